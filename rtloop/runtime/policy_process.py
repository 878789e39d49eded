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
import sys
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import Any, Callable

import numpy as np

from rtloop.errors import PolicyError, RtloopError
from rtloop.policy.base import PolicyOutput
from rtloop.runtime import heap
from rtloop.sim.base import Observation

CLOSE_WAIT_S = 2.0  # for the child to finish its call in flight and exit on its own before it is killed


def _serve(conn: Connection, build: Callable[..., Any], build_args: tuple) -> None:
    """The child: build the policy, then answer requests until told to stop (None)."""
    # Ctrl-C (and a SIGTERM to the group) reaches every process; the parent decides, and stops the child by
    # closing the pipe: no traceback from here, and the parent unlinks the shared memory.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
            result = getattr(policy, method)(Observation(image, state), instruction)
            if method == "warmup":
                heap.freeze()  # the warm policy: no garbage collection walks it again
            conn.send(("ok", result))
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
        the parent has threads and maybe CUDA). A child that dies is reported as such by the call that
        finds it dead (that episode ends on the error); the next call starts a new child."""
        self._build, self._build_args = build, build_args
        self._block: shared_memory.SharedMemory | None = None
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child_conn, self._build, self._build_args),
                                    name="rtloop-policy", daemon=True)
        self._process.start()
        child_conn.close()
        try:
            label, self.needs_images = self._receive()
            self.label = f"{label} [own process]"
        except BaseException:
            self.close()
            raise

    def _died(self) -> PolicyError:
        self._process.join(timeout=5)
        code = self._process.exitcode
        if code is not None and code < 0:
            return PolicyError(f"policy process died (signal {-code})")
        return PolicyError(f"policy process exited (exit code {code})")

    def _receive(self):
        try:
            status, payload = self._conn.recv()
        except (EOFError, OSError):  # the pipe broke: the child is gone
            raise self._died() from None
        if status == "error":
            raise payload
        return payload

    def _call(self, method: str, obs: Observation, instruction: str):
        if not self._process.is_alive():
            self._conn.close()
            self._process.join()
            print("rtloop: the policy process had died: starting a new one", file=sys.stderr)
            self._start()
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
        try:
            self._conn.send((method, block_name, shape, obs.state, instruction))
        except OSError:
            raise self._died() from None
        return self._receive()

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        return self._call("act", obs, instruction)

    def warmup(self, obs: Observation, instruction: str) -> None:
        self._call("warmup", obs, instruction)

    def close(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._process.join(timeout=CLOSE_WAIT_S)
            if self._process.is_alive():  # still in a call (a long injected delay): it holds nothing to save
                self._process.kill()
                self._process.join()
        self._conn.close()
        if self._block is not None:
            self._block.close()
            self._block.unlink()
            self._block = None
