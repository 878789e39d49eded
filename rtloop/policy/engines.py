"""Inference engines: the ways to turn (pixel_values, input_ids) into the 7 greedy action tokens.

An engine owns everything from the pixels on the device to the token ids on the device: both vision
towers, the projector, the prefill and the decode steps. `generate` may return before the GPU is done;
the caller synchronises (that is what the `generate` stage timing charges).

- `reference`: what the official code costs. Transformers' `LlamaForCausalLM` (its dynamic KV cache, its
  `generate` loop with a host sync per token) running on our weights, after our eager ViTs and projector.
  The official OpenVLA is exactly `LlamaForCausalLM.generate` fed with `inputs_embeds`, so this keeps its
  per-token costs; the HF modules alias our parameters, so no weight is copied.
- `eager`: our model, static KV cache, plain PyTorch: a kernel launch per op, no graphs.
- `graphed`: the whole of `generate` (vision towers side by side on two streams, projector, prefill, the 6
  decode steps and every argmax) captured as ONE CUDA graph; a call writes the inputs into static pinned host
  buffers and replays it. The graph's first nodes copy them in (and, given the uint8 image, normalise it);
  its last copies the tokens out to pinned host memory. No host sync inside, and one launch per call. Prompts are right-padded to a bucket of 16 tokens (one graph per bucket, captured on first
  use): the padding sits after the real prompt, so causal attention never lets a real position see it, and
  the first decode step overwrites it in the cache. CUDA only: on CPU it is an InputError, no fallback.
- `compiled`: `graphed` with its stages (each ViT, projector, prefill, decode step) compiled by TorchInductor
  first (fused LayerNorm/GELU/RMSNorm/RoPE), and the decode step on our own Triton kernels
  (`rtloop.policy.kernels`): every batch-1 linear is one GEMV ([q; k; v] and [gate; up] fused, the RMSNorm
  before it and the residual add after it in the same pass, SwiGLU too, 1-byte weights widened in registers),
  and RoPE, the KV-cache write and the attention are one more kernel; on Hopper each is a programmatic
  dependent launch, overlapping the tail of the one before. Quantised prefills run on 8-bit tensor cores.
  Inductor's own CUDA graphs stay off: we capture its kernels in our one graph, as above. Compiling and
  autotuning take two to three minutes (7B, H100).

Engine names may carry a weight format, e.g. `compiled+int8`: the same engine, on a model whose Llama
linears `build_engine` first quantises in place with `rtloop.policy.quant` (see `split_engine_name`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Protocol

import numpy as np
import torch

from rtloop.errors import InputError

PROMPT_BUCKET = 16  # graphed engines pad the prompt to a multiple of this many tokens
MAX_PROMPT_TOKENS = 96  # LIBERO prompts are 20-40 tokens; the static cache is sized for this many


class Engine(Protocol):
    name: str

    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 6, 224, 224] and input_ids [1, T] on the model's device -> LongTensor [7], on the
        device or in pinned host memory that the device is still filling (and the next call reuses): read it
        after synchronising, before the next call. Engines with `takes_host_inputs` also take the uint8
        224x224x3 image itself (numpy) and input_ids on the CPU, and prepare them on the device."""

    def generate_with_logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `generate`, plus the float32 logits [7, vocab] each token was the argmax of (for parity checks)."""


class EagerEngine:
    """Our model, eager PyTorch, static KV cache: no graphs, no compilation."""

    name = "eager"

    def __init__(self, model, n_tokens: int = 7):
        self.model = model
        self.n_tokens = n_tokens
        model.language_model.set_kernels(False)

    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.generate_action_tokens(pixel_values, input_ids, self.n_tokens)[0]

    @torch.no_grad()
    def generate_with_logits(self, pixel_values, input_ids):
        model, n = self.model, self.n_tokens
        prefix_len = input_ids.shape[1] + model.config.num_patches
        lm = model.language_model
        if lm.max_batch < 1 or lm.max_seq_len < prefix_len + n:
            model.setup_caches(1, prefix_len + n)
        logits = [model.prefill(input_ids, model.embed_images(pixel_values))[0]]
        tokens = [logits[0].argmax()]
        for i in range(1, n):
            pos = torch.tensor([prefix_len + i - 1], device=input_ids.device)
            logits.append(model.decode_step(tokens[-1].view(1, 1), pos)[0])
            tokens.append(logits[-1].argmax())
        return torch.stack(tokens), torch.stack(logits).float()


class ReferenceEngine:
    """Transformers' LlamaForCausalLM + `generate` (dynamic cache) on our weights: the official path's cost."""

    name = "reference"

    def __init__(self, model, n_tokens: int = 7):
        try:
            from transformers import GenerationConfig
        except ImportError:
            raise InputError("engine 'reference' needs transformers (pip install 'rtloop[reference]')") from None
        self.model = model
        self.n_tokens = n_tokens
        self.hf = hf_llama_sharing_weights(model)
        # greedy, exactly n_tokens: eos_token_id=None so a random-weight model cannot stop early (the
        # official predict_action would then fail on a short action anyway)
        self.hf.generation_config = GenerationConfig(
            max_new_tokens=n_tokens, do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id
        )

    def _inputs_embeds(self, pixel_values, input_ids):
        token_embeds = self.hf.get_input_embeddings()(input_ids)
        patches = self.model.embed_images(pixel_values).to(token_embeds.dtype)
        return torch.cat([token_embeds[:, :1], patches, token_embeds[:, 1:]], dim=1)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids):
        embeds = self._inputs_embeds(pixel_values, input_ids)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.hf.generate(inputs_embeds=embeds, attention_mask=mask)
        return out[0, -self.n_tokens :]

    @torch.no_grad()
    def generate_with_logits(self, pixel_values, input_ids):
        embeds = self._inputs_embeds(pixel_values, input_ids)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.hf.generate(
            inputs_embeds=embeds, attention_mask=mask, output_logits=True, return_dict_in_generate=True
        )
        return out.sequences[0, -self.n_tokens :], torch.stack([l[0] for l in out.logits]).float()


def hf_llama_sharing_weights(model):
    """A transformers LlamaForCausalLM whose parameters ARE the tensors of `model.language_model` (the
    key names are equal by construction): built on the meta device, then assigned, so nothing is copied."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    lm = model.language_model
    weight = lm.lm_head.weight
    config = LlamaConfig(**model.config.text_config)
    config.pad_token_id = model.config.pad_token_id
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(lm.state_dict(), strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(weight.device)  # non-persistent buffer
    hf.config.use_cache = True
    return hf.eval()


class GraphedEngine:
    """The whole pipeline as one CUDA graph per prompt bucket (see the module docstring)."""

    name = "graphed"
    needs_cuda = True
    takes_host_inputs = True
    compile_stages = False

    def __init__(self, model, n_tokens: int = 7, max_prompt_tokens: int = MAX_PROMPT_TOKENS):
        weight = model.language_model.lm_head.weight
        if weight.device.type != "cuda":
            raise InputError(
                f"engine {self.name!r} needs a CUDA device (it replays CUDA graphs); on {weight.device.type} "
                "use the eager or reference engine"
            )
        self.model = model
        self.n_tokens = n_tokens
        self.max_prompt_tokens = max_prompt_tokens
        device, config = weight.device, model.config
        self.num_patches = config.num_patches
        self.max_seq_len = -(-(self.num_patches + max_prompt_tokens + n_tokens) // 64) * 64
        image = config.vits[0].image
        self.image_shape = (image, image, 3)
        pixel_dtype = model.projector.fc1.weight.dtype
        # what the host writes before each replay, in pinned memory: the uint8 image, and the prompt ids
        # followed by the last real prompt position and the prefix length (= that + 1)
        self.host_image = torch.zeros(self.image_shape, dtype=torch.uint8, pin_memory=True)
        self.host_ids = torch.full((max_prompt_tokens + 2,), config.pad_token_id, dtype=torch.long, pin_memory=True)
        self.host_tokens = torch.zeros(n_tokens, dtype=torch.long, pin_memory=True)
        self._host_image, self._host_ids = self.host_image.numpy(), self.host_ids.numpy()  # ~100x cheaper writes
        # their device copies, and the static outputs: every replay reads and writes these same addresses
        self.image = torch.zeros(self.image_shape, device=device, dtype=torch.uint8)
        self.ids = torch.full((max_prompt_tokens + 2,), config.pad_token_id, device=device, dtype=torch.long)
        self.input_ids = self.ids[None, :max_prompt_tokens]
        self.last_index = self.ids[max_prompt_tokens : max_prompt_tokens + 1]
        self.prefix_len = self.ids[max_prompt_tokens + 1 :]
        self.pixel_values = torch.zeros(1, 6, image, image, device=device, dtype=pixel_dtype)
        self.tokens = torch.zeros(n_tokens, device=device, dtype=torch.long)
        self.logits = torch.zeros(n_tokens, config.llm.vocab_size, device=device, dtype=torch.float32)
        self.replayed = torch.cuda.Event()  # the host buffers are free again once the last replay is done
        self._staged_ids: torch.Tensor | None = None  # the ids tensor now in host_ids (callers do not mutate ids)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # by (prompt bucket, from the image)
        self.pool = torch.cuda.graph_pool_handle()
        self.captured_with: list[object] = []  # the caches each graph writes: kept alive with the graph
        backbone = model.vision_backbone
        self.dino, self.siglip, self.project = backbone.dino, backbone.siglip, self._project
        self.prefill, self.decode = self._prefill, self._decode
        self.side_stream = torch.cuda.Stream(device)
        model.language_model.set_kernels(self.compile_stages)
        if self.compile_stages:
            from rtloop.policy import kernels

            if not kernels.available(device):
                raise InputError(f"engine {self.name!r} needs Triton (pip install triton) for its decode kernels")
            compile_stage = partial(torch.compile, fullgraph=True, dynamic=False)
            self.dino, self.siglip, self.project = (compile_stage(f) for f in (self.dino, self.siglip, self.project))
            self.prefill, self.decode = compile_stage(self._prefill), compile_stage(self._decode)

    def _encode(self) -> torch.Tensor:
        """The static pixels -> patch embeddings [1, 256, llm_dim], the two ViTs side by side: DINOv2 on a
        side stream while SigLIP runs on this one (the graph keeps the fork and the join). Each tower's
        256-row matmuls leave much of a big GPU idle, so together they take little more than one alone."""
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            dino = self.dino(self.pixel_values)
        siglip = self.siglip(self.pixel_values)
        main.wait_stream(self.side_stream)
        dino.record_stream(main)  # allocated on the side stream, read and freed on this one
        return self.project(dino, siglip)

    def _project(self, dino: torch.Tensor, siglip: torch.Tensor) -> torch.Tensor:
        return self.model.projector(torch.cat([dino, siglip], dim=2))

    def _prefill(self, input_ids, patches, last_index) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids [1, bucket] -> float32 logits [1, vocab] at last_index, and their argmax."""
        lm = self.model.language_model
        token_embeds = lm.model.embed_tokens(input_ids)
        x = torch.cat([token_embeds[:, :1], patches.to(token_embeds.dtype), token_embeds[:, 1:]], dim=1)
        logits = lm.logits(lm.hidden_states(x, rows=last_index))[:, 0]
        return logits.float(), logits.argmax(dim=-1, keepdim=True)

    def _decode(self, token: torch.Tensor, input_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.decode_step(token, input_pos)
        return logits.float(), logits.argmax(dim=-1, keepdim=True)

    def _pipeline(self, bucket: int, from_image: bool) -> None:
        """Everything one replay does, reading and writing only the static buffers."""
        from rtloop.policy.processor import normalise

        self.ids.copy_(self.host_ids, non_blocking=True)
        if from_image:  # the processor's device half: the uint8 image in, both normalisations
            self.image.copy_(self.host_image, non_blocking=True)
            normalise(self.image.permute(2, 0, 1), self.pixel_values.dtype, out=self.pixel_values)
        patches = self._encode()
        logits, token = self.prefill(self.input_ids[:, :bucket], patches, self.last_index)
        self.logits[0].copy_(logits[0])
        self.tokens[0:1].copy_(token[0])
        for i in range(1, self.n_tokens):
            logits, token = self.decode(token, self.prefix_len + (i - 1))
            self.logits[i].copy_(logits[0])
            self.tokens[i : i + 1].copy_(token[0])
        self.host_tokens.copy_(self.tokens, non_blocking=True)

    def _capture(self, bucket: int, from_image: bool) -> torch.cuda.CUDAGraph:
        lm = self.model.language_model
        if lm.max_batch < 1 or lm.max_seq_len < self.max_seq_len:
            self.model.setup_caches(1, self.max_seq_len)
        self.captured_with.append([layer.self_attn.kv_cache for layer in lm.model.layers])
        # warm-up on a side stream, as capture requires (this is also when torch.compile compiles)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                self._pipeline(bucket, from_image)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            self._pipeline(bucket, from_image)
        return graph

    def _replay(self, pixels, input_ids: torch.Tensor) -> None:
        """pixels: the uint8 HxWx3 image (numpy) or pixel_values [1, 6, H, W] on the device."""
        T = input_ids.shape[1]
        if T > self.max_prompt_tokens:
            raise InputError(
                f"prompt of {T} tokens is longer than engine {self.name!r} allows ({self.max_prompt_tokens})"
            )
        from_image = isinstance(pixels, np.ndarray)
        if from_image and pixels.shape != self.image_shape:
            raise InputError(f"engine {self.name!r} takes {self.image_shape} images, got {pixels.shape}")
        self.replayed.synchronize()  # the previous replay has read the host buffers
        if from_image:
            np.copyto(self._host_image, pixels)
        else:
            self.pixel_values.copy_(pixels)
        if input_ids is not self._staged_ids:  # a policy passes its cached ids: once per prompt, not per call
            self._host_ids[:T] = input_ids[0].cpu().numpy()
            self._host_ids[self.max_prompt_tokens] = self.num_patches + T - 1  # BOS + patches + T - 1 prompt tokens
            self._host_ids[self.max_prompt_tokens + 1] = self.num_patches + T
            self._staged_ids = input_ids
        key = (min(-(-T // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_prompt_tokens), from_image)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        self.graphs[key].replay()
        self.replayed.record()

    def generate(self, pixel_values, input_ids):
        # the tokens land in pinned host memory, copied by the graph's last node: after the caller's
        # synchronise, reading them costs no device call
        self._replay(pixel_values, input_ids)
        return self.host_tokens

    def generate_with_logits(self, pixel_values, input_ids):
        self._replay(pixel_values, input_ids)
        return self.tokens.clone(), self.logits.clone()


class CompiledEngine(GraphedEngine):
    name = "compiled"
    compile_stages = True


ENGINES: dict[str, Callable[..., Engine]] = {
    "reference": ReferenceEngine,
    "eager": EagerEngine,
    "graphed": GraphedEngine,
    "compiled": CompiledEngine,
}


def split_engine_name(name: str) -> tuple[str, str]:
    """'compiled+int8' -> ('compiled', 'int8'); 'eager' -> ('eager', 'none'). Unknown parts: InputError."""
    from rtloop.policy.quant import QUANT_MODES

    base, _, quant = name.partition("+")
    quant = quant or "none"
    if base not in ENGINES:
        raise InputError(f"unknown engine {base!r}; available: {', '.join(ENGINES)}")
    if quant not in QUANT_MODES:
        raise InputError(f"unknown weight format {quant!r} in engine {name!r}; available: {', '.join(QUANT_MODES)}")
    if base == "reference" and quant != "none":
        raise InputError("the reference engine runs transformers' modules and takes no --quant")
    return base, quant


def check_engine_device(name: str, device: str) -> None:
    """Fail before any weights load if `name` cannot run on `device` (CUDA-graph engines on a CPU)."""
    base, _ = split_engine_name(name)
    if getattr(ENGINES[base], "needs_cuda", False) and not device.startswith("cuda"):
        raise InputError(f"engine {name!r} needs a CUDA device (it replays CUDA graphs); on {device} use eager or reference")


def build_engine(name: str, model, **kwargs) -> Engine:
    """Build engine `name` on `model`. A `+int8`/`+fp8` suffix quantises the model's Llama linears in place
    first (a no-op if it already is; an InputError if it holds the other format)."""
    from rtloop.policy.quant import quantize_

    base, quant = split_engine_name(name)
    if quant != "none":
        quantize_(model, quant)
    engine = ENGINES[base](model, **kwargs)
    engine.name = name
    return engine
