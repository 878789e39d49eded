"""The fleet's batching and bookkeeping, with fakes: which frames go into a batch, how a policy without
act_batch is served, and that a dead worker ends only its own episode."""

from __future__ import annotations

import gc
import time
from functools import partial

import anyio
import numpy as np
import pytest

from rtloop import clock
from rtloop.errors import InputError, WorkerError
from rtloop.fleet.fleet import EnvSlot, Fleet, PendingFrame, run_batch, take_batch
from rtloop.policy.base import PolicyOutput
from rtloop.runtime.heap import CollectorPauses
from rtloop.runtime.records import Fanout
from rtloop.runtime.summary import RecordLog
from rtloop.runtime.worker import WorkerThread
from rtloop.sim.base import Observation


def frame(episode: int, seq: int, arrived: float) -> PendingFrame:
    return PendingFrame(episode, seq, captured_at=arrived, load=lambda: Observation(np.zeros((2, 2, 3), np.uint8)),
                        arrived=arrived)


def test_a_batch_takes_the_newest_unread_frame_of_each_env():
    a, b, c = EnvSlot(0), EnvSlot(1), EnvSlot(2)
    a.offer(frame(0, 1, arrived=1.0))
    a.offer(frame(0, 2, arrived=3.0))  # overwrites the unread seq 1
    b.offer(frame(0, 7, arrived=2.0))
    batch = take_batch([a, b, c], cap=32)
    assert [(s.index, f.seq) for s, f in batch] == [(1, 7), (0, 2)]  # first arrived, first in
    assert a.dropped == 1 and b.dropped == 0
    assert a.pending is None and b.pending is None
    assert take_batch([a, b, c], cap=32) == []  # nothing unread is left


def test_a_batch_is_capped_and_the_envs_left_out_keep_their_frames():
    slots = [EnvSlot(i) for i in range(5)]
    for i, s in enumerate(slots):
        s.offer(frame(0, i, arrived=float(10 - i)))  # env 4 arrived first
    batch = take_batch(slots, cap=2)
    assert [s.index for s, _ in batch] == [4, 3]
    assert [s.index for s in slots if s.pending is not None] == [0, 1, 2]
    assert [s.index for s, _ in take_batch(slots, cap=2)] == [2, 1]


class OneAtATime:
    label, needs_images = "fake", True

    def __init__(self):
        self.calls = []

    def warmup(self, obs, instruction):
        pass

    def act(self, obs, instruction):
        self.calls.append(instruction)
        return PolicyOutput(np.full(7, len(self.calls), float), np.zeros(7), {"generate": 0.001})


class Batched(OneAtATime):
    def __init__(self):
        super().__init__()
        self.streams = []

    def act_batch(self, observations, instructions, streams=None):
        self.calls.append(list(instructions))
        self.streams.append(streams)
        return [PolicyOutput(np.full(7, i, float), np.zeros(7), {}) for i in range(len(observations))]


def test_a_policy_without_act_batch_is_called_once_per_frame_in_order():
    obs = [Observation(None)] * 3
    policy = OneAtATime()
    outs = run_batch(policy, obs, ["a", "b", "c"], [0, 1, 2])
    assert policy.calls == ["a", "b", "c"] and [o.action[0] for o in outs] == [1, 2, 3]
    batched = Batched()
    assert len(run_batch(batched, obs, ["a", "b", "c"], [4, 0, 2])) == 3 and batched.calls == [["a", "b", "c"]]
    assert batched.streams == [[4, 0, 2]]


