"""The prefill's matmuls (~290 prompt rows x Llama-2-7B's linears) on this GPU, in microseconds per call and
TFLOPS, L2 flushed between calls (triton.testing.do_bench):
- bf16: cuBLAS (what F.linear and Inductor's default call) against TorchInductor's max-autotune (Triton GEMM
  templates tuned per shape): whether the compiled engine's prefill should pay for max-autotune's compile time;
- `--quant`: cuBLAS's 8-bit GEMMs as `rtloop.policy.kernels` calls them (activations [M, K] times the
  weights' transpose), and transposed (the weights times the activations' transpose, giving y^T): the
  same products, but cuBLAS tiles its N side (the ~290 rows, then) differently from its M side.

    python scripts/prefill_gemm_bench.py --rows 288 --quant fp8,int8 --out profiles/prefill-gemm-h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from rtloop.policy.quant import quantize_weight

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down_proj": (4096, 11008)}


def quantised_variants(x: torch.Tensor, w: torch.Tensor, fmt: str, autotune: bool) -> dict:
    """The 8-bit GEMM of x and w as activations x weights^T and as weights x activations^T, both checked
    against the bf16 product; with `autotune`, fp8 also through Inductor's max-autotune (its Triton
    scaled-mm templates against cuBLAS)."""
    wq, w_scale = quantize_weight(w, fmt)
    w_scale = w_scale.float()
    if fmt == "fp8":
        x_scale = x.abs().amax(dim=-1, keepdim=True).float() / 448.0
        xq = (x.float() / x_scale).to(torch.float8_e4m3fn)

        def normal():
            return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale[None, :], out_dtype=torch.bfloat16,
                                    use_fast_accum=True)

        def transposed():
            return torch._scaled_mm(wq, xq.t(), scale_a=w_scale[:, None], scale_b=x_scale.t(),
                                    out_dtype=torch.bfloat16, use_fast_accum=True)
    else:
        x_scale = x.abs().amax(dim=-1, keepdim=True).float() / 127.0
        xq = (x.float() / x_scale).round().clamp(-127, 127).to(torch.int8)

        def normal():
            return torch._int_mm(xq, wq.t())

        def transposed():
            return torch._int_mm(wq, xq.t())

    y = F.linear(x, w).float()
    got = normal().float() * (x_scale * w_scale if fmt == "int8" else 1)
    got_t = transposed().float().t() * (x_scale * w_scale if fmt == "int8" else 1)
    for name, out in (("normal", got), ("transposed", got_t)):
        err = ((out - y).norm() / y.norm()).item()
        assert err < 0.1, f"{fmt} {name}: relative error {err:.3f}"
    variants = {f"{fmt} x.w^T": normal, f"{fmt} w.x^T": transposed}
    if autotune and fmt == "fp8":
        tuned = torch.compile(
            lambda a, b, sa, sb: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                                  use_fast_accum=True),
            mode="max-autotune-no-cudagraphs", dynamic=False)
        args = (xq, wq.t(), x_scale, w_scale[None, :])
        err = ((tuned(*args).float() - y).norm() / y.norm()).item()
        assert err < 0.1, f"fp8 max-autotune: relative error {err:.3f}"
        variants["fp8 inductor max-autotune"] = lambda: tuned(*args)
    return variants


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[288])
    p.add_argument("--quant", default="", help="also time the 8-bit GEMMs of these formats (fp8,int8)")
    p.add_argument("--no-autotune", action="store_true", help="skip Inductor's max-autotune of bf16 (minutes)")
    p.add_argument("--quant-autotune", action="store_true", help="also Inductor's max-autotune of the fp8 GEMMs")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    tuned = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
    rows = []
    for M in args.rows:
        for name, (N, K) in SHAPES.items():
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
            variants = {"cublas": lambda: F.linear(x, w)}
            if not args.no_autotune:
                torch.testing.assert_close(tuned(x, w), F.linear(x, w), rtol=2e-2, atol=2e-2)
                variants["inductor max-autotune"] = lambda: tuned(x, w)
            for fmt in filter(None, args.quant.split(",")):
                variants.update(quantised_variants(x, w, fmt, args.quant_autotune))
            for variant, fn in variants.items():
                ms = triton.testing.do_bench(fn, warmup=25, rep=200)
                tflops = 2 * M * N * K / (ms * 1e-3) / 1e12
                rows.append({"rows": M, "shape": name, "N": N, "K": K, "variant": variant, "us": round(ms * 1e3, 1),
                             "TFLOPS": round(tflops, 1)})
                print(f"M={M} {name:10s} {variant:22s} {ms * 1e3:8.1f} us {tflops:7.1f} TFLOPS", flush=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
