"""An env worker that waits for its actions (--sync, the virtual clock), with a fake env and a fake link:
the frame goes out, the episode waits for the answer, and the env's own runtime records the inference on
its own clock from what the answer carries; a policy error on its frame ends its episode."""

from __future__ import annotations

from dataclasses import asdict

import anyio
import numpy as np
import pytest

from rtloop.fleet.worker import EnvWorker
from rtloop.runtime.loop import LoopConfig
from rtloop.sim.base import Observation, StepResult

STEPS = 8


class Env:
    suite, task_id, instruction, label, horizon = "s", 0, "do it", "fake env", 100

    def reset(self, episode):
        return Observation(np.zeros((2, 2, 3), np.uint8))

    def step(self, action):
        return StepResult(Observation(np.zeros((2, 2, 3), np.uint8)), done=False, success=False, timings={})

    def close(self):
        pass


class Link:
    def __init__(self):
        self.records, self.on_ship = [], None

    def ship(self, episode, frame):
        self.on_ship(episode, frame)

    def emit(self, kind, record):
        self.records.append((kind, record))

    def of(self, kind):
        return [r for k, r in self.records if k == kind]


def episode(monkeypatch, on_ship, sync=False, clock="virtual"):
    monkeypatch.setattr("rtloop.commands.run.build_env", lambda args: Env())
    spec = {"sim": "fake", "suite": "s", "seed": 0, "replay": None, "clock": clock,
            "loop": asdict(LoopConfig(rate=20.0, max_steps=STEPS, sync=sync)),
            "latency": {"inject_delay": None, "latency_profile": None, "latency_scale": None, "latency_order": "iid"}}
    link = Link()
    worker = EnvWorker(spec, 3, link)
    link.on_ship = lambda ep, frame: on_ship(worker, ep, frame)
    try:
        worker.prepare(0, 0)
        anyio.run(worker.run_episode, 0, 0)
    finally:
        worker.close()
    return link


def answer(worker, episode, frame):
    worker.on_action(episode, 99, [0.1] * 7, frame.captured_at, 0, [0.2] * 7, {"generate": 0.01}, 0.12, 4, 2)


def test_a_waiting_env_charges_the_batch_time_on_its_virtual_clock(monkeypatch):
    link = episode(monkeypatch, answer)
    infs, ticks = link.of("inference"), link.of("tick")
    assert [t["step"] for t in ticks] == list(range(STEPS))
    assert infs and all(r["env"] == 3 and r["batch_size"] == 4 and r["batch_index"] == 2 for r in infs)
    assert [r["seq"] for r in infs] == list(range(1, len(infs) + 1))  # the env's own inference count
    # the measured latency model charges the batch's wall time: each action lands 0.12 s after its start
    assert all(r["t_end"] - r["t_start"] == pytest.approx(0.12) and r["stages"] == {"generate": 0.01} for r in infs)
    sources = [t["action_source"] for t in ticks]
    assert sources[:3] == ["dummy"] * 3 and sources[3] == "fresh"  # the first tick at or after 0.12 s
    assert link.of("episode")[0]["error"] is None and link.of("env")[0]["instruction"] == "do it"


def test_sync_waits_for_every_action(monkeypatch):
    link = episode(monkeypatch, answer, sync=True, clock="wall")
    assert [t["action_source"] for t in link.of("tick")] == ["fresh"] * STEPS
    assert len(link.of("inference")) == STEPS


def test_a_policy_error_on_its_frame_ends_its_episode(monkeypatch):
    link = episode(monkeypatch, lambda worker, ep, frame: worker.on_abort(ep, "action", "not an action token"))
    (end,) = link.of("episode")
    assert end["error"] == "action: not an action token" and end["steps"] == 0
    assert [(r["error_kind"], r["env"]) for r in link.of("error")] == [("action", 3)]
