"""The real-time loop: a sim task ticking at a fixed rate and an inference task running flat out, joined by
the latest-frame mailbox; and the chapter's blocking loop (`sync`) as the baseline.

Per episode, one task group owns both tasks. The sim task never waits for the model: each tick it applies
the newest action (fresh the first time, held after that, a dummy before the first one), steps the env on
the sim thread and publishes the frame. The inference task takes the newest frame, runs the policy on the
policy thread and publishes the action. When the sim task ends the episode it cancels the group; a
failure in either task cancels the other and ends the episode with an error record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

import anyio
import numpy as np

from rtloop import clock
from rtloop.errors import InputError, PolicyError, RtloopError, SimError
from rtloop.policy.base import Policy, PolicyOutput
from rtloop.runtime.mailbox import Frame, LatestFrameMailbox
from rtloop.runtime.records import EpisodeRecord, InferenceRecord, Sink, TickRecord
from rtloop.runtime.worker import WorkerThread
from rtloop.sim.base import Observation, SimEnv, StepResult

log = logging.getLogger(__name__)

# LIBERO's "do nothing, gripper open" action: sent before the model's first answer.
DUMMY_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


@dataclass
class LoopConfig:
    rate: float  # sim ticks per second
    max_steps: int | None = None  # cap on policy steps per episode (None: the env's horizon)
    sync: bool = False  # the blocking baseline: the sim waits for the model every tick

    def steps_limit(self, horizon: int) -> int:
        return horizon if self.max_steps is None else min(horizon, self.max_steps)


@dataclass
class Action:
    value: np.ndarray
    seq: int  # the inference that produced it
    frame_time: float  # capture time of the frame it was computed from


FrameConsumer = Callable[[int, LatestFrameMailbox], Awaitable[None]]


@dataclass
class EpisodeProgress:
    steps: int = 0
    success: bool = False


class Fanout:
    """Hands every record to each sink in turn."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def on_run_start(self, info: dict) -> None:
        for s in self.sinks:
            s.on_run_start(info)

    def on_tick(self, rec: TickRecord) -> None:
        for s in self.sinks:
            s.on_tick(rec)

    def on_inference(self, rec: InferenceRecord) -> None:
        for s in self.sinks:
            s.on_inference(rec)

    def on_episode(self, rec: EpisodeRecord) -> None:
        for s in self.sinks:
            s.on_episode(rec)

    def on_error(self, kind: str, message: str) -> None:
        for s in self.sinks:
            s.on_error(kind, message)

    def on_alert(self, kind: str, message: str) -> None:
        for s in self.sinks:
            s.on_alert(kind, message)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside an exception group (task groups wrap what their tasks raise)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def one_line(exc: BaseException) -> tuple[str, str]:
    """(kind, message) of an error, for the trace and the summary."""
    exc = first_error(exc)
    kind = exc.kind if isinstance(exc, RtloopError) else "error"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return kind, text


async def sleep_until(deadline: float) -> None:
    await anyio.sleep(max(0.0, deadline - clock.now()))


