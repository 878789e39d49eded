"""An env worker: one SimEnv and its sim task, in a process of its own (or a Ray actor,
rtloop.fleet.ray_backend). The sim task is the single-env runtime's own (`Runtime.run_episode`): its own
pacer and deadlines, its own latest-frame mailbox, the newest action it has applied fresh, held or dummy.
What differs is the mailbox's consumer: instead of running the policy it ships each frame to the fleet's
inference task, and the actions that come back reach the runtime's action selector (`Runtime.offer`).
With --sync or on the virtual clock the env waits for each action, as a single env does there: the
runtime's `act` ships the frame and waits for its answer, and the env's own runtime records the inference
on its own clock (`waits_for_actions`).

The transport is a `Link`: `ship(episode, frame)` and `emit(kind, record)` outward; the worker's
`on_action` and `on_abort` inward.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from pathlib import Path
from typing import Protocol

import anyio
import numpy as np

from rtloop.errors import PolicyError
from rtloop.policy.base import PolicyOutput
from rtloop.runtime.loop import Action, Answer, LoopConfig, Runtime
from rtloop.runtime.mailbox import Frame, LatestFrameMailbox
from rtloop.runtime.records import (AlertRecord, EpisodeRecord, ErrorRecord, Fanout, InferenceRecord, Record,
                                    TickRecord, to_dict)
from rtloop.runtime.worker import WorkerThread

log = logging.getLogger(__name__)


class Link(Protocol):
    def ship(self, episode: int, frame: Frame) -> None: ...
    def emit(self, kind: str, record: dict) -> None: ...


def waits_for_actions(spec: dict) -> bool:
    """Whether the env waits for each action (sync, the virtual clock) rather than ticking on without it."""
    return spec["loop"]["sync"] or spec["clock"] == "virtual"


class LinkSink:
    """The worker's records go to the parent, which hands them to the run's sinks."""

    def __init__(self, link: Link, env_index: int) -> None:
        self.link, self.env_index = link, env_index

    def on_record(self, record: Record) -> None:
        if isinstance(record, (TickRecord, InferenceRecord, EpisodeRecord, ErrorRecord, AlertRecord)):
            self.link.emit(record.kind, to_dict(record))

    def close(self) -> None:
        pass


def env_args(spec: dict, task: int) -> argparse.Namespace:
    """`rtloop run`'s env options for one task (see rtloop.commands.run.build_env)."""
    replay = spec.get("replay")
    return argparse.Namespace(sim=spec["sim"], suite=spec["suite"], task=task, seed=spec["seed"],
                              replay=None if replay is None else Path(replay))


class EnvWorker:
    """One env of a fleet. Builds the env on its sim thread (EGL contexts are per thread) for the task it
    is asked for, and keeps it while the task stays the same."""

    def __init__(self, spec: dict, index: int, link: Link) -> None:
        self.spec, self.index, self.link = spec, index, link
        self.waits = waits_for_actions(spec)
        self.sim_thread = WorkerThread(f"rtloop-sim-{index}")
        self.env = None
        self.task: int | None = None
        self.runtime: Runtime | None = None
        self.episode: int | None = None
        self.mailbox: LatestFrameMailbox | None = None
        self._reported_dropped = 0
        self._abort: anyio.Event | None = None
        self._abort_error: PolicyError | None = None
        self._answered: anyio.Event | None = None  # waiting for the answer to the frame shipped (waits)
        self._answer: Answer | None = None

    def prepare(self, task: int, episode: int) -> Frame:
        """Build the env for `task` (if it has another one) and return its first frame of `episode`:
        the parent warms the policy up on it. Blocking: runs before the worker's event loop."""
        from rtloop import clock
        from rtloop.commands import run as command

        if self.task != task:
            if self.env is not None:
                self.sim_thread.call(self.env.close)
                self.env = None
            self.env = self.sim_thread.call(command.build_env, env_args(self.spec, task))
            self.task = task
            self.runtime = self._runtime()
        obs = self.sim_thread.call(self.env.reset, episode)
        return Frame(0, obs, clock.now())

    def _runtime(self) -> Runtime:
        from rtloop.clock import WALL, VirtualClock

        latency = None
        if self.spec["clock"] == "virtual":
            from rtloop.runtime.latency import latency_model_from_args

            options = self.spec["latency"]
            latency = latency_model_from_args(options["inject_delay"], options["latency_profile"],
                                              options["latency_scale"], self.spec["seed"], options["latency_order"])
        return Runtime(self.env, None, self.sim_thread, None, Fanout([LinkSink(self.link, self.index)]),
                       LoopConfig(**self.spec["loop"]), env_index=self.index,
                       clock=VirtualClock() if latency is not None else WALL, latency=latency,
                       act=self._ask if self.waits else None)

    def describe(self) -> dict:
        env, config = self.env, self.runtime.config
        return {"instruction": env.instruction, "suite": env.suite, "task": env.task_id, "label": env.label,
                "horizon": env.horizon, "steps_limit": config.steps_limit(env.horizon)}

    async def run_episode(self, task: int, episode: int) -> None:
        """One episode of `task`; every record, the episode's last included, goes out through the link.
        An InputError (an episode past the init states) goes out as a `fatal` message."""
        from rtloop.errors import InputError

        try:
            if self.task != task:
                await anyio.to_thread.run_sync(self.prepare, task, episode)
            self.link.emit("env", self.describe())  # the instruction the parent batches this env's frames with
            self.episode, self.mailbox = episode, LatestFrameMailbox()
            self._reported_dropped = 0
            self._abort = anyio.Event()
            self._abort_error = None
            await self.runtime.run_episode(episode, self.mailbox, self._consume)
        except InputError as exc:
            self.link.emit("fatal", {"message": str(exc)})
        finally:
            self.episode = None

    async def _consume(self, episode: int, mailbox: LatestFrameMailbox) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_abort)
            while True:
                self.link.ship(episode, await mailbox.get())

    async def _watch_abort(self) -> None:
        await self._abort.wait()
        raise self._abort_error

    async def _ask(self, frame: Frame) -> Answer:
        """The runtime's `act` when the env waits for its actions: the frame goes to the fleet's inference
        task like any other, and the episode waits for its answer (or the policy's error)."""
        self._answer, self._answered = None, anyio.Event()
        self.link.ship(self.episode, frame)
        await self._answered.wait()
        if self._abort_error is not None:
            raise self._abort_error
        return self._answer

    def on_action(self, episode: int, seq: int, value, frame_time: float, dropped: int, raw, stages: dict,
                  batch_s: float, batch_size: int, batch_index: int) -> None:
        """An action from the parent. `dropped`: frames of this episode the parent overwrote unread, so
        this env's tick records count every drop, wherever it happened. The rest is what a waiting env's
        runtime records: the model's raw action, the batch's stage times, wall time and size."""
        if episode != self.episode:  # computed from a frame of an episode that is over
            return
        action = np.asarray(value, dtype=np.float64)
        if self.waits:
            if self._answered is not None and not self._answered.is_set():
                output = PolicyOutput(action, np.asarray(raw, dtype=np.float64), stages)
                self._answer = Answer(output, batch_s, batch_size, batch_index)
                self._answered.set()
        else:
            self.runtime.offer(Action(action, seq, frame_time))
        self.mailbox.dropped += dropped - self._reported_dropped
        self._reported_dropped = dropped

    def on_abort(self, episode: int, kind: str, message: str) -> None:
        """The policy failed on this env's frame: its episode ends on that error, as in a single env."""
        if episode == self.episode:
            self._abort_error = PolicyError(message)
            self._abort_error.kind = kind  # the policy's own kind of error (action, input, policy)
            self._abort.set()
            if self._answered is not None:
                self._answered.set()

    def close(self) -> None:
        if self.env is not None:
            self.sim_thread.call(self.env.close)
            self.env = None
        self.sim_thread.close()


