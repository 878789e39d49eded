"""Hand-written GPU kernels for the `compiled` engine: the batch-1 matrix-vector product every decode step is
made of, and the 8-bit matmuls of a quantised prefill.

Decode at batch 1 reads every weight once per token and does two flops with each, so a decode step takes
(bytes of weights) / (memory bandwidth) and nothing else matters. `gemv` is written for that: each program
owns BLOCK_N output rows, streams them in BLOCK_K-wide coalesced tiles (1-byte weights are widened to fp32 in
registers, so int8/fp8 weights cost half the bytes of bf16), and reduces once at the end. Autotuned per
(N, K, dtypes) on first use. `gated=True` computes SwiGLU's `silu(W_gate x) * (W_up x)` from the fused
[gate; up] matrix in the same pass, so the MLP's hidden vector is never written twice.

Prefill (~280 tokens) is a real matmul and runs on tensor cores: `int8_matmul` / `fp8_matmul` quantise the
activations on the fly (one scale per token) and call cuBLAS's 8-bit GEMMs, then apply the weights' per-row
scales. Quantising activations costs accuracy that weight-only decoding does not: on Gaussian activations
with a few 20x outlier channels (Llama-like), the relative error of a 4096x4096 product is 0.9% with int8
weights alone but 6.6% once the activations are int8 too; fp8 is 2.7% (weights) and 3.6% (both).

`TRITON_INTERPRET=1` runs the Triton kernel on the CPU (numpy, slow): the tests use it where there is no GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled engine needs CUDA (and so Triton) anyway
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether `gemv` can run on `device`."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


if triton is not None:

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, scale_ptr, y_ptr, N, K,
        HAS_SCALE: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        # y[n] = sum_k w[n, k] * x[k] * scale[n]; GATED: rows N..2N-1 of w are the "up" half, and
        # y[n] = silu(gate[n]) * up[n]
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ptrs = w_ptr + rows[:, None] * K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        if GATED:
            acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + cols
            if EVEN_N and EVEN_K:
                x = tl.load(x_ptr + kk).to(tl.float32)[None, :]
                acc += tl.load(row_ptrs + kk[None, :]).to(tl.float32) * x
                if GATED:
                    acc_up += tl.load(row_ptrs + N * K + kk[None, :]).to(tl.float32) * x
            else:
                mask = (rows[:, None] < N) & (kk[None, :] < K)
                x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)[None, :]
                acc += tl.load(row_ptrs + kk[None, :], mask=mask, other=0.0).to(tl.float32) * x
                if GATED:
                    acc_up += tl.load(row_ptrs + N * K + kk[None, :], mask=mask, other=0.0).to(tl.float32) * x
        y = tl.sum(acc, axis=1)
        row_mask = rows < N
        if HAS_SCALE:
            y *= tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.sum(acc_up, axis=1)
            if HAS_SCALE:
                up *= tl.load(scale_ptr + N + rows, mask=row_mask, other=0.0).to(tl.float32)
            y = y * tl.sigmoid(y) * up
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)

    _even = triton.heuristics({
        "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
        "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
    })
    _gemv_fixed = _even(_gemv_kernel)
    # Few rows and wide tiles: a program must keep enough bytes in flight to cover HBM latency (1-byte
    # weights want twice the columns of bf16 for the same 16-byte loads), and there must be enough programs
    # (N / BLOCK_N) to fill every SM. On an H100 the first tuning (2-16 rows, 128-1024 columns) always chose
    # the widest tile, so the set now reaches 4096 columns. Benchmarked with the L2 flushed.
    _CONFIGS = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1)
        for n in (1, 2, 4, 8)
        for k in (512, 1024, 2048, 4096)
        for w in (4, 8)
        if 1024 <= n * k <= 8192
    ] + [triton.Config({"BLOCK_N": n, "BLOCK_K": 1024}, num_warps=4, num_stages=3) for n in (2, 4)]
    _gemv_tuned = triton.autotune(configs=_CONFIGS, key=["N", "K", "HAS_SCALE", "GATED"])(_even(_gemv_kernel))


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, gated: bool) -> torch.Tensor:
    """What `gemv` computes, in plain torch (float32 accumulation)."""
    y = x.float() @ weight.float().t()
    if scale is not None:
        y = y * scale.float()
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y.to(x.dtype)


@torch.library.custom_op("rtloop::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, gated: bool) -> torch.Tensor:
    """x [..., K] holding ONE row, weight [N, K] (bf16/fp16/fp32/int8/fp8), scale [N] or None -> [..., N]
    (gated: [..., N / 2]) in x's dtype. A torch custom op, so torch.compile keeps it as one opaque call."""
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    K = weight.shape[1]
    y = torch.empty(*x.shape[:-1], n_out, device=x.device, dtype=x.dtype)
    args = (x.reshape(K), weight, scale if scale is not None else weight, y, n_out, K)
    flags = {"HAS_SCALE": scale is not None, "GATED": gated}
    if INTERPRET:  # no benchmarking without a GPU: one fixed tile, large because each program costs numpy calls
        _gemv_fixed[(triton.cdiv(n_out, 64),)](*args, **flags, BLOCK_N=64, BLOCK_K=128)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]),)](*args, **flags)
    return y


@gemv.register_fake
def _(x, weight, scale, gated):
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    return x.new_empty(*x.shape[:-1], n_out)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M > 16) float, weight [N, K] int8, scale [N] -> x @ (weight * scale).T, with x quantised to
    int8 per row (torch._int_mm: cuBLAS int8 GEMM, int32 accumulation)."""
    x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 127.0
    xq = (x.float() / x_scale).round().clamp(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, weight.t())
    return (y.float() * x_scale * scale.float()).to(x.dtype)


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float, weight [N, K] float8_e4m3fn, scale [N] -> x @ (weight * scale).T, with x quantised to
    e4m3 with one scale per row (torch._scaled_mm's row-wise scaling: fp8 tensor cores, both scales applied
    in the GEMM's epilogue). Hopper and the CPU have row-wise scaling; elsewhere (Ada, e.g. the RTX 4090)
    one scale per tensor, and the weights' scales after."""
    rowwise = x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (9, 0)
    x_max = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    x_scale = x_max.float().clamp(min=1e-12) / 448.0
    xq = (x.float() / x_scale).to(torch.float8_e4m3fn)
    if rowwise:
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.float()[None, :], out_dtype=x.dtype,
                                use_fast_accum=True)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
    return (y.float() * scale.float()).to(x.dtype)
