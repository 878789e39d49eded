"""The policy process's Python heap: frozen once the policy is warm, and every garbage collection timed.

CPython's cyclic collector stops every thread of its process while it runs, and a full collection walks
every tracked object. A compiled engine's warm-up leaves millions of them (torch.compile's graphs, guards and
generated code) that live as long as the process; a full collection then stalls the model for as long as the
walk takes, which the sim, never waiting, sees as every env's action going stale at once. The collector
starts a full collection only when enough new objects have survived, so it comes rarely and without warning.

So, as vLLM does after its warm-up (`gc.freeze`), the process that holds the policy moves everything alive
once the policy is warm to the permanent generation, which no collection walks again; and, as SGLang warns
of long collections, each collection is timed while a run lasts, and one that stops the process for a tick
or more becomes a `gc_pause` alert on the episodes it delayed.

A frozen object is still freed when its last reference goes, but a frozen cycle never is: whoever drops
what it froze (an env or a policy replaced between episodes) thaws the heap first.
"""

from __future__ import annotations

import gc
import time

from rtloop.policy.base import Alert

PAUSE_ALERT_S = 0.05  # one tick at 20 Hz


def freeze() -> int:
    """Collect what is garbage now, then freeze the rest. Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Back to the collector, before what was frozen is dropped."""
    gc.unfreeze()


class CollectorPauses:
    """While installed (`with`), times each garbage collection of this process; `take()` returns, as
    alerts, those that lasted threshold_s or more since the last take. The collector runs holding the GIL,
    one collection at a time, so the callback needs no lock."""

    def __init__(self, threshold_s: float = PAUSE_ALERT_S) -> None:
        self.threshold_s = threshold_s
        self.collections = 0
        self.total_s = 0.0
        self._started = 0.0
        self._long: list[tuple[int, float]] = []  # (generation, seconds)

    def __enter__(self) -> CollectorPauses:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        self.collections += 1
        self.total_s += seconds
        if seconds >= self.threshold_s:
            self._long.append((info["generation"], seconds))

    def take(self) -> list[Alert]:
        long, self._long = self._long, []
        return [Alert("gc_pause", f"Python's garbage collector stopped the policy's process for {seconds * 1000:.0f} ms "
                                  f"(a generation-{generation} collection): every action due meanwhile was that much "
                                  f"later. The heap was frozen once the policy was warm, so something made many "
                                  f"long-lived objects since")
                for generation, seconds in long]
