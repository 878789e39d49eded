"""The fleet's parent: one inference task per policy replica (one, but one per GPU on Ray), one task per
env worker, all in one task group.

Each env worker ticks on its own clock and ships every frame it renders; its slot here keeps the newest
unread one (a newer frame overwrites it and counts as dropped, as in the one-slot mailbox). The inference
task takes the newest unread frame of every env that has one, oldest arrival first, up to the largest
batch, runs ONE policy call on them (`act_batch` when the policy has it, with each frame's env as its
stream, else `act` per frame) and hands each env its action. Each frame goes with its env's instruction
of the moment: an env whose next episode is another task says so when the episode starts. It never waits
for an env: an env that is slow only has no frame in the batch, and a message to a worker whose pipe is
full is not sent (the action is stale by then anyway). An inference that ends after its episode did is
dropped unrecorded, as a single env's runtime cancels the one in flight.

A policy that splits its call into a host preparation and the rest (`prepares_ahead`: OpenVLA's LIBERO
frame preparation) has the next batch taken and prepared on a thread of the fleet's while it runs this one.

With --sync or on the virtual clock (`waits`) each env waits for its action, so its frames come one at a
time; the env's own runtime records each inference, on its own clock, from what the action message
carries (the batch's stage times, wall time and size).

A worker that dies (or sends nothing for `stall_s`) ends its episode with a `worker` error record; a new
worker takes its next episode, and the other envs never notice. An env that finishes an episode takes the
next assignment of its own task while there is one (`rtloop eval` queues several tasks), else the next.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

import anyio

from rtloop import clock
from rtloop.errors import InputError, RtloopError, WorkerError
from rtloop.policy.base import Policy, PolicyOutput
from rtloop.policy.buckets import BATCH_BUCKETS, MAX_BATCH, batch_bucket
from rtloop.runtime import heap
from rtloop.runtime.loop import one_line
from rtloop.runtime.records import AlertRecord, EpisodeRecord, ErrorRecord, Fanout, InferenceRecord, TickRecord
from rtloop.runtime.worker import WorkerThread
from rtloop.sim.base import Observation

log = logging.getLogger(__name__)

STALL_S = 60.0  # an env worker silent this long in an episode is taken for dead (LIBERO ticks every 50 ms)


@dataclass
class PendingFrame:
    """A frame a worker has shipped, not yet loaded: the image is copied out of the worker's shared
    memory only when it goes into a batch (`load`, None when it was overwritten there first)."""

    episode: int
    seq: int
    captured_at: float  # the worker's clock.now() when its env returned the frame
    load: Callable[[], Observation | None]
    arrived: float = field(default_factory=clock.now)


class EnvLink(Protocol):
    """The parent's end of one env worker (a local process, or a Ray actor)."""

    pid: int | None

    async def prepare(self, task: int, episode: int) -> tuple[Observation, dict]: ...
    def start(self, task: int, episode: int) -> None: ...
    def send_action(self, episode: int, seq: int, action: list[float], frame_time: float, dropped: int,
                    raw: list[float], stages: dict[str, float], batch_s: float, batch_size: int,
                    batch_index: int) -> bool: ...
    def abort(self, episode: int, kind: str, message: str) -> None: ...
    async def receive(self) -> list[tuple]: ...  # ("frame", PendingFrame) | ("record", kind, dict) | ("fatal", message)
    def close(self) -> None: ...


@dataclass
class EnvSlot:
    index: int
    link: EnvLink | None = None
    info: dict = field(default_factory=dict)  # instruction, suite, task, ... of the env it runs
    first: tuple[int, int] | None = None  # the (task, episode) its worker was prepared for
    episode: int | None = None  # in flight
    pending: PendingFrame | None = None  # the newest unread frame
    in_batch: int = 0  # frames of it in the policy call running now or in the next one, prepared ahead
    dropped: int = 0  # frames of this episode overwritten here unread
    steps: int = 0  # ticks of this episode so far

    def offer(self, frame: PendingFrame) -> None:
        if self.pending is not None:
            self.dropped += 1
        self.pending = frame


