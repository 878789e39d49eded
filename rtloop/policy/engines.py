"""Inference engines: the ways to turn B frames (pixels and prompts) into their 7 greedy action tokens each.

An engine owns everything from the pixels on the device to the token ids: both vision towers, the
projector, the prefill and the decode steps, all through the one loop `rtloop.policy.model.generate`; what
differs is the stages it hands that loop and the ops (rtloop.policy.ops) those run on. `generate_batch` may
return before the GPU is done; the caller synchronises (that is what the `generate` stage timing charges).

Every engine takes a batch: frame b with its own image and prompt. Prompts of different lengths are
right-padded to a common length and each frame's own length is tracked (`last`), so frame b's attention and
positions are those of its batch-1 run: its tokens are the same (exactly in fp32 on the CPU; in bf16 the
matmuls of another batch size may sum in another order, so `rtloop bench --batch` reports the agreement).

- `reference`: what the official code costs. Transformers' `LlamaForCausalLM` (its dynamic KV cache, its
  `generate` loop with a host sync per token) running on our weights, after our eager ViTs and projector.
  The official OpenVLA is exactly `LlamaForCausalLM.generate` fed with `inputs_embeds`, so this keeps its
  per-token costs; the HF modules alias our parameters, so no weight is copied. The official code has no
  batching (openvla#228), so a batch runs its frames one after another.
- `eager`: our model, static KV cache, plain PyTorch: a kernel launch per op, no graphs.
- `graphed`: the whole of `generate` (vision towers side by side on two streams, projector, prefill, the 6
  decode steps and every argmax) captured as ONE CUDA graph per (batch bucket, prompt bucket); a call writes
  the inputs into static pinned host buffers and replays it. The graph's first nodes copy them in (and,
  given uint8 images, normalise them); its last copies the tokens out to pinned host memory. No host sync
  inside, one launch per call. Batches are padded to a bucket of BATCH_BUCKETS (the spare frames compute on
  stale inputs and are dropped), prompts to a multiple of 16 tokens; graphs are captured on first use, all
  in one memory pool (they never run at once), reading and writing one set of static buffers sized for
  `max_batch`. CUDA only: on CPU it is an InputError, no fallback.
- `compiled`: `graphed` with its stages compiled by TorchInductor first (fused LayerNorm/GELU/RMSNorm/RoPE),
  on `kernel_ops` (rtloop.policy.ops): at batch 1 the decode steps run on our Triton kernels, a GEMV per
  linear with the norm and residual fused and one decode-attention kernel, launched with PDL where the
  architecture has it; quantised prefills run on 8-bit tensor cores at any batch. How the kernels run is
  `kernel_options` (rtloop.policy.kernels.KernelOptions). Inductor's own CUDA graphs stay off: we capture
  its kernels in our graph, as above. Compiling and autotuning take minutes.

Engine names may carry a weight format, e.g. `compiled+int8`: the same engine, on a model whose Llama
linears `build_engine` first quantises in place with `rtloop.policy.quant` (see `split_engine_name`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from rtloop.errors import InputError
from rtloop.policy.buckets import BATCH_BUCKETS, batch_bucket
from rtloop.policy.model import Stages, argmax_step, generate
from rtloop.policy.ops import TORCH_OPS, kernel_ops

PROMPT_BUCKET = 16  # graphed engines pad the prompt to a multiple of this many tokens
MAX_PROMPT_TOKENS = 96  # LIBERO prompts are 20-40 tokens; the static cache is sized for this many


class Engine(Protocol):
    name: str
    max_batch: int

    def generate_batch(self, images, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """B frames -> LongTensor [B, 7], on the device or in pinned host memory that the device is still
        filling (and the next call reuses): read it after synchronising, before the next call. `images`:
        pixel_values [B, 6, 224, 224] on the model's device; engines with `takes_host_inputs` also take a
        list of the uint8 224x224x3 images themselves (numpy), and prepare them on the device. `prompts`:
        each frame's ids ([T_b] or [1, T_b], BOS first), on the device (host-input engines: on the CPU)."""

    def generate_batch_with_logits(self, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """As `generate_batch`, plus the float32 logits [B, 7, vocab] each token was the argmax of."""

    def generate(self, pixel_values, input_ids: torch.Tensor) -> torch.Tensor:
        """Batch 1: pixel_values [1, 6, 224, 224] (or one uint8 image) and input_ids [1, T] -> tokens [7]."""

    def generate_with_logits(self, pixel_values, input_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch 1, as `generate`, plus the logits [7, vocab]."""


class BatchOneCalls:
    """`generate` and `generate_with_logits`, a batch of one frame."""

    def generate(self, pixel_values, input_ids):
        return self.generate_batch(_one(pixel_values), [input_ids])[0]

    def generate_with_logits(self, pixel_values, input_ids):
        tokens, logits = self.generate_batch_with_logits(_one(pixel_values), [input_ids])
        return tokens[0], logits[0]


def _one(pixels):
    return [pixels] if isinstance(pixels, np.ndarray) else pixels


def check_batch(engine, batch: int) -> None:
    if not 1 <= batch <= engine.max_batch:
        raise InputError(f"engine {engine.name!r} was built for batches of 1 to {engine.max_batch} frames, got {batch}")


def check_max_batch(max_batch: int) -> None:
    if max_batch not in BATCH_BUCKETS:
        raise InputError(f"batch size {max_batch} is not a bucket; choose one of {', '.join(map(str, BATCH_BUCKETS))}")


def pad_prompts(prompts: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Each frame's ids -> right-padded ids [B, longest] and each frame's own length."""
    rows = [p.reshape(-1) for p in prompts]
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)
    return padded, [len(r) for r in rows]


class EagerEngine(BatchOneCalls):
    """Our model, eager PyTorch, static KV cache: no graphs, no compilation."""

    name = "eager"

    def __init__(self, model, n_tokens: int = 7, max_batch: int = 1):
        check_max_batch(max_batch)
        self.model = model
        self.n_tokens = n_tokens
        self.max_batch = max_batch
        self.stages = model.stages(TORCH_OPS)

    @torch.no_grad()
    def _run(self, pixel_values, prompts, with_logits: bool):
        check_batch(self, len(prompts))
        model, n = self.model, self.n_tokens
        ids, lengths = pad_prompts(prompts, model.config.pad_token_id)
        B, P = ids.shape[0], model.config.num_patches
        model.ensure_caches(B, P + ids.shape[1] + n)
        last = torch.tensor(lengths, device=ids.device) + (P - 1)
        tokens = torch.empty(B, n, dtype=torch.long, device=ids.device)
        logits = torch.empty(B, n, model.config.llm.vocab_size, device=ids.device) if with_logits else None
        generate(self.stages, pixel_values, ids, last, tokens, logits)
        return tokens, logits

    def generate_batch(self, images, prompts):
        return self._run(images, prompts, False)[0]

    def generate_batch_with_logits(self, images, prompts):
        return self._run(images, prompts, True)

    @torch.no_grad()
    def time_prefill(self, batch: int, prompt_len: int, repeats: int = 5) -> tuple[float, int, int]:
        """(seconds of one LLM prefill of `batch` prompts of `prompt_len` tokens, frames and positions it
        computed), median of `repeats` after one untimed call. Its inputs are pad ids and zero patches: the
        time of these matmuls does not depend on the values."""
        from rtloop import clock

        model, config = self.model, self.model.config
        P, device, dtype = config.num_patches, model.language_model.model.norm.weight.device, model.projector.fc1.weight.dtype
        model.ensure_caches(batch, P + prompt_len + self.n_tokens)
        ids = torch.full((batch, prompt_len), config.pad_token_id, device=device)
        patches = torch.zeros(batch, P, config.llm.hidden_size, device=device, dtype=dtype)
        last = torch.full((batch,), P + prompt_len - 1, device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(repeats + 1):
            sync()
            t0 = clock.now()
            self.stages.prefill(ids, patches, last)
            sync()
            times.append(clock.now() - t0)
        return float(np.median(times[1:])), batch, P + prompt_len


class ReferenceEngine(BatchOneCalls):
    """Transformers' LlamaForCausalLM + `generate` (dynamic cache) on our weights: the official path's cost."""

    name = "reference"

    def __init__(self, model, n_tokens: int = 7, max_batch: int = 1):
        try:
            from transformers import GenerationConfig
        except ImportError:
            raise InputError("engine 'reference' needs transformers (pip install 'rtloop[reference]')") from None
        check_max_batch(max_batch)
        self.model = model
        self.n_tokens = n_tokens
        self.max_batch = max_batch
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
    def _one_frame(self, pixel_values, input_ids):
        embeds = self._inputs_embeds(pixel_values, input_ids.view(1, -1))
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        out = self.hf.generate(
            inputs_embeds=embeds, attention_mask=mask, output_logits=True, return_dict_in_generate=True
        )
        return out.sequences[0, -self.n_tokens :], torch.stack([l[0] for l in out.logits]).float()

    def generate_batch_with_logits(self, images, prompts):
        check_batch(self, len(prompts))
        frames = [self._one_frame(images[b : b + 1], ids) for b, ids in enumerate(prompts)]
        return torch.stack([t for t, _ in frames]), torch.stack([l for _, l in frames])

    @torch.no_grad()
    def generate_batch(self, images, prompts):
        check_batch(self, len(prompts))
        out = []
        for b, ids in enumerate(prompts):
            embeds = self._inputs_embeds(images[b : b + 1], ids.view(1, -1))
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            out.append(self.hf.generate(inputs_embeds=embeds, attention_mask=mask)[0, -self.n_tokens :])
        return torch.stack(out)


def hf_llama_sharing_weights(model):
    """A transformers LlamaForCausalLM whose parameters ARE the tensors of `model.language_model` (the
    key names are equal by construction; the fused matrices' parts are views): built on the meta device,
    then assigned, so nothing is copied."""
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


def batch_memory_bytes(config, batch: int, seq_len: int, dtype: torch.dtype) -> dict[str, int]:
    """What a batch of `batch` frames adds on the GPU beyond the weights, estimated before allocating it:
    the KV cache (exact) and the largest activations (the prefill's, counted twice: the graph pool keeps
    what one layer frees for the next, and Inductor's buffers come on top)."""
    a, e = config.llm, torch.tensor([], dtype=dtype).element_size()
    kv = 2 * a.num_hidden_layers * batch * a.num_key_value_heads * a.head_dim * seq_len * e
    tokens = seq_len  # every cached position goes through the prefill
    layer = tokens * (4 * a.hidden_size + (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
                      + 3 * a.intermediate_size) * e
    vision = sum(v.num_patches * (v.mlp_dim + 4 * v.width) * e for v in config.vits)
    logits = 8 * a.vocab_size * 4  # 7 tokens' float32 logits, and the last step's
    activations = 2 * batch * (layer + vision + logits)
    return {"kv_cache": kv, "activations": activations, "total": kv + activations}


def check_batch_fits(config, batch: int, seq_len: int, dtype: torch.dtype, free_bytes: int) -> None:
    """A one-line InputError when `batch` frames cannot fit in `free_bytes`, saying how much they need."""
    need = batch_memory_bytes(config, batch, seq_len, dtype)
    if need["total"] > free_bytes:
        raise InputError(
            f"batch {batch} needs ~{need['total'] / 1e9:.2f} GB of GPU memory (KV cache {need['kv_cache'] / 1e9:.2f} "
            f"GB + activations {need['activations'] / 1e9:.2f} GB) beyond the weights; {free_bytes / 1e9:.2f} GB free"
        )


def engine_seq_len(config, n_tokens: int, max_prompt_tokens: int = MAX_PROMPT_TOKENS) -> int:
    """The static cache length of a graphed engine: patches + the longest prompt + the generated tokens."""
    return -(-(config.num_patches + max_prompt_tokens + n_tokens) // 64) * 64


class GraphedEngine(BatchOneCalls):
    """The whole pipeline as one CUDA graph per (batch bucket, prompt bucket) (see the module docstring)."""

    name = "graphed"
    needs_cuda = True
    takes_host_inputs = True
    compile_stages = False

    def __init__(self, model, n_tokens: int = 7, max_batch: int = 1, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                 kernel_options=None):
        weight = model.language_model.model.norm.weight
        if weight.device.type != "cuda":
            raise InputError(
                f"engine {self.name!r} needs a CUDA device (it replays CUDA graphs); on {weight.device.type} "
                "use the eager or reference engine"
            )
        check_max_batch(max_batch)
        self.model = model
        self.n_tokens = n_tokens
        self.max_batch = max_batch
        self.max_prompt_tokens = max_prompt_tokens
        device, config = weight.device, model.config
        self.num_patches = config.num_patches
        self.max_seq_len = engine_seq_len(config, n_tokens, max_prompt_tokens)
        lm = model.language_model
        if lm.max_batch < max_batch or lm.max_seq_len < self.max_seq_len:  # the caches will be reallocated
            held = sum(2 * layer.self_attn.kv_cache.k_cache.nbytes for layer in lm.model.layers) if lm.max_batch else 0
            check_batch_fits(config, max_batch, self.max_seq_len, weight.dtype,
                             torch.cuda.mem_get_info(device)[0] + held)
        image = config.vits[0].image
        self.image_shape = (image, image, 3)
        pixel_dtype = model.projector.fc1.weight.dtype
        B = max_batch
        # what the host writes before each replay, in pinned memory: the uint8 images, and per frame the
        # prompt ids followed by its last real position in the LLM's sequence
        self.host_image = torch.zeros((B, *self.image_shape), dtype=torch.uint8, pin_memory=True)
        self.host_ids = torch.full((B, max_prompt_tokens + 1), config.pad_token_id, dtype=torch.long, pin_memory=True)
        self.host_ids[:, max_prompt_tokens] = self.num_patches  # a valid position for frames never staged
        self.host_tokens = torch.zeros(B, n_tokens, dtype=torch.long, pin_memory=True)
        self._host_image, self._host_ids = self.host_image.numpy(), self.host_ids.numpy()  # ~100x cheaper writes
        # their device copies, and the static outputs: every replay reads and writes these same addresses
        self.image = torch.zeros((B, *self.image_shape), device=device, dtype=torch.uint8)
        self.ids = torch.zeros((B, max_prompt_tokens + 1), device=device, dtype=torch.long)
        self.input_ids = self.ids[:, :max_prompt_tokens]
        self.last_index = self.ids[:, max_prompt_tokens]
        self.pixel_values = torch.zeros(B, 6, image, image, device=device, dtype=pixel_dtype)
        self.tokens = torch.zeros(B, n_tokens, device=device, dtype=torch.long)
        self.logits = torch.zeros(B, n_tokens, config.llm.vocab_size, device=device, dtype=torch.float32)
        self.replayed = torch.cuda.Event()  # the host buffers are free again once the last replay is done
        self._staged: list[object] = [None] * B  # the ids object now in each frame's host_ids (never mutated)
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}  # (batch, prompt bucket, from image)
        self.prefill_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # the prefill alone, for timing
        self.pool = torch.cuda.graph_pool_handle()  # one pool for every graph: they never run at once
        self.captured_with: list[object] = []  # the caches each graph writes: kept alive with the graph
        self.side_stream = torch.cuda.Stream(device)
        backbone = model.vision_backbone
        self.dino, self.siglip, self.project = backbone.dino, backbone.siglip, self._project
        self.kernel_options = None
        if self.compile_stages:
            self._compile(device, kernel_options)
        else:
            stages = self._stages(TORCH_OPS)
            self.stages = {False: stages, True: stages}  # by "batch > 1": plain torch ops at any batch

    def _compile(self, device, kernel_options) -> None:
        from rtloop.policy import kernels

        if not kernels.available(device):
            raise InputError(f"engine {self.name!r} needs Triton (pip install triton) for its decode kernels")
        options = kernels.DEFAULT_OPTIONS if kernel_options is None else kernel_options
        try:
            self.kernel_options = options.resolve(device)
        except ValueError as e:
            raise InputError(str(e)) from None
        # each stage is compiled once per (batch, prompt) shape it meets; the default limit of 8 would
        # leave the later buckets' stages uncompiled
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        compile_stage = partial(torch.compile, fullgraph=True, dynamic=False)
        self.dino, self.siglip, self.project = (compile_stage(f) for f in (self.dino, self.siglip, self.project))
        self.stages = {batched: self._stages(kernel_ops(self.kernel_options, 2 if batched else 1), compile_stage)
                       for batched in (False, True)}

    def _stages(self, ops, compile_stage: Callable = lambda f: f) -> Stages:
        model = self.model
        return Stages(self._encode, compile_stage(partial(argmax_step, model.prefill, ops=ops)),
                      compile_stage(partial(argmax_step, model.decode, ops=ops)))

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 6, H, W] -> patch embeddings [B, 256, llm_dim], the two ViTs side by side:
        DINOv2 on a side stream while SigLIP runs on this one (the graph keeps the fork and the join). Each
        tower's 256-row matmuls leave much of a big GPU idle, so together they take little more than one."""
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            dino = self.dino(pixel_values)
        siglip = self.siglip(pixel_values)
        main.wait_stream(self.side_stream)
        dino.record_stream(main)  # allocated on the side stream, read and freed on this one
        return self.project(dino, siglip)

    def _project(self, dino: torch.Tensor, siglip: torch.Tensor) -> torch.Tensor:
        return self.model.projector(torch.cat([dino, siglip], dim=2))

    def _pipeline(self, batch: int, bucket: int, from_image: bool) -> None:
        """Everything one replay does, reading and writing only the static buffers' first `batch` frames."""
        from rtloop.policy.processor import normalise

        B = batch
        self.ids[:B].copy_(self.host_ids[:B], non_blocking=True)
        if from_image:  # the processor's device half: the uint8 images in, both normalisations
            self.image[:B].copy_(self.host_image[:B], non_blocking=True)
            normalise(self.image[:B].permute(0, 3, 1, 2), self.pixel_values.dtype, out=self.pixel_values[:B])
        generate(self.stages[B > 1], self.pixel_values[:B], self.input_ids[:B, :bucket], self.last_index[:B],
                 self.tokens[:B], self.logits[:B])
        self.host_tokens[:B].copy_(self.tokens[:B], non_blocking=True)

    def _capture(self, batch: int, bucket: int, from_image: bool) -> torch.cuda.CUDAGraph:
        self.model.ensure_caches(self.max_batch, self.max_seq_len)
        lm = self.model.language_model
        self.captured_with.append([layer.self_attn.kv_cache for layer in lm.model.layers])
        # warm-up on a side stream, as capture requires (this is also when torch.compile compiles)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                self._pipeline(batch, bucket, from_image)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            self._pipeline(batch, bucket, from_image)
        return graph

    def _replay(self, images, prompts: Sequence[torch.Tensor]) -> int:
        """images: B uint8 HxWx3 images (numpy) or pixel_values [B, 6, H, W] on the device. Returns B."""
        B = len(prompts)
        check_batch(self, B)
        lengths = [p.shape[-1] for p in prompts]
        if max(lengths) > self.max_prompt_tokens:
            raise InputError(f"prompt of {max(lengths)} tokens is longer than engine {self.name!r} allows "
                             f"({self.max_prompt_tokens})")
        from_image = not isinstance(images, torch.Tensor)
        if from_image:
            if len(images) != B:
                raise InputError(f"{len(images)} images for {B} prompts")
            for image in images:
                if image.shape != self.image_shape:
                    raise InputError(f"engine {self.name!r} takes {self.image_shape} images, got {image.shape}")
        self.replayed.synchronize()  # the previous replay has read the host buffers
        if from_image:
            for b, image in enumerate(images):
                np.copyto(self._host_image[b], image)
        else:
            self.pixel_values[:B].copy_(images)
        for b, (ids, T) in enumerate(zip(prompts, lengths)):
            if ids is not self._staged[b]:  # a policy passes its cached ids: once per prompt, not per call
                self._host_ids[b, :T] = ids.reshape(-1).cpu().numpy()
                self._host_ids[b, self.max_prompt_tokens] = self.num_patches + T - 1  # BOS + patches + T - 1
                self._staged[b] = ids
        bucket = min(-(-max(lengths) // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_prompt_tokens)
        key = (batch_bucket(B), bucket, from_image)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        self.graphs[key].replay()
        self.replayed.record()
        return B

    def time_prefill(self, batch: int, prompt_len: int, repeats: int = 20) -> tuple[float, int, int]:
        """(seconds of the LLM prefill alone, as a replay of its own graph, frames and positions it computed:
        the batch and the prompt padded to their buckets), over `repeats` replays between CUDA events. It
        reads the static ids of the last call and zero patches: its matmuls' time does not depend on values."""
        B, bucket = batch_bucket(batch), min(-(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_prompt_tokens)
        if (B, bucket) not in self.prefill_graphs:
            self.model.ensure_caches(self.max_batch, self.max_seq_len)
            patches = torch.zeros(B, self.num_patches, self.model.config.llm.hidden_size,
                                  device=self.tokens.device, dtype=self.pixel_values.dtype)
            prefill = self.stages[B > 1].prefill
            args = (self.input_ids[:B, :bucket], patches, self.last_index[:B])
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(2):
                    prefill(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
                prefill(*args)
            graph.patches = patches  # the static input lives as long as its graph
            self.prefill_graphs[B, bucket] = graph
        graph = self.prefill_graphs[B, bucket]
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / repeats, B, self.num_patches + bucket

    def generate_batch(self, images, prompts):
        # the tokens land in pinned host memory, copied by the graph's last node: after the caller's
        # synchronise, reading them costs no device call
        return self.host_tokens[: self._replay(images, prompts)]

    def generate_batch_with_logits(self, images, prompts):
        B = self._replay(images, prompts)
        return self.tokens[:B].clone(), self.logits[:B].clone()


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


def build_engine(name: str, model, max_batch: int = 1, kernel_options=None, **kwargs) -> Engine:
    """Build engine `name` on `model` for batches of up to `max_batch` frames (a bucket). A `+int8`/`+fp8`
    suffix quantises the model's Llama linears in place first (a no-op if it already is; an InputError if
    it holds the other format). `kernel_options` (a KernelOptions) applies to `compiled` only."""
    from rtloop.policy.quant import quantize_

    base, quant = split_engine_name(name)
    if quant != "none":
        quantize_(model, quant)
    if base == "compiled":
        kwargs["kernel_options"] = kernel_options
    engine = ENGINES[base](model, max_batch=max_batch, **kwargs)
    engine.name = name
    return engine
