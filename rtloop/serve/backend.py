"""OpenVLA behind `rtloop serve`: a validated request -> a [1, 7] action chunk, each stage timed.

The image path depends on the request form: rtloop's form carries the raw simulator frame, so it gets
OpenVLA's exact LIBERO path (180° rotation, JPEG round trip, Lanczos resize to 224); openpi's LIBERO client
has already rotated and resized its frame, so only the JPEG round trip and resize remain.
"""

from __future__ import annotations

from rtloop.policy.actions import libero_gripper
from rtloop.policy.openvla import OpenVLAPolicy
from rtloop.policy.processor import prepare_libero_image
from rtloop.profiling.ranges import timed_stage
from rtloop.serve.protocol import Request
from rtloop.serve.server import Result


class OpenVLABackend:
    max_batch = 1  # until the fleet issue's batched engine: then act_batch runs the whole list at once

    def __init__(self, policy: OpenVLAPolicy):
        self.policy = policy
        self.random_weights = "RANDOM WEIGHTS" in policy.label
        self.metadata = {
            "server": "rtloop",  # RemotePolicy sends rtloop's form (the raw frame) to servers that say this
            "model": "openvla",
            "label": policy.label,
            "engine": policy.engine.name,
            "unnorm_key": policy.unnorm_key,
            "unnorm_keys": sorted(policy.config.norm_stats),
            "action_shape": [1, 7],
            "random_weights": self.random_weights,
            "forms": {"openpi": ["observation/image", "prompt", "observation/wrist_image?", "observation/state?"],
                      "rtloop": ["image", "instruction", "unnorm_key?"]},
        }

    def act_batch(self, requests: list[Request]) -> list[Result]:
        return [self._act(r) for r in requests]

    def _act(self, request: Request) -> Result:
        policy = self.policy
        stages: dict[str, float] = {}
        with timed_stage("processor", stages):
            image = prepare_libero_image(request.image, center_crop=policy.center_crop,
                                         rotate=request.form == "rtloop" and policy.rotate)
        raw, stages = policy.predict_action(image, request.instruction, request.unnorm_key, stages)
        alerts = [{"kind": a.kind, "message": a.message} for a in policy.guards.drain()]
        return Result(libero_gripper(raw)[None], raw[None], stages, alerts)
