"""The latest-frame mailbox between the sim task and the inference task.

One slot. The sim puts every frame it renders; a frame the model has not taken yet is overwritten (and
counted as dropped), because a model that is behind should work on the newest view of the world, not on
a backlog. The inference task's `get` waits until there is a frame newer than the last one it took.
Both sides run on the event loop, so no lock is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import anyio
import anyio.lowlevel

from rtloop.sim.base import Observation


@dataclass
class Frame:
    seq: int  # 0 for the frame after reset, then one per tick
    obs: Observation
    captured_at: float  # clock.now() when the simulator returned it


class LatestFrameMailbox:
    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._unread = False
        self._new_frame = anyio.Event()
        self.dropped = 0  # frames overwritten before anyone took them

    def put(self, frame: Frame) -> None:
        if self._unread:
            self.dropped += 1
        self._frame = frame
        self._unread = True
        # trio-style broadcast: set the current event, hand later waiters a fresh one
        self._new_frame.set()
        self._new_frame = anyio.Event()

    async def get(self) -> Frame:
        """Always a cancellation point, even when a frame is waiting: an episode's end or a signal stops the
        inference loop here rather than after one more inference."""
        await anyio.lowlevel.checkpoint()
        while not self._unread:
            await self._new_frame.wait()
        return self._take()

    def take_nowait(self) -> Frame | None:
        """The unread frame, or None (the virtual clock's event loop never waits for one)."""
        return self._take() if self._unread else None

    def _take(self) -> Frame:
        self._unread = False
        assert self._frame is not None
        return self._frame
