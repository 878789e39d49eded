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
- gil: a pure-Python busy loop (holds the GIL except at switch intervals).
`--switch-interval` sets sys.setswitchinterval (Python's default is 5 ms). Each run prints one JSON line
and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np


def host_loop(kind: str, stop) -> None:
    if kind == "gil":
        while not stop.is_set():
            sum(range(1000))
        return
    import torch

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


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--task", type=int, default=0)
    p.add_argument("--load", choices=("none", "cuda", "cuda-blocking", "cuda-process", "cpu-torch", "gil"),
                   default="none")
    p.add_argument("--switch-interval", type=float, default=None, help="seconds (sys.setswitchinterval)")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import multiprocessing as mp
    import sys

    from rtloop.sim.libero_env import LiberoEnv

    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.torch_threads is not None or args.load not in ("none", "gil"):
        import torch

        if args.torch_threads is not None:
            torch.set_num_threads(args.torch_threads)
    env = LiberoEnv(suite="libero_object", task_id=args.task)
    env.reset(0)
    loader = None
    if args.load == "cuda-process":
        stop = mp.get_context("spawn").Event()
        loader = mp.get_context("spawn").Process(target=host_loop, args=("cuda", stop), daemon=True)
    elif args.load != "none":
        stop = threading.Event()
        loader = threading.Thread(target=host_loop, args=(args.load, stop), daemon=True)
    if loader is not None:
        loader.start()
        time.sleep(1.0)
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
           "switch_interval_s": sys.getswitchinterval()}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
