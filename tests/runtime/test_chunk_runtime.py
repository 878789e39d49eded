"""Action chunks through the runtime (the ChunkSelector): a chunk is executed one action per tick, the next
one asked for at --chunk-threshold, overlaps merged by --chunk-merge; on the virtual clock exactly, on the
fake wall clock in order. A policy without chunks runs as before (the other runtime tests)."""

from __future__ import annotations

import anyio
import numpy as np
import pytest
from fakes import ChunkedFakePolicy, FakeClock, FakeEnv

from rtloop.clock import VirtualClock
from rtloop.runtime.latency import FixedLatency
from rtloop.runtime.loop import LoopConfig, Runtime
from rtloop.runtime.summary import RecordLog, summarize
from rtloop.runtime.worker import WorkerThread


def run(threshold=0.5, merge="latest_only", latency=0.0, horizon=4, steps=12, sync=False, virtual=True):
    sim, pol = WorkerThread("rtloop-test-sim"), WorkerThread("rtloop-test-policy")
    clock = VirtualClock() if virtual else FakeClock()
    env, log = FakeEnv(horizon=100, clock=None if virtual else clock), RecordLog()
    config = LoopConfig(rate=20.0, max_steps=steps, sync=sync, chunk_threshold=threshold, chunk_merge=merge)
    runtime = Runtime(env, ChunkedFakePolicy(horizon), sim, pol, log, config, clock=clock,
                      latency=FixedLatency(latency) if virtual else None)
    try:
        anyio.run(runtime.run_episode, 0)
    finally:
        sim.close()
        pol.close()
    ticks = [r for r in log.records if r["kind"] == "tick"]
    infs = [r for r in log.records if r["kind"] == "inference"]
    return ticks, infs, np.array(env.applied), log.records


def planned_step(action) -> int:
    return round(action[0] * 100)


def call(action) -> int:
    return round(action[1] * 100)


@pytest.mark.parametrize("sync", [False, True])
def test_each_tick_executes_the_action_planned_for_it_and_asks_at_the_threshold(sync):
    ticks, infs, applied, _ = run(threshold=0.5, horizon=4, sync=sync)
    assert [t["action_source"] for t in ticks] == ["chunk"] * 12
    assert [planned_step(a) for a in applied] == list(range(12))
    # 4 actions, asked again when 2 are left: an inference every 2 ticks, on the newest frame
    assert [i["frame_seq"] for i in infs] == [0, 2, 4, 6, 8, 10]
    assert [call(a) for a in applied] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert [t["chunk_index"] for t in ticks] == [0, 1] * 6
    assert {t["chunk_len"] for t in ticks} == {4}
    assert [t["chunk_age_ticks"] for t in ticks] == [0, 1] * 6
    # each new chunk overlaps the 2 actions left of the previous one (latest_only: replaced)
    assert [t["chunk_merged"] for t in ticks] == [False, False] + [True] * 10


@pytest.mark.parametrize("threshold, frames", [(0.0, [0, 4, 8]), (0.25, [0, 3, 6, 9]), (1.0, list(range(12)))])
def test_the_threshold_decides_when_the_next_chunk_is_asked_for(threshold, frames):
    ticks, infs, applied, _ = run(threshold=threshold, horizon=4)
    assert [i["frame_seq"] for i in infs] == frames
    assert [planned_step(a) for a in applied] == list(range(12))


@pytest.mark.parametrize("merge, new_weight", [("latest_only", 1.0), ("weighted_average", 0.7), ("average", 0.5),
                                               ("conservative", 0.3)])
def test_overlapping_actions_merge_by_the_named_rule(merge, new_weight):
    _, _, applied, _ = run(threshold=0.5, merge=merge, horizon=4)
    # steps 2 and 3: chunk 1's actions for them (call 1) meet chunk 2's (call 2); steps 0 and 1: chunk 1's alone
    assert [a[1] for a in applied[:4]] == pytest.approx([0.01, 0.01] + [(1 - new_weight) * 0.01 + new_weight * 0.02] * 2)
    assert [planned_step(a) for a in applied] == list(range(12))  # both were planned for the same step


def test_a_late_chunk_drops_the_steps_already_executed():
    # latency 0.12 s at 20 Hz: a chunk reaches the sim 3 ticks after its frame
    ticks, infs, applied, records = run(threshold=0.5, latency=0.12, horizon=8)
    assert [t["action_source"] for t in ticks[:3]] == ["dummy"] * 3
    assert [t["action_source"] for t in ticks[3:]] == ["chunk"] * 9
    assert [planned_step(a) for a in applied[3:]] == list(range(3, 12))
    assert [t["chunk_index"] for t in ticks[3:7]] == [3, 4, 5, 6]  # ticks since the chunk's frame
    assert [t["chunk_age_ticks"] for t in ticks[3:7]] == [0, 1, 2, 3]  # ticks since it arrived
    assert [i["frame_seq"] for i in infs[:2]] == [0, 4]  # asked again at 4 of 8 left
    assert ticks[7]["chunk_merged"] and call(applied[7]) == 2
    chunks = summarize(records)["chunks"]
    assert chunks["ticks"] == 9 and chunks["chunk_len"] == 8 and chunks["merged"] >= 1


def test_a_virtual_chunked_run_is_deterministic():
    a, b = run(latency=0.07, horizon=5, steps=20), run(latency=0.07, horizon=5, steps=20)
    assert np.array_equal(a[2], b[2])
    assert [i["frame_seq"] for i in a[1]] == [i["frame_seq"] for i in b[1]]


def test_on_the_wall_clock_chunks_run_in_order():
    ticks, infs, applied, _ = run(threshold=0.5, horizon=4, steps=20, virtual=False)
    chunk_ticks = [i for i, t in enumerate(ticks) if t["action_source"] == "chunk"]
    assert chunk_ticks  # when a chunk lands is the threads' business; what it executes is not
    assert all(planned_step(applied[i]) == i for i in chunk_ticks)
    assert all(ticks[i]["chunk_index"] == i - infs_frame(infs, call(applied[i])) for i in chunk_ticks)


def infs_frame(infs, call_number):
    return infs[call_number - 1]["frame_seq"]
