"""The Llama's linear weights: one copy, fused where several matrices read the same input, from load on.

The checkpoint names every matrix (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`, ...), and
`state_dict()` must keep those names. The model instead holds [q; k; v] as one `Linear` (`qkv_proj`) and
[gate; up] as another (`gate_up_proj`), built once when the weights load: `fuse_parts` registers the two
hooks that make the module speak the checkpoint's layout both ways. `state_dict()` gives each part under its
own name, as a view of the fused matrix (so nothing is copied, and transformers' modules can alias it);
`load_state_dict()` takes the parts and concatenates them. Nothing re-fuses later: quantisation converts
the fused matrix in place (`Linear.quantize_`).

How a `Linear` runs (plain PyTorch, a Triton GEMV, an 8-bit GEMM) is not its business: the engine passes
the Llama its ops (rtloop.policy.ops).
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHT_FORMATS = {torch.int8: "int8", torch.float8_e4m3fn: "fp8"}  # 1-byte dtypes; anything else: "none"


class Linear(nn.Module):
    """A bias-free linear layer: `weight` [out, in] in the model's dtype, or (after `quantize_`) in 1 byte
    with `scale` [out], one scale per output row (weight ~= q * scale[:, None])."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.scale: torch.Tensor | None
        self.register_buffer("scale", None)

    @property
    def format(self) -> str:
        return WEIGHT_FORMATS.get(self.weight.dtype, "none")

    @torch.no_grad()
    def quantize_(self, mode: str) -> None:
        """Replace the float weight by 1-byte values and per-row scales (rtloop.policy.quant)."""
        from rtloop.policy.quant import quantize_weight

        q, scale = quantize_weight(self.weight, mode)
        del self.weight  # the parameter; the buffer below replaces it
        self.register_buffer("weight", q)
        self.scale = scale


def fuse_parts(module: nn.Module, fused: str, parts: dict[str, int]) -> None:
    """`module.<fused>` (a Linear) holds the checkpoint's `parts` (name -> rows, in order) stacked: let
    state_dict() split it into `<part>.weight` (and `.scale`) views, and load_state_dict() fuse them."""
    module.fused_parts = (fused, parts)
    module.register_state_dict_post_hook(_split_hook)
    module.register_load_state_dict_pre_hook(_fuse_hook)


def _split_hook(module, destination, prefix, local_metadata):
    fused, parts = module.fused_parts
    found = {f"{prefix}{fused}.{suffix}": suffix for suffix in ("weight", "scale")}
    if not any(k in destination for k in found):
        return
    items = list(destination.items())  # rebuilt in order: the parts stand where the fused tensor stood
    destination.clear()
    for key, tensor in items:
        if key not in found:
            destination[key] = tensor
            continue
        for name, piece in zip(parts, tensor.split(list(parts.values()))):
            destination[f"{prefix}{name}.{found[key]}"] = piece


def _fuse_hook(module, state_dict, prefix, *args):
    fuse_state_dict_(state_dict, prefix, *module.fused_parts)


def fuse_state_dict_(state: dict, prefix: str, fused: str, parts: dict[str, int]) -> None:
    """In `state`, replace the parts' tensors under `prefix` by their concatenation (a no-op where the
    parts are absent). Pops each part as it goes, so the caller's dict stops holding it."""
    for suffix in ("weight", "scale"):
        keys = [f"{prefix}{name}.{suffix}" for name in parts]
        if all(k in state for k in keys):
            state[f"{prefix}{fused}.{suffix}"] = torch.cat([state.pop(k) for k in keys])


def fuse_checkpoint_state_(model: nn.Module, state: dict) -> None:
    """Fuse a whole model's checkpoint `state` in place, one module at a time (the loader calls this before
    load_state_dict, so the unfused and the fused copies of a matrix coexist for one module at most)."""
    for name, module in model.named_modules():
        if hasattr(module, "fused_parts"):
            fuse_state_dict_(state, f"{name}." if name else "", *module.fused_parts)
