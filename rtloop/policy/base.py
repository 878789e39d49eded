"""What the runtime needs from a policy. The OpenVLA pipeline (rtloop.policy.openvla) implements it;
so does a deliberately slow wrapper used to make real-time effects visible in tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

STAGES = ("processor", "generate", "detokenize")


@dataclass
class PolicyOutput:
    action: np.ndarray  # env-ready 7-vector (for LIBERO: gripper already mapped to -1 open / +1 close)
    raw_action: np.ndarray  # the model's unnormalised 7-vector, before any env-specific mapping
    timings: dict[str, float]  # seconds per stage, keys from STAGES


class Policy(Protocol):
    label: str  # e.g. "openvla-7b (weights/openvla-7b)" or "openvla tiny RANDOM WEIGHTS"

    def act(self, frame: np.ndarray, instruction: str) -> PolicyOutput:
        """Raw simulator frame in, env-ready action out. Blocking; the runtime calls it off the event loop."""

    def warmup(self, frame: np.ndarray, instruction: str) -> None:
        """Run once before timing starts (allocations, CUDA graph capture)."""
