"""The real-time loop: a sim task ticking at a fixed rate and an inference task running flat out, joined by
the latest-frame mailbox; the chapter's blocking loop (`sync`) as the baseline; and the same loop on a
virtual clock, as a deterministic discrete-event simulation.

Per episode, one task group owns both tasks. The sim task never waits for the model: each tick it applies
the action the episode's ActionSelector picks (the newest one: fresh the first time, held after that, a
dummy before the first one, the stop action once it is older than --max-action-age), steps the env on the
sim thread and publishes the frame. The inference task takes the newest frame, runs the policy on the
policy thread and hands the action to the selector. When the sim task ends the episode it cancels the
group; a failure in either task cancels the other and ends the episode with an error record.

All three modes share the tick (`_tick`: select, step, publish, record) and the pacing (`Pacer`); they
differ only in when an action reaches the selector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import anyio
import numpy as np

from rtloop import clock as wall
from rtloop.clock import WALL
from rtloop.errors import InputError, PolicyError, RtloopError, SimError
from rtloop.policy.base import Policy, PolicyOutput
from rtloop.runtime import heap
from rtloop.runtime.chunks import ChunkBuffer
from rtloop.runtime.mailbox import Frame, LatestFrameMailbox
from rtloop.runtime.records import (AlertRecord, EpisodeRecord, ErrorRecord, InferenceRecord, Sink,
                                    TickRecord)
from rtloop.runtime.worker import WorkerThread
from rtloop.sim.base import SimEnv, StepResult

log = logging.getLogger(__name__)

# LIBERO's "do nothing, gripper open" action: sent before the model's first answer.
DUMMY_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
GRIPPER = 6  # index of the gripper command in a 7-vector action


@dataclass
class LoopConfig:
    rate: float  # sim ticks per second
    max_steps: int | None = None  # cap on policy steps per episode (None: the env's horizon)
    sync: bool = False  # the blocking baseline: the sim waits for the model every tick
    max_action_age: float | None = 1.0  # seconds; past it the sim applies the stop action (None: never)
    chunk_threshold: float = 0.5  # ask for the next chunk at or below this unexecuted share (LeRobot's)
    chunk_merge: str = "latest_only"  # how overlapping chunks merge (rtloop.runtime.chunks.MERGE_RULES)

    def steps_limit(self, horizon: int) -> int:
        return horizon if self.max_steps is None else min(horizon, self.max_steps)


@dataclass
class Action:
    value: np.ndarray  # env-ready 7-vector
    seq: int  # the inference that produced it
    frame_time: float  # capture time of the frame it was computed from
    frame_seq: int | None = None  # that frame's step index (a chunk's first action is meant for the step after it)
    chunk: np.ndarray | None = None  # [H, 7] when the policy returned a chunk


@dataclass
class Answer:
    """One inference's result as the loops use it."""

    output: PolicyOutput
    wall_s: float  # the call's wall time: what the measured latency model charges on the virtual clock
    batch_size: int = 1  # frames in the policy call it came from (a fleet batches several envs' frames)
    batch_index: int = 0  # this frame's place in that call


# act(frame) -> Answer: how the runtime's own inference task, blocking loop and virtual loop get an action
# (by default the policy's `act` on the policy thread; a fleet's env worker that waits for its actions asks
# the fleet's batched inference task instead, rtloop.fleet.worker)
Act = Callable[[Frame], Awaitable[Answer]]

# consumer(episode, mailbox): what takes the sim's frames during an episode (the inference task, or a fleet
# worker's link to the fleet's one inference task, which hands actions back through Runtime.offer)
FrameConsumer = Callable[[int, LatestFrameMailbox], Awaitable[None]]


@dataclass
class Selection:
    source: str  # one of rtloop.runtime.records.ACTION_SOURCES
    value: np.ndarray
    seq: int | None
    age: float | None
    # set when the action comes from a chunk: its position in the chunk (= ticks since the chunk's
    # observation), the chunk's length, ticks since the chunk reached the sim, blended with an older chunk
    chunk_index: int | None = None
    chunk_len: int | None = None
    chunk_age_ticks: int | None = None
    chunk_merged: bool | None = None


