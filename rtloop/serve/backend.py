"""OpenVLA behind `rtloop serve`: validated requests -> one [1, 7] action chunk each, from one batched call,
each stage timed.

The image path depends on the request form: rtloop's form carries the raw simulator frame, so it gets
OpenVLA's exact LIBERO path (180° rotation, JPEG round trip, Lanczos resize to 224); openpi's LIBERO client
has already rotated and resized its frame, so only the JPEG round trip and resize remain. Frames of both
forms go into one `predict_action_batch`: in fp32 on the CPU each frame's action is exactly its batch-1 one
(rtloop.policy.engines; in bf16 on a GPU the matmuls of another batch size may sum in another order).
"""

from __future__ import annotations

from rtloop.policy.actions import libero_gripper
from rtloop.policy.openvla import OpenVLAPolicy
from rtloop.serve.protocol import Request
from rtloop.serve.server import Result


class OpenVLABackend:
    def __init__(self, policy: OpenVLAPolicy):
        self.policy = policy
        self.max_batch = policy.engine.max_batch
        self.random_weights = "RANDOM WEIGHTS" in policy.label
        self.metadata = {
            "server": "rtloop",  # RemotePolicy sends rtloop's form (the raw frame) to servers that say this
            "model": "openvla",
            "label": policy.label,
            "engine": policy.engine.name,
            "unnorm_key": policy.unnorm_key,
            "unnorm_keys": sorted(policy.config.norm_stats),
            "action_shape": [1, 7],
            "max_batch": self.max_batch,
            "random_weights": self.random_weights,
            "forms": {"openpi": ["observation/image", "prompt", "observation/wrist_image?", "observation/state?"],
                      "rtloop": ["image", "instruction", "unnorm_key?"]},
        }

    def act_batch(self, requests: list[Request], streams: list[int]) -> list[Result]:
        """Requests that share one unnorm key (the server batches only those together). The stages are the
        call's, in every result."""
        policy = self.policy
        stages: dict[str, float] = {}
        images = policy.prepare_frames([r.image for r in requests], stages,
                                       rotate=[r.form == "rtloop" and policy.rotate for r in requests])
        raws, stages = policy.predict_action_batch(images, [r.instruction for r in requests],
                                                   requests[0].unnorm_key, stages, streams)
        shared = policy.drain_alerts(0)  # the configuration's: every request of this call used it
        return [Result(libero_gripper(raw)[None], raw[None], dict(stages),
                       [{"kind": a.kind, "message": a.message} for a in (*shared, *policy.drain_alerts(stream))])
                for raw, stream in zip(raws, streams)]

    def end_stream(self, stream: int) -> None:
        self.policy.end_stream(stream)