class FakeLink:
    """A worker that ticks `steps` times per episode, one frame per tick, and waits for nothing; with
    die_after, it dies after that many ticks."""

    def __init__(self, index: int, steps: int = 4, die_after: int | None = None):
        self.index, self.steps, self.die_after, self.pid = index, steps, die_after, None
        self.send, self.inbox = anyio.create_memory_object_stream(100)
        self.actions: list[tuple] = []
        self.closed = False

    async def prepare(self, task, episode):
        return Observation(np.zeros((2, 2, 3), np.uint8)), {"instruction": f"task {task}", "suite": "s", "label": "fake",
                                                            "horizon": 10, "steps_limit": 10}

    def start(self, task, episode):
        for step in range(self.steps):
            if self.die_after is not None and step == self.die_after:
                self.send.send_nowait(("die",))
                return
            self.send.send_nowait(("frame", frame(episode, step, arrived=float(step))))
            self.send.send_nowait(("record", "tick", tick(self.index, episode, step)))
        self.send.send_nowait(("record", "episode", {"episode": episode, "suite": "s", "task_id": task, "t_start": 0.0,
                                                     "t_end": 1.0, "steps": self.steps, "success": True,
                                                     "env": self.index}))

    def send_action(self, *action):
        self.actions.append(action)
        return True

    def abort(self, *args):
        raise AssertionError("no policy error here")

    async def receive(self):
        message = await self.inbox.receive()
        if message[0] == "die":
            raise WorkerError(f"env {self.index}: killed")
        await anyio.sleep(0.001)  # let the inference task take frames between ticks
        return [message]

    def close(self):
        self.closed = True


def tick(env, episode, step):
    return {"episode": episode, "step": step, "t_start": float(step), "t_end": step + 0.01, "deadline": float(step),
            "interval_s": None, "overrun_s": 0.0, "lateness_s": 0.0, "step_s": 0.01, "physics_s": 0.0,
            "render_s": 0.0, "action_source": "dummy", "action_seq": None, "action_age_s": None, "frame_seq": step + 1,
            "frames_dropped_total": 0, "done": False, "success": False, "env": env}


@pytest.mark.parametrize("policy", [OneAtATime(), Batched()], ids=["act", "act_batch"])
def test_a_dead_worker_ends_only_its_episode_and_a_new_one_takes_the_next(policy):
    links: list[FakeLink] = []

    def make_link(index):
        # env 1's first worker dies after 2 ticks; its replacement is healthy
        link = FakeLink(index, die_after=2 if index == 1 and not any(l.index == 1 for l in links) else None)
        links.append(link)
        return link

    log = RecordLog()
    thread = WorkerThread("test-policy")
    try:
        fleet = Fleet(make_link, 3, [(policy, thread)], Fanout([log]), suite="s")

        async def main():
            await fleet.prepare([(0, e) for e in range(5)])
            return await fleet.run()

        episodes = anyio.run(main)
    finally:
        thread.close()
    by_episode = {e.episode: e for e in episodes}
    assert sorted(by_episode) == [0, 1, 2, 3, 4]
    failed = [e for e in episodes if e.error]
    assert [(e.episode, e.env, e.steps) for e in failed] == [(1, 1, 2)]
    assert failed[0].error.startswith("worker: env 1")
    assert [l.index for l in links].count(1) == 2 and links[1].closed  # replaced, the dead one closed
    assert [(r["error_kind"], r["message"], r["env"]) for r in log.records if r["kind"] == "error"] == [
        ("worker", "env 1: killed", 1)]
    infs = [r for r in log.records if r["kind"] == "inference"]
    assert {r["env"] for r in infs} == {0, 1, 2}
    assert all(1 <= r["batch_size"] <= 3 for r in infs)
    assert all(link.actions for link in links if link.die_after is None)  # every healthy env got actions


class TaskLink(FakeLink):
    """As FakeLink, but each episode starts by saying its task's instruction (as a worker does), and its
    frames show which env and which task they come from (pixel 0 is the env, pixel 1 the task)."""

    def start(self, task, episode):
        self.send.send_nowait(("record", "env", {"instruction": f"task {task}", "task": task}))
        for step in range(self.steps):
            image = np.array([[[self.index] * 3, [task] * 3]] * 2, np.uint8)
            load = partial(Observation, image)
            self.send.send_nowait(("frame", PendingFrame(episode, step, float(step), load, arrived=float(step))))
            self.send.send_nowait(("record", "tick", tick(self.index, episode, step)))
        self.send.send_nowait(("record", "episode", {"episode": episode, "suite": "s", "task_id": task, "t_start": 0.0,
                                                     "t_end": 1.0, "steps": self.steps, "success": True,
                                                     "env": self.index}))


