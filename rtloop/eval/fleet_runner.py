"""`rtloop eval`'s episodes on the fleet (rtloop.fleet): N env workers, local processes or Ray actors,
feeding ONE batched policy. For a policy that batches (OpenVLA): one model serves every env, where the
worker pool (rtloop.eval.pool) would load one per worker.

The fleet's queue is the eval's (task, init state) keys in order: each env takes the next one when its
episode ends, another task's included (its worker rebuilds its env, and the batch takes each frame with
its own env's instruction). Each episode's records become its results row through `episode_row`, as the
pool's do, so the results file, the resume and the tables are one code path for both runners.
"""

from __future__ import annotations

import argparse
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from rtloop.eval.episode import episode_row, run_args, run_header, trace_path
from rtloop.eval.grid import Key
from rtloop.runtime.records import EpisodeRecord, Record, RunRecord, to_dict


def fleet_args(spec: dict, task: int, envs: int, backend: str, address: str | None,
               oversubscribe: bool) -> argparse.Namespace:
    """`rtloop run --envs N`'s arguments for the eval's cell, after the fleet's checks (Ray is started
    here for --backend ray: its cluster's cores and GPUs are part of the checks)."""
    from rtloop.fleet.command import validate_fleet

    args = run_args(spec, task)
    args.envs, args.backend, args.address, args.oversubscribe = envs, backend, address, oversubscribe
    args.episodes = 1  # `rtloop run`'s own count (default: one per env) is not the eval's: its keys are
    validate_fleet(args)
    return args


class EpisodeRows:
    """The fleet's record stream cut into episodes, per env (an env runs one episode at a time): at each
    episode's end its results row goes to on_row, and with --traces its records to its own trace file."""

    def __init__(self, spec: dict, args: argparse.Namespace, on_row: Callable[[dict], None]) -> None:
        self.spec, self.args, self.on_row = spec, args, on_row
        self.policy = ""  # the policy's label, once built
        self.envs: list[dict] = []  # each env's description (the fleet's slot info), once it runs
        self.records: dict[int, list[Record]] = {}
        self.since: dict[int, float] = {}  # when each env's current episode began, its env build included

    def start(self, policy: str, envs: list[dict]) -> None:
        self.policy, self.envs = policy, envs
        now = time.monotonic()
        self.since = {i: now for i in range(len(envs))}

    def on_record(self, record: Record) -> None:
        if isinstance(record, RunRecord):
            return
        self.records.setdefault(record.env, []).append(record)
        if isinstance(record, EpisodeRecord):
            self._episode_done(record)

    def _episode_done(self, end: EpisodeRecord) -> None:
        records = self.records.pop(end.env)
        now = time.monotonic()
        wall_s, self.since[end.env] = now - self.since[end.env], now
        env = self.envs[end.env]
        # a worker that died before it said which task it ran still describes its previous one
        same_task = env.get("task") == end.task_id
        if same_task and self.spec.get("trace_dir"):
            from rtloop.runtime.trace import TraceSink

            trace = TraceSink(trace_path(Path(self.spec["trace_dir"]), self.spec["cell"], end.task_id, end.episode))
            trace.on_record(run_header(self.spec, self.args, self.policy, env))
            for record in records:
                trace.on_record(record)
            trace.close()
        self.on_row(episode_row(self.spec["cell"], end.task_id, end.episode, [to_dict(r) for r in records], wall_s,
                                policy=self.policy, sim=env.get("label") if same_task else None,
                                instruction=env.get("instruction") if same_task else None))

    def close(self) -> None:
        pass


class FleetRunner:
    """A runner for rtloop.eval.session.run_session (called as run_episodes is) on the fleet of `args`
    (from fleet_args). `started`: when the episodes began (time.time()), after the policy's build and
    warm-up and the first envs' builds; None until then."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started: float | None = None

    def __call__(self, specs: dict[str, dict], keys: list[Key], workers: int, on_row: Callable[[dict], None],
                 log_path: str | None = None) -> None:
        """Every key on `workers` envs, on_row(row) as each episode ends. Ctrl-C and SIGTERM raise
        KeyboardInterrupt here, after the workers are gone."""
        import anyio

        from rtloop.eval.pool import raise_interrupt
        from rtloop.fleet.command import make_backend, make_fleet, policy_threads
        from rtloop.runtime.loop import first_error
        from rtloop.runtime.records import Fanout

        args = self.args
        (spec,) = specs.values()  # an eval is one cell
        args.envs = workers
        # on the CPU torch gets the cores the env workers leave, as `rtloop run --envs` does
        args.torch_threads = policy_threads(workers) if args.device == "cpu" else None
        rows = EpisodeRows(spec, args, on_row)
        previous_term = signal.signal(signal.SIGTERM, raise_interrupt)
        try:
            with ExitStack() as cleanup:
                backend = make_backend(args, args.checkpoint, workers, log_path)
                cleanup.callback(backend.close)
                fleet = make_fleet(args, backend, workers, Fanout([rows]))
                cleanup.callback(fleet.close)

                async def run_all() -> None:
                    await fleet.prepare([(task, episode) for _, task, episode in keys])
                    rows.start(backend.policies[0][0].label, [slot.info for slot in fleet.slots])
                    self.started = time.time()
                    await fleet.run()

                try:
                    anyio.run(run_all)
                except ExceptionGroup as group:  # an InputError from a worker (an env that cannot be built)
                    raise first_error(group) from None
        finally:
            signal.signal(signal.SIGTERM, previous_term)
