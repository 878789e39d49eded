"""The decode step's GEMVs as the compiled engine runs them: Llama-2-7B's 32 layers of [q; k; v] (RMSNorm
fused in front), o (residual add behind), [gate; up] (norm, SwiGLU) and down (residual), each layer its own
weights, back to back in one CUDA graph, timed over replays with CUDA events. So every byte comes from HBM
(13 GB of bf16, 6.5 GB of 1-byte weights, far past the 50 MB L2) and launches overlap as they do in the
engine. Reports ms per token and GB/s of weights for bf16, int8 and fp8, with the autotuned tiles and with
fixed ones, with programmatic dependent launch on and off, and int8 widened by bit arithmetic or by I2F.

    python scripts/gemv_bench.py --out profiles/gemv-h100.json

(Isolated calls, as `triton.testing.do_bench` times them, mostly measure launch and ramp-up: a 4096x4096
bf16 GEMV alone read at 1.7 TB/s, the same kernel inside the decode graph at ~2.9.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from rtloop.policy import kernels
from rtloop.policy.quant import quantize_weight

HIDDEN, FFN, LAYERS, HEADS_DIM = 4096, 11008, 32, 12288
FIXED_TILES = [(2, 1024, 4, False), (4, 1024, 4, False), (8, 1024, 8, False), (8, 1024, 4, True),
               (8, 2048, 8, True), (16, 512, 4, True), (16, 1024, 8, True), (4, 2048, 4, True)]


def layers(fmt: str, seed: int = 0) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(LAYERS):
        layer = {}
        for name, (n, k) in {"qkv": (HEADS_DIM, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN),
                             "down": (HIDDEN, FFN)}.items():
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
            layer[name] = (w, None) if fmt == "bf16" else quantize_weight(w, fmt)
        out.append(layer)
    return out


def decode_gemvs(stack: list[dict], x: torch.Tensor, norm: torch.Tensor, **how) -> torch.Tensor:
    """One token through the GEMVs of every layer (attention itself left out: q goes straight to o).
    `how`: the GEMV's launch options (pdl, tile, int8_bits)."""
    for layer in stack:
        qkv = kernels.gemv(x, *layer["qkv"], False, norm, 1e-5, **how)
        x = kernels.gemv(qkv[..., :HIDDEN], *layer["o"], False, residual=x, **how)
        h = kernels.gemv(x, *layer["gate_up"], True, norm, 1e-5, **how)
        x = kernels.gemv(h, *layer["down"], False, residual=x, **how)
    return x


def time_graph(fn, replays: int = 20) -> float:
    """ms per call of fn, captured in a CUDA graph (after two eager calls: autotuning, compilation)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", default="bf16,int8,fp8")
    p.add_argument("--autotuned-only", action="store_true", help="skip the fixed tiles and the switches")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    x = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    norm = (torch.rand(HIDDEN, device="cuda") + 0.5).bfloat16()
    rows = []

    def measure(fmt, stack, nbytes, variant, pdl=True, tile=None, int8_bits=True):
        ms = time_graph(lambda: decode_gemvs(stack, x, norm, pdl=pdl, tile=tile, int8_bits=int8_bits))
        rows.append({"format": fmt, "variant": variant, "ms_per_token": round(ms, 3),
                     "GB/s": round(nbytes / (ms * 1e-3) / 1e9, 1)})
        print(f"{fmt:5s} {variant:56s} {ms:7.3f} ms {rows[-1]['GB/s']:8.1f} GB/s", flush=True)

    for fmt in args.formats.split(","):
        stack = layers(fmt)
        nbytes = sum(w.numel() * w.element_size() for layer in stack for w, _ in layer.values())
        measure(fmt, stack, nbytes, "autotuned, PDL")
        if not args.autotuned_only:
            if fmt == "int8":
                measure(fmt, stack, nbytes, "autotuned, PDL, widened by I2F", int8_bits=False)
            measure(fmt, stack, nbytes, "autotuned, no PDL", pdl=False)
            for tile in FIXED_TILES if fmt != "bf16" else []:
                measure(fmt, stack, nbytes, "fixed BLOCK_N=%d BLOCK_K=%d warps=%d row_sums=%d, PDL" % tile,
                        tile=[tile[0], tile[1], tile[2], int(tile[3])])
        del stack
        torch.cuda.empty_cache()
    tuned = {str(k): str(v) for k, v in kernels._gemv_tuned.cache.items()}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "what": "32 layers of decode GEMVs (qkv+norm, o+residual, gate_up+norm+SwiGLU, down+residual) in one "
                      "CUDA graph, ms per token",
              "rows": rows, "autotuned_configs": tuned}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