class ActionSelector:
    """Which action the sim applies at each tick; one per episode. This one keeps the newest action.

    The runtime talks to it through three calls, so a chunk buffer (rtloop.runtime.chunks) can take its
    place: `offer(action)` when an inference delivers, `select(t, step)` at each tick, and
    `wants_inference()` before an inference starts on a new frame."""

    def __init__(self, max_age: float | None) -> None:
        self.max_age = max_age
        self.latest: Action | None = None
        self.last_applied: int | None = None
        self.gripper = float(DUMMY_ACTION[GRIPPER])  # the last gripper command applied

    def offer(self, action: Action) -> None:
        self.latest = action

    def wants_inference(self) -> bool:
        return True

    def select(self, t: float, step: int) -> Selection:
        action = self.latest
        if action is None:
            return Selection("dummy", DUMMY_ACTION, None, None)
        age = t - action.frame_time
        if self.max_age is not None and age > self.max_age:
            # A real arm's driver stops on stale commands: no motion, the gripper as last commanded
            # (re-applying a delta action seconds old would move the arm where nobody asked).
            stop = np.zeros(7)
            stop[GRIPPER] = self.gripper
            return Selection("stop", stop, action.seq, age)
        source = "fresh" if action.seq != self.last_applied else "held"
        self.last_applied = action.seq
        self.gripper = float(action.value[GRIPPER])
        return Selection(source, action.value, action.seq, age)


class ChunkSelector(ActionSelector):
    """Executes action chunks one action per tick, as LeRobot's async inference does: a chunk computed from
    the frame published before step k holds the actions for steps k, k+1, ...; those for steps already
    executed when it arrives are dropped, overlaps with the chunk still executing merge by `merge`, and the
    next inference is wanted once the unexecuted share is at or below `threshold`. A planned action is
    applied at its step whatever its age (the policy meant it for then); with nothing planned for a step
    the last action is held and the stale-action stop applies as without chunks. An action without a chunk
    takes ActionSelector's path unchanged, so a policy without chunks runs exactly as before."""

    def __init__(self, max_age: float | None, threshold: float = 0.5, merge: str = "latest_only") -> None:
        super().__init__(max_age)
        self.threshold = threshold
        self.buffer = ChunkBuffer(merge)
        self.chunked = False  # a chunk has arrived this episode
        self.next_step = 0  # the next step the sim executes
        self.delivered: dict[int, tuple[int, float]] = {}  # inference seq -> (step it arrived for, frame time)

    def offer(self, action: Action) -> None:
        if action.chunk is None:
            super().offer(action)
            return
        self.chunked = True
        start = self.next_step if action.frame_seq is None else action.frame_seq
        self.buffer.add(action.chunk, action.seq, start=start, now=self.next_step)
        self.delivered[action.seq] = (self.next_step, action.frame_time)

    def wants_inference(self) -> bool:
        return not self.chunked or self.buffer.needs_request(self.threshold)

    def select(self, t: float, step: int) -> Selection:
        self.next_step = step + 1
        planned = self.buffer.pop(step)
        if planned is None:
            return super().select(t, step)  # nothing planned for this step: hold, stop or the dummy
        arrived, frame_time = self.delivered[planned.seq]
        self.latest = Action(planned.action, planned.seq, frame_time)  # what is held if the buffer runs dry
        self.last_applied = planned.seq
        self.gripper = float(planned.action[GRIPPER])
        return Selection("chunk", planned.action, planned.seq, t - frame_time, chunk_index=planned.index,
                         chunk_len=planned.chunk_len, chunk_age_ticks=step - arrived, chunk_merged=planned.merged)


def chunk_selector_factory(config: LoopConfig) -> Callable[[float | None], ChunkSelector]:
    return lambda max_age: ChunkSelector(max_age, config.chunk_threshold, config.chunk_merge)


class Pacer:
    """Tick deadlines k/rate apart on one clock. A tick that overruns its budget does not make the next
    ticks burst to catch up on missed deadlines (that would apply actions faster than the controller
    expects): the schedule restarts from the end of the late tick."""

    def __init__(self, clock, rate: float) -> None:
        self.clock = clock
        self.period = 1.0 / rate
        self._anchor: float | None = None
        self._k = 0
        self.deadline = 0.0

    async def wait(self) -> float:
        """Sleep until the next tick's deadline; returns it."""
        if self._anchor is None:
            self._anchor = self.clock.now()
        self.deadline = self._anchor + self._k * self.period
        await self.clock.sleep_until(self.deadline)
        return self.deadline

    def finish(self, t_end: float) -> float:
        """The tick ended at t_end: returns its overrun (0 if it fit) and schedules the next one."""
        overrun = max(0.0, t_end - (self.deadline + self.period))
        if overrun > 0:
            self._anchor, self._k = t_end, 0
        else:
            self._k += 1
        return overrun


