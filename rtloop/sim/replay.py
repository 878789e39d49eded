"""Replay of recorded real LIBERO frames: the SimEnv interface on machines without LIBERO or MuJoCo.

It serves the recorded frames of one task in order, looping, and ignores the actions: the frames are real,
the closed loop is not. Its step costs nothing, so physics and render are reported as 0.

Recording format (an .npz written by `python -m rtloop.sim.record`):
- frames_delta  uint8 [N, H, W, 3]: per task, the first frame raw, then each frame minus the previous one
  (mod 256). Lossless; consecutive frames differ in a few % of pixels, so this compresses ~10x better.
- frame_task_ids int [N]; task_ids int [T]; instructions str [T]; suite str; episode, seed; mujoco str (the
  version that rendered them).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from rtloop.errors import InputError
from rtloop.sim.base import Observation, StepResult
from rtloop.sim.libero_env import horizon_for

INIT_STATES_PER_TASK = 50  # LIBERO's; the replay accepts the same episode range as the real env
RECORDING_NAME = "libero_object_frames.npz"  # libero_object tasks 0-3, 15 frames each (rtloop.sim.record defaults)


def default_recording() -> Path:
    """The recording shipped inside the package (rtloop/data), where a wheel install has it too. A plain
    file on disk (packages are installed unzipped), so it is usable as a path after the lookup."""
    return Path(str(resources.files("rtloop.data") / RECORDING_NAME))


@dataclass
class Frame:
    image: np.ndarray  # a raw LIBERO agentview frame, as the sim returns it
    instruction: str


def load_frames(path: Path) -> list[Frame]:
    """All recorded frames, interleaved across tasks so consecutive calls change frame and prompt."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"recorded frames {path}: no such file")
    with np.load(path, allow_pickle=False) as data:
        frame_task_ids = data["frame_task_ids"]
        frames = decode_frames(data["frames_delta"], frame_task_ids)
        instructions = dict(zip(data["task_ids"].tolist(), data["instructions"].tolist()))
    per_task = [[Frame(f, instructions[t]) for f, t in zip(frames, frame_task_ids) if t == task] for task in instructions]
    longest = max(len(fs) for fs in per_task)
    return [fs[i] for i in range(longest) for fs in per_task if i < len(fs)]


def encode_frames(frames: np.ndarray, frame_task_ids: np.ndarray) -> np.ndarray:
    delta = frames.copy()
    same_task = frame_task_ids[1:] == frame_task_ids[:-1]
    delta[1:][same_task] = frames[1:][same_task] - frames[:-1][same_task]  # uint8 arithmetic wraps
    return delta


def decode_frames(delta: np.ndarray, frame_task_ids: np.ndarray) -> np.ndarray:
    frames = np.empty_like(delta)
    starts = np.flatnonzero(np.r_[True, frame_task_ids[1:] != frame_task_ids[:-1]])
    for start, end in zip(starts, [*starts[1:], len(delta)]):
        frames[start:end] = np.cumsum(delta[start:end], axis=0, dtype=np.uint8)
    return frames


class ReplayEnv:
    label = "replay (recorded LIBERO frames, actions ignored)"

    def __init__(self, path: str | Path, suite: str = "libero_object", task_id: int = 0) -> None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"replay recording not found: {path} (make one with `python -m rtloop.sim.record`)")
        with np.load(path, allow_pickle=False) as data:
            recorded_suite = str(data["suite"])
            task_ids = data["task_ids"].tolist()
            instructions = data["instructions"].tolist()
            frame_task_ids = data["frame_task_ids"]
            if suite != recorded_suite:
                raise InputError(f"{path} records suite {recorded_suite!r}, not {suite!r}")
            if task_id not in task_ids:
                raise InputError(f"{path} has no frames of {suite} task {task_id}; recorded tasks: {task_ids}")
            frames = decode_frames(data["frames_delta"], frame_task_ids)
        self.suite = suite
        self.task_id = task_id
        self.instruction = instructions[task_ids.index(task_id)]
        self.horizon = horizon_for(suite)
        self.frames = frames[frame_task_ids == task_id]
        self._steps = 0

    def reset(self, episode: int) -> Observation:
        if not 0 <= episode < INIT_STATES_PER_TASK:
            raise InputError(
                f"episode {episode} is outside the {INIT_STATES_PER_TASK} init states of "
                f"{self.suite} task {self.task_id} (0..{INIT_STATES_PER_TASK - 1})"
            )
        self._steps = 0
        return Observation(self.frames[0].copy())

    def step(self, action: np.ndarray) -> StepResult:
        self._steps += 1
        return StepResult(
            obs=Observation(self.frames[self._steps % len(self.frames)].copy()),  # a fresh array, as LIBERO returns
            done=self._steps >= self.horizon,
            success=False,
            timings={"physics": 0.0, "render": 0.0},
        )

    def close(self) -> None:
        pass
