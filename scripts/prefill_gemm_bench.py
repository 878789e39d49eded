"""The prefill's matmuls (~290 prompt rows x Llama-2-7B's linears) on this GPU: cuBLAS (what F.linear and
Inductor's default call) against TorchInductor's max-autotune (Triton GEMM templates tuned per shape), in
microseconds per call and TFLOPS, L2 flushed between calls (triton.testing.do_bench). Decides whether the
compiled engine's prefill should pay for max-autotune's compile time.

    python scripts/prefill_gemm_bench.py --rows 288 --out profiles/prefill-gemm-h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down_proj": (4096, 11008)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[288])
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
            torch.testing.assert_close(tuned(x, w), F.linear(x, w), rtol=2e-2, atol=2e-2)
            for variant, fn in (("cublas", lambda: F.linear(x, w)), ("inductor max-autotune", lambda: tuned(x, w))):
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
