"""The clocks every timestamp in rtloop comes from.

`now()` is the wall clock: the sim thread, the inference thread and the event loop all stamp with it, so
ages and intervals can be subtracted across threads (perf_counter is CLOCK_MONOTONIC on Linux, ns
resolution). The runtime takes its clock as an object with `now()` and `async sleep_until(t)`:
- WallClock: real time; `rtloop run`'s default.
- VirtualClock (`--clock virtual`): time is what the runtime says it is. Sleeping to a deadline jumps there
  at once, so a run's timeline depends on its rate and latency model, never on how fast the machine is.
Durations measured on the machine (a step's, a stage's) are always wall time, read with `now()`.
"""

from __future__ import annotations

import time

now = time.perf_counter


class WallClock:
    label = "wall"

    def now(self) -> float:
        return time.perf_counter()

    async def sleep_until(self, t: float) -> None:
        import anyio

        await anyio.sleep(max(0.0, t - time.perf_counter()))


class VirtualClock:
    label = "virtual"

    def __init__(self, start: float = 0.0) -> None:
        self._t = start

    def now(self) -> float:
        return self._t

    async def sleep_until(self, t: float) -> None:
        import anyio.lowlevel

        self._t = max(self._t, t)
        await anyio.lowlevel.checkpoint()  # still a cancellation point, like a real sleep

    def advance_to(self, t: float) -> None:
        self._t = max(self._t, t)


WALL = WallClock()