# --- a local worker process ----------------------------------------------------------------------------


class PipeLink:
    """Messages to the parent over the pipe (msgpack), frames through the shared-memory ring."""

    def __init__(self, conn) -> None:
        from rtloop.fleet.wire import FrameRing, pack, pack_arrays

        self.conn, self.pack, self.pack_arrays, self.FrameRing = conn, pack, pack_arrays, FrameRing
        self.ring: FrameRing | None = None
        self.written = 0  # frames put into the ring over the worker's life: the ring's sequence numbers

    def send(self, message: list) -> None:
        self.conn.send_bytes(self.pack(message))

    def frame_message(self, kind: str, episode: int, frame: Frame) -> list:
        image, slot, ring_seq, shape = frame.obs.image, None, None, None
        if image is not None:
            image = np.ascontiguousarray(image, dtype=np.uint8)
            if self.ring is None or self.ring.shape != image.shape:
                if self.ring is not None:
                    self.ring.close(unlink=True)
                self.ring = self.FrameRing(image.shape)
            self.written += 1
            ring_seq, slot, shape = self.written, self.ring.write(self.written, image), list(image.shape)
        return [kind, episode, frame.seq, frame.captured_at, None if self.ring is None else self.ring.name,
                slot, ring_seq, shape, self.pack_arrays(frame.obs.state)]

    def ship(self, episode: int, frame: Frame) -> None:
        self.send(self.frame_message("frame", episode, frame))

    def emit(self, kind: str, record: dict) -> None:
        self.send(["record", kind, record])

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close(unlink=True)
            self.ring = None


def serve(conn, spec: dict, index: int, log_path: str | None) -> None:
    """The worker process (spawned): answer the parent's messages until it says stop or goes away.
      parent -> worker: ["prepare", task, episode] ["episode", task, episode]
                        ["action", episode, seq, [7 floats], frame_time, dropped, [7 raw floats], {stage: s},
                         batch_s, batch_size, batch_index]
                        ["abort", episode, kind, message]
                        ["stop"]
      worker -> parent: ["ready", ...frame, info] ["frame", ...] ["record", kind, dict]
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    if log_path is not None:  # LIBERO's chatter would fight the live view
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    from rtloop.fleet.wire import unpack

    link = PipeLink(conn)
    worker = EnvWorker(spec, index, link)
    try:
        anyio.run(_serve_loop, conn, worker, link, unpack)
    finally:
        worker.close()
        link.close()


async def _serve_loop(conn, worker: EnvWorker, link: PipeLink, unpack) -> None:
    from rtloop.errors import RtloopError

    async with anyio.create_task_group() as tg:
        while True:
            await anyio.wait_readable(conn.fileno())
            while conn.poll():
                try:
                    message = unpack(conn.recv_bytes())
                except EOFError:  # the parent is gone
                    tg.cancel_scope.cancel()
                    return
                kind = message[0]
                if kind == "action":
                    worker.on_action(*message[1:])
                elif kind == "abort":
                    worker.on_abort(*message[1:])
                elif kind == "episode":
                    tg.start_soon(worker.run_episode, *message[1:])
                elif kind == "prepare":
                    try:
                        frame = await anyio.to_thread.run_sync(worker.prepare, *message[1:])
                    except Exception as exc:  # the env cannot be built: the parent says so in one line
                        message = str(exc) if isinstance(exc, RtloopError) else f"{type(exc).__name__}: {exc}"
                        link.emit("fatal", {"message": message})
                        continue
                    link.send([*link.frame_message("ready", message[2], frame), worker.describe()])
                elif kind == "stop":
                    tg.cancel_scope.cancel()
                    return
