"""`--policy-process`: the policy runs in its own process, so its Python never holds the sim's GIL.

In one process, a policy thread that runs Python (an eager PyTorch decode loop launching kernels, a
CPU-bound policy) holds the GIL most of the time; the sim thread must win it back after every native call
that released it (each MuJoCo substep), and the event loop must win it to start a tick. Here the parent
keeps the sim, the loop and a thin proxy; the child builds and runs the real policy. Frames go through
one shared-memory block (no pickling of images), the small rest through a pipe.

The proxy is a Policy like any other: the runtime calls `act` on its policy thread, which blocks on the
pipe with the GIL released.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from rtloop.errors import PolicyError, RtloopError
from rtloop.policy.base import PolicyOutput
from rtloop.sim.base import Observation


def _serve(conn: Connection, build: Callable[..., Any], build_args: tuple) -> None:
    """The child: build the policy, then answer requests until told to stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    try:
        policy = build(*build_args)
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        return
    conn.send(("ok", (policy.label, policy.needs_images)))
    blocks: dict[str, shared_memory.SharedMemory] = {}
    while (request := conn.recv()) is not None:
        method, block_name, shape, state, instruction = request
        image = None
        if block_name is not None:
            if block_name not in blocks:
                blocks[block_name] = shared_memory.SharedMemory(name=block_name)
            image = np.ndarray(shape, dtype=np.uint8, buffer=blocks[block_name].buf).copy()
        try:
            conn.send(("ok", getattr(policy, method)(Observation(image, state), instruction)))
        except BaseException as exc:
            conn.send(("error", _portable(exc)))
    for block in blocks.values():
        block.close()


def _portable(exc: BaseException) -> BaseException:
    """Our one-line errors cross the pipe as they are; anything else as a PolicyError naming it."""
    if isinstance(exc, RtloopError):
        return exc
    return PolicyError(f"{type(exc).__name__}: {exc}")


class ProcessPolicy:
    def __init__(self, build: Callable[..., Any], *build_args) -> None:
        """build(*build_args) -> Policy runs in the child (both must be picklable: spawn, not fork, because
        the parent has threads and maybe CUDA)."""
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_conn, build, build_args), name="rtloop-policy",
                                    daemon=True)
        self._process.start()
        child_conn.close()
        self._block: shared_memory.SharedMemory | None = None
        try:
            label, self.needs_images = self._receive()
            self.label = f"{label} [own process]"
        except BaseException:
            self.close()
            raise

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise PolicyError(f"the policy process exited (exit code {self._process.exitcode})") from None
        if status == "error":
            raise payload
        return payload

    def _call(self, method: str, obs: Observation, instruction: str):
        block_name, shape = None, None
        if obs.image is not None:
            frame = np.ascontiguousarray(obs.image, dtype=np.uint8)
            if self._block is None or self._block.size < frame.nbytes:
                if self._block is not None:
                    self._block.close()
                    self._block.unlink()
                self._block = shared_memory.SharedMemory(create=True, size=frame.nbytes)
            np.ndarray(frame.shape, dtype=np.uint8, buffer=self._block.buf)[...] = frame
            block_name, shape = self._block.name, frame.shape
        self._conn.send((method, block_name, shape, obs.state, instruction))
        return self._receive()

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        return self._call("act", obs, instruction)

    def warmup(self, obs: Observation, instruction: str) -> None:
        self._call("warmup", obs, instruction)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._conn.close()
        if self._block is not None:
            self._block.close()
            self._block.unlink()
            self._block = None
