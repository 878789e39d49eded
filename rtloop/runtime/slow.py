"""A policy wrapper that gives every inference a latency from a LatencyModel, on the wall clock.

Like the injected-delay studies of real-time chunking and LeRobot's async inference: the model is the
same, it just answers later. The model's sample is the inference's total latency: the wrapper pads the
call up to it (sleeps the sample minus what the call already took), so `--inject-delay 0.1` means the
same 100 ms on the wall clock as on the virtual clock, and a profile recorded on a GPU is replayed as that
GPU's latency, whatever this machine takes. A call slower than its sample is not shortened (the padding is
0; `injected_delay` in the timings records the padding actually spent).

How the padding is spent is a knob for the GIL study:
- sleep: no CPU, GIL released (like waiting for a GPU);
- spin-gil: a pure-Python busy loop, GIL held (like a CPU-bound Python policy);
- spin-nogil: the same CPU burnt in hashlib, which releases the GIL on large buffers (like native code).
"""

from __future__ import annotations

import hashlib
import threading

from rtloop import clock
from rtloop.policy.base import Policy, PolicyOutput
from rtloop.runtime.latency import LatencyModel
from rtloop.sim.base import Observation


MODES = ("sleep", "spin-gil", "spin-nogil")
_BURN = bytes(1 << 16)  # hashing 64 KiB takes ~0.1 ms with the GIL released


def sleep(closed: threading.Event, seconds: float) -> None:
    """Sleep, unless the policy is closed meanwhile (then return at once)."""
    closed.wait(seconds)


class SlowPolicy:
    def __init__(self, inner: Policy, latency: LatencyModel, mode: str = "sleep") -> None:
        assert mode in MODES
        self.inner = inner
        self.latency = latency
        self.mode = mode
        self.calls = 0  # the index of the next latency sample
        self.label = f"{inner.label}, latency padded to {latency.label} ({mode})"
        self._closed = threading.Event()  # close() cuts a delay in flight short: a run's exit never waits it out

    @property
    def needs_images(self) -> bool:
        return self.inner.needs_images

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        t_call = clock.now()
        out = self.inner.act(obs, instruction)
        t0 = clock.now()
        target = self.latency.sample(self.calls, measured_s=t0 - t_call)
        self.calls += 1
        until = t_call + target
        if self.mode == "sleep":
            sleep(self._closed, max(0.0, until - t0))
        elif self.mode == "spin-gil":
            while clock.now() < until and not self._closed.is_set():
                pass
        else:
            while clock.now() < until and not self._closed.is_set():
                hashlib.sha256(_BURN).digest()
        out.timings["injected_delay"] = clock.now() - t0
        return out

    def warmup(self, obs: Observation, instruction: str) -> None:
        self.inner.warmup(obs, instruction)

    def close(self) -> None:
        self._closed.set()
        self.inner.close()
