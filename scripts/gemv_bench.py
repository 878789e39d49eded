"""Batch-1 linears of Llama-2-7B on this GPU: our Triton GEMV (rtloop.policy.kernels.gemv) against cuBLAS
(F.linear in bf16) and TorchInductor's fused dequantise-and-reduce (the int8/fp8 path before the kernel), as
microseconds per call and GB/s of weights read, L2 flushed between calls (triton.testing.do_bench). The
`+norm` / `+residual` rows are the same GEMV with what the compiled engine fuses into it, to price that.

    python scripts/gemv_bench.py --out profiles/gemv-h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F
import triton

from rtloop.policy import kernels
from rtloop.policy.quant import quantize_weight

SHAPES = {  # name: (N, K, gated, fused) as the decode step runs them, [q; k; v] and [gate; up] fused;
    # fused: what the compiled engine folds into that GEMV (the RMSNorm before it, or the residual add after)
    "qkv": (12288, 4096, False, "norm"),
    "o_proj": (4096, 4096, False, "residual"),
    "gate_up (SwiGLU)": (22016, 4096, True, "norm"),
    "down_proj": (4096, 11008, False, "residual"),
    "lm_head": (32064, 4096, False, "norm"),
}


def gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / (ms * 1e-3) / 1e9, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64  # one compiled dequantise-and-reduce per (shape, format)
    torch._inductor.config.coordinate_descent_tuning = True  # what makes batch-1 matmuls Triton reductions
    rows = []
    inductor_dequant = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s, dynamic=False)
    for name, (N, K, gated, fused) in SHAPES.items():
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
        norm = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
        residual = torch.randn(1, N // 2 if gated else N, device="cuda", dtype=torch.bfloat16)
        extra = {"norm": norm, "eps": 1e-6} if fused == "norm" else {"residual": residual}
        variants = {
            "cublas bf16": (lambda: F.linear(x, w), w.numel() * 2),
            "triton bf16": (lambda: kernels.gemv(x, w, None, gated), w.numel() * 2),
            f"triton bf16 +{fused}": (lambda: kernels.gemv(x, w, None, gated, **extra), w.numel() * 2),
        }
        for fmt in ("int8", "fp8"):
            q, s = quantize_weight(w, fmt)
            variants[f"triton {fmt}"] = (lambda q=q, s=s: kernels.gemv(x, q, s, gated), q.numel())
            variants[f"inductor {fmt}"] = (lambda q=q, s=s: inductor_dequant(x, q, s), q.numel())
            torch.testing.assert_close(  # the kernel computes what it should before it is timed
                kernels.gemv(x, q, s, gated).float(), kernels.gemv_reference(x, q, s, gated).float(), atol=0.05, rtol=0.05
            )
        for variant, (fn, nbytes) in variants.items():
            fn()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            rows.append({"shape": name, "N": N, "K": K, "variant": variant, "us": round(ms * 1e3, 1), "GB/s": gbps(nbytes, ms)})
            print(f"{name:18s} {variant:14s} {ms * 1e3:8.1f} us {gbps(nbytes, ms):8.1f} GB/s", flush=True)
    tuned = {str(k): str(v) for k, v in kernels._gemv_tuned.cache.items()}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": rows, "autotuned_configs": tuned}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
