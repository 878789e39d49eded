"""How the Llama's linears run: several matrices that read the same input fused into one, and batch-1 steps
on a hand-written kernel when the engine asks for it.

The checkpoint names every matrix (`q_proj`, `k_proj`, `v_proj`, `gate_proj`, `up_proj`, ...), and
`state_dict()` must keep those names. A `FusedLinear` concatenates the matrices of one input ([q; k; v],
[gate; up]) and re-points the named modules at slices of the result, so the weights exist once, under their
own names, and one kernel reads them all. `Llama.fuse_linears` builds them (again, if quantisation replaced
the named modules); moving the model with `.to()` afterwards would break the aliasing, so fuse on the
device the model runs on (`setup_caches` does).

With `use_kernels` (the `compiled` engine, CUDA) a one-row input goes to `rtloop.policy.kernels.gemv`, and a
quantised many-row input (the prefill) to the 8-bit tensor-core matmuls (`kernels.fp8_matmul` may run a
~288-row GEMM's last rows on a side stream); otherwise plain PyTorch, where
1-byte weights are widened to the activation dtype first (weight-only quantisation, exact but slow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtloop.policy import kernels


class FusedLinear(nn.Module):
    def __init__(self, parts: list[nn.Module], gated: bool = False, use_kernels: bool = False):
        """`parts`: bias-free nn.Linear or WeightOnlyLinear modules of one input, all in one format.
        `gated`: exactly two parts, gate and up; forward returns silu(gate(x)) * up(x)."""
        super().__init__()
        scales = [getattr(p, "scale", None) for p in parts]
        if len(parts) == 1:
            weight, scale = parts[0].weight, scales[0]
        else:
            weight = torch.cat([p.weight for p in parts])
            scale = None if scales[0] is None else torch.cat(scales)
            offset = 0
            for p in parts:  # the named modules become views of the fused matrix: one copy in memory
                n = p.weight.shape[0]
                if isinstance(p, nn.Linear):
                    p.weight = nn.Parameter(weight[offset : offset + n], requires_grad=False)
                else:
                    p.weight, p.scale = weight[offset : offset + n], scale[offset : offset + n]
                offset += n
        if gated and len(parts) != 2:
            raise ValueError("a gated FusedLinear takes exactly two parts: gate and up")
        self.register_buffer("weight", weight, persistent=False)  # not in state_dict: the parts are
        self.register_buffer("scale", scale, persistent=False)
        self.gated = gated
        self.use_kernels = use_kernels
        self.sources = self._sources(parts)

    @staticmethod
    def _sources(parts: list[nn.Module]) -> tuple[int, ...]:
        return tuple(p.weight.data_ptr() for p in parts)

    def is_built_from(self, parts: list[nn.Module]) -> bool:
        """False once any part has been replaced (quantisation) or re-assigned (load_state_dict assign=True)."""
        return self._sources(parts) == self.sources

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """`residual + self(norm(x))`, each part optional. `norm` is an RMSNorm (`weight`, `eps`): on the
        kernel path both run inside the GEMV, which saves two kernels per norm in every decode step."""
        if self.use_kernels and x.shape[:-1].numel() == 1:
            norm_weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
            return kernels.gemv(x, self.weight, self.scale, self.gated, norm_weight, eps, residual)
        if norm is not None:
            x = norm(x)
        if self.scale is None:
            y = F.linear(x, self.weight)
        elif self.use_kernels and self._fits_8bit_gemm(x):
            y = self._quantised_matmul(x)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        if self.gated:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        return y if residual is None else residual + y

    def _fits_8bit_gemm(self, x: torch.Tensor) -> bool:
        """cuBLAS's 8-bit GEMMs take only aligned shapes (7B's always are; the tiny test model's are not)."""
        M, (N, K) = x.shape[:-1].numel(), self.weight.shape
        if self.weight.dtype == torch.int8:
            return M > 16 and K % 8 == 0 and N % 8 == 0
        return M % 16 == 0 and K % 16 == 0 and N % 16 == 0

    def _quantised_matmul(self, x: torch.Tensor) -> torch.Tensor:
        matmul = kernels.int8_matmul if self.weight.dtype == torch.int8 else kernels.fp8_matmul
        y = matmul(x.reshape(-1, x.shape[-1]), self.weight, self.scale)
        return y.view(*x.shape[:-1], -1)