@dataclass
class Batch:
    """The frames of one policy call, loaded, with their envs. `prepared`: the policy's `prepare_batch` of
    them, when it was run ahead on the fleet's preparation thread; `error`: what that raised."""

    items: list[tuple[EnvSlot, PendingFrame, Observation]]
    t_wait: float  # when the inference task began to wait for these frames
    t_start: float  # when they were taken
    prepared: object = None
    error: Exception | None = None
    prepare_s: float = 0.0


def take_batch(slots: list[EnvSlot], cap: int) -> list[tuple[EnvSlot, PendingFrame]]:
    """The newest unread frame of every env that has one, up to `cap`; when more envs wait than fit, the
    frames that arrived first go first, and the rest stay unread for the next batch."""
    waiting = sorted((s for s in slots if s.pending is not None), key=lambda s: s.pending.arrived)[:cap]
    batch = [(s, s.pending) for s in waiting]
    for s in waiting:
        s.pending = None
    return batch


def prepares_ahead(policy: Policy) -> bool:
    """A policy that splits its call: `prepare_batch(observations)` (host work on the frames, safe on another
    thread while the policy runs) and `act_prepared(prepared, instructions, streams)`."""
    return callable(getattr(policy, "prepare_batch", None)) and callable(getattr(policy, "act_prepared", None))


def run_batch(policy: Policy, observations: list[Observation], instructions: list[str],
              streams: list[int]) -> list[PolicyOutput]:
    """One policy call for the batch: the policy's own `act_batch` when it has one, else one `act` per
    frame (so any policy serves a fleet). `streams`: each frame's env, so the policy's per-stream checks
    (a frame against the one before it) compare frames of one env."""
    act_batch = getattr(policy, "act_batch", None)
    if act_batch is not None:
        return list(act_batch(observations, instructions, streams=streams))
    return [policy.act(obs, text) for obs, text in zip(observations, instructions)]


def warm_batches(policy: Policy, obs: Observation, instruction: str, envs: int,
                 report: Callable[[int, float], None] | None = None) -> None:
    """One call of every batch bucket above 1 that `envs` envs can fill, on the first frame: an engine
    compiles and captures a bucket on first use (minutes for compiled), which must not happen mid-run.
    Their streams are negative, no env's; their alerts are the warm-up frame's, which `warmup` keeps.
    report(batch, seconds) after each bucket: the wait is long enough that a user should see it move."""
    if getattr(policy, "act_batch", None) is None:  # frame by frame: nothing per batch size to build
        return
    largest = batch_bucket(min(envs, MAX_BATCH))
    for size in (b for b in BATCH_BUCKETS if 1 < b <= largest):
        t0 = clock.now()
        policy.act_batch([obs] * size, [instruction] * size, streams=[-1 - i for i in range(size)])
        if report is not None:
            report(size, clock.now() - t0)


