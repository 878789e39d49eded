"""The torch profiler around a few inference calls, exported as a Chrome/Perfetto trace.

Stages appear under their own names (processor, generate, detokenize) because the policy times them with
rtloop.timing.timed_stage, which opens a record_function range (and an NVTX range on CUDA) per
stage. Open the JSON in ui.perfetto.dev or chrome://tracing.

On a GPU machine, without LIBERO and without a checkpoint on disk:
    python -m rtloop.profiling.torch_trace --size 7b --device cuda --engine graphed --out DIR
builds the random-weight model directly in GPU memory (as `rtloop bench` does) and profiles `--calls`
policy.act calls on recorded LIBERO frames after warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from rtloop.policy.base import STAGES

DEFAULT_INSTRUCTION = "pick up the alphabet soup and place it in the basket"


def profile_calls(call: Callable[[], object], n_calls: int, out_path: Path, cuda: bool) -> dict:
    """Run `call` n_calls times under the torch profiler; write the Chrome trace; return, per stage name,
    the ms each call spent in it (profiler clock), summed over that call's ranges of the name: a stage may
    open more than one range per call (act's LIBERO image path and predict_action's input preparation are
    both `processor`, two ranges one after the other), and the JSONL trace likewise adds them up."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(n_calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out_path))
    stages = {}
    for name in STAGES:
        ranges = sorted((e for e in prof.events() if e.name == name), key=lambda e: e.time_range.start)
        if not ranges:
            continue
        # Every call opens the same ranges in the same order, so call i owns the i-th run of them.
        per_call = len(ranges) // n_calls
        ms = [sum(e.cpu_time_total for e in ranges[i * per_call:(i + 1) * per_call]) / 1000 for i in range(n_calls)]
        stages[name] = {"ranges_per_call": per_call, "ms_per_call": ms, "ms_per_call_median": float(np.median(ms))}
    return {"calls": n_calls, "activities": [a.name for a in activities], "stages": stages, "path": str(out_path)}


def check_trace(path: Path) -> list[str]:
    """The stage names found in an exported trace (for the report and the tests)."""
    events = json.loads(path.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    return [s for s in STAGES if s in names]


def load_profile_frames(path: Path) -> tuple[list, str]:
    """Recorded LIBERO frames (rtloop.sim.record, the same ones `rtloop bench` uses); where the file is not
    there (an installed package without tests/data), a LIBERO-sized synthetic frame: inference cost does not
    depend on pixel content (fixed 224x224 input, 7 generated tokens)."""
    from rtloop.bench import Frame, load_frames

    if path.is_file():
        # One task's frames: one prompt, as in a run, so one warm-up call covers every engine's graphs.
        frames = load_frames(path)
        frames = [f for f in frames if f.instruction == frames[0].instruction]
        return frames, f"{len(frames)} recorded LIBERO frames of one task from {path.name}"
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8), np.ones((32, 32, 1), dtype=np.uint8))
    return [Frame(smooth, DEFAULT_INSTRUCTION)], f"a synthetic {smooth.shape} frame ({path} not found)"


def profile_policy(policy, frames: list, n_calls: int, out_path: Path, cuda: bool, warmup: int = 1) -> dict:
    """Warm up outside the profile (one call per distinct prompt, for engines that capture a graph per
    prompt length, then `warmup` more), then profile n_calls of policy.act, round-robin over frames."""
    for frame in list({f.instruction: f for f in frames}.values()) + frames[:warmup]:
        policy.act(frame.image, frame.instruction)
    calls = iter(frames[i % len(frames)] for i in range(n_calls))

    def call():
        frame = next(calls)
        return policy.act(frame.image, frame.instruction)

    summary = profile_calls(call, n_calls, out_path, cuda)
    summary["policy"] = policy.label
    return summary


def main(argv: list[str] | None = None) -> int:
    from rtloop.bench import DEFAULT_FRAMES

    p = argparse.ArgumentParser(prog="python -m rtloop.profiling.torch_trace", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: random weights of --size)")
    p.add_argument("--size", default="tiny", choices=["tiny", "7b"],
                   help="tiny (a generated checkpoint) or 7b (built in device memory)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--engine", default="eager", help="inference engine (as in rtloop bench)")
    p.add_argument("--frames", type=Path, default=DEFAULT_FRAMES, help="recorded LIBERO frames (.npz)")
    p.add_argument("--calls", type=int, default=5, help="policy.act calls to profile after warm-up (default 5)")
    p.add_argument("--out", type=Path, required=True, help="directory for torch_trace.json and torch_summary.json")
    args = p.parse_args(argv)

    from rtloop.errors import InputError, RtloopError

    try:
        if args.calls < 1:
            raise InputError(f"--calls must be >= 1 (got {args.calls})")
        summary = run(args)
    except RtloopError as e:
        print(f"rtloop: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def run(args: argparse.Namespace) -> dict:
    import torch

    from rtloop.bench import PolicyFactory
    from rtloop.commands.device import resolve_device
    from rtloop.policy.engines import build_engine

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    dtype = getattr(torch, ("bfloat16" if cuda else "float32") if args.dtype == "auto" else args.dtype)
    policy = PolicyFactory(args, device, dtype).build()
    policy.engine = build_engine(args.engine, policy.model)
    frames, source = load_profile_frames(args.frames)
    summary = profile_policy(policy, frames, args.calls, args.out / "torch_trace.json", cuda)
    summary.update(frames=source, device=device, engine=args.engine, dtype=str(dtype).removeprefix("torch."),
                   stages_in_trace=check_trace(args.out / "torch_trace.json"))
    if cuda:
        summary["gpu"] = torch.cuda.get_device_name(torch.device(device))
    (args.out / "torch_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
