"""Does splitting the prefill's rows across two streams beat one GEMM? (a probe, not a benchmark)

A ~288-row GEMM tiles as three 128-row tiles, the third mostly empty, so its last wave of tiles runs on part of
the GPU. Splitting the rows in two (the first `split` rows on this stream, the rest on a side stream, both
writing into one output) lets the small GEMM fill the SMs the big one leaves idle. Each variant is captured
in a CUDA graph (fork and join included, no launch overhead) and replayed with L2 flushed between calls;
"layer" runs the four linears of a Llama layer one after another, as the prefill does.

    python scripts/prefill_split_bench.py --rows 288 --splits 256,224,192 --out /tmp/split.json

What it found on an H200 (profiles/prefill-split-h200.json): fp8 [q; k; v] wins (63.7 -> 48.0 us at row 256),
the other three fp8 shapes and every bf16 one lose; splitting at 224 or 192 is no better than at 256. So
`rtloop.policy.kernels.prefill_fp8_matmul` times whole vs split per shape, and only fp8 is offered the split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from rtloop.policy.quant import quantize_weight

SHAPES = {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096), "down_proj": (4096, 11008)}


def matmul_fn(fmt: str, M: int, N: int, K: int):
    """(inputs, f(rows, out)) computing rows `rows` of the product into out[rows]."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K**0.5
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    if fmt == "bf16":
        def f(rows):
            torch.mm(x[rows], w.t(), out=out[rows])
    else:
        wq, ws = quantize_weight(w, "fp8")
        ws = ws.float()[None, :]
        xs = x.abs().amax(dim=-1, keepdim=True).float() / 448.0
        xq = (x.float() / xs).to(torch.float8_e4m3fn)

        def f(rows):
            torch._scaled_mm(xq[rows], wq.t(), scale_a=xs[rows], scale_b=ws, out_dtype=torch.bfloat16,
                             use_fast_accum=True, out=out[rows])
    return f, out


def run(fns, M: int, split: int | None, side: torch.cuda.Stream):
    main = torch.cuda.current_stream()
    for f in fns:
        if split is None:
            f(slice(0, M))
            continue
        side.wait_stream(main)
        with torch.cuda.stream(side):
            f(slice(split, M))
        f(slice(0, split))
        main.wait_stream(side)


def time_graph(fns, M, split, side) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(fns, M, split, side)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run(fns, M, split, side)
    return triton.testing.do_bench(g.replay, warmup=25, rep=300) * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=288)
    p.add_argument("--splits", default="256,224,192")
    p.add_argument("--formats", default="fp8,bf16")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    M, side = args.rows, torch.cuda.Stream()
    splits = [None] + [int(s) for s in args.splits.split(",")]
    rows = []
    for fmt in args.formats.split(","):
        fns = {name: matmul_fn(fmt, M, N, K) for name, (N, K) in SHAPES.items()}
        for name, (f, out) in fns.items():  # every split computes the same product, up to rounding
            run([f], M, None, side)
            whole = out.clone()
            for split in splits[1:]:
                out.zero_()
                run([f], M, split, side)
                torch.cuda.synchronize()
                # cuBLAS may pick another kernel (accumulation order) for the split-off rows
                err = ((out.float() - whole.float()).abs().max() / whole.float().abs().max()).item()
                assert err < 1e-2, f"{fmt} {name} split {split} differs by {err:.3g}"
        groups = {name: [f] for name, (f, _) in fns.items()} | {"layer": [f for f, _ in fns.values()]}
        for name, group in groups.items():
            base = None
            for split in splits:
                us = time_graph(group, M, split, side)
                base = base or us
                rows.append({"format": fmt, "shape": name, "rows": M, "split": split, "us": round(us, 1),
                             "x whole": round(base / us, 3)})
                print(f"{fmt:5s} {name:9s} M={M} split={split!s:5s} {us:8.1f} us  x{base / us:.3f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