class Fleet:
    def __init__(self, make_link: Callable[[int], EnvLink], envs: int, policies: list[tuple[Policy, WorkerThread]],
                 sinks: Fanout, suite: str, max_batch: int = MAX_BATCH, stall_s: float = STALL_S,
                 waits: bool = False, report_warm: Callable[[int, float], None] | None = None) -> None:
        """waits: the envs wait for each action (rtloop.fleet.worker.waits_for_actions). report_warm(batch,
        seconds): each batch size's warm-up, as it ends (warm_batches)."""
        self.make_link = make_link
        self.waits = waits
        self.report_warm = report_warm
        self.slots = [EnvSlot(i, info={"suite": suite}) for i in range(envs)]
        self.policies = policies
        self.sinks = sinks
        self.max_batch = max_batch
        self.stall_s = stall_s
        self.inference_seq = 0
        self._preparation: WorkerThread | None = None  # the frames of the next batch, prepared ahead
        self.todo: list[tuple[int, int]] = []
        self.episodes: list[EpisodeRecord] = []
        self._new_frame = anyio.Event()
        self.pauses = heap.CollectorPauses()

    # --- setup -------------------------------------------------------------------------------------------

    async def prepare(self, assignments: list[tuple[int, int]]) -> Observation:
        """Start the workers, build each env for its first (task, episode) and warm every policy replica
        up on the first env's first frame, every batch size the envs can fill included. Returns that frame."""
        self.todo = list(assignments)
        firsts: dict[int, tuple[Observation, dict]] = {}

        async def prepare_one(slot: EnvSlot) -> None:
            slot.link = self.make_link(slot.index)
            firsts[slot.index] = await slot.link.prepare(*slot.first)
            slot.info.update(firsts[slot.index][1])

        async with anyio.create_task_group() as tg:
            for slot in self.slots[:len(self.todo)]:
                slot.first = self.todo.pop(0)
                tg.start_soon(prepare_one, slot)
        obs, info = firsts[0]
        async with anyio.create_task_group() as tg:
            for policy, thread in self.policies:
                tg.start_soon(self._warm, policy, thread, obs, info["instruction"])
        return obs

    async def _warm(self, policy: Policy, thread: WorkerThread, obs: Observation, instruction: str) -> None:
        t0 = clock.now()
        await thread.run(policy.warmup, obs, instruction)
        if self.report_warm is not None:
            self.report_warm(1, clock.now() - t0)
        await thread.run(warm_batches, policy, obs, instruction, len(self.slots), self.report_warm)
        freeze_heap = getattr(policy, "freeze_heap", None)  # a policy in a process of its own (a Ray actor)
        if freeze_heap is not None:
            await thread.run(freeze_heap)

    def close(self) -> None:
        for slot in self.slots:
            if slot.link is not None:
                slot.link.close()
                slot.link = None

    # --- the run -----------------------------------------------------------------------------------------

    async def run(self) -> list[EpisodeRecord]:
        """Every assignment of prepare(), each on the next free env. Returns the episode records. What is
        alive when it starts (the warm policies) is frozen, and each long garbage collection becomes an
        alert on every frame of the batch it delayed (rtloop.runtime.heap)."""
        heap.freeze()
        try:
            with self.pauses:
                async with anyio.create_task_group() as tg:
                    for policy, thread in self.policies:
                        tg.start_soon(self._inference_task, policy, thread)
                    async with anyio.create_task_group() as envs:
                        for slot in self.slots:
                            if slot.first is not None:
                                envs.start_soon(self._env_task, slot)
                    tg.cancel_scope.cancel()  # every env is done: stop the inference tasks
        finally:
            if self._preparation is not None:
                self._preparation.close()
                self._preparation = None
        return self.episodes

    async def _env_task(self, slot: EnvSlot) -> None:
        assignment, slot.first = slot.first, None
        while assignment is not None:
            task, episode = assignment
            try:
                if slot.link is None:  # its worker died: a new one takes the next episode
                    slot.link = self.make_link(slot.index)
                    slot.info.update((await slot.link.prepare(task, episode))[1])
                await self._run_episode(slot, task, episode)
            except WorkerError as exc:
                self._worker_failed(slot, task, episode, str(exc))
            assignment = self._next_assignment(task)

    def _next_assignment(self, task: int) -> tuple[int, int] | None:
        """The first assignment left of `task`, else the first left: an env keeps its env while its task
        has episodes to run (building a LIBERO env takes seconds)."""
        same = next((i for i, (t, _) in enumerate(self.todo) if t == task), 0)
        return self.todo.pop(same) if self.todo else None

    async def _run_episode(self, slot: EnvSlot, task: int, episode: int) -> None:
        slot.episode, slot.pending, slot.dropped, slot.steps = episode, None, 0, 0
        slot.link.start(task, episode)
        try:
            while True:
                with anyio.move_on_after(self.stall_s) as timer:
                    messages = await slot.link.receive()
                if timer.cancelled_caught:
                    if slot.in_batch:  # a waiting env is silent while its frame is in the policy call
                        continue
                    raise WorkerError(f"env {slot.index}: its worker sent nothing for {self.stall_s:g} s")
                for message in messages:
                    if self._handle(slot, episode, message):
                        return
        finally:
            slot.episode, slot.pending = None, None

    def _handle(self, slot: EnvSlot, episode: int, message: tuple) -> bool:
        """One message from a worker; True when it ends the episode."""
        if message[0] == "frame":
            frame: PendingFrame = message[1]
            if frame.episode == episode:
                slot.offer(frame)
                self._new_frame.set()
                self._new_frame = anyio.Event()
            return False
        if message[0] == "fatal":
            raise InputError(message[1])
        _, kind, record = message
        if kind == "env":  # the env of its episode starting now: its task's instruction
            slot.info.update(record)
        elif kind == "tick":
            slot.steps = record["step"] + 1
            self.sinks.on_record(TickRecord(**record))
        elif kind == "inference":  # a waiting env's own record of its inference
            self.sinks.on_record(InferenceRecord(**record))
        elif kind == "error":
            self.sinks.on_record(ErrorRecord(**record))
        elif kind == "alert":
            self.sinks.on_record(AlertRecord(**record))
        elif kind == "episode":
            rec = EpisodeRecord(**record)
            self.episodes.append(rec)
            self.sinks.on_record(rec)
            return True
        return False

    def _worker_failed(self, slot: EnvSlot, task: int, episode: int, message: str) -> None:
        log.error("rtloop: %s; episode %d ends on it, the fleet goes on", message, episode)
        now = clock.now()
        self.sinks.on_record(ErrorRecord(WorkerError.kind, message, now, episode, env=slot.index))
        rec = EpisodeRecord(episode=episode, suite=slot.info["suite"], task_id=task, t_start=now, t_end=now,
                            steps=slot.steps, success=False, error=f"{WorkerError.kind}: {message}", env=slot.index)
        self.episodes.append(rec)
        self.sinks.on_record(rec)
        slot.link.close()
        slot.link = None

    async def _inference_task(self, policy: Policy, thread: WorkerThread) -> None:
        """One policy call at a time. With a policy that prepares ahead (`prepares_ahead`), on the wall clock
        with envs that do not wait, the next batch's frames are taken and prepared while the policy runs this
        one, from the moment the last call's time less the last preparation's: so the preparation ends about
        when the call does, and the frames are as new as if they were taken after it. The call's time, not
        the host's preparation plus it, then paces the fleet. Envs that wait send a frame only after their
        action, so for them nothing is taken ahead."""
        ahead = not self.waits and prepares_ahead(policy)
        if ahead and self._preparation is None:
            self._preparation = WorkerThread("rtloop-prepare")
        call_s: float | None = None
        next_batch: list[Batch] = []
        while True:
            batch = next_batch.pop() if next_batch else await self._wait_for_batch(policy if ahead else None)
            if batch is None:
                continue
            t_call = clock.now()
            async with anyio.create_task_group() as tg:
                if ahead and call_s is not None:
                    tg.start_soon(self._take_ahead, policy, t_call + max(0.0, call_s - batch.prepare_s), next_batch)
                try:
                    outs = await thread.run(self._call, policy, batch) if batch.error is None else batch.error
                except Exception as exc:  # every env of the batch ends its episode on it, as one env would
                    outs = exc
                t_end = clock.now()
                call_s = t_end - t_call
                for slot, _, _ in batch.items:
                    slot.in_batch -= 1
                if isinstance(outs, Exception):
                    self._abort(batch, outs)
                else:
                    self._deliver(batch, outs, t_end)
                tg.cancel_scope.cancel()  # a preparation not begun is not needed; one begun finishes

    async def _wait_for_batch(self, preparing: Policy | None) -> Batch | None:
        t_wait = clock.now()
        while not (taken := take_batch(self.slots, self.max_batch)):
            await self._new_frame.wait()
        return await self._load(taken, t_wait, preparing)

    async def _take_ahead(self, policy: Policy, at: float, out: list[Batch]) -> None:
        await anyio.sleep(max(0.0, at - clock.now()))
        with anyio.CancelScope(shield=True):  # frames taken are prepared and go into the next call
            taken = take_batch(self.slots, self.max_batch)
            if taken and (batch := await self._load(taken, clock.now(), policy)) is not None:
                out.append(batch)

    async def _load(self, taken: list[tuple[EnvSlot, PendingFrame]], t_wait: float,
                    preparing: Policy | None) -> Batch | None:
        """The frames taken, copied out of their workers (None when none was left to copy), and prepared by
        `preparing` when given."""
        items = []
        for slot, frame in taken:
            obs = frame.load()
            if obs is None:  # overwritten in the worker's ring before it could be copied
                slot.dropped += 1
            else:
                items.append((slot, frame, obs))
                slot.in_batch += 1
        if not items:
            return None
        batch = Batch(items, t_wait, clock.now())
        if preparing is not None:
            await self._prepare(preparing, batch)
        return batch

    async def _prepare(self, policy: Policy, batch: Batch) -> None:
        t0 = clock.now()
        try:
            batch.prepared = await self._preparation.run(policy.prepare_batch, [obs for _, _, obs in batch.items])
        except Exception as exc:
            batch.error = exc
        batch.prepare_s = clock.now() - t0

    @staticmethod
    def _call(policy: Policy, batch: Batch) -> list[PolicyOutput]:
        instructions = [slot.info["instruction"] for slot, _, _ in batch.items]
        streams = [slot.index for slot, _, _ in batch.items]
        if batch.prepared is not None:
            return list(policy.act_prepared(batch.prepared, instructions, streams))
        return run_batch(policy, [obs for _, _, obs in batch.items], instructions, streams)

    def _abort(self, batch: Batch, exc: Exception) -> None:
        kind, message = one_line(exc) if isinstance(exc, RtloopError) else ("policy", f"{type(exc).__name__}: {exc}")
        for slot, frame, _ in batch.items:
            if slot.link is not None and slot.episode == frame.episode:
                slot.link.abort(frame.episode, kind, message)

    def _deliver(self, batch: Batch, outs: list[PolicyOutput], t_end: float) -> None:
        items, t_start = batch.items, batch.t_start
        pauses = self.pauses.take()
        for i, ((slot, frame, _), out) in enumerate(zip(items, outs)):
            current = slot.link is not None and slot.episode == frame.episode
            for alert in out.alerts + pauses:  # a guard alerts once per env: kept, unattributed if the episode is over
                self.sinks.on_record(AlertRecord(alert.kind, alert.message, t_end,
                                                 frame.episode if current else None, env=slot.index))
            if not current:
                continue
            self.inference_seq += 1
            action = [float(x) for x in out.action]
            stages = {k: float(v) for k, v in out.timings.items()}
            slot.link.send_action(frame.episode, self.inference_seq, action, frame.captured_at, slot.dropped,
                                  [float(x) for x in out.raw_action], stages, t_end - t_start, len(items), i)
            if not self.waits:
                self.sinks.on_record(InferenceRecord(
                    episode=frame.episode, seq=self.inference_seq, frame_seq=frame.seq,
                    frame_time=frame.captured_at, t_start=t_start, t_end=t_end, queue_wait_s=t_start - batch.t_wait,
                    frame_age_s=t_start - frame.captured_at, stages=stages, action=action, env=slot.index,
                    batch_size=len(items), batch_index=i,
                ))
