"""1-byte Llama linears: int8 or fp8 (e4m3) weights, one scale per output channel.

Decoding at batch 1 reads every weight once per token and does almost no arithmetic with it, so its time is
the bytes of the weights over the memory bandwidth: 1-byte weights halve it. `quantize_` converts every
Llama `Linear` (rtloop.policy.linear) in place, the fused [q; k; v] and [gate; up] included; state_dict()
then holds `<name>.weight` (1 byte) and `<name>.scale` under the checkpoint's names. How they run is the
engine's ops (rtloop.policy.ops): on `compiled`, decode steps on the Triton GEMV (weight-only: bytes widened
in registers) and the prefill on 8-bit tensor cores (activations quantised per token too); elsewhere
`F.linear(x, w.to(x.dtype)) * scale`, weight-only but slower than bf16. The vision towers, projector and
embeddings stay in bf16. Measured latencies and memory: README, "Performance".
"""

from __future__ import annotations

import torch

from rtloop.errors import InputError
from rtloop.policy.linear import Linear

QUANT_MODES = ("none", "int8", "fp8")
_STORAGE = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # dtype, largest magnitude


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
    return model.language_model.lm_head.format


@torch.no_grad()
def quantize_(model, mode: str) -> None:
    """Convert every Linear of the Llama (attention, MLP, `lm_head`) to `mode`, in place, one at a time (the
    peak is one float32 copy of one matrix). Irreversible for this model. `lm_head` is 2% of the bytes but
    read by every decode step, so it goes to 1 byte too, as gpt-fast's int8 does; the embedding table (only
    a row of it is read), the norms, the ViTs and the projector stay."""
    if mode not in QUANT_MODES:
        raise InputError(f"unknown weight format {mode!r}; available: {', '.join(QUANT_MODES)}")
    current = weight_format(model)
    if mode == current:
        return
    if current != "none":
        raise InputError(f"the model is already quantised to {current}; load it again to use {mode}")
    for module in model.language_model.modules():
        if isinstance(module, Linear):
            module.quantize_(mode)


def llama_bytes_per_token(model) -> int:
    """Bytes of Llama weights one forward reads at batch 1: every matrix, scale and norm, but only one row
    of the token embedding (which is why it is left out). KV caches, mask and RoPE tables are not counted."""
    return sum(  # state_dict: each tensor once, under its checkpoint name (views of the fused matrices)
        t.numel() * t.element_size()
        for name, t in model.language_model.state_dict().items()
        if name.endswith(("weight", "scale")) and not name.startswith("model.embed_tokens")
    )
