"""OpenVLA: two ViTs, a fused-GELU projector and a Llama decoder, with the official parameter names.

`state_dict()` keys equal the official checkpoint's: `vision_backbone.featurizer.*` (DINOv2),
`vision_backbone.fused_featurizer.*` (SigLIP), `projector.fc{1,2,3}.*`, `language_model.model.*`,
`language_model.lm_head.weight`.

The LLM input is `[BOS embedding, 256 patch embeddings, the rest of the prompt embeddings]`. Engines build on
`embed_images`, `prefill` and `decode`, strung together by the one `generate` loop; `generate_action_tokens`
runs it eagerly on prompts of one length.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rtloop.policy.config import OpenVLAConfig
from rtloop.policy.llama import Llama
from rtloop.policy.ops import TORCH_OPS, Ops
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


class Stages(NamedTuple):
    """The three steps `generate` strings together, as an engine runs them (plain, two-stream, compiled)."""

    encode: Callable  # pixel_values [B, 6, H, W] -> patch embeddings [B, P, llm_dim]
    prefill: Callable  # (input_ids [B, T], patches, last [B]) -> (float32 logits [B, vocab], tokens [B, 1])
    decode: Callable  # (tokens [B, 1], input_pos [B]) -> the same


def generate(stages: Stages, pixel_values, input_ids, last, tokens, logits=None) -> None:
    """THE generate loop, for every engine: greedy decoding of tokens.shape[1] tokens per frame, 1 prefill
    and the rest decode steps, into `tokens` [B, n] (and the float32 `logits` [B, n, vocab] each token is the
    argmax of, when given). `input_ids` [B, T] are right-padded prompts, BOS first; `last` [B] is each
    frame's last real position in the LLM's sequence (BOS + patches + its own prompt, minus one), so frame
    b's first generated token goes to position last[b] + 1: its own prompt length, whatever the padding
    (padding sits after the real prompt: causal attention never lets a real position see it, and the decode
    steps overwrite it in the cache). Never syncs with the device, so it can be captured in a CUDA graph."""
    patches = stages.encode(pixel_values)
    step_logits, token = stages.prefill(input_ids, patches, last)
    for i in range(tokens.shape[1]):
        if i > 0:
            step_logits, token = stages.decode(token, last + i)
        tokens[:, i : i + 1].copy_(token)
        if logits is not None:
            logits[:, i].copy_(step_logits)


class OpenVLA(nn.Module):
    def __init__(self, config: OpenVLAConfig):
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config)
        self.projector = Projector(config.vision_dim, config.llm.hidden_size)
        self.language_model = Llama(config.llm)

    def setup_caches(self, max_batch: int, max_seq_len: int, device=None, dtype=None) -> None:
        self.language_model.setup_caches(max_batch, max_seq_len, device, dtype)

    def ensure_caches(self, batch: int, seq_len: int) -> None:
        """Caches for at least `batch` frames of `seq_len` positions, (re)allocated only when too small
        (rounded up to 64 positions, so nearby prompt lengths share one)."""
        lm = self.language_model
        if lm.max_batch < batch or lm.max_seq_len < seq_len:
            self.setup_caches(max(batch, lm.max_batch), max(-(-seq_len // 64) * 64, lm.max_seq_len))

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 6, 224, 224] -> projected patch embeddings [B, 256, llm_dim]."""
        pixel_values = pixel_values.to(self.projector.fc1.weight.dtype)
        return self.projector(self.vision_backbone(pixel_values))

    def prefill(self, input_ids: torch.Tensor, patches: torch.Tensor, last: torch.Tensor,
                ops: Ops = TORCH_OPS) -> torch.Tensor:
        """Prompt ids [B, T] (BOS first, right-padded) and patch embeddings [B, P, D] -> logits [B, vocab] at
        each frame's position last[b]. Fills the KV cache at positions 0 .. T + P - 1."""
        token_embeds = self.language_model.embed(input_ids)
        x = torch.cat([token_embeds[:, :1], patches.to(token_embeds.dtype), token_embeds[:, 1:]], dim=1)
        return self.language_model.prefill(x, last, ops)[:, 0]

    def decode(self, token: torch.Tensor, input_pos: torch.Tensor, ops: Ops = TORCH_OPS) -> torch.Tensor:
        """token [B, 1], frame b at position input_pos[b] -> logits [B, vocab]."""
        return self.language_model.decode(self.language_model.embed(token), input_pos, ops)

    def stages(self, ops: Ops = TORCH_OPS) -> Stages:
        """The plain stages on `ops` (the eager engine's)."""
        return Stages(self.embed_images, partial(argmax_step, self.prefill, ops=ops),
                      partial(argmax_step, self.decode, ops=ops))

    @torch.no_grad()
    def generate_action_tokens(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, n_tokens: int = 7,
                               ops: Ops = TORCH_OPS) -> torch.Tensor:
        """Greedy decoding of prompts of one length [B, T] -> token ids [B, n_tokens] on the device, eagerly.
        no_grad, not inference_mode: caches made here must stay writable by engines that run outside it."""
        B, T = input_ids.shape
        prefix_len = T + self.config.num_patches
        self.ensure_caches(B, prefix_len + n_tokens)
        tokens = torch.empty(B, n_tokens, dtype=torch.long, device=input_ids.device)
        last = torch.full((B,), prefix_len - 1, device=input_ids.device)
        generate(self.stages(ops), pixel_values, input_ids, last, tokens)
        return tokens


def argmax_step(step: Callable, *args, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill or decode step -> (its logits in float32, their argmax [B, 1]): what `generate` records."""
    logits = step(*args, ops=ops)
    return logits.float(), logits.argmax(dim=-1, keepdim=True)
