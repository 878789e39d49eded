"""Issue 16's GPU measurements of one engine in ONE process: the compiled engine compiles and captures each
batch bucket once (minutes per process), so separate processes per N would spend the device time on
compiles. In order:

  1. build the policy as `rtloop run --envs <largest bucket>` does and capture every batch bucket (the
     fleet's own warm-up, on a recorded LIBERO frame);
  2. with --go FILE, wait until FILE exists (the machine is running another measurement: the warm-up may
     overlap it, the timed part must not);
  3. `rtloop bench --batch` on that engine (--batches);
  4. `rtloop run` in-process, one env (--inprocess-episodes): the single-env loop, for comparison;
  5. `rtloop run --envs N` per N of --fleet-ns (fleet capacity), and per N of --serial-image-ns the same with
     `--image-threads 1` (the frames prepared in series, as before the image threads: a ratio in one process);
  6. `rtloop eval --envs N --clock C` per N of --eval-ns and C of --eval-clocks (eval throughput).

Steps 4-6 are rtloop's own commands: their arguments go through rtloop's parser and they run its main. The
one difference from separate `rtloop` processes: the policy they build is the one of step 1, its per-run
checks reset (OpenVLAPolicy.reset_guards). The outputs keep gpu_bench.sh's layout, so
scripts/fleet_summary.py and scripts/evalrate_summary.py read them:

    OUT/batch-<gpu>-<engine>.{json,md}  OUT/inprocess-<engine>/  OUT/fleet-<engine>[-serial_image]-n<N>/
    OUT/evalrate-openvla-<engine>-<clock>-n<N>/  OUT/study-<engine>.json (what ran, when, exit codes)

    python3 scripts/fleet_study.py --engine compiled+fp8 --checkpoint /tmp/ck7b --out OUT [--go FILE] ...

Needs a CUDA machine with real LIBERO (on ours: ../shared/gpu-libero, then `. /opt/libero-site/env.sh`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

INTERRUPTED = 130  # a command that returns this was stopped: the study stops with it


def ids(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def rtloop(argv: list[str]) -> int:
    """One rtloop command as the CLI runs it (its parser, its main, its exit status)."""
    from rtloop.cli import main

    print(f"[study] rtloop {' '.join(argv)}", flush=True)
    return main(argv)


def build(engine: str, checkpoint: Path, device: str, max_batch: int, kernel_flags: list[str]):
    """The policy `rtloop run --envs max_batch` builds, every batch bucket up to max_batch captured."""
    import numpy as np

    from rtloop.cli import build_parser
    from rtloop.commands import run as command
    from rtloop.fleet.fleet import warm_batches
    from rtloop.sim.base import Observation
    from rtloop.sim.replay import default_recording, load_frames

    # --sim replay: the build needs no LIBERO (on our GPU machine its assets may not be unpacked yet)
    args = build_parser("run").parse_args(["run", "--envs", str(max_batch), "--sim", "replay", "--engine", engine,
                                           "--device", device, "--checkpoint", str(checkpoint), *kernel_flags])
    command.validate(args)
    policy = command.build_policy(args, command.resolve_checkpoint(args.checkpoint), args.device)
    frame = load_frames(default_recording())[0]
    obs = Observation(np.ascontiguousarray(frame.image), {})
    policy.warmup(obs, frame.instruction)
    warm_batches(policy, obs, frame.instruction, max_batch)
    return policy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda", help="cpu for a dry run (--engine eager, a tiny checkpoint)")
    p.add_argument("--size", default="7b", help="the checkpoint's size, for bench's report (tiny for a dry run)")
    p.add_argument("--gpu", default="h200", help="the machine's label in file names")
    p.add_argument("--go", type=Path, help="wait for this file after the warm-up")
    p.add_argument("--done", type=Path, help="create this file at the end (another study's --go)")
    p.add_argument("--batches", default="1,2,4,8,16,32", help="rtloop bench --batch (empty: no bench)")
    p.add_argument("--bench-iters", type=int, default=20)
    p.add_argument("--agreement-frames", type=int, default=32)
    p.add_argument("--inprocess-episodes", type=int, default=0)
    p.add_argument("--inprocess-steps", type=int, default=280)
    p.add_argument("--fleet-ns", default="1,2,4,8,16")
    p.add_argument("--serial-image-ns", default="")
    p.add_argument("--fleet-steps", type=int, default=200)
    p.add_argument("--eval-ns", default="")
    p.add_argument("--eval-clocks", default="wall,virtual")
    p.add_argument("--eval-steps", type=int, default=280)
    p.add_argument("--eval-total", type=int, default=0, help="episodes per eval run (default: max(N, 2))")
    p.add_argument("--kernel-flags", default="", help="e.g. '--kernel-arch sm89'")
    a = p.parse_args()

    from rtloop.commands import run as command
    from rtloop.policy.buckets import batch_bucket

    batches, fleet_ns, eval_ns = ids(a.batches), ids(a.fleet_ns), ids(a.eval_ns)
    clocks = [c for c in a.eval_clocks.split(",") if c]
    kernel_flags = a.kernel_flags.split()
    name = a.engine.replace("+", "_")
    a.out.mkdir(parents=True, exist_ok=True)
    log = {"engine": a.engine, "device": a.device, "kernel_flags": kernel_flags,
           "weights": f"RANDOM WEIGHTS ({a.size}, seed 0)", "steps": []}
    log_path = a.out / f"study-{name}.json"

    def step(what: str, argv: list[str] | None, run) -> bool:
        t0 = time.time()
        rc = run()
        log["steps"].append({"step": what, "argv": argv, "exit": rc, "started": t0, "seconds": round(time.time() - t0, 1)})
        log_path.write_text(json.dumps(log, indent=2) + "\n")
        print(f"[study] {what}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        return rc != INTERRUPTED

    largest = batch_bucket(max(batches + fleet_ns + eval_ns))
    t0 = time.time()
    policy = build(a.engine, a.checkpoint, a.device, largest, kernel_flags)
    log["warmup_s"] = round(time.time() - t0, 1)
    log["max_batch"] = largest
    print(f"[study] {a.engine}: built and every bucket up to {largest} captured in {log['warmup_s']} s", flush=True)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    if a.go is not None:
        while not a.go.exists():
            time.sleep(1)
        log["go_at"] = time.time()

    def reused(args, checkpoint, device):
        if args.engine != a.engine:
            raise RuntimeError(f"the study built {a.engine}, not {args.engine}")
        policy.reset_guards()
        policy.set_image_threads(args.image_threads)
        return policy

    command.build_policy = reused  # rtloop.commands.run's name: what run, the fleet and eval call
    common = ["--engine", a.engine, "--device", a.device, "--checkpoint", str(a.checkpoint), *kernel_flags]
    try:
        if batches:
            from rtloop import bench
            from rtloop.cli import build_parser

            argv = ["bench", "--size", a.size, "--device", a.device, "--engines", a.engine, "--batch", a.batches,
                    "--iters", str(a.bench_iters), "--warmup", "3", "--agreement-frames", str(a.agreement_frames),
                    *kernel_flags, "--out", str(a.out / f"batch-{a.gpu}-{name}")]
            args = build_parser("bench").parse_args(argv)
            step("bench --batch", argv, lambda: bench.main(args, policy=policy))
        runs = []
        if a.inprocess_episodes:
            runs.append(("inprocess", ["run", "--episodes", str(a.inprocess_episodes), "--max-steps", str(a.inprocess_steps),
                                       "--trace", str(a.out / f"inprocess-{name}" / "trace.jsonl")]))
        for n, variant in [(n, "") for n in fleet_ns] + [(n, "serial_image") for n in ids(a.serial_image_ns)]:
            runs.append((f"fleet n{n} {variant}", [
                "run", "--envs", str(n), "--episodes", str(n), "--max-steps", str(a.fleet_steps),
                *(["--image-threads", "1"] if variant else []),
                "--trace", str(a.out / f"fleet-{name}{'-' + variant if variant else ''}-n{n}" / "trace.jsonl")]))
        for clock in clocks:
            for n in eval_ns:
                total = a.eval_total or max(n, 2)
                per_task = -(-total // 10)  # init states per task; libero_object has 10 tasks
                tasks = -(-total // per_task)
                runs.append((f"eval {clock} n{n}", [
                    "eval", "--suite", "libero_object", "--tasks", f"0-{tasks - 1}", "--episodes", str(per_task),
                    "--envs", str(n), "--clock", clock, "--policy", "openvla", "--max-steps", str(a.eval_steps),
                    "--out", str(a.out / f"evalrate-openvla-{name}-{clock}-n{n}")]))
        for what, argv in runs:
            argv = argv + common + (["--rate", "20", "--suite", "libero_object", "--task", "0", "--quiet",
                                     "--metrics-port", "0"] if argv[0] == "run" else [])
            if not step(what, argv, lambda: rtloop(argv)):
                break
    except KeyboardInterrupt:
        log["interrupted"] = True
    finally:
        log_path.write_text(json.dumps(log, indent=2) + "\n")
        if a.done is not None:
            a.done.touch()
    return INTERRUPTED if log.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