@dataclass
class EpisodeState:
    episode: int
    selector: ActionSelector
    pacer: Pacer
    mailbox: LatestFrameMailbox = field(default_factory=LatestFrameMailbox)
    steps: int = 0
    success: bool = False
    prev_start: float | None = None
    idle_since: float | None = None  # virtual clock: when the inference task last became free


def leaf_errors(exc: BaseException) -> list[BaseException]:
    """The real errors inside an exception group (task groups wrap what their tasks raise), in order."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_errors(sub)]
    return [exc]


def first_error(exc: BaseException) -> BaseException:
    return leaf_errors(exc)[0]


def one_line(exc: BaseException) -> tuple[str, str]:
    """(kind, message) of an error, for the trace and the summary."""
    exc = first_error(exc)
    kind = exc.kind if isinstance(exc, RtloopError) else "error"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return kind, text


class Runtime:
    def __init__(
        self,
        env: SimEnv,
        policy: Policy,
        sim_thread: WorkerThread,
        policy_thread: WorkerThread,
        sinks: Sink,
        config: LoopConfig,
        keep_frames: bool = False,
        env_index: int = 0,
        clock=WALL,
        latency=None,
        new_selector=None,
        act: Act | None = None,
    ) -> None:
        """env_index: stamped on every record (which env of a fleet, rtloop.fleet).
        clock: rtloop.clock.WALL, a VirtualClock, or any object with now() and async sleep_until(t).
        latency: on a VirtualClock, the latency model (rtloop.runtime.latency: `sample(index, measured_s)`
        -> seconds, `label`); unused on the wall clock, where rtloop.runtime.slow pads the calls instead.
        new_selector(max_age) -> the episode's action selector (default: a ChunkSelector with the
        config's threshold and merge rule, which runs a policy without chunks as ActionSelector does).
        act: how an inference is made (see Act; default: `policy.act` on policy_thread)."""
        self.env = env
        self.env_index = env_index
        self.policy = policy
        self.sim_thread = sim_thread
        self.policy_thread = policy_thread
        self.sinks = sinks
        self.config = config
        self.clock = clock
        self.virtual = getattr(clock, "label", "") == "virtual"
        if self.virtual and latency is None:
            raise ValueError("a virtual clock needs a latency model")
        self.latency = latency
        self.new_selector = chunk_selector_factory(config) if new_selector is None else new_selector
        self.act = self._policy_act if act is None else act
        self.inference_seq = 0  # counts across the run
        self.dropped_before = 0  # frames dropped in earlier episodes
        self.stale_alerted = False
        self.pauses = heap.CollectorPauses()
        self._episode: EpisodeState | None = None  # the episode in progress
        self.frames: list[np.ndarray] | None = [] if keep_frames else None  # for --video, raw sim frames

    # --- episodes ------------------------------------------------------------------------------------

    async def run_episode(self, episode: int, mailbox: LatestFrameMailbox | None = None,
                          consumer: FrameConsumer | None = None) -> EpisodeRecord:
        """One episode. The sim task puts its frames into `mailbox` and `consumer(episode, mailbox)` runs
        beside it until the episode ends: by default the inference task here; in a fleet's env worker
        (rtloop.fleet.worker) the link that ships frames to the fleet's one inference task, whose actions
        come back through `offer`. Its inferences carry an alert for each long garbage collection
        (rtloop.runtime.heap; the command that warmed the policy up froze the heap)."""
        with self.pauses:
            return await self._run_episode(episode, mailbox, consumer)

    async def _run_episode(self, episode: int, mailbox: LatestFrameMailbox | None,
                           consumer: FrameConsumer | None) -> EpisodeRecord:
        t_start = self.clock.now()
        ep = EpisodeState(episode, self.new_selector(None if self.config.sync else self.config.max_action_age),
                          Pacer(self.clock, self.config.rate), mailbox if mailbox is not None else LatestFrameMailbox())
        self._episode = ep
        try:
            first = await self._sim_call(self.env.reset, episode)
            if self.frames is not None:
                self.frames.append(first.image)
            ep.mailbox.put(Frame(0, first, self.clock.now()))
            if self.config.sync:
                await self._blocking_loop(ep)
            elif self.virtual:
                await self._virtual_loop(ep)
            else:
                async with anyio.create_task_group() as tg:
                    if consumer is None:
                        tg.start_soon(self._inference_task, ep)
                    else:
                        tg.start_soon(consumer, episode, ep.mailbox)
                    await self._sim_task(ep)
                    tg.cancel_scope.cancel()  # the episode is over: stop the model
        except anyio.get_cancelled_exc_class():
            # Ctrl-C, SIGTERM: keep a record of the episode, then let the cancellation through.
            self._end_episode(ep, t_start, "interrupted")
            raise
        except Exception as exc:
            errors = leaf_errors(exc)
            for err in errors:
                kind, message = one_line(err)
                log.error("rtloop: episode %d ended on a %s error: %s", episode, kind, message)
                self._emit(ErrorRecord(kind, message, self.clock.now(), episode))
            kind, message = one_line(errors[0])
            self._end_episode(ep, t_start, f"{kind}: {message}")
            bad_input = next((e for e in errors if isinstance(e, InputError)), None)
            if bad_input is not None:  # the user's to fix (an episode past the init states, a bad image): stop the run
                raise bad_input from None
            return self._last_episode  # a policy or sim failure ends this episode, not the run
        finally:
            self.dropped_before += ep.mailbox.dropped
            self._episode = None
        return self._end_episode(ep, t_start, None)

    def offer(self, action: Action) -> None:
        """An action computed elsewhere (a fleet's inference task) for the episode in progress."""
        if self._episode is not None:
            self._episode.selector.offer(action)

    def _end_episode(self, ep: EpisodeState, t_start: float, error: str | None) -> EpisodeRecord:
        rec = EpisodeRecord(episode=ep.episode, suite=self.env.suite, task_id=self.env.task_id, t_start=t_start,
                            t_end=self.clock.now(), steps=ep.steps, success=ep.success, error=error)
        self._last_episode = rec
        self._emit(rec)
        return rec

    def _emit(self, record) -> None:
        record.env = self.env_index
        self.sinks.on_record(record)

    # --- the three ways actions reach the selector ----------------------------------------------------

    async def _sim_task(self, ep: EpisodeState) -> None:
        for step in range(self.config.steps_limit(self.env.horizon)):
            deadline = await ep.pacer.wait()
            t_start = self.clock.now()
            if (await self._tick(ep, step, deadline, t_start, t_start)).done:
                return

    async def _inference_task(self, ep: EpisodeState) -> None:
        while True:
            t_wait = self.clock.now()
            frame = await ep.mailbox.get()
            if not ep.selector.wants_inference():
                continue
            t_start = self.clock.now()
            answer = await self._act(frame)
            self._deliver(ep, frame, answer, t_start, self.clock.now(), t_start - t_wait)

    async def _blocking_loop(self, ep: EpisodeState) -> None:
        """The chapter's loop: frame -> act -> step, the sim waiting for the model. Paced to the same
        rate when it is fast enough, so both modes aim at the same Hz and the summary compares like with
        like. Every action is fresh; its age is the inference time plus any wait for the tick. On the
        virtual clock the inference takes the latency model's time, the step one period."""
        for step in range(self.config.steps_limit(self.env.horizon)):
            deadline = await ep.pacer.wait()
            t_start = self.clock.now()
            frame = ep.mailbox.take_nowait()
            t_apply = t_start
            if ep.selector.wants_inference():  # always, but while a chunk is executing
                answer = await self._act(frame)
                if self.virtual:
                    await self.clock.sleep_until(t_start + self._latency(answer.wall_s))
                t_apply = self.clock.now()
                self._deliver(ep, frame, answer, t_start, t_apply, 0.0)
            t_end = t_apply + ep.pacer.period if self.virtual else None
            if (await self._tick(ep, step, deadline, t_start, t_apply, t_end)).done:
                return

    async def _virtual_loop(self, ep: EpisodeState) -> None:
        """The async loop as a discrete-event simulation on the virtual clock. A tick starts every 1/rate,
        and its step lasts exactly that long: its frame is captured at the next tick's start. An inference
        started at t on the newest frame, with latency L from the model, delivers its action at the first
        tick starting at or after t + L; then the next inference starts, on the newest frame. The policy
        and the env are called one after the other (still on their threads), so the result depends only on
        the latency model and the seeds. With L = 0 every frame gets its own action at once: the sync loop."""
        pending: tuple[float, Frame, Answer, float] | None = None  # (due, frame, answer, start)
        for step in range(self.config.steps_limit(self.env.horizon)):
            deadline = await ep.pacer.wait()
            t = self.clock.now()
            while True:
                if pending is not None and pending[0] <= t:
                    due, frame, answer, t_inf = pending
                    wait = 0.0 if ep.idle_since is None else t_inf - ep.idle_since
                    self._deliver(ep, frame, answer, t_inf, due, wait)
                    ep.idle_since, pending = t, None
                if pending is None and (frame := ep.mailbox.take_nowait()) is not None:
                    if not ep.selector.wants_inference():
                        continue
                    answer = await self._act(frame)
                    pending = (t + self._latency(answer.wall_s), frame, answer, t)
                    continue
                break
            if (await self._tick(ep, step, deadline, t, t, deadline + ep.pacer.period)).done:
                return

    def _latency(self, wall_s: float) -> float:
        """This inference's latency on the virtual clock: the model's sample for the inference's number in the
        run (the measured model answers the call's own wall time)."""
        return float(self.latency.sample(self.inference_seq - 1, measured_s=wall_s))

    # --- shared by all three -------------------------------------------------------------------------

    async def _tick(self, ep: EpisodeState, step: int, deadline: float, t_start: float, t_apply: float,
                    t_end: float | None = None) -> StepResult:
        """One tick: pick the action (at t_apply), step the env, publish the frame, record. t_end: when
        the step ends on the virtual clock (None: read the clock after the step)."""
        sel = ep.selector.select(t_apply, step)
        if sel.source == "stop" and not self.stale_alerted:
            self.stale_alerted = True
            message = (f"the newest action was {sel.age:.2f} s old at step {step} (--max-action-age "
                       f"{self.config.max_action_age:g} s): the arm is stopped until a newer one arrives")
            log.warning("rtloop: SILENT FAILURE? %s", message)
            self._emit(AlertRecord("stale_action", message, t_apply, ep.episode))
        w0 = wall.now()
        result: StepResult = await self._sim_call(self.env.step, sel.value)
        step_s = wall.now() - w0
        t_end = self.clock.now() if t_end is None else t_end
        ep.mailbox.put(Frame(step + 1, result.obs, t_end))
        overrun = ep.pacer.finish(t_end)
        if self.frames is not None:
            self.frames.append(result.frame)
        self._emit(TickRecord(
            episode=ep.episode,
            step=step,
            t_start=t_start,
            t_end=t_end,
            deadline=deadline,
            interval_s=None if ep.prev_start is None else t_start - ep.prev_start,
            overrun_s=overrun,
            lateness_s=t_start - deadline,
            step_s=step_s,
            physics_s=result.timings.get("physics", 0.0),
            render_s=result.timings.get("render", 0.0),
            action_source=sel.source,
            action_seq=sel.seq,
            action_age_s=sel.age,
            frame_seq=step + 1,
            frames_dropped_total=self.dropped_before + ep.mailbox.dropped,
            done=result.done,
            success=result.success,
            chunk_index=sel.chunk_index,
            chunk_len=sel.chunk_len,
            chunk_age_ticks=sel.chunk_age_ticks,
            chunk_merged=sel.chunk_merged,
        ))
        ep.prev_start = t_start
        ep.steps, ep.success = step + 1, result.success
        return result

    def _deliver(self, ep: EpisodeState, frame: Frame, answer: Answer, t_start: float, t_end: float,
                 queue_wait: float) -> None:
        """An inference's action reaches the selector; its record and alerts go out."""
        out = answer.output
        ep.selector.offer(Action(out.action, self.inference_seq, frame.captured_at, frame.seq, out.chunk))
        self._emit(InferenceRecord(
            episode=ep.episode,
            seq=self.inference_seq,
            frame_seq=frame.seq,
            frame_time=frame.captured_at,
            t_start=t_start,
            t_end=t_end,
            queue_wait_s=queue_wait,
            frame_age_s=t_start - frame.captured_at,
            stages={k: float(v) for k, v in out.timings.items()},
            action=[float(x) for x in out.action],
            batch_size=answer.batch_size,
            batch_index=answer.batch_index,
        ))
        for alert in out.alerts + self.pauses.take():
            self._emit(AlertRecord(alert.kind, alert.message, t_end, ep.episode))

    async def _sim_call(self, fn, *args):
        try:
            return await self.sim_thread.run(fn, *args)
        except RtloopError:
            raise
        except Exception as exc:
            raise SimError(f"{type(exc).__name__}: {exc}") from exc

    async def _act(self, frame: Frame) -> Answer:
        """The inference on `frame`; it gets the next inference number."""
        try:
            answer = await self.act(frame)
        except RtloopError:
            raise
        except Exception as exc:
            raise PolicyError(f"{type(exc).__name__}: {exc}") from exc
        self.inference_seq += 1
        return answer

    async def _policy_act(self, frame: Frame) -> Answer:
        w0 = wall.now()
        out = await self.policy_thread.run(self.policy.act, frame.obs, self.env.instruction)
        return Answer(out, wall.now() - w0)
