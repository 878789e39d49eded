"""1-byte Llama linears: int8 or fp8 (e4m3) weights, one scale per output channel.

Decoding at batch 1 reads every weight once per token and does almost no arithmetic with it, so its time is
the bytes of the weights over the memory bandwidth: 1-byte weights halve it. `WeightOnlyLinear` holds the
bytes and scales under the checkpoint's module names; the Llama runs them through `FusedLinear`
(rtloop.policy.linear): on the `compiled` engine decode steps use the Triton GEMV (weight-only: bytes
widened in registers) and the prefill the 8-bit tensor-core matmuls (activations quantised per token too);
elsewhere `F.linear(x, w.to(x.dtype)) * scale`: weight-only, but slower than bf16. Measured on an
H100 (profiles/bench-h100-7b.md): compiled+int8 28.6 ms and compiled+fp8 26.4 ms per predict_action
against bf16's 38.9, in 9.0 GB instead of 15.5; on an H200 25.5 and 24.2 against 29.4 (there the widening
of the bytes, not the bandwidth, limits the 1-byte GEMVs: profiles/README.md). The vision towers, projector and embeddings stay in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtloop.errors import InputError

QUANT_MODES = ("none", "int8", "fp8")
_STORAGE = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # dtype, largest magnitude


class WeightOnlyLinear(nn.Module):
    """A bias-free nn.Linear whose weight is stored in 1 byte per element with a per-row scale (forward:
    weight-only, for use on its own; inside the Llama a FusedLinear runs these tensors)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, mode: str):
        super().__init__()
        self.mode = mode
        self.register_buffer("weight", weight)  # [out, in], int8 or float8_e4m3fn
        self.register_buffer("scale", scale)  # [out], the original weight's dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scale


def quantize_weight(weight: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (1-byte weight, scale [out]) with weight ~= q * scale[:, None]."""
    dtype, top = _STORAGE[mode]
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / top
    q = w / scale[:, None]
    q = q.round().clamp(-128, 127).to(dtype) if mode == "int8" else q.to(dtype)
    return q, scale.to(weight.dtype)


def weight_format(model) -> str:
    """'none', 'int8' or 'fp8': how the model's Llama linears are stored now."""
    for module in model.language_model.modules():
        if isinstance(module, WeightOnlyLinear):
            return module.mode
    return "none"


@torch.no_grad()
def quantize_(model, mode: str) -> None:
    """Replace every nn.Linear of the Llama (attention, MLP, `lm_head`) by a WeightOnlyLinear, in place, one at
    a time (the peak is one float32 copy of one matrix). Irreversible for this model. `lm_head` is 2% of
    the bytes but read by every decode step: in 1 byte it saves 0.3 ms a call (H100), as gpt-fast's int8
    does; the embedding table (only a row of it is read), the norms, the ViTs and the projector stay."""
    if mode not in QUANT_MODES:
        raise InputError(f"unknown weight format {mode!r}; available: {', '.join(QUANT_MODES)}")
    current = weight_format(model)
    if mode == current:
        return
    if current != "none":
        raise InputError(f"the model is already quantised to {current}; load it again to use {mode}")
    lm = model.language_model
    for layer in lm.model.layers:
        # drop the fused matrices first, or they would keep every bf16 weight alive until the end
        layer.self_attn.qkv = layer.self_attn.out = layer.mlp.gate_up = layer.mlp.down = None
        for name, linear in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
            if linear.bias is not None:
                raise InputError(f"cannot quantise {name}: Llama linears have no bias")
            parent_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(parent_name), attr, WeightOnlyLinear(*quantize_weight(linear.weight, mode), mode))
            linear.weight = None  # free the bf16 matrix now, not after the loop
    lm.head = None
    lm.lm_head = WeightOnlyLinear(*quantize_weight(lm.lm_head.weight, mode), mode)
    lm.fuse_linears()


def llama_bytes_per_token(model) -> int:
    """Bytes of Llama weights one forward reads at batch 1: every matrix, scale and norm, but only one row
    of the token embedding (which is why it is left out). KV caches, mask and RoPE tables are not counted."""
    return sum(  # state_dict: each tensor once, under its checkpoint name (fused matrices are views of them)
        t.numel() * t.element_size()
        for name, t in model.language_model.state_dict().items()
        if name.endswith(("weight", "scale")) and not name.startswith("model.embed_tokens")
    )
