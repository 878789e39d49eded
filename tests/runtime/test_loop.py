"""The runtime's logic with a fake env, a fake policy and a fake clock: no LIBERO, no subprocess, every timing
decided by the test, so each runs in milliseconds and the same way every time."""

from __future__ import annotations

import threading

import anyio
import numpy as np
import pytest
from fakes import Blocker, FakeClock, FakeEnv, FakePolicy, InferenceWatch

from rtloop.runtime.loop import ActionSelector, Action, LoopConfig, Pacer, Runtime
from rtloop.runtime.mailbox import Frame, LatestFrameMailbox
from rtloop.runtime.summary import RecordLog
from rtloop.runtime.worker import WorkerThread
from rtloop.sim.base import Observation


class Threads:
    def __init__(self):
        self.sim, self.policy = WorkerThread("rtloop-test-sim"), WorkerThread("rtloop-test-policy")

    def close(self):
        self.sim.close()
        self.policy.close()


@pytest.fixture
def threads():
    t = Threads()
    yield t
    t.close()
    assert not [th.name for th in threading.enumerate() if th.name.startswith("rtloop-test-")]


def kinds(log: RecordLog, kind: str) -> list[dict]:
    return [r for r in log.records if r["kind"] == kind]


def run(runtime: Runtime, *episodes: int):
    async def main():
        return [await runtime.run_episode(e) for e in episodes]

    return anyio.run(main)


def test_an_overrun_resyncs_without_a_catch_up_burst(threads):
    """Step 2 takes 3.5 periods: the next tick starts when it ends (not at the three deadlines it missed,
    back to back), and the schedule goes on from there, one period apart."""
    clock = FakeClock()
    env = FakeEnv(horizon=6, clock=clock, step_s=lambda step: 0.35 if step == 2 else 0.02)
    log = RecordLog()
    runtime = Runtime(env, FakePolicy(), threads.sim, threads.policy, log, LoopConfig(rate=10), clock=clock)
    run(runtime, 0)
    ticks = kinds(log, "tick")
    assert [t["deadline"] for t in ticks] == pytest.approx([0.0, 0.1, 0.2, 0.55, 0.65, 0.75])
    assert [t["overrun_s"] for t in ticks] == pytest.approx([0, 0, 0.25, 0, 0, 0])
    assert [t["interval_s"] for t in ticks[1:]] == pytest.approx([0.1, 0.1, 0.35, 0.1, 0.1])


def test_the_pacer_alone():
    async def main():
        clock = FakeClock()
        pacer = Pacer(clock, rate=20)
        starts = []
        for took in (0.01, 0.2, 0.01, 0.01):
            starts.append(await pacer.wait())
            clock.advance(took)
            pacer.finish(clock.now())
        return starts

    assert anyio.run(main) == pytest.approx([0.0, 0.05, 0.25, 0.30])


def frame(seq: int) -> Frame:
    return Frame(seq, Observation(np.zeros((2, 2, 3), np.uint8)), float(seq))


def test_mailbox_accounting_with_a_fast_producer_and_a_slow_consumer():
    """The consumer takes one frame in three: it always gets the newest, the other two count as dropped,
    and every frame is taken, dropped or still unread."""

    async def main():
        box, taken = LatestFrameMailbox(), []
        for seq in range(12):
            box.put(frame(seq))
            if seq % 3 == 2:
                taken.append((await box.get()).seq)
        box.put(frame(12))  # left unread
        return box, taken

    box, taken = anyio.run(main)
    assert taken == [2, 5, 8, 11]
    assert box.dropped == 8
    assert len(taken) + box.dropped + 1 == 13


def test_get_is_a_cancellation_point_even_with_a_frame_waiting():
    async def main():
        box = LatestFrameMailbox()
        with anyio.CancelScope() as empty:
            empty.cancel()
            await box.get()
        box.put(frame(0))
        with anyio.CancelScope() as waiting:
            waiting.cancel()
            await box.get()  # must not hand out the frame and let one more inference start
        return empty.cancelled_caught, waiting.cancelled_caught, await box.get()

    empty, waiting, left = anyio.run(main)
    assert empty and waiting and left.seq == 0  # the frame stayed for whoever asks next


