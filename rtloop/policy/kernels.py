"""Hand-written GPU kernels for the `compiled` engine: the batch-1 matrix-vector product every decode step is
made of, and the 8-bit matmuls of a quantised prefill.

Decode at batch 1 reads every weight once per token and does two flops with each, so a decode step takes
(bytes of weights) / (memory bandwidth) and nothing else matters. `gemv` is written for that: each program
owns BLOCK_N output rows, streams them in BLOCK_K-wide coalesced tiles (1-byte weights are widened to fp32 in
registers, so int8/fp8 weights cost half the bytes of bf16), and reduces once at the end (or, for tiles
that reduce as they go, per tile). Autotuned per (N, K, dtypes, flags) on first use. `gated=True` computes SwiGLU's `silu(W_gate x) * (W_up x)` from the
fused [gate; up] matrix in the same pass, so the MLP's hidden vector is never written twice; `norm` runs
the RMSNorm before it and `residual` the add after it in the same pass too. What is left of a decode layer
is one more kernel, `decode_attention`: RoPE on the query and the new key, the cache write, and one query
over the cache, split into chunks of keys that one program each loads at once.

On Hopper both are launched as programmatic dependent launches (PDL): the GPU starts a kernel while the one
before it finishes; the kernel loads what that one does not write (its weights, the cached keys and values)
and then waits for it in `gdc_wait`. Every kernel waits before it triggers its own dependents, so a kernel
that starts early can only overlap its direct predecessor.

Prefill (~280 tokens) is a real matmul and runs on tensor cores: `int8_matmul` / `fp8_matmul` quantise the
activations on the fly (one scale per token) and call cuBLAS's 8-bit GEMMs, then apply the weights' per-row
scales. Quantising activations costs accuracy that weight-only decoding does not (README, "Performance",
has the measured errors). A ~288-row fp8 GEMM may run its last rows on a side stream (`prefill_split`,
`prefill_fp8_matmul`), where it times faster that way.

How they run is explicit, never read from the environment: `KernelOptions` (autotuning, PDL, the prefill
split, and the architecture whose code paths to take) is an engine option and a `rtloop bench`/`run` flag,
resolved against the device by `KernelOptions.resolve`. Measured effects of each are in README
("Performance") and profiles/README.md.

`TRITON_INTERPRET=1` (Triton's own switch) runs the Triton kernel on the CPU (numpy, slow): the tests use it
where there is no GPU.
"""

from __future__ import annotations

import os
from functools import partial

import torch

from rtloop.policy.buckets import MAX_BATCH
from rtloop.policy.kernel_options import FIXED_TILE, KernelOptions  # noqa: F401  (FIXED_TILE: for scripts)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled engine needs CUDA (and so Triton) anyway
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's own switch, read by Triton too


