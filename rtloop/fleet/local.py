"""The parent's end of a local env worker process (spawn): msgpack over a pipe, frames from the worker's
shared-memory ring (rtloop.fleet.wire)."""

from __future__ import annotations

import multiprocessing as mp
import select

import anyio

from rtloop.errors import WorkerError
from rtloop.fleet.fleet import PendingFrame
from rtloop.fleet.wire import FrameRing, pack, unpack, unpack_arrays
from rtloop.fleet.worker import serve
from rtloop.sim.base import Observation

STOP_S = 10.0  # a worker told to stop closes its env; after this long it is killed


class ProcessEnvLink:
    def __init__(self, index: int, spec: dict, log_path: str | None = None) -> None:
        ctx = mp.get_context("spawn")  # the parent holds threads, maybe CUDA: never fork it
        self.index = index
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, spec, index, log_path), name=f"rtloop-env-{index}",
                                   daemon=True)
        self.process.start()
        child.close()
        self.pid = self.process.pid
        self.ring: FrameRing | None = None
        self._gone = False  # the pipe reached its end: the worker exited

    def _send(self, message: list) -> bool:
        """Only when the pipe has room: a worker that stopped reading never blocks the parent (a message
        under PIPE_BUF bytes is written whole once the pipe polls writable)."""
        if self._gone:
            return False
        _, writable, _ = select.select([], [self.conn.fileno()], [], 0)
        if not writable:
            return False
        try:
            self.conn.send_bytes(pack(message))
        except (BrokenPipeError, OSError):
            return False
        return True

    async def prepare(self, task: int, episode: int) -> tuple[Observation, dict]:
        self._send(["prepare", task, episode])
        while True:
            for message in await self.receive():
                if message[0] == "ready":
                    return message[1].load(), message[2]
                if message[0] == "fatal":
                    from rtloop.errors import InputError

                    raise InputError(message[1])

    def start(self, task: int, episode: int) -> None:
        self._send(["episode", task, episode])

    def send_action(self, *answer) -> bool:
        return self._send(["action", *answer])

    def abort(self, episode: int, kind: str, message: str) -> None:
        self._send(["abort", episode, kind, message])

    async def receive(self) -> list[tuple]:
        if self._gone:
            raise self._died()
        await anyio.wait_readable(self.conn.fileno())
        out = []
        while self.conn.poll():
            try:
                data = self.conn.recv_bytes()
            except (EOFError, OSError):
                self._gone = True
                break
            out.append(self._decode(unpack(data)))
        if not out and self._gone:
            raise self._died()
        return out

    def _died(self) -> WorkerError:
        self.process.join(timeout=5)
        code = self.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return WorkerError(f"env {self.index}: its worker process (pid {self.pid}) died ({how})")

    def _decode(self, message: list) -> tuple:
        kind = message[0]
        if kind == "record":
            return ("record", message[1], message[2])
        if kind == "fatal":
            return ("fatal", message[1]["message"])
        _, episode, seq, captured_at, ring_name, slot, ring_seq, shape, state = message[:9]
        if ring_name is not None and (self.ring is None or self.ring.name != ring_name):
            if self.ring is not None:
                self.ring.close()
            self.ring = FrameRing(tuple(shape), name=ring_name)
        ring = self.ring

        def load() -> Observation | None:
            if ring_name is None:
                return Observation(None, unpack_arrays(state))
            if ring is not self.ring:  # the worker replaced its ring since (a new frame shape)
                return None
            image = ring.read(slot, ring_seq)
            return None if image is None else Observation(image, unpack_arrays(state))

        frame = PendingFrame(episode, seq, captured_at, load)
        return (kind, frame, message[9]) if kind == "ready" else (kind, frame)

    def close(self) -> None:
        if self.process.is_alive():
            self._send(["stop"])
            self.process.join(timeout=STOP_S)
            if self.process.is_alive():
                self.process.kill()
        self.process.join()
        self.conn.close()
        if self.ring is not None:
            # a worker that exited cleanly unlinked its ring; one that was killed could not
            self.ring.close(unlink=self.process.exitcode != 0)
            self.ring = None


class LocalBackend:
    """Env workers as local processes; the policy in this process, on its own thread."""

    def __init__(self, spec: dict, log_path: str | None, build, build_args: tuple) -> None:
        """build(*build_args) -> Policy runs on the policy thread (rtloop.commands.policies.build_policy)."""
        from rtloop.runtime.worker import WorkerThread

        self.spec, self.log_path = spec, log_path
        thread = WorkerThread("rtloop-policy")
        try:
            policy = thread.call(build, *build_args)
        except BaseException:
            thread.close()
            raise
        self.policies = [(policy, thread)]

    def make_link(self, index: int) -> ProcessEnvLink:
        return ProcessEnvLink(index, self.spec, self.log_path)

    def close(self) -> None:
        for policy, thread in self.policies:
            thread.call(policy.close)
            thread.close()
