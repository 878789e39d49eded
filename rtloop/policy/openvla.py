"""OpenVLA-7B as an rtloop Policy: checkpoint directory in, LIBERO-ready actions out, each stage timed.

    policy = OpenVLAPolicy("weights/openvla-7b-finetuned-libero-object", device="cuda")
    out = policy.act(obs["agentview_image"], "pick up the alphabet soup and place it in the basket")
    env.step(out.action)   # LIBERO's gripper convention (-1 open); out.raw_action is the model's (+1 open)

    policy = OpenVLAPolicy(..., max_batch=8)           # a fleet: one batched call for several envs' frames
    outs = policy.act_batch(frames, instructions)      # one PolicyOutput per frame

Two calls, two gripper conventions:
- `predict_action(image, instruction)` is the official function: a prepared image (numpy or PIL) in, the
  model's own 7-vector out, gripper 0..1 with +1 = OPEN. LIBERO reads that as "close": map it with
  `rtloop.policy.actions.libero_gripper` before `env.step`.
- `act(frame, instruction)` is the LIBERO eval's step: the raw camera frame in (rotated, JPEG round trip,
  resized, centre-cropped here), `PolicyOutput.action` out in LIBERO's convention, -1 = OPEN, +1 = close.

Stages (rtloop.policy.base.STAGES), each a `timed_stage` so profilers see the same names:
- processor: LIBERO image path (act and act_batch; also timed alone, as `libero_image`), prompt, tokens,
  pixel_values including host->device (graphed engines take the uint8 image and do that inside their graph,
  so for them this is the prompt only)
- generate: the engine's vision towers, 1 prefill + 6 decode steps, synchronised on CUDA so the GPU time
  lands here; the frame and prompt checks run on the host meanwhile
- detokenize: tokens to the host, bins -> action, validity checks and silent-failure detectors
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rtloop.errors import ActionError, InputError
from rtloop.policy.actions import ActionDetokenizer, libero_gripper, resolve_unnorm_key
from rtloop.policy.base import LIBERO_IMAGE, Alert, PolicyOutput
from rtloop.policy.cuda_wait import set_cuda_wait
from rtloop.policy.guards import Guards
from rtloop.policy.model import OpenVLA
from rtloop.policy.processor import (
    PROMPT_TEMPLATE,
    as_array,
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

log = logging.getLogger("rtloop")

MAX_CACHED_PROMPTS = 64  # tokenized prompts kept per policy (a fleet's envs each have one)


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
        center_crop: bool = True,
        prompt_template: str | None = None,
        rotate: bool = True,
        model: OpenVLA | None = None,
        cuda_wait: str = "blocking",
        max_batch: int = 1,
        kernel_options=None,
        image_threads: int | None = None,
    ):
        """`suite` is the LIBERO suite being run (None: not LIBERO); it picks the default unnorm_key
        (`<suite>` or `<suite>_no_noops`). `center_crop` (default on, as the official LIBERO eval) applies to
        `act`'s frame preparation. `prompt_template` and `rotate=False` exist to study failures.
        `model`: an OpenVLA already on `device` (e.g. random 7B weights built in GPU memory); the checkpoint
        directory then only supplies the tokenizer, and the config comes from the model. `cuda_wait`: how the
        host waits for the GPU, "blocking" (sleeps) or "spin" (rtloop.policy.cuda_wait). `max_batch`: the
        most frames `predict_action_batch` takes at once (a bucket: 1, 2, 4, 8, 16, 32); `kernel_options`:
        the compiled engine's rtloop.policy.kernels.KernelOptions. `image_threads`: how many threads prepare a
        batch's LIBERO frames (`set_image_threads`)."""
        from rtloop.policy.checkpoint import check_checkpoint_dir, load_checkpoint
        from rtloop.policy.config import OpenVLAConfig
        from rtloop.policy.engines import build_engine

        self.device = torch.device(device)
        # before the first CUDA call makes the context (rtloop.policy.cuda_wait says why)
        if self.device.type == "cuda" and (took := set_cuda_wait(cuda_wait)) != cuda_wait:
            log.warning("rtloop: the GPU waits as CUDA chose, not %r: %s", cuda_wait, took)
        if model is None:
            check_checkpoint_dir(checkpoint_dir)
            self.config = OpenVLAConfig.from_dir(checkpoint_dir)
        else:
            self.config = model.config
        self.tokenizer = load_tokenizer(checkpoint_dir)
        self.suite = suite
        self.center_crop = center_crop
        self.rotate = rotate
        self.prompt_template = PROMPT_TEMPLATE if prompt_template is None else check_prompt_template(prompt_template)
        self.reset_guards()

        # the statistics are checked before the weights load: a wrong key fails in a moment, not after minutes
        self.unnorm_key = resolve_unnorm_key(self.config.norm_stats, unnorm_key, suite)
        self._detokenizers: dict[str, ActionDetokenizer] = {}
        self._detokenizer(self.unnorm_key)
        if model is None:
            loaded = load_checkpoint(checkpoint_dir, self.device, dtype)
            self.config, self.model = loaded.config, loaded.model
        else:
            self.model = model
        self.dtype = next(self.model.parameters()).dtype
        self.engine = build_engine(engine, self.model, max_batch=max_batch, kernel_options=kernel_options)
        self._image_pool: ThreadPoolExecutor | None = None
        self.image_threads = 1
        self.set_image_threads(image_threads)
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else None
        self._prompt_ids: dict[tuple[str, torch.device], torch.Tensor] = {}  # prompts tokenized, where used

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
                self.config.norm_stats[key], where=f"{self.config.norm_stats_file}, key {key!r}",
            )
        return self._detokenizers[key]

    def _input_ids(self, prompt: str, device: torch.device) -> torch.Tensor:
        """The same tensor for the same prompt (graphed engines stage a prompt once, then recognise it)."""
        key = (prompt, device)
        if key not in self._prompt_ids:
            if len(self._prompt_ids) >= MAX_CACHED_PROMPTS:
                self._prompt_ids.clear()
            self._prompt_ids[key] = tokenize_prompt(self.tokenizer, prompt).to(device)
        return self._prompt_ids[key]

    def _guards(self, stream: int) -> Guards:
        if stream not in self._stream_guards:
            self._stream_guards[stream] = Guards()
        return self._stream_guards[stream]

    def drain_alerts(self, stream: int = 0) -> list[Alert]:
        """The alerts queued for `stream` since its last drain (stream 0's include the configuration's, e.g. an
        unnorm key first used by a call)."""
        return self._guards(stream).drain()

    def end_stream(self, stream: int) -> None:
        """Forget a finished stream's frame history (its env or client is gone); stream 0 is kept."""
        if stream != 0:
            self._stream_guards.pop(stream, None)

    def predict_action(
        self,
        image: np.ndarray | Image.Image,
        instruction: str,
        unnorm_key: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """The official `predict_action`: an RGB image (HxWx3 uint8 numpy, or a PIL image as the chapter
        passes one; 224x224 already through the LIBERO path for LIBERO, other sizes are resized naively) ->
        (unnormalised 7-vector, seconds per stage). The action is the MODEL's: gripper 0..1, +1 = open.
        LIBERO wants -1 = open: use `act`, or `libero_gripper(action)`, before `env.step`. Stage times add
        to `timings` when one is passed."""
        actions, timings = self.predict_action_batch([image], [instruction], unnorm_key, timings)
        return actions[0], timings

    def predict_action_batch(
        self,
        images: list[np.ndarray],
        instructions: list[str],
        unnorm_key: str | None = None,
        timings: dict[str, float] | None = None,
        streams: list[int] | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """B frames in one call, each with its own image (as for predict_action) and instruction ->
        (unnormalised actions [B, 7], seconds per stage of the whole batch). `streams`: which stream of
        frames (e.g. which env) each frame belongs to, for the detectors that compare a frame with the one
        before it (default: frame b is stream b)."""
        B = len(images)
        if B != len(instructions) or (streams is not None and len(streams) != B):
            raise InputError(f"{B} images for {len(instructions)} instructions"
                             + ("" if streams is None else f" and {len(streams)} streams"))
        if not 1 <= B <= self.engine.max_batch:
            raise InputError(f"a batch of {B} frames; this policy takes 1 to {self.engine.max_batch} (max_batch)")
        timings = {} if timings is None else timings
        images = [as_array(image) for image in images]
        key = self.unnorm_key if unnorm_key is None else resolve_unnorm_key(self.config.norm_stats, unnorm_key)
        detokenize = self._detokenizer(key)
        engine = self.engine
        guards = [self._guards(b if streams is None else streams[b]) for b in range(B)]
        # graphed engines take the images and the ids on the host: their graph copies and normalises
        on_host = getattr(engine, "takes_host_inputs", False) and all(
            check_image(image).shape == engine.image_shape for image in images)
        with timed_stage("processor", timings, None if on_host else self._sync):
            prompts = [build_prompt(instruction, self.prompt_template) for instruction in instructions]
            ids = [self._input_ids(p, torch.device("cpu") if on_host else self.device) for p in prompts]
            if on_host:
                pixels = images
            else:
                pixels = torch.cat([pixel_values(image, self.device, self.dtype) for image in images])
        with timed_stage("generate", timings, self._sync):
            tokens = engine.generate_batch(pixels, ids)
            # the input checks need nothing from the device: on a GPU they run while it generates
            for g, image, prompt in zip(guards, images, prompts):
                g.check_frame(image)
                g.check_prompt(prompt)
        with timed_stage("detokenize", timings):
            try:
                actions = np.stack([detokenize(t) for t in tokens.cpu().numpy()])
            except ActionError:
                self._check_logits_finite(pixels, ids)
                raise
            for g, action in zip(guards, actions):
                g.check_action(action)
        return actions, timings

    def _check_logits_finite(self, pixels, ids: list[torch.Tensor]) -> None:
        """After a non-action token: NaN or inf logits (NaN weights, an overflow) make argmax return token
        0, whose "not an action token" would send the user after the prompt or the vocabulary. The same
        call again, with its logits, tells the two apart; it runs only on this error path."""
        _, logits = self.engine.generate_batch_with_logits(pixels, ids)
        if not torch.isfinite(logits).all():
            raise ActionError("the model's logits are not finite (NaN or inf): the weights hold NaN/inf or the "
                              f"activations overflow in {self.dtype} (check the checkpoint's weights)")

    def act(self, obs: Observation | np.ndarray | Image.Image, instruction: str) -> PolicyOutput:
        """A raw LIBERO frame as the sim returns it (upside down; numpy, PIL, or an Observation holding one)
        -> LIBERO-ready action: `action` has LIBERO's gripper convention (-1 = open, +1 = close), ready for
        `env.step`; `raw_action` is predict_action's, the model's (+1 = open)."""
        (image,), timings = self.prepare_batch([obs])
        raw, timings = self.predict_action(image, instruction, timings=timings)
        return PolicyOutput(action=libero_gripper(raw), raw_action=raw, timings=timings, alerts=self.guards.drain())

    def act_batch(self, observations: list, instructions: list[str],
                  streams: list[int] | None = None) -> list[PolicyOutput]:
        """Raw LIBERO frames (or Observations holding them), one instruction each -> one LIBERO-ready
        PolicyOutput per frame (as `act`), from one batched call. The timings are the batch's, in every
        output; each output's alerts are its stream's (`streams`, as for predict_action_batch)."""
        return self.act_prepared(self.prepare_batch(observations), instructions, streams)

    def prepare_batch(self, observations: list) -> tuple[list[np.ndarray], dict[str, float]]:
        """act_batch's host half: the raw frames prepared (prepare_frames), with the time it took. Touches
        nothing the model uses, so it may run on another thread while the policy runs (the fleet prepares
        the next batch so)."""
        frames = [as_array(o.image if isinstance(o, Observation) else o) for o in observations]
        timings: dict[str, float] = {}
        return self.prepare_frames(frames, timings), timings

    def act_prepared(self, prepared: tuple[list[np.ndarray], dict[str, float]], instructions: list[str],
                     streams: list[int] | None = None) -> list[PolicyOutput]:
        """act_batch's second half, on what prepare_batch returned."""
        images, timings = prepared
        raws, timings = self.predict_action_batch(images, instructions, timings=dict(timings), streams=streams)
        streams = list(range(len(raws))) if streams is None else streams
        return [PolicyOutput(action=libero_gripper(raw), raw_action=raw, timings=dict(timings),
                             alerts=self.drain_alerts(stream)) for raw, stream in zip(raws, streams)]

    def prepare_frames(self, frames: list[np.ndarray], timings: dict[str, float],
                       rotate: list[bool] | None = None) -> list[np.ndarray]:
        """Raw LIBERO frames -> the model's 224x224 images (prepare_libero_image), on the image threads when
        there are several frames; timed as `libero_image`, inside `processor`. `rotate`: per frame, whether it
        still needs the 180° rotation (default: the policy's `rotate` for every frame)."""
        rotate = [self.rotate] * len(frames) if rotate is None else rotate
        prepare = functools.partial(prepare_libero_image, center_crop=self.center_crop)
        with timed_stage("processor", timings), timed_stage(LIBERO_IMAGE, timings):
            if self._image_pool is None or len(frames) == 1:
                return [prepare(f, rotate=r) for f, r in zip(frames, rotate)]
            return list(self._image_pool.map(lambda f, r: prepare(f, rotate=r), frames, rotate))

    def set_image_threads(self, threads: int | None) -> None:
        """How many threads prepare a batch's frames (None: one per frame of the largest batch, up to this
        machine's cores; 1: the policy thread alone). Threads, not processes: PIL's JPEG codec and resize
        and numpy's arithmetic release the GIL. In series, a batch's frames were the fleet's largest host
        cost (README, "Fleet capacity")."""
        if threads is None:
            threads = min(self.engine.max_batch, os.cpu_count() or 1)
        if threads < 1:
            raise InputError(f"image threads must be >= 1 (got {threads})")
        if threads == self.image_threads:
            return
        if self._image_pool is not None:
            self._image_pool.shutdown()
        self.image_threads = threads
        self._image_pool = ThreadPoolExecutor(threads, thread_name_prefix="rtloop-image") if threads > 1 else None

    def warmup(self, obs: Observation | np.ndarray, instruction: str) -> None:
        """Two full passes: the first allocates (KV cache, kernels), the second runs what steady state runs
        (engines that capture graphs do it on a later call). Their alerts stay queued for the first act."""
        alerts = [alert for _ in range(2) for alert in self.act(obs, instruction).alerts]
        self.guards.requeue(alerts)

    def reset_guards(self) -> None:
        """Fresh checks of the configuration and of every stream's frames and actions: a new run on this
        policy, its engine as built (scripts/fleet_study.py runs many on one compiled engine)."""
        self.guards = Guards()  # the checks of the configuration, and of the frames of stream 0
        self.guards.check_rotation(self.rotate)
        self._stream_guards: dict[int, Guards] = {0: self.guards}  # per stream of frames (an env of a fleet)

    def close(self) -> None:
        self.set_image_threads(1)