def available(device: torch.device) -> bool:
    """Whether `gemv` can run on `device`."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


# What engines use when given no options. Only a test harness replaces it (tests/conftest.py: autotune off).
DEFAULT_OPTIONS = KernelOptions()


if triton is not None:

    @triton.jit
    def _weight_tile(row_ptrs, rows, kk, N, K, EVEN: tl.constexpr):
        if EVEN:
            return tl.load(row_ptrs + kk[None, :])
        return tl.load(row_ptrs + kk[None, :], mask=(rows[:, None] < N) & (kk[None, :] < K), other=0.0)

    @triton.jit
    def _widen(w, INT8_BITS: tl.constexpr):
        """Weights to float32. INT8_BITS: int8 by float bit arithmetic, not I2F, a quarter-rate instruction that
        int8 weights streaming at full bandwidth keep busy; the same trick for fp8 e4m3 measured slower than
        Hopper's packed e4m3x2 conversion, so fp8 converts (both measured: profiles/gemv-h100.json,
        scripts/gemv_bench.py)."""
        if INT8_BITS:  # the float with bits 0x4B000080 + w is 2^23 + 128 + w exactly
            return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        return w.to(tl.float32)

    @triton.jit
    def _gemv_step(acc, acc_up, sum_sq, w, w_up, x_ptr, norm_ptr, kk, K, GATED: tl.constexpr,
                   HAS_NORM: tl.constexpr, EVEN_K: tl.constexpr, INT8_BITS: tl.constexpr, ROW_SUMS: tl.constexpr):
        """One BLOCK_K-wide tile: x (normed: times the norm weight, its squares summed) times the weights."""
        if EVEN_K:
            x = tl.load(x_ptr + kk).to(tl.float32)
        else:
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        if HAS_NORM:
            sum_sq += x * x
            if EVEN_K:
                x *= tl.load(norm_ptr + kk).to(tl.float32)
            else:
                x *= tl.load(norm_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        # ROW_SUMS: reduce each tile to its rows now (acc [BLOCK_N]), not at the end (acc [BLOCK_N, BLOCK_K]),
        # so a wide tile of 1-byte weights does not also hold four bytes of accumulator per weight
        if ROW_SUMS:
            acc += tl.sum(_widen(w, INT8_BITS) * x[None, :], axis=1)
            if GATED:
                acc_up += tl.sum(_widen(w_up, INT8_BITS) * x[None, :], axis=1)
        else:
            acc += _widen(w, INT8_BITS) * x[None, :]
            if GATED:
                acc_up += _widen(w_up, INT8_BITS) * x[None, :]
        return acc, acc_up, sum_sq

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, scale_ptr, norm_ptr, residual_ptr, y_ptr, N, K, eps,
        HAS_SCALE: tl.constexpr, GATED: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
        USE_PDL: tl.constexpr, INT8_BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        ROW_SUMS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        # y[n] = sum_k w[n, k] * x[k] * scale[n]; GATED: rows N..2N-1 of w are the "up" half, and
        # y[n] = silu(gate[n]) * up[n]. HAS_NORM: x is first RMS-normalised and scaled by norm[k]; the
        # 1/rms factor is the same for every k, so it is summed alongside and applied once at the end.
        # HAS_RESIDUAL: y = residual + y, with y rounded to the output dtype first (as the unfused add).
        # USE_PDL (launched as a programmatic dependent launch, Hopper+): this kernel may start while the one
        # before it (which wrote x, and maybe the residual) still runs. The weights and scales are never
        # written, so the first weight tile is loaded before gdc_wait, hiding the ramp-up every launch pays;
        # everything else is read, and all is written, after it.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        row_ptrs = w_ptr + rows[:, None] * K
        row_mask = rows < N
        EVEN: tl.constexpr = EVEN_N and EVEN_K
        if ROW_SUMS:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_up = acc
        sum_sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            if GATED:
                scale_up = tl.load(scale_ptr + N + rows, mask=row_mask, other=0.0).to(tl.float32)
        start = 0
        if USE_PDL:
            w = _weight_tile(row_ptrs, rows, cols, N, K, EVEN)
            w_up = w
            if GATED:
                w_up = _weight_tile(row_ptrs + N * K, rows, cols, N, K, EVEN)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()  # after the wait: whatever follows may assume x's writer done
            acc, acc_up, sum_sq = _gemv_step(acc, acc_up, sum_sq, w, w_up, x_ptr, norm_ptr, cols, K,
                                             GATED, HAS_NORM, EVEN_K, INT8_BITS, ROW_SUMS)
            start = BLOCK_K
        if HAS_RESIDUAL:  # loaded before the loop, so its latency hides behind it
            residual = tl.load(residual_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        for k in range(start, K, BLOCK_K):
            kk = k + cols
            w = _weight_tile(row_ptrs, rows, kk, N, K, EVEN)
            w_up = w
            if GATED:
                w_up = _weight_tile(row_ptrs + N * K, rows, kk, N, K, EVEN)
            acc, acc_up, sum_sq = _gemv_step(acc, acc_up, sum_sq, w, w_up, x_ptr, norm_ptr, kk, K,
                                             GATED, HAS_NORM, EVEN_K, INT8_BITS, ROW_SUMS)
        y = acc if ROW_SUMS else tl.sum(acc, axis=1)
        if HAS_NORM:
            inv_rms = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / K + eps)
            y *= inv_rms
        if HAS_SCALE:
            y *= scale
        if GATED:
            up = acc_up if ROW_SUMS else tl.sum(acc_up, axis=1)
            if HAS_NORM:
                up *= inv_rms
            if HAS_SCALE:
                up *= scale_up
            y = y * tl.sigmoid(y) * up
        if HAS_RESIDUAL:
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + residual
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)

    _even = triton.heuristics({
        "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
        "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
    })
    _gemv_fixed = _even(_gemv_kernel)
    # Few rows and wide tiles: a program must keep enough bytes in flight to cover HBM latency (1-byte
    # weights want twice the columns of bf16 for the same 16-byte loads), and there must be enough programs
    # (N / BLOCK_N) to fill every SM. A first tuning (2-16 rows, 128-1024 columns) always chose
    # the widest tile, so the set now reaches 4096 columns. Benchmarked with the L2 flushed.
    _CONFIGS = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "ROW_SUMS": False}, num_warps=w, num_stages=1)
        for n in (1, 2, 4, 8)
        for k in (512, 1024, 2048, 4096)
        for w in (4, 8)
        if 1024 <= n * k <= 8192
    ] + [triton.Config({"BLOCK_N": n, "BLOCK_K": 1024, "ROW_SUMS": False}, num_warps=4, num_stages=3) for n in (2, 4)]
    # tiles reduced as they go: more rows and columns per program for the same registers
    _CONFIGS += [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k, "ROW_SUMS": True}, num_warps=w, num_stages=1)
        for n in (4, 8, 16)
        for k in (512, 1024, 2048)
        for w in (4, 8)
        if 4096 <= n * k <= 16384
    ]
    _gemv_tuned = triton.autotune(
        configs=_CONFIGS, key=["N", "K", "HAS_SCALE", "GATED", "HAS_NORM", "HAS_RESIDUAL", "INT8_BITS", "USE_PDL"],
    )(_even(_gemv_kernel))


if triton is not None:

    @triton.jit
    def _few_rows_kernel(
        x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K,
        HAS_SCALE: tl.constexpr, INT8_BITS: tl.constexpr, F32_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # y[m, n] = sum_k x[m, k] * w[n, k] * scale[n] for the M <= BLOCK_M rows of a batch's decode: each
        # program streams its BLOCK_N weight rows once, for all M rows (a tensor-core dot, M padded to the
        # block), where a matmul on widened weights would write and re-read them in 2 bytes. 1-byte weights
        # widen exactly to the activations' dtype (int8 and e4m3 values are bf16 values).
        rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_m = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            kk = k + cols
            x = tl.load(x_ptr + rows_m[:, None] * K + kk[None, :], mask=(rows_m[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + rows_n[:, None] * K + kk[None, :], mask=(rows_n[:, None] < N) & (kk[None, :] < K),
                        other=0.0)
            w = _widen(w, INT8_BITS)
            if F32_DOT:  # full float32 products, no TF32 rounding
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rows_n, mask=rows_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows_m[:, None] * N + rows_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows_m[:, None] < M) & (rows_n[None, :] < N))

    # enough programs (N / BLOCK_N) to fill the SMs, each with enough weight bytes in flight
    _FEW_ROWS_CONFIGS = [
        triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for n in (16, 32, 64) for k in (128, 256, 512) for w, s in ((4, 2), (4, 3), (4, 4), (8, 3))
        if n * k <= 16384
    ]
    _few_rows_tuned = triton.autotune(
        configs=_FEW_ROWS_CONFIGS, key=["M", "N", "K", "HAS_SCALE", "INT8_BITS", "F32_DOT", "BLOCK_M"],
    )(_few_rows_kernel)

FEW_ROWS_MAX = MAX_BATCH  # a batch's decode: one row per frame, up to the largest bucket
FEW_ROWS_TILE = (32, 256, 4, 3)  # (BLOCK_N, BLOCK_K, num_warps, num_stages) when not autotuning


@torch.library.custom_op("rtloop::few_rows_matmul", mutates_args=())
def few_rows_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                    tile: list[int] | None = None, int8_bits: bool = True) -> torch.Tensor:
    """x [M, K] (M <= FEW_ROWS_MAX: one row per frame of a batch's decode), weight [N, K] (int8/fp8, or
    bf16/fp32), scale [N] or None -> x @ (weight * scale).T [M, N] in x's dtype, float32 accumulation. `tile`
    (BLOCK_N, BLOCK_K, num_warps, num_stages): that tile, None: autotuned; `int8_bits`: see `_widen`."""
    M, K = x.shape
    N = weight.shape[0]
    if M > FEW_ROWS_MAX:
        raise ValueError(f"few_rows_matmul takes at most {FEW_ROWS_MAX} rows, got {M}")
    x = x.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    flags = {"HAS_SCALE": scale is not None, "INT8_BITS": int8_bits and weight.dtype == torch.int8,
             # float32 activations, or the interpreter (its numpy dot has no bf16): float32 products
             "F32_DOT": x.dtype == torch.float32 or INTERPRET, "BLOCK_M": max(16, triton.next_power_of_2(M))}
    args = (x, weight, weight if scale is None else scale, y, M, N, K)
    if INTERPRET:  # a fixed, large tile: each program costs numpy calls
        block_n = max(32, triton.next_power_of_2(triton.cdiv(N, 16)))
        _few_rows_kernel[(triton.cdiv(N, block_n),)](*args, **flags, BLOCK_N=block_n, BLOCK_K=128)
    elif tile is not None:
        block_n, block_k, warps, stages = tile
        _few_rows_kernel[(triton.cdiv(N, block_n),)](*args, **flags, BLOCK_N=block_n, BLOCK_K=block_k,
                                                     num_warps=warps, num_stages=stages)
    else:
        _few_rows_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return y


@few_rows_matmul.register_fake
def _(x, weight, scale, tile=None, int8_bits=True):
    return x.new_empty(x.shape[0], weight.shape[0])


def _launch(pdl: bool) -> dict:
    """The launch options of a kernel written for programmatic dependent launch (see `_gemv_kernel`)."""
    return {"USE_PDL": True, "launch_pdl": True} if pdl and not INTERPRET else {"USE_PDL": False}


def gemv_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, gated: bool,
    norm: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """What `gemv` computes, in plain torch (float32 accumulation)."""
    h = x.float()
    if norm is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    y = h @ weight.float().t()
    if scale is not None:
        y = y * scale.float()
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    y = y.to(x.dtype)
    return y if residual is None else y + residual


@torch.library.custom_op("rtloop::gemv", mutates_args=())
def gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, gated: bool,
    norm: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
    pdl: bool = False, tile: list[int] | None = None, int8_bits: bool = True,
) -> torch.Tensor:
    """x [..., K] holding ONE row, weight [N, K] (bf16/fp16/fp32/int8/fp8), scale [N] or None -> [..., N]
    (gated: [..., N / 2]) in x's dtype. `norm` [K]: RMS-normalise x with that weight and `eps` first (an
    RMSNorm fused in front); `residual` [..., N]: add it to the result (a residual connection fused behind).
    `pdl`: launch as a programmatic dependent launch (sm90+); `tile` (BLOCK_N, BLOCK_K, num_warps, ROW_SUMS):
    that tile, None: autotuned; `int8_bits`: see `_widen` (KernelOptions holds all three).
    A torch custom op, so torch.compile keeps it as one opaque call."""
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    K = weight.shape[1]
    y = torch.empty(*x.shape[:-1], n_out, device=x.device, dtype=x.dtype)
    unused = weight  # a pointer for the absent optional inputs; the kernel never reads it
    args = (
        x.reshape(K), weight, unused if scale is None else scale, unused if norm is None else norm,
        unused if residual is None else residual.reshape(n_out), y, n_out, K, eps,
    )
    flags = {"HAS_SCALE": scale is not None, "GATED": gated, "HAS_NORM": norm is not None,
             "HAS_RESIDUAL": residual is not None, "INT8_BITS": int8_bits and weight.dtype == torch.int8}
    if INTERPRET:  # no benchmarking without a GPU: a fixed tile, large because each program costs numpy calls
        row_sums = bool(tile[3]) if tile is not None else False
        # 64 rows, or at most ~16 programs: the lm_head's 32064 rows in 64-row programs were most of a
        # whole-model test's minute
        block_n = max(64, triton.next_power_of_2(triton.cdiv(n_out, 16)))
        _gemv_fixed[(triton.cdiv(n_out, block_n),)](*args, **flags, USE_PDL=False, BLOCK_N=block_n, BLOCK_K=128,
                                                     ROW_SUMS=row_sums)
        return y
    if tile is not None:
        block_n, block_k, warps, row_sums = tile
        _gemv_fixed[(triton.cdiv(n_out, block_n),)](*args, **flags, **_launch(pdl), BLOCK_N=block_n,
                                                     BLOCK_K=block_k, ROW_SUMS=bool(row_sums), num_warps=warps)
    else:
        _gemv_tuned[lambda meta: (triton.cdiv(n_out, meta["BLOCK_N"]),)](*args, **flags, **_launch(pdl))
    return y


@gemv.register_fake
def _(x, weight, scale, gated, norm=None, eps=0.0, residual=None, pdl=False, tile=None, int8_bits=True):
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    return x.new_empty(*x.shape[:-1], n_out)


ATTENTION_CHUNK = 32  # keys per program of the decode attention: one load each of K and V, no loop

if triton is not None:

    @triton.jit
    def _decode_attention_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, part_ptr, arrivals_ptr, out_ptr, max_seq_len, scale,
        H: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr,
        N_CHUNKS_POW2: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # one (query head, chunk of keys): RoPE on this head's query and on the new key, the softmax statistics
        # and the unnormalised sum over this chunk alone; the last chunk of a head to finish combines them all
        # (flash-decoding without a second launch). The new key and value are used from registers, and the
        # one program whose chunk holds the position (first head of the group) writes them into the cache;
        # every other program reads only earlier positions, so nothing races.
        # USE_PDL: the kernel before this one (the qkv GEMV) may still run; the cached keys and values of
        # earlier positions, the position and the RoPE tables are not its outputs, so they load first.
        head, chunk = tl.program_id(0), tl.program_id(1)
        GROUP: tl.constexpr = H // H_KV
        HALF: tl.constexpr = D // 2
        pos = tl.load(pos_ptr)
        n_used = pos // CHUNK + 1
        if chunk < n_used:  # chunks past the position hold nothing yet
            kv_head = head // GROUP
            half = tl.arange(0, HALF)
            d = tl.arange(0, D)
            keys = chunk * CHUNK + tl.arange(0, CHUNK)
            earlier = (keys < pos)[:, None]
            is_new = (keys == pos)[:, None]
            rows = kv_head * max_seq_len * D + keys[:, None] * D
            k_lo = tl.load(k_ptr + rows + half[None, :], mask=earlier, other=0.0)
            k_hi = tl.load(k_ptr + rows + HALF + half[None, :], mask=earlier, other=0.0)
            v = tl.load(v_ptr + rows + d[None, :], mask=earlier, other=0.0)
            # rotate_half's layout: both halves share the angles; rounded as stored tensors would be
            cos = tl.load(cos_ptr + pos * D + half).to(tl.float32)
            sin = tl.load(sin_ptr + pos * D + half).to(tl.float32)
            if USE_PDL:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
            dtype = k_ptr.dtype.element_ty
            q1 = tl.load(qkv_ptr + head * D + half).to(tl.float32)
            q2 = tl.load(qkv_ptr + head * D + HALF + half).to(tl.float32)
            q1, q2 = (q1 * cos - q2 * sin).to(dtype).to(tl.float32), (q2 * cos + q1 * sin).to(dtype).to(tl.float32)
            new_k = qkv_ptr + (H + kv_head) * D
            k1 = tl.load(new_k + half).to(tl.float32)
            k2 = tl.load(new_k + HALF + half).to(tl.float32)
            k1, k2 = (k1 * cos - k2 * sin).to(dtype), (k2 * cos + k1 * sin).to(dtype)
            v_new = tl.load(qkv_ptr + (H + H_KV + kv_head) * D + d).to(dtype)
            k_lo = tl.where(is_new, k1[None, :], k_lo)
            k_hi = tl.where(is_new, k2[None, :], k_hi)
            v = tl.where(is_new, v_new[None, :], v)
            dot = tl.sum(k_lo.to(tl.float32) * q1[None, :], axis=1) + tl.sum(k_hi.to(tl.float32) * q2[None, :], axis=1)
            scores = tl.where(keys <= pos, dot * scale, float("-inf"))
            m = tl.max(scores, axis=0)
            p = tl.exp(scores - m)  # exp(-inf) = 0 for the masked keys
            if chunk == n_used - 1 and head % GROUP == 0:
                row = (kv_head * max_seq_len + pos) * D
                tl.store(k_ptr + row + half, k1)
                tl.store(k_ptr + row + HALF + half, k2)
                tl.store(v_ptr + row + d, v_new)
            part = part_ptr + (head * N_CHUNKS + chunk) * (D + 2)
            tl.store(part + d, tl.sum(p[:, None] * v.to(tl.float32), axis=0))
            tl.store(part + D, m)
            tl.store(part + D + 1, tl.sum(p, axis=0))
            # every thread's stores issued, then one release-acquire count: the program that counts last
            # sees all the partials of its head (read from L2: another SM wrote them)
            tl.debug_barrier()
            if tl.atomic_add(arrivals_ptr + head, 1, sem="acq_rel", scope="gpu") == n_used - 1:
                chunks = tl.arange(0, N_CHUNKS_POW2)
                used = chunks < n_used
                parts = part_ptr + (head * N_CHUNKS + chunks) * (D + 2)
                ms = tl.load(parts + D, mask=used, other=float("-inf"), cache_modifier=".cg")
                weight = tl.where(used, tl.exp(ms - tl.max(ms, axis=0)), 0.0)
                total = tl.sum(weight * tl.load(parts + D + 1, mask=used, other=0.0, cache_modifier=".cg"), axis=0)
                acc = tl.load(parts[:, None] + d[None, :], mask=used[:, None], other=0.0, cache_modifier=".cg")
                out = tl.sum(weight[:, None] * acc, axis=0) / total
                tl.store(out_ptr + head * D + d, out.to(out_ptr.dtype.element_ty))
                tl.store(arrivals_ptr + head, 0)  # ready for the next call (launches run in stream order)


_ARRIVALS: dict[tuple[torch.device, int], torch.Tensor] = {}


def _arrivals(device: torch.device, n_heads: int) -> torch.Tensor:
    """Per-head counters of the decode attention, zero between calls (the kernel resets them). Made on the
    first call, which is a warm-up, never a capture; shared by every layer, as they run one after another."""
    if (device, n_heads) not in _ARRIVALS:
        _ARRIVALS[device, n_heads] = torch.zeros(n_heads, device=device, dtype=torch.int32)
    return _ARRIVALS[device, n_heads]


@torch.library.custom_op("rtloop::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, pdl: bool = False,
) -> torch.Tensor:
    """One decode token's attention, from the fused projection to the heads' outputs, in one kernel:
    qkv [1, 1, (H + 2 Hkv) * D] = [q; k; v], the RoPE tables cos/sin [S, D] (rotate_half layout, indexed at
    input_pos [1] inside), caches [1, Hkv, S, D] -> [1, H, 1, D], as RoPE, the cache write and
    scaled_dot_product_attention with the causal mask would give; the rotated key and the value are written
    into the caches at input_pos. One program per (head, chunk of ATTENTION_CHUNK keys), each a single load of
    its keys and values; the last of a head combines. For ~300 keys, short and wide beats cuDNN's one long
    loop, and RoPE inside saves a launch a layer. `pdl`: launched as a programmatic dependent launch."""
    _, n_kv_heads, max_seq_len, D = k_cache.shape
    n_chunks = triton.cdiv(max_seq_len, ATTENTION_CHUNK)
    parts = torch.empty(n_heads, n_chunks, D + 2, device=qkv.device, dtype=torch.float32)
    out = qkv.new_empty(1, n_heads, 1, D)
    _decode_attention_kernel[(n_heads, n_chunks)](
        qkv, cos, sin, input_pos, k_cache, v_cache, parts, _arrivals(qkv.device, n_heads), out, max_seq_len,
        D**-0.5, H=n_heads, H_KV=n_kv_heads, D=D, CHUNK=ATTENTION_CHUNK, N_CHUNKS=n_chunks,
        N_CHUNKS_POW2=triton.next_power_of_2(n_chunks), **_launch(pdl),
    )
    return out


@decode_attention.register_fake
def _(qkv, cos, sin, input_pos, k_cache, v_cache, n_heads, pdl=False):
    return qkv.new_empty(1, n_heads, 1, k_cache.shape[-1])


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M > 16) float, weight [N, K] int8, scale [N] -> x @ (weight * scale).T, with x quantised to
    int8 per row (torch._int_mm: cuBLAS int8 GEMM, int32 accumulation)."""
    x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 127.0
    xq = (x.float() / x_scale).round().clamp(-127, 127).to(torch.int8)
    y = torch._int_mm(xq, weight.t())
    return (y.float() * x_scale * scale.float()).to(x.dtype)


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               options: KernelOptions | None = None) -> torch.Tensor:
    """x [M, K] float, weight [N, K] float8_e4m3fn, scale [N] -> x @ (weight * scale).T, with x quantised to
    e4m3 with one scale per row (torch._scaled_mm's row-wise scaling: fp8 tensor cores, both scales applied
    in the GEMM's epilogue) where `options.rowwise_fp8` (Hopper, the CPU); else (Ada, e.g. the RTX 4090, or
    `arch="sm89"`) one scale per tensor, and the weights' scales after. `options`: resolved (None:
    DEFAULT_OPTIONS for x's device)."""
    options = DEFAULT_OPTIONS.resolve(x.device) if options is None else options
    rowwise = options.rowwise_fp8
    x_max = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    x_scale = x_max.float().clamp(min=1e-12) / 448.0
    xq = (x.float() / x_scale).to(torch.float8_e4m3fn)
    if rowwise:
        if x.device.type == "cuda":
            split = prefill_split(x.shape[0]) if options.prefill_split else 0
            return prefill_fp8_matmul(xq, weight, x_scale, scale.float()[None, :], x.dtype, split, options.autotune)
        return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=scale.float()[None, :], out_dtype=x.dtype,
                                use_fast_accum=True)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
    return (y.float() * scale.float()).to(x.dtype)


