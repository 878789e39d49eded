"""Time real LIBERO steps with a dummy action, alone or beside a load that imitates the policy, to find what
slows the sim's physics down once a model runs (issue 18: 9 ms alone, 18-19 ms in closed loop on the H200).

    python3 scripts/libero_alone.py --steps 100 --out alone.json                     # LIBERO by itself
    python3 scripts/libero_alone.py --load cuda --torch-threads 16 --out load16.json # beside a GPU model's host loop

Loads (each on a second thread of this process unless named -process):
- cuda: what a CUDA policy does on the host between frames: a few small CPU tensor ops (the processor's), a
  chain of GPU matmuls, then torch.cuda.synchronize() (which spins a core until the GPU is done);
- cuda-blocking: the same, but waiting on a blocking CUDA event (the thread sleeps instead of spinning);
- cuda-process: `cuda` in a separate process (no shared GIL, same cores);
- cpu-torch: only the small CPU tensor ops, back to back;
- gil: a pure-Python busy loop (holds the GIL except at switch intervals);
- spin-process: the same busy loop in a separate process (a busy core, no GIL shared, no GPU);
- gpu-busy-process: a separate process keeps the GPU busy (a CUDA graph of matmuls, replayed) while its host
  thread sleeps in a blocking event: GPU work with an idle host;
- torch-import, cuda-idle: nothing runs; this process has only imported torch (and, for cuda-idle, made a
  CUDA context and a tensor on the GPU), as the closed loop's sim process has.
`--pin-sim CPU` / `--pin-load CPU` pin the sim's thread / the load (thread or process) to one CPU, to tell
CPU placement (a shared physical core) from other causes. `--switch-interval` sets sys.setswitchinterval
(Python's default is 5 ms). Each run prints one JSON line and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np


def host_loop(kind: str, stop, cpu: int | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # this thread (or process) only
    if kind in ("gil", "spin"):
        while not stop.is_set():
            sum(range(1000))
        return
    import torch

    if kind == "gpu-busy":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                a = a @ a.T * 1e-4
        done = torch.cuda.Event(blocking=True)
        while not stop.is_set():
            graph.replay()
            done.record()
            done.synchronize()
        return

    small = torch.randn(3, 256, 256)
    on_gpu = kind.startswith("cuda")
    if on_gpu:
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        done = torch.cuda.Event(blocking=kind == "cuda-blocking")
    while not stop.is_set():
        x = (small * 0.5 + 0.1).clamp_(0, 1)  # the processor's few CPU tensor ops
        _ = x.sum()
        if on_gpu:
            for _ in range(20):
                a = a @ a.T * 1e-3
            if kind == "cuda-blocking":
                done.record()
                done.synchronize()
            else:
                torch.cuda.synchronize()


def cpu_mhz() -> list[float]:
    """/proc/cpuinfo's per-CPU clock as the (virtual) machine reports it, at the end of the run."""
    try:
        with open("/proc/cpuinfo") as f:
            return [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
    except OSError:
        return []


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--load", choices=("none", "cuda", "cuda-blocking", "cuda-process", "cpu-torch", "gil",
                                       "spin-process", "gpu-busy-process", "torch-import", "cuda-idle"),
                   default="none")
    p.add_argument("--pin-sim", type=int, default=None, metavar="CPU")
    p.add_argument("--pin-load", type=int, default=None, metavar="CPU")
    p.add_argument("--switch-interval", type=float, default=None, help="seconds (sys.setswitchinterval)")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import multiprocessing as mp
    import sys

    from rtloop.sim.libero_env import LiberoEnv

    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.pin_sim is not None:
        os.sched_setaffinity(0, {args.pin_sim})
    if args.torch_threads is not None or args.load not in ("none", "gil", "spin-process", "gpu-busy-process"):
        import torch

        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
        if args.load == "cuda-idle":
            torch.ones(1, device="cuda").sum().item()
    env = LiberoEnv(suite="libero_object", task_id=args.task)
    env.reset(0)
    loader = None
    if args.load.endswith("-process"):
        spawn = mp.get_context("spawn")
        stop = spawn.Event()
        loader = spawn.Process(target=host_loop, args=(args.load.removesuffix("-process"), stop, args.pin_load),
                               daemon=True)
    elif args.load not in ("none", "torch-import", "cuda-idle"):
        stop = threading.Event()
        loader = threading.Thread(target=host_loop, args=(args.load, stop, args.pin_load), daemon=True)
    if loader is not None:
        loader.start()
        time.sleep(3.0 if args.load == "gpu-busy-process" else 1.0)  # its CUDA context and graph first
    steps, cpu, physics, render = [], [], [], []
    action = np.array([0, 0, 0, 0, 0, 0, -1.0])
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        result = env.step(action)
        steps.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)  # on-CPU time of this thread: wall minus waits and preemption
        physics.append(result.timings["physics"])
        render.append(result.timings["render"])
    if loader is not None:
        stop.set()
        loader.join()
    env.close()

    def ms(values):
        p50, p95, p99 = np.percentile(np.asarray(values) * 1e3, [50, 95, 99])
        return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "p99": round(float(p99), 2)}

    torch_threads = None
    if "torch" in sys.modules:
        torch_threads = sys.modules["torch"].get_num_threads()
    out = {"load": args.load, "torch_threads": torch_threads, "cpu_count": os.cpu_count(), "steps": args.steps,
           "step_ms": ms(steps), "step_cpu_ms": ms(cpu), "physics_ms": ms(physics), "render_ms": ms(render),
           "switch_interval_s": sys.getswitchinterval(), "pin_sim": args.pin_sim, "pin_load": args.pin_load,
           "cpu_mhz": cpu_mhz()}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
