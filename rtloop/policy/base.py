"""What the runtime needs from a policy. The OpenVLA pipeline (rtloop.policy.openvla) implements it;
so do the scripted expert, the remote (websocket) policy and a deliberately slow wrapper."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from rtloop import clock
from rtloop.sim.base import Observation

STAGES = ("processor", "generate", "detokenize")
# Timed inside a stage, so not summed with STAGES: the LIBERO eval's frame preparation (rotation, JPEG round
# trip, Lanczos resize, centre crop), part of `processor` in `act` and `act_batch`.
LIBERO_IMAGE = "libero_image"
SUB_STAGES = (LIBERO_IMAGE,)

# Every Alert.kind (bounded label values): the policy guards' (rtloop.policy.guards says why each exists), and
# the runtime's stale_action (an action older than --max-action-age was due: the sim stopped the arm), and the
# remote client's remote_input (the env lacks an input the remote policy's form wants: zeros were sent), and
# gc_pause (Python's garbage collector stopped the policy's process for a tick or more: rtloop.runtime.heap).
ALERT_KINDS = ("blank_frame", "prompt", "unnorm_key", "constant_action", "image_orientation", "stale_action",
               "remote_input", "gc_pause")


@dataclass
class Alert:
    """A suspected silent failure."""

    kind: str  # one of ALERT_KINDS
    message: str
    time: float = field(default_factory=clock.now)


@dataclass
class PolicyOutput:
    action: np.ndarray  # env-ready 7-vector (for LIBERO: gripper already mapped to -1 open / +1 close)
    raw_action: np.ndarray  # the model's unnormalised 7-vector, before any env-specific mapping
    timings: dict[str, float]  # seconds per stage
    chunk: np.ndarray | None = None  # [H, 7] env-ready actions (chunk[0] is `action`), or None: one action
    alerts: list[Alert] = field(default_factory=list)  # suspected silent failures noticed during this call


class Policy(Protocol):
    label: str  # e.g. "openvla-7b (weights/openvla-7b)" or "openvla tiny RANDOM WEIGHTS"
    needs_images: bool  # False: the env renders nothing (a policy that reads privileged state only)

    def act(self, obs: Observation, instruction: str) -> PolicyOutput:
        """Raw observation in, env-ready action out. Blocking; the runtime calls it off the event loop."""

    def warmup(self, obs: Observation, instruction: str) -> None:
        """Run once before timing starts (allocations, CUDA graph capture)."""

    def close(self) -> None: ...