def prefill_split(rows: int) -> int:
    """Where a GEMM of `rows` rows could split in two (0: nowhere). cuBLAS tiles the rows by 128, so a
    ~288-row prefill pays a third row of tiles that is three quarters empty; split off onto a side stream,
    those last rows run on the SMs that the first 256 leave idle (KernelOptions.prefill_split=False: never)."""
    if rows <= 128:
        return 0
    tail = rows % 128
    return rows - tail if 0 < tail <= 64 else 0


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_SPLIT_CHOICE: dict[tuple, int] = {}  # (shapes, dtypes, device, split, tune) -> that split, or 0: the faster, as timed


def _scaled_mm(x, weight, x_scale, w_scale, out_dtype, split: int) -> torch.Tensor:
    """torch._scaled_mm(x, weight.T) with row-wise scales (x_scale [M, 1], w_scale [1, N]) and fast
    accumulation; split > 0: rows [split:] on a side stream while rows [:split] run on this one, both writing
    one output. Fork and join are stream waits, which a CUDA graph captures."""
    def mm(rows, out=None):
        return torch._scaled_mm(x[rows], weight.t(), scale_a=x_scale[rows], scale_b=w_scale, out_dtype=out_dtype,
                                use_fast_accum=True, out=out)

    if not split:
        return mm(slice(None))
    out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=out_dtype)
    main = torch.cuda.current_stream(x.device)
    if x.device not in _SIDE_STREAMS:  # made by a warm-up call, never during a capture
        _SIDE_STREAMS[x.device] = torch.cuda.Stream(x.device)
    side = _SIDE_STREAMS[x.device]
    side.wait_stream(main)  # the inputs are ready; they and `out` are freed on main, which joins side below
    with torch.cuda.stream(side):
        mm(slice(split, None), out[split:])
    mm(slice(0, split), out[:split])
    main.wait_stream(side)
    return out


