"""The heap freeze and the garbage-collection timer, on this process's real collector."""

from __future__ import annotations

import gc

import anyio
from fakes import FakeClock, FakeEnv, FakePolicy, InferenceWatch

from rtloop.runtime.heap import CollectorPauses, freeze, thaw
from rtloop.runtime.loop import LoopConfig, Runtime
from rtloop.runtime.worker import WorkerThread


def test_what_is_alive_at_the_freeze_is_never_walked_again():
    alive = [[]]
    freeze()
    assert gc.get_freeze_count() > 0
    assert not any(o is alive for o in gc.get_objects())  # no generation holds it: no collection walks it
    later = [[]]
    assert any(o is later for o in gc.get_objects())


def test_a_collection_at_or_over_the_threshold_becomes_an_alert_while_installed():
    with CollectorPauses(threshold_s=0) as pauses:
        gc.collect()
    alerts = pauses.take()
    assert alerts and {a.kind for a in alerts} == {"gc_pause"}
    assert "generation-2" in alerts[-1].message
    assert pauses.take() == []  # taken once
    gc.collect()  # uninstalled: not seen
    assert pauses.take() == []


def test_a_short_collection_is_counted_not_alerted():
    with CollectorPauses(threshold_s=60) as pauses:
        gc.collect()
    assert pauses.collections >= 1 and pauses.total_s > 0
    assert pauses.take() == []


def test_the_runtime_puts_a_long_collection_on_the_episode_it_delayed():
    """The first inference runs a full collection; the sim holds its first step until that inference is
    delivered (else the episode could end first, its inference cancelled)."""
    threads = WorkerThread("test-sim"), WorkerThread("test-policy")
    try:
        log, clock = InferenceWatch(), FakeClock()
        env = FakeEnv(horizon=8, clock=clock)
        log.hold_first_step(env)
        policy = FakePolicy(hook=lambda call: gc.collect() if call == 1 else None)
        runtime = Runtime(env, policy, *threads, log, LoopConfig(rate=10), clock=clock)
        runtime.pauses = CollectorPauses(threshold_s=0)  # every collection counts as long
        anyio.run(runtime.run_episode, 0)
    finally:
        for thread in threads:
            thread.close()
    pauses = [r for r in log.records if r["kind"] == "alert" and r["alert_kind"] == "gc_pause"]
    assert pauses and {r["episode"] for r in pauses} == {0}
    assert gc.get_freeze_count() == 0  # freezing is the command's, once the policy is warm: not the loop's


def test_a_thaw_gives_the_frozen_back_to_the_collector():
    freeze()
    thaw()
    assert gc.get_freeze_count() == 0
