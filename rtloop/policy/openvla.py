"""OpenVLA-7B as an rtloop Policy: checkpoint directory in, LIBERO-ready actions out, each stage timed.

    policy = OpenVLAPolicy("weights/openvla-7b-finetuned-libero-object", device="cuda")
    out = policy.act(obs["agentview_image"], "pick up the alphabet soup and place it in the basket")
    env.step(out.action)   # LIBERO's gripper convention (-1 open); out.raw_action is the model's (+1 open)

Stages (rtloop.policy.base.STAGES), each a `timed_stage` so profilers see the same names:
- processor: LIBERO image path (act only), prompt, tokens, pixel_values including host->device (graphed
  engines take the uint8 image and do that inside their graph, so for them this is the prompt only)
- generate: the engine's vision towers, 1 prefill + 6 decode steps, synchronised on CUDA so the GPU time
  lands here; the frame and prompt checks run on the host meanwhile
- detokenize: tokens to the host, bins -> action, validity checks and silent-failure detectors
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rtloop.policy.actions import ActionDetokenizer, default_unnorm_key, libero_gripper, resolve_unnorm_key
from rtloop.policy.base import PolicyOutput
from rtloop.policy.guards import Guards
from rtloop.policy.model import OpenVLA
from rtloop.policy.processor import (
    PROMPT_TEMPLATE,
    build_prompt,
    check_image,
    check_prompt_template,
    pixel_values,
    prepare_libero_image,
    tokenize_prompt,
)
from rtloop.policy.tokenizer import load_tokenizer
from rtloop.timing import timed_stage
from rtloop.sim.base import Observation


class OpenVLAPolicy:
    needs_images = True

    def __init__(
        self,
        checkpoint_dir: str | Path,
        unnorm_key: str | None = None,
        suite: str | None = "libero_object",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        engine: str = "eager",
        center_crop: bool = False,
        prompt_template: str | None = None,
        rotate: bool = True,
        model: OpenVLA | None = None,
    ):
        """`suite` is the LIBERO suite being run (None: not LIBERO); it picks the default unnorm_key
        (`<suite>` or `<suite>_no_noops`). `prompt_template` and `rotate=False` exist to study failures.
        `model`: an OpenVLA already on `device` (e.g. random 7B weights built in GPU memory); the checkpoint
        directory then only supplies the tokenizer, and the config comes from the model."""
        from rtloop.policy.checkpoint import load_checkpoint
        from rtloop.policy.engines import build_engine

        self.device = torch.device(device)
        if model is None:
            loaded = load_checkpoint(checkpoint_dir, self.device, dtype)
            self.config, self.model = loaded.config, loaded.model
        else:
            self.config, self.model = model.config, model
        self.dtype = next(self.model.parameters()).dtype
        self.tokenizer = load_tokenizer(checkpoint_dir)
        self.suite = suite
        self.center_crop = center_crop
        self.rotate = rotate
        self.prompt_template = PROMPT_TEMPLATE if prompt_template is None else check_prompt_template(prompt_template)
        self.guards = Guards()
        self.guards.check_rotation(rotate)

        norm_stats = self.config.norm_stats
        if unnorm_key is None and suite is not None:
            unnorm_key = default_unnorm_key(norm_stats, suite)
        self.unnorm_key = resolve_unnorm_key(norm_stats, unnorm_key)
        self._detokenizers: dict[str, ActionDetokenizer] = {}
        self._detokenizer(self.unnorm_key)  # fail at construction, not at the first action
        self.engine = build_engine(engine, self.model)
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        self._prompt_ids: tuple[str, torch.Tensor] | None = None  # the last prompt, tokenized, where it is used

        generated = self.config.generated or {}  # set by `rtloop checkpoint make`, absent in real checkpoints
        self._checkpoint_label = f"openvla {Path(checkpoint_dir).name} ({checkpoint_dir})"
        if generated.get("random_weights"):
            self._random_label = f", RANDOM WEIGHTS (generated: size {generated.get('size')}, seed {generated.get('seed')})"
        else:
            self._random_label = ""

    @property
    def label(self) -> str:
        # a property: bench and the profiler swap `engine` on a built policy
        return f"{self._checkpoint_label}, engine {self.engine.name}{self._random_label}"

    def _detokenizer(self, key: str) -> ActionDetokenizer:
        if key not in self._detokenizers:
            self.guards.check_unnorm_key(key, self.config.norm_stats[key], self.suite)
            self._detokenizers[key] = ActionDetokenizer(
                self.config.llm.vocab_size, self.config.pad_to_multiple_of, self.config.n_action_bins,
                self.config.norm_stats[key],
            )
        return self._detokenizers[key]

    def _input_ids(self, prompt: str, device: torch.device) -> torch.Tensor:
        if self._prompt_ids is None or self._prompt_ids[0] != prompt or self._prompt_ids[1].device != device:
            self._prompt_ids = (prompt, tokenize_prompt(self.tokenizer, prompt).to(device))
        return self._prompt_ids[1]

    def predict_action(
        self,
        image: np.ndarray,
        instruction: str,
        unnorm_key: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """A 224x224x3 uint8 image (already through the LIBERO path, if any) -> (unnormalised 7-vector,
        seconds per stage). Stage times add to `timings` when one is passed."""
        timings = {} if timings is None else timings
        key = self.unnorm_key if unnorm_key is None else resolve_unnorm_key(self.config.norm_stats, unnorm_key)
        detokenize = self._detokenizer(key)
        engine = self.engine
        # graphed engines take the image and the ids on the host: their graph copies and normalises
        on_host = getattr(engine, "takes_host_inputs", False) and check_image(image).shape == engine.image_shape
        with timed_stage("processor", timings, None if on_host else self._sync):
            prompt = build_prompt(instruction, self.prompt_template)
            input_ids = self._input_ids(prompt, torch.device("cpu") if on_host else self.device)
            pixels = image if on_host else pixel_values(image, self.device, self.dtype)
        with timed_stage("generate", timings, self._sync):
            tokens = engine.generate(pixels, input_ids)
            # the input checks need nothing from the device: on a GPU they run while it generates
            self.guards.check_frame(image)
            self.guards.check_prompt(prompt)
        with timed_stage("detokenize", timings):
            action = detokenize(tokens.cpu().numpy())
            self.guards.check_action(action)
        return action, timings

    def act(self, obs: Observation | np.ndarray, instruction: str) -> PolicyOutput:
        """A raw LIBERO frame (or an Observation holding one) -> LIBERO-ready action: `action` has LIBERO's
        gripper convention (-1 open, +1 close), `raw_action` the model's (+1 open)."""
        frame = obs.image if isinstance(obs, Observation) else obs
        timings: dict[str, float] = {}
        with timed_stage("processor", timings):
            image = prepare_libero_image(frame, center_crop=self.center_crop, rotate=self.rotate)
        raw, timings = self.predict_action(image, instruction, timings=timings)
        return PolicyOutput(action=libero_gripper(raw), raw_action=raw, timings=timings, alerts=self.guards.drain())

    def warmup(self, obs: Observation | np.ndarray, instruction: str) -> None:
        """Two full passes: the first allocates (KV cache, kernels), the second runs what steady state runs
        (engines that capture graphs do it on a later call). Their alerts stay queued for the first act."""
        alerts = [alert for _ in range(2) for alert in self.act(obs, instruction).alerts]
        self.guards.requeue(alerts)

    def close(self) -> None:
        pass