@torch.library.custom_op("rtloop::prefill_fp8_matmul", mutates_args=())
def prefill_fp8_matmul(
    x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
    split: int, tune: bool = True,
) -> torch.Tensor:
    """The fp8 prefill GEMM on CUDA (`_scaled_mm`), whole or split at row `split` (see `prefill_split`),
    whichever ran faster when this shape was first seen: cuBLAS's tiles differ by shape and GPU
    (profiles/prefill-split-h200.json). With tune=False it splits wherever `split` says. An op of its own because TorchInductor cannot
    trace streams: to it this is one opaque call, as cuBLAS's GEMMs are anyway."""
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, out_dtype, x.device, split, tune)
    if key not in _SPLIT_CHOICE:
        if not tune or not split:
            _SPLIT_CHOICE[key] = split
        else:  # first seen in a warm-up call (captures replay what the warm-ups chose)
            ms = {s: triton.testing.do_bench(partial(_scaled_mm, x, weight, x_scale, w_scale, out_dtype, s))
                  for s in (0, split)}
            _SPLIT_CHOICE[key] = min(ms, key=ms.get)
    return _scaled_mm(x, weight, x_scale, w_scale, out_dtype, _SPLIT_CHOICE[key])


def split_choices() -> list[dict]:
    """Each GEMM shape `prefill_fp8_matmul` could split in this process, and where it did (0: whole), for reports."""
    return [{"rows": x_shape[0], "k": x_shape[1], "n": w_shape[0], "dtype": str(dtype).removeprefix("torch."),
             "split": chosen}
            for (x_shape, w_shape, dtype, _, _, split, _), chosen in _SPLIT_CHOICE.items() if split]


@prefill_fp8_matmul.register_fake
def _(x, weight, x_scale, w_scale, out_dtype, split, tune=True):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)
