"""Measure the scripted expert (privileged state) on real LIBERO through the library runtime.

Each episode runs in rtloop.runtime.loop.Runtime, sync mode (the sim waits for every action, so zero
latency), on a LiberoEnv built with render=False unless --render is given. One line per episode is appended
to --out (JSONL) as it finishes; a rerun skips the (task, init state) pairs already there, so an
interrupted measurement resumes. --report writes the per-task table (Markdown) and JSON from that file.

    PYTHONPATH=$PWD nice -n 10 python scripts/expert_eval.py --out profiles/expert-libero_object/episodes.jsonl
    PYTHONPATH=$PWD python scripts/expert_eval.py --report profiles/expert-libero_object/episodes.jsonl

What rendering costs: the same episodes with and without --render (--tasks 0 --episodes 0-2), then
--compare-render on the two files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import anyio

from rtloop.errors import RtloopError
from rtloop.policy.expert import ScriptedExpert, check_suite
from rtloop.runtime.loop import LoopConfig, Runtime
from rtloop.runtime.records import EpisodeRecord, Fanout, TickRecord
from rtloop.runtime.worker import WorkerThread


class EpisodeTotals:
    """A sink that sums what each tick cost, per episode."""

    def __init__(self) -> None:
        self.episodes: list[dict] = []
        self._ticks = {"step_s": 0.0, "physics_s": 0.0, "render_s": 0.0}

    def on_record(self, rec) -> None:
        if isinstance(rec, TickRecord):
            self._ticks["step_s"] += rec.step_s
            self._ticks["physics_s"] += rec.physics_s
            self._ticks["render_s"] += rec.render_s
        elif isinstance(rec, EpisodeRecord):
            self.episodes.append({
                "suite": rec.suite, "task": rec.task_id, "episode": rec.episode, "success": rec.success,
                "steps": rec.steps, "error": rec.error, "wall_s": rec.t_end - rec.t_start, **self._ticks,
            })
            self._ticks = {k: 0.0 for k in self._ticks}

    def close(self) -> None: ...


def parse_ids(text: str) -> list[int]:
    """"0-9" or "0,3,5" or "7"."""
    ids: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return ids


def run_task(suite: str, task: int, episodes: list[int], rate: float, render: bool, out: Path | None) -> list[dict]:
    from rtloop.sim import make_env

    sim_thread, policy_thread = WorkerThread("rtloop-sim"), WorkerThread("rtloop-policy")
    try:
        built = time.perf_counter()
        env = sim_thread.call(lambda: make_env(suite=suite, task_id=task, render=render))
        build_s = time.perf_counter() - built
        try:
            totals = EpisodeTotals()
            runtime = Runtime(env, ScriptedExpert(), sim_thread, policy_thread, Fanout([totals]),
                              LoopConfig(rate=rate, sync=True))

            async def run_all() -> None:
                for episode in episodes:
                    await runtime.run_episode(episode)
                    row = {**totals.episodes[-1], "render": render, "rate": rate}
                    print(json.dumps(row), flush=True)
                    if out is not None:
                        with out.open("a") as f:
                            f.write(json.dumps(row) + "\n")

            anyio.run(run_all)
        finally:
            sim_thread.call(env.close)
    finally:
        policy_thread.close()
        sim_thread.close()
    print(f"task {task}: env built in {build_s:.1f} s", file=sys.stderr, flush=True)
    return totals.episodes


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def report(path: Path) -> None:
    from rtloop.sim.libero_env import load_task

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_task: dict[int, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    suite = rows[0]["suite"]
    tasks = []
    for task in sorted(by_task):
        eps = by_task[task]
        ok = sum(r["success"] for r in eps)
        lo, hi = wilson(ok, len(eps))
        won = [r["steps"] for r in eps if r["success"]]
        tasks.append({
            "task": task, "instruction": load_task(suite, task)[1].language, "episodes": len(eps),
            "successes": ok, "success_rate": ok / len(eps), "wilson95": [lo, hi],
            "failed_init_states": sorted(r["episode"] for r in eps if not r["success"]),
            "errors": sum(r["error"] is not None for r in eps),
            "mean_steps_success": sum(won) / len(won) if won else None,
            "mean_wall_s": sum(r["wall_s"] for r in eps) / len(eps),
        })
    total = sum(t["successes"] for t in tasks)
    n = sum(t["episodes"] for t in tasks)
    summary = {
        "policy": ScriptedExpert.label, "suite": suite, "mode": "sync (zero latency)", "rate": rows[0]["rate"],
        "render": rows[0]["render"], "machine": f"{os.cpu_count()}-core CPU dev machine ({platform.machine()})",
        "episodes": n, "successes": total, "success_rate": total / n, "wilson95": list(wilson(total, n)),
        "tasks": tasks,
    }
    path.with_name("summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# {ScriptedExpert.label} on {suite}",
        "",
        f"Sync mode (zero latency) at {summary['rate']:g} Hz through `rtloop.runtime.loop.Runtime`, real LIBERO "
        f"with render={summary['render']}, {summary['machine']}. Official protocol: 10 settle steps, horizon 280.",
        "",
        "| task | instruction | success | rate | 95% Wilson | failed init states | mean steps (successes) |",
        "|---:|---|---:|---:|---|---|---:|",
    ]
    for t in tasks:
        failed = ", ".join(map(str, t["failed_init_states"])) or "-"
        steps = f"{t['mean_steps_success']:.0f}" if t["mean_steps_success"] is not None else "-"
        lines.append(
            f"| {t['task']} | {t['instruction']} | {t['successes']}/{t['episodes']} | {t['success_rate']:.0%} | "
            f"{t['wilson95'][0]:.0%}-{t['wilson95'][1]:.0%} | {failed} | {steps} |"
        )
    lines.append(
        f"| all | | {total}/{n} | {total / n:.1%} | {summary['wilson95'][0]:.1%}-{summary['wilson95'][1]:.1%} | | |"
    )
    path.with_name("README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def compare_render(paths: list[Path]) -> None:
    """Per-episode means of the same episodes with and without rendering, as a Markdown table beside them."""
    lines = [
        "| render | episodes | steps | episode wall (s, reset included) | step (ms) | physics (ms) | render (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = sum(r["steps"] for r in rows)
        per_step = {k: 1000 * sum(r[k] for r in rows) / steps for k in ("step_s", "physics_s", "render_s")}
        lines.append(
            f"| {rows[0]['render']} | {len(rows)} | {steps / len(rows):.0f} | "
            f"{sum(r['wall_s'] for r in rows) / len(rows):.1f} | {per_step['step_s']:.1f} | "
            f"{per_step['physics_s']:.1f} | {per_step['render_s']:.1f} |"
        )
    paths[0].with_name("README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--tasks", default="0-9", help='task ids: "0-9", "0,3"')
    parser.add_argument("--episodes", default="0-49", help='init states: "0-49", "0,7"')
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--render", action="store_true", help="render the agentview camera (to time its cost)")
    parser.add_argument("--out", type=Path, help="append one JSON line per episode; skip pairs already in it")
    parser.add_argument("--report", type=Path, metavar="JSONL", help="write README.md + summary.json beside it")
    parser.add_argument("--compare-render", type=Path, nargs="+", metavar="JSONL",
                        help="tabulate runs of the same episodes with and without --render (README.md beside them)")
    args = parser.parse_args()
    try:
        if args.report:
            report(args.report)
            return 0
        if args.compare_render:
            compare_render(args.compare_render)
            return 0
        check_suite(args.suite)
        done = set()
        if args.out is not None and args.out.exists():
            done = {(r["task"], r["episode"]) for r in map(json.loads, args.out.read_text().splitlines()) if r}
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
        for task in parse_ids(args.tasks):
            todo = [e for e in parse_ids(args.episodes) if (task, e) not in done]
            if todo:
                run_task(args.suite, task, todo, args.rate, args.render, args.out)
    except (RtloopError, ValueError) as e:
        print(f"rtloop: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
