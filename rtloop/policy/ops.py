"""How the Llama's prefill and decode run: the ops an engine passes in (the model itself never chooses).

An `Ops` is three functions:
- `prefill_linear(x, linear, norm=None, residual=None, gated=False)`: `residual + f(linear(norm(x)))`, f
  SwiGLU when `gated` (silu of the first half times the second), on a many-row input;
- `decode_linear(...)`: the same on one row per frame: the decode steps, and the prefill's last layer after
  its attention (only each frame's last position goes on: `Llama.prefill`) and its lm_head;
- `decode_attention(qkv, input_pos, cache, n_heads, cos, sin, causal_mask)`: a decode token's attention
  from its fused [q; k; v] [B, 1, *] at per-frame positions input_pos [B]: RoPE, the cache write, and the
  attention over the cache -> [B, H, 1, head_dim]; cos/sin are the whole RoPE tables, causal_mask the bool
  [S, S] table.

`TORCH_OPS` is plain PyTorch (eager, graphed, and what runs on the CPU): 1-byte weights are widened to the
activation dtype first (weight-only quantisation: exact, but slower than bf16). `kernel_ops(options, batch)`
is the compiled engine's: at batch 1 every decode linear is one Triton GEMV with its RMSNorm and residual
fused, and the decode attention one kernel (rtloop.policy.kernels); quantised prefills run on 8-bit tensor
cores at any batch. The GEMV and the decode attention kernel are written for one row, so at batch > 1 a
decode linear on 1-byte weights is `kernels.few_rows_matmul` (each weight tile read once for the batch),
on bf16 weights cuBLAS's matmul, and the decode attention plain torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from rtloop.policy import kernels


@dataclass(frozen=True)
class Ops:
    prefill_linear: Callable
    decode_linear: Callable
    decode_attention: Callable


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _epilogue(y, gated, residual):
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


def torch_linear(x, linear, norm=None, residual=None, gated=False):
    if norm is not None:
        x = norm(x)
    if linear.scale is None:
        y = F.linear(x, linear.weight)
    else:
        y = F.linear(x, linear.weight.to(x.dtype)) * linear.scale
    return _epilogue(y, gated, residual)


def split_heads(qkv: torch.Tensor, n_heads: int, n_kv_heads: int):
    """[B, T, (H + 2 Hkv) D] -> q [B, H, T, D], k and v [B, Hkv, T, D]."""
    B, T, width = qkv.shape
    head_dim = width // (n_heads + 2 * n_kv_heads)
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    return (t.view(B, T, -1, head_dim).transpose(1, 2) for t in (q, k, v))


def repeat_kv(k: torch.Tensor, v: torch.Tensor, n_heads: int):
    if k.shape[1] != n_heads:
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    return k, v


def torch_decode_attention(qkv, input_pos, cache, n_heads, cos, sin, causal_mask):
    B = qkv.shape[0]
    q, k, v = split_heads(qkv, n_heads, cache.k_cache.shape[1])
    cos = cos[input_pos].to(qkv.dtype)[:, None, None]  # [B, 1, 1, D]: each frame at its own position
    sin = sin[input_pos].to(qkv.dtype)[:, None, None]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k_cache, v_cache = cache.k_cache[:B], cache.v_cache[:B]
    frames = torch.arange(B, device=qkv.device)
    k_cache[frames, :, input_pos] = k[:, :, 0]
    v_cache[frames, :, input_pos] = v[:, :, 0]
    k_all, v_all = repeat_kv(k_cache, v_cache, n_heads)
    mask = causal_mask[input_pos][:, None, None]  # [B, 1, 1, S]: positions <= each frame's own
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


TORCH_OPS = Ops(torch_linear, torch_linear, torch_decode_attention)


def gemv_linear(x, linear, norm=None, residual=None, gated=False, *, options: kernels.KernelOptions):
    norm_weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    tile = None if options.autotune else list(options.tile)
    return kernels.gemv(x, linear.weight, linear.scale, gated, norm_weight, eps, residual,
                        pdl=options.pdl, tile=tile, int8_bits=options.int8_bits)


def fits_8bit_gemm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """cuBLAS's 8-bit GEMMs take only aligned shapes (7B's always are; the tiny test model's are not)."""
    M, (N, K) = x.shape[:-1].numel(), weight.shape
    if weight.dtype == torch.int8:
        return M > 16 and K % 8 == 0 and N % 8 == 0
    return M % 16 == 0 and K % 16 == 0 and N % 16 == 0


def _on_rows(matmul, x, norm, residual, gated):
    """`residual + f(matmul(norm(x)))` with matmul taking x's rows as one [M, K] matrix."""
    if norm is not None:
        x = norm(x)
    y = matmul(x.reshape(-1, x.shape[-1]))
    return _epilogue(y.view(*x.shape[:-1], -1), gated, residual)


def quantised_prefill_linear(x, linear, norm=None, residual=None, gated=False, *, options: kernels.KernelOptions):
    """1-byte weights on 8-bit tensor cores, activations quantised per token; otherwise as torch_linear."""
    if linear.scale is None or not fits_8bit_gemm(x, linear.weight):
        return torch_linear(x, linear, norm, residual, gated)
    if linear.weight.dtype == torch.int8:
        matmul = partial(kernels.int8_matmul, weight=linear.weight, scale=linear.scale)
    else:
        matmul = partial(kernels.fp8_matmul, weight=linear.weight, scale=linear.scale, options=options)
    return _on_rows(matmul, x, norm, residual, gated)


def few_rows_linear(x, linear, norm=None, residual=None, gated=False, *, options: kernels.KernelOptions):
    """A batch's decode on 1-byte weights: each weight tile read once for every frame (kernels.few_rows_matmul);
    bf16 weights go to cuBLAS, which reads them once already."""
    if linear.scale is None:
        return torch_linear(x, linear, norm, residual, gated)
    tile = None if options.autotune else list(kernels.FEW_ROWS_TILE)
    matmul = partial(kernels.few_rows_matmul, weight=linear.weight, scale=linear.scale, tile=tile,
                     int8_bits=options.int8_bits)
    return _on_rows(matmul, x, norm, residual, gated)


def kernel_decode_attention(qkv, input_pos, cache, n_heads, cos, sin, causal_mask, *, options: kernels.KernelOptions):
    return kernels.decode_attention(qkv, cos, sin, input_pos, cache.k_cache, cache.v_cache, n_heads, options.pdl)


def kernel_ops(options: kernels.KernelOptions, batch: int = 1) -> Ops:
    """The compiled engine's ops for a batch of `batch` frames; `options` resolved (KernelOptions.resolve)."""
    prefill = partial(quantised_prefill_linear, options=options)
    if batch == 1:
        return Ops(prefill, partial(gemv_linear, options=options), partial(kernel_decode_attention, options=options))
    return Ops(prefill, partial(few_rows_linear, options=options), torch_decode_attention)
