"""The ViT of timm (`timm.models.vision_transformer.VisionTransformer`), reduced to what OpenVLA runs.

Parameter names equal timm's, so a timm state dict (and OpenVLA's `vision_backbone.featurizer.*` /
`vision_backbone.fused_featurizer.*`) loads as is, except LayerScale: the OpenVLA checkpoint stores timm's
`gamma` as `scale_factor` (Hugging Face renames parameters called `gamma` on load, so OpenVLA renamed it).

OpenVLA replaces each ViT's forward with `get_intermediate_layers(n={depth - 2})`: the output of the
second-to-last block, no final norm, prefix tokens (CLS, registers) dropped. `forward` here returns exactly
that, and never runs the last block, the final `norm` or SigLIP's `attn_pool` head (their weights are in
the checkpoint, so the modules exist for a strict load).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtloop.policy.config import VitArgs


class PatchEmbed(nn.Module):
    def __init__(self, args: VitArgs):
        super().__init__()
        self.patch = args.patch
        self.proj = nn.Conv2d(3, args.width, kernel_size=args.patch, stride=args.patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, width]: the stride-p convolution as the matmul it is. cuDNN runs the
        convolution as a layout change, then a 3-channel implicit GEMM (slower, as measured: README,
        "Performance"); unfolded into [B, N, C p p] rows it is one copy and one small GEMM."""
        B, C, H, W = x.shape
        p = self.patch
        patches = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
        return F.linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, args: VitArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.width, eps=args.eps)
        self.attn = Attention(args.width, args.heads)
        self.ls1 = LayerScale(args.width) if args.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(args.width, eps=args.eps)
        self.mlp = Mlp(args.width, args.mlp_dim, args.act)
        self.ls2 = LayerScale(args.width) if args.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """SigLIP's MAP head, parameters only: OpenVLA never runs it, but the checkpoint carries its weights."""

    def __init__(self, args: VitArgs):
        super().__init__()
        dim = args.width
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=args.eps)
        self.mlp = Mlp(dim, args.mlp_dim, args.act)


class VisionTransformer(nn.Module):
    def __init__(self, args: VitArgs):
        super().__init__()
        self.args = args
        if args.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, args.width))
        if args.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, args.reg_tokens, args.width))
        embed_len = args.num_patches + (0 if args.no_embed_class else args.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, args.width))
        self.patch_embed = PatchEmbed(args)
        self.blocks = nn.ModuleList([Block(args) for _ in range(args.depth)])
        self.norm = nn.LayerNorm(args.width, eps=args.eps)
        if args.attn_pool:
            self.attn_pool = AttentionPoolLatent(args)

    def _prefix_tokens(self, batch: int) -> list[torch.Tensor]:
        tokens = []
        if self.args.class_token:
            tokens.append(self.cls_token.expand(batch, -1, -1))
        if self.args.reg_tokens:
            tokens.append(self.reg_token.expand(batch, -1, -1))
        return tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, image, image] -> patch features of the second-to-last block [B, num_patches, width]."""
        x = self.patch_embed(pixels)
        prefix = self._prefix_tokens(x.shape[0])
        # timm `_pos_embed`: with no_embed_class the position embedding covers the patches only and the
        # prefix tokens (CLS, registers) are prepended after it is added; otherwise it covers everything.
        if self.args.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        for block in self.blocks[:-1]:
            x = block(x)
        return x[:, self.args.num_prefix_tokens:]
