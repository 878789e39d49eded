"""The virtual clock (`--clock virtual`): a tick every 1/rate of virtual time, an inference started on a frame
captured at t with latency L delivers at the first tick starting at or after t + L, and the result depends
only on the latency model and the seeds. Fake env and policy (deterministic), real worker threads."""

from __future__ import annotations

import anyio
import pytest
from fakes import FakeEnv, FakePolicy

from rtloop.clock import VirtualClock
from rtloop.runtime.latency import FixedLatency
from rtloop.runtime.loop import LoopConfig, Runtime
from rtloop.runtime.summary import RecordLog
from rtloop.runtime.worker import WorkerThread

WALL_FIELDS = ("step_s", "physics_s", "render_s", "stages")  # measured on the machine, not simulated


class Recorded:
    """A latency model replaying fixed samples, cycled."""

    label = "test samples"

    def __init__(self, seconds: list[float]) -> None:
        self.seconds = seconds

    def sample(self, index: int, measured_s: float | None = None) -> float:
        return self.seconds[index % len(self.seconds)]


def run(latency, sync: bool = False, episodes=(0,), steps: int = 12, rate: float = 20.0, max_action_age=1.0):
    sim, pol = WorkerThread("rtloop-test-sim"), WorkerThread("rtloop-test-policy")
    env, policy, log = FakeEnv(horizon=100), FakePolicy(), RecordLog()
    runtime = Runtime(env, policy, sim, pol, log, LoopConfig(rate=rate, max_steps=steps, sync=sync,
                                                              max_action_age=max_action_age),
                      clock=VirtualClock(), latency=latency)

    async def main():
        applied = []
        for e in episodes:
            await runtime.run_episode(e)
            applied.append([a.tolist() for a in env.applied])
        return applied

    try:
        applied = anyio.run(main)
    finally:
        sim.close()
        pol.close()
    return log.records, applied, [f.tolist() for f in policy.frames]


def without_wall_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in records]


def test_an_action_arrives_at_the_first_tick_after_its_latency():
    records, _, _ = run(FixedLatency(0.12))
    ticks = [r for r in records if r["kind"] == "tick"]
    infs = [r for r in records if r["kind"] == "inference"]
    assert [t["t_start"] for t in ticks] == pytest.approx([k / 20 for k in range(12)])  # exactly 1/rate apart
    assert all(t["overrun_s"] == 0 and t["lateness_s"] == 0 for t in ticks)
    # frame 0 (t=0) is ready at 0.12 -> tick 3 (0.15); the next starts there on frame 3, ready at 0.27 -> tick 6
    assert [(i["frame_seq"], round(i["t_start"], 9), round(i["t_end"], 9)) for i in infs] == [
        (0, 0.0, 0.12), (3, 0.15, 0.27), (6, 0.30, 0.42)]
    assert [t["action_source"] for t in ticks] == ["dummy"] * 3 + ["fresh", "held", "held"] * 3
    assert [t["action_age_s"] for t in ticks[3:6]] == pytest.approx([0.15, 0.20, 0.25])
    # a fast producer and a slow consumer: of every three frames, the newest is taken and two are dropped
    assert [t["frames_dropped_total"] for t in ticks] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8]


def test_two_runs_give_identical_traces():
    first, applied_1, _ = run(Recorded([0.03, 0.21, 0.08, 0.5]), episodes=(0, 1), steps=30)
    second, applied_2, _ = run(Recorded([0.03, 0.21, 0.08, 0.5]), episodes=(0, 1), steps=30)
    assert without_wall_time(first) == without_wall_time(second)
    assert applied_1 == applied_2
    sources = {r["action_source"] for r in first if r["kind"] == "tick"}
    assert {"fresh", "held"} <= sources  # the latencies made a difference worth comparing


@pytest.mark.parametrize("rate", [20.0, 7.0])
def test_zero_latency_async_equals_sync(rate):
    async_records, async_applied, async_frames = run(FixedLatency(0.0), rate=rate, steps=15)
    sync_records, sync_applied, sync_frames = run(FixedLatency(0.0), sync=True, rate=rate, steps=15)
    assert async_frames == sync_frames and len(async_frames) == 15  # the policy saw the same frames
    assert async_applied == sync_applied  # the env got the same actions
    ticks = lambda records: [(t["t_start"], t["action_source"], t["action_age_s"], t["frames_dropped_total"])
                             for t in records if t["kind"] == "tick"]
    assert ticks(async_records) == ticks(sync_records)
    assert {s for _, s, _, _ in ticks(async_records)} == {"fresh"}


def test_sync_on_the_virtual_clock_waits_out_each_latency():
    records, _, _ = run(FixedLatency(0.1), sync=True, steps=4)
    ticks = [r for r in records if r["kind"] == "tick"]
    assert [t["t_start"] for t in ticks] == pytest.approx([0.0, 0.15, 0.30, 0.45])  # period + latency apart
    assert [t["action_age_s"] for t in ticks] == pytest.approx([0.1] * 4)


def test_a_stale_action_stops_the_arm_on_the_virtual_clock():
    records, applied, _ = run(Recorded([0.0, 2.0, 0.0]), steps=40, max_action_age=0.5)
    ticks = [r for r in records if r["kind"] == "tick"]
    # inference 1 (frame 0, no latency) acts at tick 0; inference 2 starts at tick 1 on frame 1 and takes 2 s:
    # due at 2.05 s, after the episode's 40 ticks. Action 1 is held until it is older than 0.5 s (tick 11)
    sources = [t["action_source"] for t in ticks]
    assert sources == ["fresh"] + ["held"] * 10 + ["stop"] * 29
    assert ticks[11]["action_age_s"] == pytest.approx(0.55)
    assert all(a[:6] == [0.0] * 6 for a in applied[0][11:])
    assert [a["alert_kind"] for a in records if a["kind"] == "alert"] == ["stale_action"]
