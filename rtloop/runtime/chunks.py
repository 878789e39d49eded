"""Executing action chunks one action per tick, as LeRobot's async inference does.

A policy like π0 returns H actions from one observation: chunk[i] is meant for the i-th step after that
observation's step. The buffer keeps the unexecuted ones indexed by the step they are meant for:

    buf = ChunkBuffer("weighted_average")
    buf.add(out.chunk, seq=inference_seq, start=obs_step)  # chunk[i] is for step obs_step + i
    a = buf.pop(step)          # the action for this step (None: nothing left for it -> hold the last one)
    if buf.needs_request(0.5): ...send the next observation

When a new chunk arrives, its actions for steps already executed are dropped (the robot is past them),
where it overlaps actions still pending the two are merged by the named rule, and the rest is appended.
`start` = the current step instead of the observation's gives plain queue semantics (openpi's example).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from rtloop.errors import InputError

# old, new -> the action to execute. LeRobot's aggregate functions, under its names.
MERGE_RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "latest_only": lambda old, new: new,
    "weighted_average": lambda old, new: 0.3 * old + 0.7 * new,
    "average": lambda old, new: 0.5 * old + 0.5 * new,
    "conservative": lambda old, new: 0.7 * old + 0.3 * new,
}


def merge_rule(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    if name not in MERGE_RULES:
        raise InputError(f"unknown chunk merge rule {name!r}; valid: {', '.join(MERGE_RULES)}")
    return MERGE_RULES[name]


@dataclass
class ChunkAction:
    action: np.ndarray  # env-ready 7-vector
    step: int  # the step it is meant for
    seq: int  # the inference that produced it (the newer one when merged)
    index: int  # its position in that inference's chunk (= steps since the observation: staleness)
    chunk_len: int
    merged: bool = False  # blended with an older chunk's action for the same step


class ChunkBuffer:
    def __init__(self, merge: str = "latest_only"):
        self.merge_name = merge
        self._merge = merge_rule(merge)
        self._pending: dict[int, ChunkAction] = {}  # step -> action, steps ascending (insertion order)
        self.chunk_len = 0  # the latest chunk's length: needs_request's denominator
        self.dropped = 0  # actions that arrived for steps already executed, or were never executed

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, chunk: np.ndarray, seq: int, start: int, now: int | None = None) -> None:
        """chunk [H, 7]; chunk[i] is meant for step start + i. `now`: the next step to execute (actions
        for earlier steps are dropped); default: keep everything from `start` on."""
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise InputError(f"an action chunk must be [H, action_dim] with H >= 1, got shape {chunk.shape}")
        self.chunk_len = len(chunk)
        first = start if now is None else max(start, now)
        self.dropped += min(first - start, len(chunk))
        merged = dict(self._pending)
        for i in range(first - start, len(chunk)):
            step, new = start + i, chunk[i]
            old = merged.get(step)
            action = new if old is None else self._merge(old.action, new)
            merged[step] = ChunkAction(action, step, seq, i, len(chunk), merged=old is not None)
        self._pending = dict(sorted(merged.items()))

    def pop(self, step: int) -> ChunkAction | None:
        """The action meant for `step`, removed; actions for earlier steps are dropped unexecuted."""
        for s in [s for s in self._pending if s < step]:
            del self._pending[s]
            self.dropped += 1
        return self._pending.pop(step, None)

    def needs_request(self, threshold: float) -> bool:
        """LeRobot's chunk_size_threshold: ask for the next chunk once the unexecuted share of the latest
        chunk is at or below `threshold` (0: only when empty; 1: every step)."""
        if not 0 <= threshold <= 1:
            raise InputError(f"chunk threshold must be in 0..1 (got {threshold:g})")
        if not self._pending:
            return True
        return len(self._pending) / self.chunk_len <= threshold
