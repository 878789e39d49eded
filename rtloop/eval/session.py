"""What `rtloop sweep` and `rtloop eval` share: their `rtloop run` options, the checks before anything heavy,
and one session over a results file (resume, worker pool, progress bar)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rtloop.errors import InputError
from rtloop.eval.episode import run_args
from rtloop.eval.grid import Key
from rtloop.eval.pool import run_episodes
from rtloop.eval.progress import Progress
from rtloop.eval.results import ResultsFile

INIT_STATES = 50  # per LIBERO task


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `rtloop run` that make an episode, as `rtloop run` spells them."""
    p.add_argument("--out", type=Path, required=True,
                   help="output directory: results.jsonl (appended per episode; a rerun resumes), table.md, table.json")
    p.add_argument("--suite", default="libero_object", help="LIBERO suite (default libero_object)")
    p.add_argument("--policy", default="openvla", help="policy (default openvla)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="OpenVLA checkpoint directory (default as `rtloop run`: weights/openvla-7b, else a tiny "
                        "random-weight checkpoint)")
    p.add_argument("--engine", default=None, help="inference engine (default as `rtloop run`)")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--clock", choices=("wall", "virtual"), default="wall",
                   help="wall: real time (default); virtual: time advances 1/rate per tick")
    p.add_argument("--rate", type=float, default=20.0, help="sim ticks per second (default 20)")
    p.add_argument("--max-steps", type=int, default=None, help="cap on policy steps per episode")
    p.add_argument("--seed", type=int, default=0, help="env seed, and the latency profiles' draws (default 0)")
    p.add_argument("--sim", choices=("libero", "replay"), default="libero",
                   help="libero, or replay of recorded LIBERO frames (actions ignored: no outcome to measure)")
    p.add_argument("--replay", type=Path, default=None, help="recorded frames for --sim replay")
    from rtloop.commands.run import add_chunk_arguments

    add_chunk_arguments(p)
    p.add_argument("--traces", action="store_true",
                   help="also write each episode's trace, as DIR/traces/<cell>/task<T>-ep<E>.jsonl (see rtloop timeline)")


def run_options(args: argparse.Namespace) -> dict:
    """The `rtloop run` options every cell shares, but the checkpoint (see prepare_specs). Options at their
    default that the runtime may not have yet (clock, policy) are left out, so only asking for them needs them."""
    options = {"suite": args.suite, "rate": args.rate, "max_steps": args.max_steps, "seed": args.seed,
               "sim": args.sim, "engine": args.engine, "device": args.device,
               "replay": None if args.replay is None else str(args.replay),
               "chunk_threshold": args.chunk_threshold, "chunk_merge": args.chunk_merge}
    if args.clock != "wall":
        options["clock"] = args.clock
    if args.policy != "openvla":
        options["policy"] = args.policy
    return options


def check_workers(n: int, option: str) -> int:
    cores = os.cpu_count() or 1
    if n < 1:
        raise InputError(f"{option} must be >= 1 (got {n})")
    if n > cores:
        raise InputError(f"{option} {n} is more than this machine's {cores} cores (one env per worker process)")
    return n


def check_episodes(n: int) -> list[int]:
    if not 1 <= n <= INIT_STATES:
        raise InputError(f"--episodes must be 1..{INIT_STATES}, the init states per task (got {n})")
    return list(range(n))


def prepare_specs(cells: dict[str, dict], tasks: list[int], checkpoint: Path | None, workers: int,
                  trace_dir: Path | None) -> dict[str, dict]:
    """The spec of every cell (see rtloop.eval.episode), after `rtloop run`'s own checks for each cell and
    task, before any worker starts. Resolving the checkpoint may generate the tiny random one, so it
    comes after the checks that need nothing."""
    from rtloop.commands import run as command

    resolved = str(command.resolve_checkpoint(checkpoint))
    specs = {}
    for name, cell in cells.items():
        cell["run"]["checkpoint"] = resolved
        specs[name] = {"cell": name, **cell, "torch_threads": torch_threads(workers),
                       "trace_dir": None if trace_dir is None else str(trace_dir)}
    # a cell's options do not depend on the task, nor a task's (suite, recording) on the cell
    first = next(iter(specs.values()))
    checks = [(spec, tasks[0]) for spec in specs.values()] + [(first, task) for task in tasks[1:]]
    for spec, task in checks:
        args = run_args(spec, task)
        command.validate(args)
        if args.sim == "replay" and spec is first:  # the recording must hold the task: cheap to open
            command.build_env(args).close()
    return specs


def torch_threads(workers: int) -> int:
    """One core of each worker's share for its sim, the rest for torch (as `rtloop run` does on CPU)."""
    return max(1, (os.cpu_count() or 1) // workers - 1)


@dataclass
class Outcome:
    rows: list[dict]  # the last row of every key asked for that has one
    ran: int  # episodes run in this invocation
    wall_s: float
    interrupted: bool


def run_session(out: Path, grid: dict, specs: dict[str, dict], keys: list[Key], workers: int, title: str,
                runner=run_episodes) -> Outcome:
    """Run the keys not done yet with runner(specs, keys, workers, on_row, log_path), the local worker pool
    by default, appending each row as it comes."""
    results = ResultsFile(out / "results.jsonl", grid)
    done = results.done()
    todo = [k for k in keys if k not in done]
    if len(todo) < len(keys):
        print(f"rtloop: resuming {results.path}: {len(keys) - len(todo)} of {len(keys)} episodes done", file=sys.stderr)
    progress = Progress(title, len(keys), [results.rows[k] for k in keys if k in done])
    ran = 0

    def on_row(row: dict) -> None:
        nonlocal ran
        results.append(row)
        progress.update(row)
        ran += 1

    t0 = time.monotonic()
    interrupted = False
    try:
        if todo:
            runner(specs, todo, min(workers, len(todo)), on_row, str(out / "workers.log"))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        progress.close()
        results.close()
    rows = [results.rows[k] for k in keys if k in results.rows]
    return Outcome(rows, ran, time.monotonic() - t0, interrupted)


def finish(outcome: Outcome, keys: list[Key], out: Path) -> int:
    print(f"results: {out / 'results.jsonl'}  tables: {out / 'table.md'} {out / 'table.json'}  "
          f"worker output: {out / 'workers.log'}")
    if outcome.interrupted:
        print(f"rtloop: interrupted with {sum(not r.get('error') for r in outcome.rows)} of {len(keys)} episodes "
              "done; the same command resumes", file=sys.stderr)
        return 130
    return 1 if any(r.get("error") for r in outcome.rows) else 0
