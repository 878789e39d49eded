"""Detectors for the failures that do not raise: the robot moves, the numbers look fine, and the policy is
quietly wrong. Each detector warns once per policy, loudly (logger "rtloop", prefix "SILENT FAILURE?"),
and queues an `Alert`; the policy hands the queue back in each `PolicyOutput.alerts`, the runtime records it.

What is checked, and why each check can actually see its failure:
- blank_frame: a black or constant image (rendering off, wrong camera key): its pixel statistics show it.
- prompt: a prompt that is not OpenVLA's training template (custom template, a whole prompt passed as the
  instruction, a trailing "?"): the model was fine-tuned on one string shape only.
- unnorm_key: statistics of another robot used in LIBERO. Bridge/Fractal-style datasets move metres per
  step (translation q01..q99 spans of a few centimetres); LIBERO's controller actions span about ±0.9.
  Also a LIBERO key whose suite is not the suite being run.
- constant_action: the same 7-vector for many consecutive, visibly different frames: the model is not
  looking at the image (the transformers>=4.50 remote-code bug, openvla#346; or random weights).
- image_orientation: the caller switched off the 180° rotation. There is no honest content test for an
  upside-down LIBERO frame, so only the switch is reported.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np

from rtloop.policy.base import Alert
from rtloop.policy.processor import PROMPT_TEMPLATE

log = logging.getLogger("rtloop")

BLANK_MEAN = 2.0  # pixel mean (0..255) below which a frame counts as black
BLANK_STD = 1.0  # pixel std below which a frame counts as constant
LIBERO_MIN_TRANSLATION_SPAN = 0.3  # LIBERO's q99 - q01 is ~1.5-1.9 per translation axis; Bridge's ~0.06
CONSTANT_ACTION_RUN = 10  # identical actions on this many consecutive, visibly different frames
PIXEL_CHANGE = 12  # a pixel "changed" by more than this (0..255): above JPEG noise
CHANGED_FRACTION = 0.005  # a frame "differs visibly" when this share of (subsampled) pixels changed
THUMB_STRIDE = 4  # detectors look at every 4th pixel: 56x56 of a 224 image, ~0.1 ms

_OFFICIAL_PROMPT = re.compile(
    "^" + re.escape(PROMPT_TEMPLATE).replace(re.escape("{instruction}"), "(?P<instruction>.+)") + "$", re.S
)


class Guards:
    def __init__(self) -> None:
        self._pending: list[Alert] = []
        self._fired: set[str] = set()
        self._thumb: np.ndarray | None = None  # the last frame's thumbnail
        self._frame_changed = False  # the last frame differs visibly from the one before
        self._last_action: np.ndarray | None = None
        self._same_action_run = 1

    def warn(self, kind: str, message: str) -> None:
        if kind in self._fired:
            return
        self._fired.add(kind)
        log.warning("SILENT FAILURE? %s", message)
        self._pending.append(Alert(kind, message))

    def drain(self) -> list[Alert]:
        alerts, self._pending = self._pending, []
        return alerts

    def requeue(self, alerts: list[Alert]) -> None:
        """Put drained alerts back, ahead of newer ones (a warm-up's, for the first real call)."""
        self._pending[:0] = alerts

    def check_frame(self, image: np.ndarray) -> None:
        """Warn on a black or constant frame, and note whether it differs visibly from the previous one (for
        `check_action`, which a GPU policy calls after the model: this part runs while the GPU generates)."""
        thumb = thumbnail(image)
        mean = float(thumb.mean())
        std = math.sqrt(max(float((thumb * thumb).mean()) - mean * mean, 0.0))
        if mean < BLANK_MEAN:
            self.warn("blank_frame", f"the policy got an all-black frame (pixel mean {mean:.2f}); "
                                     "is the renderer working (MUJOCO_GL) and the camera the right one?")
        elif std < BLANK_STD:
            self.warn("blank_frame", f"the policy got a constant frame (pixel std {std:.2f}, mean {mean:.1f}); "
                                     "is the renderer working and the camera the right one?")
        last = self._thumb
        self._frame_changed = last is not None and (last.shape != thumb.shape or _differs_visibly(thumb, last))
        self._thumb = thumb

    def check_prompt(self, prompt: str) -> None:
        m = _OFFICIAL_PROMPT.match(prompt)
        if m is None:
            self.warn("prompt", f"the prompt {prompt!r} does not follow OpenVLA's template {PROMPT_TEMPLATE!r}; "
                                "the fine-tuned model saw only that shape")
            return
        instruction = m.group("instruction")
        malformed = instruction.endswith("?") or "Out:" in instruction or "\n" in instruction
        if malformed or instruction != instruction.strip():
            self.warn("prompt", f"the instruction {instruction!r} inside the prompt looks malformed (a whole "
                                "prompt, a trailing '?', stray whitespace); pass the bare task instruction")

    def check_unnorm_key(self, key: str, stats: dict[str, Any], suite: str | None) -> None:
        """Only meaningful when running a LIBERO suite (suite is None otherwise)."""
        if suite is None:
            return
        base = key.removesuffix("_no_noops")
        if base.startswith("libero") and base != suite:
            self.warn("unnorm_key", f"unnorm_key {key!r} holds the statistics of another LIBERO suite than the "
                                    f"one running ({suite!r}); actions will be scaled for the wrong task set")
            return
        action = stats["action"]
        span = np.asarray(action["q99"], dtype=np.float64)[:3] - np.asarray(action["q01"], dtype=np.float64)[:3]
        if float(np.median(span)) < LIBERO_MIN_TRANSLATION_SPAN:
            self.warn("unnorm_key", f"unnorm_key {key!r} has translation ranges {np.round(span, 3).tolist()} "
                                    f"(q99 - q01): another robot's statistics (e.g. bridge_orig, metres per "
                                    f"step), not LIBERO's (about 1.5-1.9); the arm will barely move")
        elif not base.startswith("libero"):
            self.warn("unnorm_key", f"unnorm_key {key!r} is not a LIBERO dataset while running {suite!r}; "
                                    "LIBERO keys exist only in the fine-tuned checkpoints")

    def check_action(self, action: np.ndarray) -> None:
        """After `check_frame` of the frame this action answers."""
        if self._last_action is not None:
            if not np.array_equal(action, self._last_action):
                self._same_action_run = 1
            elif self._frame_changed:
                self._same_action_run += 1
            # same action on an unchanged frame: expected, and no evidence either way
        self._last_action = np.array(action, copy=True)
        if self._same_action_run >= CONSTANT_ACTION_RUN:
            self.warn("constant_action", f"the same action {np.round(action, 4).tolist()} came back for "
                                         f"{self._same_action_run} consecutive, visibly different frames: the "
                                         "model is not using the image (transformers>=4.50 remote-code bug, "
                                         "openvla#346, or random weights)")

    def check_rotation(self, rotate: bool) -> None:
        if not rotate:
            self.warn("image_orientation", "the 180° rotation of LIBERO frames is switched off: the model sees "
                                           "the scene upside down and mirrored, unlike its training data")


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Every THUMB_STRIDE-th pixel, as float32 (contiguous: half numpy's strided cost to reduce)."""
    return image[::THUMB_STRIDE, ::THUMB_STRIDE].astype(np.float32)


def _differs_visibly(a: np.ndarray, b: np.ndarray) -> bool:
    changed = (np.abs(a - b) > PIXEL_CHANGE).any(axis=-1)
    return float(changed.mean()) > CHANGED_FRACTION
