"""One episode of a sweep or an eval, through the ordinary runtime: `run_one_episode(spec, task, episode)`.

A spec is a plain dict:
    {"cell": "async 50ms",
     "run": {"sync": False, "inject_delay": 0.05, "rate": 20.0, "sim": "libero", "checkpoint": "/path", ...},
     "torch_threads": 1,          # per worker process
     "trace_dir": None}           # or a directory: each episode's trace as DIR/<cell>/task<T>-ep<E>.jsonl

"run" holds `rtloop run` options by their argparse names; everything else takes `rtloop run`'s default.
The env and the policy are built with `rtloop run`'s own factories (rtloop.commands.run build_env,
build_policy) and the episode runs on `Runtime.run_episode` with the run's clock and latency model, so a new
runtime option reaches the sweep by naming it in "run".
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from rtloop.errors import InputError

ENV_OPTIONS = ("sim", "suite", "task", "seed", "replay")  # the env depends on these alone
NOT_POLICY_OPTIONS = ("sim", "task", "replay", "rate", "max_steps", "sync", "max_action_age", "chunk_threshold",
                      "chunk_merge")  # the policy on none of these


def run_args(spec: dict, task: int) -> argparse.Namespace:
    """`rtloop run`'s arguments for this spec and task: its defaults, then the spec's options."""
    from rtloop.commands import run as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([])
    for name, value in spec["run"].items():
        if not hasattr(args, name):
            raise InputError(f"`rtloop run` has no option --{name.replace('_', '-')}")
        setattr(args, name, Path(value) if name in ("checkpoint", "replay") and value is not None else value)
    args.task, args.quiet, args.metrics_port = task, True, 0
    args.torch_threads = spec.get("torch_threads")
    return args


def loop_config(args: argparse.Namespace):
    from rtloop.commands.run import loop_config as run_loop_config

    return run_loop_config(args)


def _options_key(args: argparse.Namespace, names) -> tuple:
    return tuple((n, str(getattr(args, n))) for n in names)


class EpisodeRunner:
    """Keeps one env and one policy alive from episode to episode while the options they depend on stay
    the same (a LIBERO env takes ~8 s to build, a 7B model much longer). The env lives on its own thread
    for its whole life (EGL contexts are per thread), the policy on another, as in `rtloop run`."""

    def __init__(self) -> None:
        from rtloop.runtime.worker import WorkerThread

        self.sim_thread, self.policy_thread = WorkerThread("rtloop-sim"), WorkerThread("rtloop-policy")
        self.env = self.policy = None
        self.env_key: tuple | None = None
        self.policy_key: tuple | None = None

    def _prepare(self, args: argparse.Namespace, episode: int) -> None:
        from rtloop.commands import run as command
        from rtloop.runtime import heap

        # The policy before the env: built the other way round, importing triton (the policy's kernels)
        # after a LIBERO env made its EGL context segfaults on the 2-core CPU machine (Mesa's software
        # renderer loads its own LLVM first). `rtloop run` builds both at once and the env is slower.
        # validate's derived objects (args._latency) are left out: the options that made them are in
        policy_key = _options_key(args, sorted(n for n in vars(args) if n not in NOT_POLICY_OPTIONS and n[0] != "_"))
        new_policy = policy_key != self.policy_key
        env_key = _options_key(args, ENV_OPTIONS)
        if not (new_policy or env_key != self.env_key):
            return
        heap.thaw()  # what is replaced was frozen with the rest: its cycles must be collectable (rtloop.runtime.heap)
        if new_policy:
            self._close_policy()
            self.policy = self.policy_thread.call(command.build_policy, args, args.checkpoint, args.device)
            self.policy_key = policy_key
        if env_key != self.env_key:
            self._close_env()
            self.env = self.sim_thread.call(command.build_env, args, args._policy_spec.needs_images)
            self.env_key = env_key
        if new_policy:
            first = self.sim_thread.call(self.env.reset, episode)
            self.policy_thread.call(self.policy.warmup, first, self.env.instruction)
        heap.freeze()

    def run(self, spec: dict, task: int, episode: int) -> dict:
        import anyio

        from rtloop.commands import run as command
        from rtloop.clock import WALL, VirtualClock
        from rtloop.runtime.loop import Runtime
        from rtloop.runtime.records import Fanout
        from rtloop.runtime.summary import RecordLog

        args = run_args(spec, task)
        command.validate(args)  # resolves the device and the engine as `rtloop run` does
        self._prepare(args, episode)
        log = RecordLog()
        sinks = [log]
        if spec.get("trace_dir"):
            from rtloop.runtime.trace import TraceSink

            sinks.append(TraceSink(trace_path(Path(spec["trace_dir"]), spec["cell"], task, episode)))
        fanout = Fanout(sinks)
        config = loop_config(args)
        env = self.env
        fanout.on_record(run_header(spec, args, self.policy.label, {
            "suite": env.suite, "task": task, "label": env.label, "instruction": env.instruction,
            "horizon": env.horizon, "steps_limit": config.steps_limit(env.horizon)}))
        virtual = args.clock == "virtual"
        runtime = Runtime(self.env, self.policy, self.sim_thread, self.policy_thread, fanout, config,
                          clock=VirtualClock() if virtual else WALL, latency=args._latency if virtual else None)
        t0 = time.monotonic()
        try:
            anyio.run(runtime.run_episode, episode)
        finally:
            fanout.close()
        return episode_row(spec["cell"], task, episode, log.records, time.monotonic() - t0,
                           policy=self.policy.label, sim=self.env.label, instruction=self.env.instruction)

    def _close_env(self) -> None:
        if self.env is not None:
            self.sim_thread.call(self.env.close)
            self.env = self.env_key = None

    def _close_policy(self) -> None:
        close = getattr(self.policy, "close", None)
        if close is not None:
            self.policy_thread.call(close)
        self.policy = self.policy_key = None

    def close(self) -> None:
        self._close_env()
        self._close_policy()
        self.sim_thread.close()
        self.policy_thread.close()


def run_header(spec: dict, args: argparse.Namespace, policy: str, env: dict):
    """The RunRecord that heads an episode's records: its cell, the run's options, the policy's label and
    its env's (`env`: suite, task, label, instruction, horizon, steps_limit, as a fleet worker describes it)."""
    from rtloop.commands import run as command
    from rtloop.runtime.records import RunRecord

    return RunRecord({
        "cell": spec["cell"], "clock": args.clock, "rate": args.rate, "suite": env["suite"], "task": env["task"],
        "sync": args.sync, "policy": policy, "sim": env["label"], "instruction": env["instruction"],
        "horizon": env["horizon"], "steps_limit": env["steps_limit"], "latency": args._latency.describe(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
        "machine": command.machine(args.device), "versions": command.versions(),
    })


def trace_path(trace_dir: Path, cell: str, task: int, episode: int) -> Path:
    return trace_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", cell) / f"task{task}-ep{episode}.jsonl"


def episode_row(cell: str, task: int, episode: int, records: list[dict], wall_s: float, **labels) -> dict:
    """One results row: what the tables need, from this episode's records (via summarize)."""
    from collections import Counter

    from rtloop.runtime.records import ACTION_SOURCES
    from rtloop.runtime.summary import summarize

    summary = summarize(records)
    (outcome,) = summary["episodes"]
    ticks = [r for r in records if r["kind"] == "tick"]
    sizes = [r["batch_size"] for r in records if r["kind"] == "inference"]
    ages = [r["action_age_s"] for r in ticks if r["action_age_s"] is not None]
    sources = Counter(r["action_source"] for r in ticks)
    return {
        "cell": cell, "task": task, "episode": episode,
        "success": outcome["success"], "steps": outcome["steps"], "error": outcome["error"],
        "ticks": summary["ticks"], **{source: sources[source] for source in ACTION_SOURCES},
        "frames_dropped": summary["frames_dropped"],
        "inferences": summary["inferences"], "sim_hz": summary["sim_hz"],
        # frames per policy call, averaged over this episode's inferences (a fleet batches several envs')
        "batch_size_mean": sum(sizes) / len(sizes) if sizes else None,
        "action_ages_ms": [round(a * 1e3, 2) for a in ages],  # the samples, so cells pool exact percentiles
        "alerts": summary["alerts"], "wall_s": round(wall_s, 3), **labels,
    }


_runner: EpisodeRunner | None = None


def run_one_episode(spec: dict, task: int, episode: int) -> dict:
    """One episode of `spec` at (task, episode), reusing this process's env and policy where it can."""
    global _runner
    if _runner is None:
        _runner = EpisodeRunner()
    return _runner.run(spec, task, episode)


def close_runner() -> None:
    global _runner
    if _runner is not None:
        _runner.close()
        _runner = None