class Recorder(Batched):
    """Keeps every frame it was given with its instruction and stream."""

    def __init__(self):
        super().__init__()
        self.frames = []

    def act_batch(self, observations, instructions, streams=None):
        self.frames += [(int(o.image[0, 0, 0]), int(o.image[0, 1, 0]), text, stream)
                        for o, text, stream in zip(observations, instructions, streams)]
        return super().act_batch(observations, instructions, streams)


def run_fleet(policy, envs, assignments, make_link=TaskLink, waits=False, pause_alert_s=None):
    log = RecordLog()
    thread = WorkerThread("test-policy")
    links = []

    def link(index):
        links.append(make_link(index))
        return links[-1]

    try:
        fleet = Fleet(link, envs, [(policy, thread)], Fanout([log]), suite="s", waits=waits)
        if pause_alert_s is not None:
            fleet.pauses = CollectorPauses(pause_alert_s)

        async def main():
            await fleet.prepare(assignments)
            await fleet.run()

        anyio.run(main)
    finally:
        thread.close()
    return log, links


def test_each_frame_goes_with_its_env_as_stream_and_its_task_as_instruction():
    """Three envs through five tasks: an env's next episode may be another task, whose instruction the
    batch must take for that env's frames from then on."""
    policy = Recorder()
    run_fleet(policy, 3, [(task, e) for task in range(5) for e in range(2)])
    assert policy.frames and {env for env, _, _, _ in policy.frames} == {0, 1, 2}
    warm_up = [f for f in policy.frames if f[3] < 0]  # the warm-up batches, on the first env's first frame
    assert {f[3] for f in warm_up} == {-1, -2, -3, -4}  # buckets 2 and 4 for 3 envs
    for env, task, instruction, stream in policy.frames:
        if stream >= 0:
            assert (stream, instruction) == (env, f"task {task}")
    assert {task for _, task, _, stream in policy.frames if stream >= 0} == set(range(5))


@pytest.mark.parametrize("envs, sizes", [(1, []), (2, [2]), (5, [2, 4, 8]), (40, [2, 4, 8, 16, 32])])
def test_the_warm_up_runs_every_batch_bucket_the_envs_can_fill(envs, sizes):
    from rtloop.fleet.fleet import warm_batches

    policy, reported = Batched(), []
    warm_batches(policy, Observation(np.zeros((2, 2, 3), np.uint8)), "do it", envs,
                 report=lambda size, seconds: reported.append((size, seconds >= 0)))
    assert [len(s) for s in policy.streams] == sizes
    assert reported == [(size, True) for size in sizes]  # each bucket says when it is ready
    assert all(stream < 0 for s in policy.streams for stream in s)  # no env's stream
    warm_batches(OneAtATime(), Observation(None), "do it", envs)  # frame by frame: nothing to warm


def test_waiting_envs_record_their_own_inferences_from_what_the_action_carries():
    """With --sync or the virtual clock the env's runtime records each inference on its own clock: the
    parent records none, and its action message carries the raw action, the stages and the batch."""
    log, links = run_fleet(Batched(), 2, [(0, 0), (0, 1)], waits=True)
    assert not [r for r in log.records if r["kind"] == "inference"]
    answers = [a for link in links for a in link.actions]
    assert answers
    for episode, seq, action, frame_time, dropped, raw, stages, batch_s, size, index in answers:
        assert len(action) == len(raw) == 7 and stages == {} and batch_s >= 0 and 0 <= index < size <= 2


class Collecting(Batched):
    def act_batch(self, observations, instructions, streams=None):
        if streams[0] >= 0:  # not a warm-up batch
            gc.collect()
        return super().act_batch(observations, instructions, streams)


def test_a_long_collection_alerts_every_env_of_the_batch_it_delayed():
    log, _ = run_fleet(Collecting(), 2, [(0, 0), (0, 1)], pause_alert_s=0)  # every collection counts as long
    pauses = [r for r in log.records if r["kind"] == "alert" and r["alert_kind"] == "gc_pause"]
    assert {(r["env"], r["episode"]) for r in pauses} == {(0, 0), (1, 1)}
    assert gc.get_freeze_count() > 0  # the run froze the warm policy


