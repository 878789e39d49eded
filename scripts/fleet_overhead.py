"""Ray's overhead per tick against local processes: the same fleet on both backends, with a policy that
costs nothing (it returns LIBERO's dummy action at once), so what is left is the machinery.

    PYTHONPATH=$PWD python scripts/fleet_overhead.py --envs 2 --steps 400 --out profiles/fleet-overhead-cpu-2core.json

Per backend, from the run's own records (rtloop.runtime.summary):
- frame age at inference start: the worker's capture -> the parent's inference task has it (one way in);
- inference: one policy call of the batch, i.e. for the instant policy the policy hop itself (in process
  for local; a Ray actor call, frames out and actions back through the object store, for Ray);
- action age: capture -> the tick that applies the action (both ways, plus the wait for that tick);
- tick lateness and env.step: whether the worker's pacing suffers.
--sim replay (recorded LIBERO frames, actions ignored): the envs cost ~nothing, the frames are real size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import anyio
import numpy as np

from rtloop.fleet.fleet import Fleet
from rtloop.policy.base import PolicyOutput
from rtloop.runtime.loop import DUMMY_ACTION, LoopConfig
from rtloop.runtime.records import Fanout
from rtloop.runtime.summary import RecordLog, summarize

FIELDS = ("frame age", "inference", "action age", "tick lateness", "step", "queue wait")


class InstantPolicy:
    label = "instant (no model: the dummy action at once; measures the machinery)"
    needs_images = True

    def act(self, obs, instruction):
        return PolicyOutput(DUMMY_ACTION.copy(), DUMMY_ACTION.copy(), {})

    def act_batch(self, observations, instructions, streams=None):
        return [self.act(o, i) for o, i in zip(observations, instructions)]

    def warmup(self, obs, instruction):
        pass

    def close(self):
        pass


def build_instant() -> InstantPolicy:
    return InstantPolicy()


def measure(backend_name: str, envs: int, spec: dict) -> dict:
    if backend_name == "ray":
        from rtloop.fleet import ray_backend

        ray_backend.start_ray(None)
        backend = ray_backend.RayBackend("cpu", spec, envs, build_instant, ())
    else:
        from rtloop.fleet.local import LocalBackend

        backend = LocalBackend(spec, None, build_instant, ())
    log = RecordLog()
    fleet = Fleet(backend.make_link, envs, backend.policies, Fanout([log]), spec["suite"])
    try:
        async def main():
            await fleet.prepare([(0, e) for e in range(envs)])
            t0 = time.monotonic()
            await fleet.run()
            return time.monotonic() - t0

        wall = anyio.run(main)
    finally:
        fleet.close()
        backend.close()
    summary = summarize(log.records)
    stages = {name: summary["stages_s"][name] for name in FIELDS}
    return {"wall_s": wall, "sim_hz": summary["sim_hz"], "fresh_fraction": summary["fresh_fraction"],
            "frames_dropped": summary["frames_dropped"], "ticks": summary["ticks"],
            "stages_ms": {k: None if v is None else {q: round(v[q] * 1e3, 3) if q != "n" else v[q] for q in v}
                          for k, v in stages.items()},
            "fleet": {k: v for k, v in summary["fleet"].items() if k != "per_env"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", type=int, default=2)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--steps", type=int, default=400, help="ticks per env")
    p.add_argument("--backends", default="local,ray")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    # rtloop.fleet.command.env_spec's form: the wall clock, the default loop (no latency model needed)
    spec = {"sim": "replay", "suite": "libero_object", "seed": 0, "replay": None, "clock": "wall", "latency": None,
            "loop": asdict(LoopConfig(rate=args.rate, max_steps=args.steps))}
    results = {}
    for name in args.backends.split(","):
        results[name] = measure(name, args.envs, spec)
        s = results[name]["stages_ms"]
        print(f"{name:6} frame age p50/p99 {s['frame age']['p50']:.2f}/{s['frame age']['p99']:.2f} ms  "
              f"policy hop p50/p99 {s['inference']['p50']:.2f}/{s['inference']['p99']:.2f} ms  "
              f"action age p50/p99 {s['action age']['p50']:.1f}/{s['action age']['p99']:.1f} ms  "
              f"lateness p99 {s['tick lateness']['p99']:.2f} ms  sim {results[name]['sim_hz']:.1f} Hz")
    import ray

    doc = {"what": "fleet machinery per tick, local processes vs Ray actors, instant policy, --sim replay "
                   "(recorded LIBERO frames, 256x256x3 uint8)",
           "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                       "label": "2-core CPU dev machine" if os.cpu_count() == 2 else None},
           "ray": ray.__version__, "envs": args.envs, "rate": args.rate, "steps": args.steps,
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
