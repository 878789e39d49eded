"""Simulators behind the SimEnv interface (rtloop.sim.base): real LIBERO, or a replay of recorded frames."""

from __future__ import annotations

from pathlib import Path

from rtloop.errors import InputError
from rtloop.sim.base import SimEnv
from rtloop.sim.replay import default_recording

# Recorded with `python -m rtloop.sim.record --out rtloop/data/libero_object_frames.npz` (defaults).
DEFAULT_RECORDING = default_recording()

KINDS = ("libero", "replay")


def make_env(
    kind: str = "libero",
    suite: str = "libero_object",
    task_id: int = 0,
    seed: int = 0,
    replay_path: str | Path | None = None,
) -> SimEnv:
    if kind == "libero":
        from rtloop.sim.libero_env import LiberoEnv

        return LiberoEnv(suite=suite, task_id=task_id, seed=seed)
    if kind == "replay":
        from rtloop.sim.replay import ReplayEnv

        return ReplayEnv(replay_path or DEFAULT_RECORDING, suite=suite, task_id=task_id)
    raise InputError(f"unknown sim kind {kind!r}; valid kinds: {', '.join(KINDS)}")