def test_an_episode_end_does_not_wait_for_the_inference_in_flight(threads):
    """The second inference blocks until the test releases it; the episode still ends on its last tick,
    and the blocked call finishes on its thread afterwards (the fixture checks no thread is left)."""
    clock = FakeClock()
    blocker = Blocker({2})
    policy = FakePolicy(hook=blocker)
    env = FakeEnv(horizon=50, clock=clock)
    env.on_step = lambda step: blocker.entered.wait(timeout=10) if step == 1 else None  # the call is in flight
    log = RecordLog()
    runtime = Runtime(env, policy, threads.sim, threads.policy, log, LoopConfig(rate=10, max_steps=5), clock=clock)
    try:
        (episode,) = run(runtime, 0)
        assert episode.steps == 5 and episode.error is None
        assert blocker.entered.is_set() and not blocker.release.is_set()  # still blocked when the episode ended
        assert len(kinds(log, "inference")) == 1
    finally:
        blocker.release.set()


def test_both_tasks_failing_at_once_end_the_episode_and_the_next_one_runs(threads):
    """Whichever failure the loop sees first ends the episode and cancels the other task, which stops
    waiting for its own (failing) call; the episode records the error, no exception group escapes."""
    both = threading.Barrier(2, timeout=10)

    def fail(what):
        def hook(*_):
            both.wait()  # the sim's step and the policy's call are in flight together
            raise RuntimeError(f"injected {what} failure")
        return hook

    env, policy = FakeEnv(horizon=10), FakePolicy(hook=lambda call: fail("policy")() if call == 1 else None)
    env.on_step = lambda step: fail("sim")() if (env.episode, step) == (0, 0) else None
    log = RecordLog()
    runtime = Runtime(env, policy, threads.sim, threads.policy, log, LoopConfig(rate=1000))
    first, second = run(runtime, 0, 1)
    errors = [f'{e["error_kind"]}: {e["message"]}' for e in kinds(log, "error")]
    assert errors and set(errors) <= {"policy: RuntimeError: injected policy failure",
                                      "sim: RuntimeError: injected sim failure"}
    assert first.error == errors[0] and first.steps == 0
    assert second.error is None and second.steps == 10  # the next episode runs as usual


def test_a_stale_action_stops_the_arm_and_alerts_once(threads):
    """The first action arrives during tick 0; the next inference never finishes. Past --max-action-age the
    sim applies the stop action (no motion, the gripper as last commanded), counted as `stop`, alerted once."""
    clock = FakeClock()
    env = FakeEnv(horizon=50, clock=clock)
    log = InferenceWatch()
    log.hold_first_step(env)
    blocker = Blocker({2})
    runtime = Runtime(env, FakePolicy(hook=blocker), threads.sim, threads.policy, log,
                      LoopConfig(rate=10, max_steps=9, max_action_age=0.45), clock=clock)
    try:
        run(runtime, 0)
    finally:
        blocker.release.set()
    ticks = kinds(log, "tick")
    assert [t["action_source"] for t in ticks] == ["dummy", "fresh", "held", "held", "held",
                                                    "stop", "stop", "stop", "stop"]
    assert [t["action_age_s"] for t in ticks[5:]] == pytest.approx([0.5, 0.6, 0.7, 0.8])
    first_action = np.array(kinds(log, "inference")[0]["action"])
    for applied in env.applied[5:]:
        assert np.all(applied[:6] == 0) and applied[6] == first_action[6]
    assert np.allclose(env.applied[1], first_action)
    alerts = kinds(log, "alert")
    assert [a["alert_kind"] for a in alerts] == ["stale_action"]


def test_the_selector_keeps_the_last_gripper_command_when_it_stops():
    selector = ActionSelector(max_age=1.0)
    assert selector.select(0.0, 0).source == "dummy"
    selector.offer(Action(np.array([0.1] * 6 + [1.0]), seq=1, frame_time=0.0, frame_seq=0))
    assert selector.select(0.5, 1).source == "fresh"
    assert selector.select(0.9, 2).source == "held"
    stop = selector.select(1.5, 3)
    assert stop.source == "stop" and stop.seq == 1 and stop.age == pytest.approx(1.5)
    assert list(stop.value) == [0, 0, 0, 0, 0, 0, 1.0]
    selector.offer(Action(np.array([0.2] * 6 + [-1.0]), seq=2, frame_time=1.4, frame_seq=14))
    assert selector.select(1.5, 4).source == "fresh"  # a newer action ends the stop
