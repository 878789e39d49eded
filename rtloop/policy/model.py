"""OpenVLA: two ViTs, a fused-GELU projector and a Llama decoder, with the official parameter names.

`state_dict()` keys equal the official checkpoint's: `vision_backbone.featurizer.*` (DINOv2),
`vision_backbone.fused_featurizer.*` (SigLIP), `projector.fc{1,2,3}.*`, `language_model.model.*`,
`language_model.lm_head.weight`.

The LLM input is `[BOS embedding, 256 patch embeddings, the rest of the prompt embeddings]`. Engines build on
`embed_images`, `prefill` and `decode_step`; `generate_action_tokens` is the plain eager loop over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtloop.policy.config import OpenVLAConfig
from rtloop.policy.llama import Llama
from rtloop.policy.vit import VisionTransformer


class VisionBackbone(nn.Module):
    def __init__(self, config: OpenVLAConfig):
        super().__init__()
        self.featurizer = VisionTransformer(config.vits[0])  # DINOv2, pixel channels 0:3
        self.fused_featurizer = VisionTransformer(config.vits[1])  # SigLIP, pixel channels 3:6

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 6, H, W] -> patch features [B, num_patches, dino width + siglip width]."""
        return torch.cat([self.dino(pixel_values), self.siglip(pixel_values)], dim=2)

    def dino(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.featurizer(pixel_values[:, :3])

    def siglip(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fused_featurizer(pixel_values[:, 3:])


class Projector(nn.Module):
    """`fused-gelu-mlp`: vision_dim -> 4 * vision_dim -> llm_dim -> llm_dim, GELU between."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class OpenVLA(nn.Module):
    def __init__(self, config: OpenVLAConfig):
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config)
        self.projector = Projector(config.vision_dim, config.llm.hidden_size)
        self.language_model = Llama(config.llm)

    def setup_caches(self, max_batch: int, max_seq_len: int, device=None, dtype=None) -> None:
        self.language_model.setup_caches(max_batch, max_seq_len, device, dtype)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 6, 224, 224] -> projected patch embeddings [B, 256, llm_dim]."""
        pixel_values = pixel_values.to(self.projector.fc1.weight.dtype)
        return self.projector(self.vision_backbone(pixel_values))

    def prefill(self, input_ids: torch.Tensor, patch_embeds: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, T] (BOS first) and patch embeddings [B, P, D] -> logits [B, vocab] of the last position.

        Fills the KV cache at positions 0 .. T + P - 1.
        """
        token_embeds = self.language_model.model.embed_tokens(input_ids)
        x = torch.cat([token_embeds[:, :1], patch_embeds.to(token_embeds.dtype), token_embeds[:, 1:]], dim=1)
        last = torch.full((1,), x.shape[1] - 1, device=x.device)
        hidden = self.language_model.hidden_states(x, rows=last)
        return self.language_model.logits(hidden[:, -1])

    def decode_step(self, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """token [B, 1] at position input_pos [1] -> logits [B, vocab]."""
        return self.language_model(input_pos, input_ids=token)[:, -1]

    @torch.no_grad()
    def generate_action_tokens(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, n_tokens: int = 7
    ) -> torch.Tensor:
        """Greedy decoding: 1 prefill + (n_tokens - 1) decode steps -> token ids [B, n_tokens] on the device.

        Never syncs with the device; (re)allocates the static cache only when it is too small. no_grad, not
        inference_mode: caches made here must stay writable by engines that run outside inference mode.
        """
        B, T = input_ids.shape
        prefix_len = T + self.config.num_patches
        needed = -(-(prefix_len + n_tokens) // 64) * 64  # round up so nearby prompt lengths share one cache
        lm = self.language_model
        if lm.max_batch < B or lm.max_seq_len < prefix_len + n_tokens:
            self.setup_caches(B, needed)
        tokens = torch.empty(B, n_tokens, dtype=torch.long, device=input_ids.device)
        logits = self.prefill(input_ids, self.embed_images(pixel_values))
        tokens[:, 0] = logits.argmax(dim=-1)
        input_pos = torch.tensor([prefix_len], device=input_ids.device)
        for i in range(1, n_tokens):
            logits = self.decode_step(tokens[:, i - 1 : i], input_pos)
            tokens[:, i] = logits.argmax(dim=-1)
            input_pos += 1
        return tokens