class Runtime:
    def __init__(
        self,
        env: SimEnv,
        policy: Policy,
        sim_thread: WorkerThread,
        policy_thread: WorkerThread,
        sinks: Fanout,
        config: LoopConfig,
        keep_frames: bool = False,
        env_index: int = 0,
    ) -> None:
        self.env = env
        self.env_index = env_index  # stamped on every record: which env of a fleet (rtloop.fleet)
        self.policy = policy
        self.sim_thread = sim_thread
        self.policy_thread = policy_thread
        self.sinks = sinks
        self.config = config
        self.inference_seq = 0  # counts across the run
        self.dropped_before = 0  # frames dropped in earlier episodes
        self.latest: Action | None = None
        self.frames: list[np.ndarray] | None = [] if keep_frames else None  # for --video, raw sim frames

    async def run_episode(self, episode: int, mailbox: LatestFrameMailbox | None = None,
                          consumer: FrameConsumer | None = None) -> EpisodeRecord:
        """One episode. The sim task puts its frames into `mailbox` and `consumer(episode, mailbox)` runs
        beside it until the episode ends: by default the inference task here; in a fleet's env worker
        (rtloop.fleet.worker) the link that ships frames to the fleet's one inference task, which sets
        `latest` when an action comes back."""
        consumer = consumer or self._inference_task
        t_start = clock.now()
        progress = EpisodeProgress()
        error: str | None = None
        self.latest = None
        try:
            first = await self._sim_call(self.env.reset, episode)
            if self.frames is not None:
                self.frames.append(first.image)
            first_frame = Frame(0, first, clock.now())
            if self.config.sync:
                await self._blocking_loop(episode, first_frame, progress)
            else:
                mailbox = mailbox if mailbox is not None else LatestFrameMailbox()
                mailbox.put(first_frame)
                try:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(consumer, episode, mailbox)
                        await self._sim_task(episode, mailbox, progress)
                        tg.cancel_scope.cancel()  # the episode is over: stop the model
                finally:
                    self.dropped_before += mailbox.dropped
        except anyio.get_cancelled_exc_class():
            # Ctrl-C: keep a record of the episode, then let the cancellation through.
            self._end_episode(episode, t_start, progress, "interrupted")
            raise
        except InputError:  # e.g. an episode index beyond the init states: the user's to fix, stop the run
            raise
        except Exception as exc:  # a policy or sim failure ends this episode, not the run
            kind, message = one_line(exc)
            error = f"{kind}: {message}"
            log.error("rtloop: episode %d ended on a %s error: %s", episode, kind, message)
            self.sinks.on_error(kind, message)
        return self._end_episode(episode, t_start, progress, error)

    def _end_episode(self, episode: int, t_start: float, progress: EpisodeProgress, error: str | None) -> EpisodeRecord:
        rec = EpisodeRecord(
            episode=episode,
            suite=self.env.suite,
            task_id=self.env.task_id,
            t_start=t_start,
            t_end=clock.now(),
            steps=progress.steps,
            success=progress.success,
            error=error,
            env=self.env_index,
        )
        self.sinks.on_episode(rec)
        return rec

    async def _sim_call(self, fn, *args):
        try:
            return await self.sim_thread.run(fn, *args)
        except RtloopError:
            raise
        except Exception as exc:
            raise SimError(f"{type(exc).__name__}: {exc}") from exc

    async def _act(self, obs: Observation) -> PolicyOutput:
        try:
            return await self.policy_thread.run(self.policy.act, obs, self.env.instruction)
        except RtloopError:
            raise
        except Exception as exc:
            raise PolicyError(f"{type(exc).__name__}: {exc}") from exc

    async def _sim_task(self, episode: int, mailbox: LatestFrameMailbox, progress: EpisodeProgress) -> None:
        period = 1.0 / self.config.rate
        anchor, k = clock.now(), 0
        prev_start: float | None = None
        last_applied: int | None = None
        for step in range(self.config.steps_limit(self.env.horizon)):
            deadline = anchor + k * period
            await sleep_until(deadline)
            t_start = clock.now()
            action = self.latest
            if action is None:
                source, value, seq, age = "dummy", DUMMY_ACTION, None, None
            else:
                source = "fresh" if action.seq != last_applied else "held"
                value, seq, age = action.value, action.seq, t_start - action.frame_time
                last_applied = action.seq
            result: StepResult = await self._sim_call(self.env.step, value)
            t_end = clock.now()
            mailbox.put(Frame(step + 1, result.obs, t_end))
            overrun = max(0.0, t_end - (deadline + period))
            self._record_tick(episode, step, t_start, t_end, deadline, prev_start, overrun, t_end - t_start, result,
                              source, seq, age, step + 1, self.dropped_before + mailbox.dropped)
            prev_start = t_start
            progress.steps, progress.success = step + 1, result.success
            if result.done:
                return
            # An overrun tick does not make the next ticks burst to catch up on missed deadlines (that
            # would apply actions faster than the controller expects): the schedule restarts from now.
            if overrun > 0:
                anchor, k = t_end, 0
            else:
                k += 1

    async def _inference_task(self, episode: int, mailbox: LatestFrameMailbox) -> None:
        while True:
            t_wait = clock.now()
            frame = await mailbox.get()
            t_start = clock.now()
            out = await self._act(frame.obs)
            self.inference_seq += 1
            self.latest = Action(out.action, self.inference_seq, frame.captured_at)
            self._record_inference(episode, frame, t_start, clock.now(), t_start - t_wait, out)

    async def _blocking_loop(self, episode: int, frame: Frame, progress: EpisodeProgress) -> None:
        """The chapter's loop: frame -> act -> step, the sim waiting for the model. Paced to the same
        rate when it is fast enough, so both modes aim at the same Hz and the summary compares like with
        like. Every action is fresh; its age is the inference time plus any wait for the tick."""
        period = 1.0 / self.config.rate
        anchor, k = clock.now(), 0
        prev_start: float | None = None
        for step in range(self.config.steps_limit(self.env.horizon)):
            deadline = anchor + k * period
            await sleep_until(deadline)
            t_start = clock.now()
            out = await self._act(frame.obs)
            self.inference_seq += 1
            t_apply = clock.now()
            self._record_inference(episode, frame, t_start, t_apply, 0.0, out)
            result: StepResult = await self._sim_call(self.env.step, out.action)
            t_end = clock.now()
            overrun = max(0.0, t_end - (deadline + period))
            self._record_tick(episode, step, t_start, t_end, deadline, prev_start, overrun, t_end - t_apply, result,
                              "fresh", self.inference_seq, t_apply - frame.captured_at, step + 1, 0)
            frame = Frame(step + 1, result.obs, t_end)
            prev_start = t_start
            progress.steps, progress.success = step + 1, result.success
            if result.done:
                return
            if overrun > 0:  # as in the sim task: resync rather than burst
                anchor, k = t_end, 0
            else:
                k += 1

    def _record_tick(self, episode, step, t_start, t_end, deadline, prev_start, overrun, step_s,
                     result: StepResult, source, action_seq, action_age, frame_seq, dropped_total) -> None:
        if self.frames is not None:
            self.frames.append(result.frame)
        self.sinks.on_tick(TickRecord(
            episode=episode,
            step=step,
            t_start=t_start,
            t_end=t_end,
            deadline=deadline,
            interval_s=None if prev_start is None else t_start - prev_start,
            overrun_s=overrun,
            lateness_s=t_start - deadline,
            step_s=step_s,
            physics_s=result.timings.get("physics", 0.0),
            render_s=result.timings.get("render", 0.0),
            action_source=source,
            action_seq=action_seq,
            action_age_s=action_age,
            frame_seq=frame_seq,
            frames_dropped_total=dropped_total,
            done=result.done,
            success=result.success,
            env=self.env_index,
        ))

    def _record_inference(self, episode, frame: Frame, t_start, t_end, queue_wait, out: PolicyOutput) -> None:
        self.sinks.on_inference(InferenceRecord(
            episode=episode,
            seq=self.inference_seq,
            frame_seq=frame.seq,
            frame_time=frame.captured_at,
            t_start=t_start,
            t_end=t_end,
            queue_wait_s=queue_wait,
            frame_age_s=t_start - frame.captured_at,
            stages={k: float(v) for k, v in out.timings.items()},
            action=[float(x) for x in out.action],
            env=self.env_index,
        ))
        for alert in out.alerts:
            self.sinks.on_alert(alert.kind, alert.message)