def test_an_env_keeps_its_task_while_the_task_has_episodes_left():
    """Queued task 0, 1, 1, 0: each env takes the next episode of the task its env is built for."""
    policy = Recorder()
    run_fleet(policy, 2, [(0, 0), (1, 0), (1, 1), (0, 1)])
    tasks = {env: {task for e, task, _, stream in policy.frames if e == env and stream >= 0} for env in (0, 1)}
    assert tasks == {0: {0}, 1: {1}}


class PacedLink(FakeLink):
    """A worker ticking on its own: one new frame every 5 ms while the parent listens, then the episode's
    end; policy errors are kept, not raised."""

    period = 0.005

    def start(self, task, episode):
        self.task, self.episode, self.step = task, episode, 0
        self.aborts = []

    async def receive(self):
        await anyio.sleep(self.period)
        if self.aborts or self.step == self.steps:
            return [("record", "episode", {"episode": self.episode, "suite": "s", "task_id": self.task,
                                           "t_start": 0.0, "t_end": 1.0, "steps": self.step,
                                           "success": not self.aborts, "env": self.index})]
        self.step += 1
        return [("frame", PendingFrame(self.episode, self.step, clock.now(),
                                       lambda: Observation(np.zeros((2, 2, 3), np.uint8))))]

    def abort(self, episode, kind, message):
        self.aborts.append((episode, kind, message))


class Split(Batched):
    """A policy whose call has a host half (prepare_batch) and the rest (act_prepared), each logged with its
    wall-clock interval."""

    def __init__(self, prepare_s=0.03, call_s=0.06, fail_at=None):
        super().__init__()
        self.prepare_s, self.call_s, self.fail_at = prepare_s, call_s, fail_at
        self.log = []

    def prepare_batch(self, observations):
        t0 = clock.now()
        time.sleep(self.prepare_s)
        self.log.append(("prepare", t0, clock.now()))
        if self.fail_at is not None and sum(w == "prepare" for w, _, _ in self.log) == self.fail_at:
            raise InputError("frame 0 is not HxWx3")
        return len(observations)

    def act_prepared(self, prepared, instructions, streams):
        t0 = clock.now()
        time.sleep(self.call_s)
        self.log.append(("call", t0, clock.now()))
        return [PolicyOutput(np.zeros(7), np.zeros(7), {"generate": self.call_s}) for _ in range(prepared)]


def overlaps(log) -> int:
    """Preparations that began while a call ran."""
    calls = [(t0, t1) for what, t0, t1 in log if what == "call"]
    return sum(any(c0 < p0 < c1 for c0, c1 in calls) for what, p0, _ in log if what == "prepare")


def test_the_next_batch_is_prepared_while_the_policy_runs_this_one():
    policy = Split()
    log, links = run_fleet(policy, 2, [(0, 0), (0, 1)], make_link=lambda i: PacedLink(i, steps=100))
    assert overlaps(policy.log) >= 3
    infs = [r for r in log.records if r["kind"] == "inference"]
    assert infs and all(link.actions for link in links) and all(not link.aborts for link in links)
    # a batch prepared ahead waited for the call before it: its inference runs from the moment it was taken
    assert max(r["t_end"] - r["t_start"] for r in infs) > policy.call_s + policy.prepare_s


def test_envs_that_wait_for_their_actions_get_nothing_prepared_ahead():
    policy = Split()
    run_fleet(policy, 2, [(0, 0), (0, 1)], make_link=lambda i: PacedLink(i, steps=10), waits=True)
    assert len(policy.calls) >= 5 and policy.log == []  # whole act_batch calls, one after another


def test_a_preparation_that_raises_ends_its_batch_episodes_and_the_fleet_goes_on():
    policy = Split(fail_at=2)
    _, links = run_fleet(policy, 2, [(0, 0), (0, 1)], make_link=lambda i: PacedLink(i, steps=30))
    aborted = [a for link in links for a in link.aborts]
    assert aborted and all(a[1:] == ("input", "frame 0 is not HxWx3") for a in aborted)
    assert sum(what == "call" for what, _, _ in policy.log) >= 1
