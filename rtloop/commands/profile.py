"""`rtloop profile [run options]`: one command from "where does the time go?" to files a person can open.

1. `rtloop run` with the given options runs as a subprocess under `py-spy record` (rtloop.profiling.pyspy):
   speedscope.json, and flamegraph.svg drawn from the same samples; the run's trace.jsonl, summary.json and
   console output (run.log) land beside them.
2. The torch profiler wraps `--torch-calls` policy.act calls (after warm-up) of the same policy, built with
   the same options, in this process: torch_trace.json (Chrome/Perfetto), stage names as ranges.
3. report.md / report.json: per-stage and per-thread shares of the loop's wall time and the inference
   ceiling they imply (rtloop.profiling.report). Printed too.

Everything goes to `--out`, default profiles/<UTC timestamp>-<machine>/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# Run options whose value the profiler sets itself.
OWN_RUN_OPTIONS = ("trace",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rtloop.commands.run import add_arguments as add_run_arguments

    before = set(p._actions)
    add_run_arguments(p)
    run_actions = [a for a in p._actions if a not in before]
    g = p.add_argument_group("profile options")
    g.add_argument("--out", type=Path, default=None,
                   help="profile directory (default profiles/<UTC timestamp>-<machine>)")
    g.add_argument("--machine", default=None, help="machine label for the default directory name (default: hostname)")
    g.add_argument("--rate-hz", type=int, default=100, help="py-spy samples per second (default 100, py-spy's own)")
    g.add_argument("--native", action="store_true",
                   help="also unwind C/C++ stacks (see inside MuJoCo, Mesa, OpenMP); off by default because it "
                        "pauses the process longer per sample: on 2 cores it stretches the run ~4x and makes "
                        "py-spy's on-CPU/idle split unreliable")
    g.add_argument("--idle", action="store_true",
                   help="also sample idle threads (shows where they wait; the per-thread busy shares then mean less)")
    g.add_argument("--torch-calls", type=int, default=5, help="policy.act calls under the torch profiler (default 5; 0 = skip)")
    p.set_defaults(_run_actions=run_actions)


def default_out_dir(machine: str | None) -> Path:
    label = (machine or platform.node() or "machine").replace("/", "-").replace(" ", "-")
    return Path("profiles") / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{label}"


def run_argv(args: argparse.Namespace, actions: list[argparse.Action]) -> list[str]:
    """The `rtloop run` command line for the run options the user gave (those not at their default)."""
    argv: list[str] = []
    for a in actions:
        if not a.option_strings or a.dest in OWN_RUN_OPTIONS:
            continue
        value = getattr(args, a.dest)
        if value == a.default:
            continue
        flag = a.option_strings[-1]
        if isinstance(a, argparse.BooleanOptionalAction):  # --x / --no-x: the one that gives this value
            argv.append(a.option_strings[0] if value else a.option_strings[1])
        elif isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def torch_profile(args: argparse.Namespace, out_dir: Path) -> dict | None:
    """Profile --torch-calls inferences of the run's policy (same checkpoint, engine, device), on the
    recorded LIBERO frames `rtloop bench` uses, after warm-up."""
    from rtloop.bench import DEFAULT_FRAMES
    from rtloop.commands.policies import build_policy, resolve_checkpoint
    from rtloop.profiling.torch_trace import load_profile_frames, profile_policy

    if args.torch_calls == 0 or args._policy_spec.kind != "openvla":  # the torch profiler profiles OpenVLA
        return None
    device = args.device  # resolved by validate
    policy = build_policy(args, resolve_checkpoint(args.checkpoint), device)
    frames, source = load_profile_frames(DEFAULT_FRAMES)
    summary = profile_policy(policy, frames, args.torch_calls, out_dir / "torch_trace.json", cuda=device.startswith("cuda"))
    summary.update(frames=source, device=device, engine=args.engine)
    return summary


def main(args: argparse.Namespace) -> int:
    from rtloop.errors import InputError
    from rtloop.profiling import pyspy
    from rtloop.profiling.flamegraph import collapse, render_svg
    from rtloop.profiling.report import build_report, write_report
    from rtloop.profiling.torch_trace import check_trace
    from rtloop.commands.paths import check_writable
    from rtloop.commands.run import validate
    from rtloop.runtime.trace import read_trace

    if args.rate_hz < 1:
        raise InputError(f"--rate-hz must be >= 1 (got {args.rate_hz})")
    if args.torch_calls < 0:
        raise InputError(f"--torch-calls must be >= 0 (got {args.torch_calls})")
    validate(args)  # bad run options fail here, in one line, before py-spy starts anything
    out_dir = args.out or default_out_dir(args.machine)
    check_writable(out_dir, "--out", directory=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "trace.jsonl"
    target = [sys.executable, "-m", "rtloop", "run", *run_argv(args, args._run_actions), "--trace", str(trace)]
    speedscope_path = out_dir / "speedscope.json"

    print(f"rtloop profile: {' '.join(target[1:])}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    py_spy = pyspy.find_py_spy()
    cmd = pyspy.record_command(py_spy, str(speedscope_path), args.rate_hz, args.native, args.idle, target)
    result = pyspy.probe(py_spy, args.native, str(out_dir))
    if result.ok:
        result = pyspy.record(cmd, str(speedscope_path), str(out_dir / "run.log"))
    else:  # py-spy cannot sample here: say why, run plainly for the stage report and the torch profile
        with open(out_dir / "run.log", "w") as log:
            subprocess.run(target, stdout=log, stderr=subprocess.STDOUT)
    load = {"before": load_before, "after": os.getloadavg()[0]}
    pyspy_message = result.message
    if pyspy_message:
        print(f"rtloop profile: {pyspy_message}", file=sys.stderr)
    if not trace.exists():
        code = run_exit_code(out_dir)
        print(f"rtloop profile: the profiled run exited with {code} and wrote no trace: "
              f"{last_error_line(out_dir / 'run.log')}", file=sys.stderr)
        return code

    speedscope = None
    if result.ok:
        speedscope = json.loads(speedscope_path.read_text())
        title = f"rtloop profile {out_dir.name}: py-spy {'--native ' if args.native else ''}at {args.rate_hz} Hz"
        (out_dir / "flamegraph.svg").write_text(render_svg(collapse(speedscope), title))

    torch_summary = torch_profile(args, out_dir)
    torch_stages = check_trace(out_dir / "torch_trace.json") if torch_summary else []
    if torch_summary:
        (out_dir / "torch_summary.json").write_text(json.dumps(torch_summary, indent=2) + "\n")

    sampling = {"flags": " ".join(cmd[cmd.index("--rate"): cmd.index("--")]), "samples": result.samples,
                "errors": result.errors, "max_behind_s": result.max_behind_s, "native": args.native}
    report = build_report(read_trace(trace), speedscope, torch_stages, pyspy_message, sampling, load)
    report["run_command"] = ["rtloop", *target[3:]]
    text = write_report(out_dir, report, f"rtloop profile {out_dir.name}")
    print(text)
    print(f"profile: {out_dir}")
    code = run_exit_code(out_dir)
    if code != 0:
        print(f"rtloop profile: the profiled run exited with {code}: {last_error_line(out_dir / 'run.log')}",
              file=sys.stderr)
    return code


def run_exit_code(out_dir: Path) -> int:
    """The profiled run's exit status, from its summary.json (py-spy exits 0 whatever its target did); a
    run that wrote no summary stopped before its end: 1."""
    try:
        return int(json.loads((out_dir / "summary.json").read_text())["exit_code"])
    except (OSError, ValueError, KeyError):
        return 1


def last_error_line(log: Path) -> str:
    """The run's last `rtloop: error`/`warning` line, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("rtloop: error", "rtloop: warning"))]
    return (errors or lines or ["no output"])[-1]
