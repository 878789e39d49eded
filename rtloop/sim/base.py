"""What the runtime needs from a simulator. LIBERO (rtloop.sim.libero_env) and the replay of recorded
LIBERO frames (rtloop.sim.replay) both implement it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Observation:
    image: np.ndarray | None  # the policy camera, HxWx3 uint8, exactly as the simulator returns it (LIBERO:
    # upside down); None when the env was built with render=False (a policy that reads only state)
    state: dict[str, np.ndarray] = field(default_factory=dict)  # privileged sim state, where the env has it


@dataclass
class StepResult:
    obs: Observation
    done: bool  # the episode ended: success, or the horizon was reached
    success: bool
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "physics", "render" (inside "step")

    @property
    def frame(self) -> np.ndarray | None:
        return self.obs.image


class SimEnv(Protocol):
    suite: str
    task_id: int
    instruction: str  # the task's language instruction
    horizon: int  # max policy steps after the settle steps
    label: str  # e.g. "libero" or "replay (recorded LIBERO frames)": shown in every output

    def reset(self, episode: int) -> Observation:
        """Start `episode` (an init-state index), run the settle steps, return the first observation."""

    def step(self, action: np.ndarray) -> StepResult:
        """Apply one env-ready 7-vector action (gripper already in the env's convention)."""

    def close(self) -> None: ...
