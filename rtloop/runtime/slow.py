"""A policy wrapper that adds latency, to make real-time effects visible (held actions, dropped frames).

Like the injected-delay studies of real-time chunking and LeRobot's async inference: the model is the
same, it just answers later. How the delay is spent is a knob for the GIL study:
- sleep: no CPU, GIL released (like waiting for a GPU);
- spin-gil: a pure-Python busy loop, GIL held (like a CPU-bound Python policy);
- spin-nogil: the same CPU burnt in hashlib, which releases the GIL on large buffers (like native code).
"""

from __future__ import annotations

import hashlib
import threading

from rtloop import clock
from rtloop.policy.base import Policy, PolicyOutput
from rtloop.sim.base import Observation


MODES = ("sleep", "spin-gil", "spin-nogil")
_BURN = bytes(1 << 16)  # hashing 64 KiB takes ~0.1 ms with the GIL released


class SlowPolicy:
    def __init__(self, inner: Policy, delay_s: float, mode: str = "sleep") -> None:
        assert mode in MODES
        self.inner = inner
        self.delay_s = delay_s
        self.mode = mode
        self.label = f"{inner.label} + {delay_s * 1000:.0f} ms injected delay ({mode})"
        self._closed = threading.Event()  # close() cuts a delay in flight short: a run's exit never waits it out

    @property
    def needs_images(self) -> bool:
        return self.inner.needs_images

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        out = self.inner.act(obs, instruction)
        t0 = clock.now()
        if self.mode == "sleep":
            self._closed.wait(self.delay_s)
        elif self.mode == "spin-gil":
            while clock.now() - t0 < self.delay_s and not self._closed.is_set():
                pass
        else:
            while clock.now() - t0 < self.delay_s and not self._closed.is_set():
                hashlib.sha256(_BURN).digest()
        out.timings["injected_delay"] = clock.now() - t0
        return out

    def warmup(self, obs: Observation, instruction: str) -> None:
        self.inner.warmup(obs, instruction)

    def close(self) -> None:
        self._closed.set()
        self.inner.close()
