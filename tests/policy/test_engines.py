"""Engines on the tiny checkpoint and real recorded LIBERO frames: all must pick the same greedy tokens.

CPU: eager vs reference (transformers' LlamaForCausalLM + generate on the same tensors), quantisation.
GPU (`-m gpu`, skipped without CUDA; run on the device machine): graphed and compiled vs eager.
"""

from __future__ import annotations

import pytest
import torch

from rtloop.bench import DEFAULT_FRAMES, engine_tokens, load_frames
from rtloop.errors import InputError
from rtloop.policy.engines import PROMPT_BUCKET, build_engine, check_engine_device, split_engine_name
from rtloop.policy.linear import Linear
from rtloop.policy.quant import llama_bytes_per_token, quantize_, quantize_weight, weight_format

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _policy(checkpoint, device="cpu", dtype=None):
    from rtloop.policy.openvla import OpenVLAPolicy

    return OpenVLAPolicy(checkpoint, device=device, dtype=dtype)


@pytest.fixture(scope="module")
def frames():
    return load_frames(DEFAULT_FRAMES)[:4]  # interleaved: one frame of each of the 4 tasks (4 prompts)


def _run(policy, name, frames):
    policy.engine = build_engine(name, policy.model)
    return engine_tokens(policy, frames)


# Quantisation errors at the first token, as a share of the largest bf16 logit, on the tiny random model (2-core
# CPU dev machine, eager+int8/fp8 against eager: 2.1% and 5.9%), with margin. Its logits are near-ties (the
# median gap between the top two is 0.6% of the largest), so 8-bit weights flip tokens that a trained 7B
# keeps: tokens are compared only where the gap exceeds twice the tolerance.
QUANT_TOL = {"int8": 0.06, "fp8": 0.15}


def _agrees_where_decided(tokens, logits, base_tokens, base_logits, rel_tol) -> int:
    """Frame by frame, position by position while the tokens so far agree (a later position is conditioned
    on them): logits within rel_tol x the largest base logit, and the same token wherever the base's top two
    logits differ by more than twice that. Returns how many positions were compared."""
    tol = rel_tol * base_logits.float().abs().max()
    compared = 0
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            error = (logits[b, t].float() - base_logits[b, t].float()).abs().max()
            assert error <= tol, f"frame {b} token {t}: logits off by {error:.4g} > {tol:.4g}"
            top2 = base_logits[b, t].float().topk(2).values
            if top2[0] - top2[1] > 2 * tol:
                assert tokens[b, t] == base_tokens[b, t], f"frame {b} token {t}: a clear choice changed"
            compared += 1
            if tokens[b, t] != base_tokens[b, t]:
                break
    return compared


def test_agreement_where_decided_fails_on_far_logits_and_on_a_changed_clear_choice():
    base = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.0, 1.05]]])
    base_tokens = base.argmax(-1)
    assert _agrees_where_decided(base_tokens, base + 0.1, base_tokens, base, 0.05) == 2
    near_tie = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 1.1, 1.05]]])  # the tie flips: allowed, and it stops there
    assert _agrees_where_decided(near_tie.argmax(-1), near_tie, base_tokens, base, 0.05) == 2
    with pytest.raises(AssertionError, match="logits off"):
        _agrees_where_decided(base_tokens, base + 0.5, base_tokens, base, 0.05)
    flipped = torch.tensor([[[0.0, 4.0, 0.0], [0.0, 1.0, 1.05]]])
    with pytest.raises(AssertionError, match="a clear choice changed"):
        _agrees_where_decided(flipped.argmax(-1), base, base_tokens, base, 0.05)


def test_eager_and_reference_pick_the_same_tokens(tiny_checkpoint, frames):
    policy = _policy(tiny_checkpoint)
    eager_tokens, eager_logits = _run(policy, "eager", frames)
    ref_tokens, ref_logits = _run(policy, "reference", frames)
    assert torch.equal(eager_tokens, ref_tokens)
    assert torch.allclose(eager_logits, ref_logits, atol=1e-3, rtol=1e-4)
    # the fast `generate` path (the model's own loop) agrees with the logit-keeping one
    frame = frames[0]
    pixels, ids = _inputs(policy, frame)
    policy.engine = build_engine("eager", policy.model)
    assert torch.equal(policy.engine.generate(pixels, ids), eager_tokens[0])
    # different frames are different inputs: the images reach the logits
    assert not torch.allclose(eager_logits[0], eager_logits[1])


def _inputs(policy, frame):
    from rtloop.policy.processor import build_prompt, pixel_values, prepare_libero_image, tokenize_prompt

    ids = tokenize_prompt(policy.tokenizer, build_prompt(frame.instruction)).to(policy.device)
    return pixel_values(prepare_libero_image(frame.image), policy.device, policy.dtype), ids


def test_engine_names_and_formats():
    assert split_engine_name("compiled+int8") == ("compiled", "int8")
    assert split_engine_name("eager") == ("eager", "none")
    with pytest.raises(InputError, match="unknown engine 'fast'"):
        split_engine_name("fast")
    with pytest.raises(InputError, match="unknown weight format 'int4'"):
        split_engine_name("eager+int4")
    with pytest.raises(InputError, match="takes no --quant"):
        split_engine_name("reference+int8")
    with pytest.raises(InputError, match="needs a CUDA device"):
        check_engine_device("graphed", "cpu")
    check_engine_device("eager+int8", "cpu")


def test_graphed_refuses_a_cpu_model(tiny_checkpoint):
    policy = _policy(tiny_checkpoint)
    for name in ("graphed", "compiled"):
        with pytest.raises(InputError, match=f"engine '{name}' needs a CUDA device"):
            build_engine(name, policy.model)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_quantize_weight_is_close(mode):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_weight(w, mode)
    assert q.dtype == (torch.int8 if mode == "int8" else torch.float8_e4m3fn) and scale.shape == (64,)
    back = q.float() * scale[:, None]
    rel = (back - w).norm() / w.norm()
    assert rel < (0.01 if mode == "int8" else 0.05), rel


def test_quantized_model_keeps_its_tokens(tiny_checkpoint, frames):
    policy = _policy(tiny_checkpoint)
    bytes_fp32 = llama_bytes_per_token(policy.model)
    layers = policy.model.language_model.model.layers
    linear_bytes = sum(m.weight.numel() * 4 for m in layers.modules() if isinstance(m, Linear))
    assert linear_bytes > 0
    base_tokens, _ = _run(policy, "eager", frames)
    tokens, _ = _run(policy, "eager+int8", frames)
    assert weight_format(policy.model) == "int8"
    layer = policy.model.language_model.model.layers[0]
    for linear in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj,
                   policy.model.language_model.lm_head):
        assert linear.weight.dtype == torch.int8 and linear.scale is not None
    assert llama_bytes_per_token(policy.model) < bytes_fp32 - 0.7 * linear_bytes  # 4-byte weights -> 1-byte
    assert (tokens == base_tokens).float().mean() >= 0.9
    with pytest.raises(InputError, match="already quantised to int8"):
        quantize_(policy.model, "fp8")


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_matches_eager_on_cuda(tiny_checkpoint, frames, dtype):
    policy = _policy(tiny_checkpoint, "cuda", dtype)
    eager_tokens, eager_logits = _run(policy, "eager", frames)
    graphed_tokens, graphed_logits = _run(policy, "graphed", frames)
    assert len(policy.engine.graphs) >= 1  # captured, and replayed for the other prompts of the bucket
    assert torch.equal(graphed_tokens, eager_tokens)
    tol = 1e-3 if dtype == torch.float32 else 0.1
    assert (graphed_logits - eager_logits).abs().max() < tol
    # a replay after other prompts gives what the first did: no state leaks between calls
    again, _ = engine_tokens(policy, frames[:1])
    assert torch.equal(again[0], graphed_tokens[0])
    _image_path_matches(policy, frames, graphed_tokens)


def _image_path_matches(policy, frames, tokens):
    """engine_tokens (as predict_action) hands a graphed engine the uint8 image and host ids, copied and
    normalised inside its graph; pixel_values and device ids, as the other engines take, give the same tokens,
    and `generate`'s pinned output is right call after call."""
    from rtloop.policy.processor import build_prompt, pixel_values, prepare_libero_image, tokenize_prompt

    assert policy.engine.takes_host_inputs
    for _ in range(2):
        for frame, expected in zip(frames, tokens):
            ids = tokenize_prompt(policy.tokenizer, build_prompt(frame.instruction)).to(policy.device)
            pixels = pixel_values(prepare_libero_image(frame.image), policy.device, policy.dtype)
            out = policy.engine.generate(pixels, ids)
            torch.cuda.synchronize()
            assert out.is_pinned() and torch.equal(out, expected.cpu())


@pytest.mark.gpu
@cuda_only
def test_compiled_matches_eager_on_cuda(tiny_checkpoint, frames):
    policy = _policy(tiny_checkpoint, "cuda", torch.float32)
    eager_tokens, eager_logits = _run(policy, "eager", frames)
    tokens, logits = _run(policy, "compiled", frames)
    assert torch.equal(tokens, eager_tokens)
    assert (logits - eager_logits).abs().max() < 1e-2
    _image_path_matches(policy, frames, tokens)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_compiled_quantised_mostly_matches_bf16_on_cuda(tiny_checkpoint, frames, fmt):
    """compiled+int8/fp8 (Triton GEMV decode, 8-bit tensor-core prefill) against compiled in bf16."""
    policy = _policy(tiny_checkpoint, "cuda", torch.bfloat16)
    base, base_logits = _run(policy, "compiled", frames)
    tokens, logits = _run(policy, f"compiled+{fmt}", frames)
    assert weight_format(policy.model) == fmt
    _agrees_where_decided(tokens, logits, base, base_logits, QUANT_TOL[fmt])


INSTRUCTIONS = ["pick up the ketchup", "pick up the alphabet soup and place it in the basket",
                "open the top drawer of the cabinet and put the bowl inside it", "put the cream cheese in the bowl",
                "pick it"]


def _batch_inputs(policy, n, on_host=False):
    """n frames, each its own random image (random images give varied tokens) and its own prompt, of
    different lengths."""
    import numpy as np

    from rtloop.policy.processor import build_prompt, pixel_values, tokenize_prompt

    rng = np.random.default_rng(n)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]
    ids = [tokenize_prompt(policy.tokenizer, build_prompt(INSTRUCTIONS[i % len(INSTRUCTIONS)])) for i in range(n)]
    assert len({i.shape[1] for i in ids}) == min(n, len(INSTRUCTIONS))  # prompts of different lengths
    if on_host:
        return images, ids
    return torch.cat([pixel_values(im, policy.device, policy.dtype) for im in images]), [i.to(policy.device) for i in ids]


def _batch_matches_batch_one(engine, images, ids, logit_tol):
    tokens, logits = engine.generate_batch_with_logits(images, ids)
    assert tokens.shape == (len(ids), 7) and logits.shape[:2] == (len(ids), 7)
    for b in range(len(ids)):
        one = images[b : b + 1] if isinstance(images, torch.Tensor) else [images[b]]
        alone_tokens, alone_logits = engine.generate_batch_with_logits(one, [ids[b]])
        assert torch.equal(tokens[b], alone_tokens[0]), b
        assert (logits[b] - alone_logits[0]).abs().max() < logit_tol
    return tokens


def test_eager_batch_of_frames_with_their_own_prompts_equals_each_frame_alone(tiny_checkpoint):
    """fp32 on the CPU: frame b's tokens in a batch are its batch-1 tokens, its logits those to rounding,
    with prompts of four lengths right-padded to the longest."""
    policy = _policy(tiny_checkpoint)
    engine = build_engine("eager", policy.model, max_batch=4)
    images, ids = _batch_inputs(policy, 4)
    tokens = _batch_matches_batch_one(engine, images, ids, 1e-4)
    assert len({tuple(t.tolist()) for t in tokens}) > 1  # the frames differ: a mix-up would show
    # and the plain generate (no logits) gives the same tokens
    assert torch.equal(engine.generate_batch(images, ids), tokens)
    with pytest.raises(InputError, match="batches of 1 to 4 frames, got 5"):
        engine.generate_batch(torch.cat([images, images[:1]]), ids + ids[:1])
    with pytest.raises(InputError, match="batch size 3 is not a bucket"):
        build_engine("eager", policy.model, max_batch=3)


def test_batch_memory_is_estimated_before_allocating():
    from rtloop.policy.checkpoint import make_config
    from rtloop.policy.config import OpenVLAConfig
    from rtloop.policy.engines import batch_memory_bytes, check_batch_fits, engine_seq_len

    config = OpenVLAConfig.from_dict(make_config("7b"))
    seq = engine_seq_len(config, 7)
    one, many = (batch_memory_bytes(config, b, seq, torch.bfloat16) for b in (1, 32))
    # 32 layers x (k, v) x 4096 x 384 positions x 2 bytes: 201 MB of KV cache a frame
    assert one["kv_cache"] == 32 * 2 * 4096 * seq * 2 and many["kv_cache"] == 32 * one["kv_cache"]
    assert 0 < one["activations"] < one["kv_cache"]
    check_batch_fits(config, 32, seq, torch.bfloat16, 100e9)
    with pytest.raises(InputError, match=r"batch 32 needs ~\d+\.\d+ GB of GPU memory \(KV cache 6\.4\d GB"):
        check_batch_fits(config, 32, seq, torch.bfloat16, 4e9)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("name", ["graphed", "compiled"])
def test_graphed_batches_equal_each_frame_alone_on_cuda(tiny_checkpoint, name):
    """fp32: 3 frames (padded to the bucket of 4) through one graph give each frame's batch-1 tokens, from
    uint8 images on the host and from pixel_values on the device alike, and eager's tokens too."""
    policy = _policy(tiny_checkpoint, "cuda", torch.float32)
    eager = build_engine("eager", policy.model, max_batch=4)
    engine = build_engine(name, policy.model, max_batch=4)
    images, ids = _batch_inputs(policy, 3)
    tokens = _batch_matches_batch_one(engine, images, ids, 1e-2)
    assert torch.equal(tokens, eager.generate_batch(images, ids))
    host_images, host_ids = _batch_inputs(policy, 3, on_host=True)
    assert torch.equal(_batch_matches_batch_one(engine, host_images, host_ids, 1e-2), tokens)
    assert {key[0] for key in engine.graphs} == {1, 4}  # batch buckets, sharing one pool
    longest = max(i.shape[1] for i in ids)
    seconds, frames, positions = engine.time_prefill(3, longest)
    assert seconds > 0 and frames == 4 and positions == 256 + -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_compiled_quantised_batches_mostly_match_batch_one_on_cuda(tiny_checkpoint, fmt):
    """bf16, 8-bit prefill at any batch; at batch 1 the decode on the GEMV, at 4 on cuBLAS (weight-only)."""
    from rtloop.policy.kernels import KernelOptions

    policy = _policy(tiny_checkpoint, "cuda", torch.bfloat16)
    engine = build_engine(f"compiled+{fmt}", policy.model, max_batch=4)
    images, ids = _batch_inputs(policy, 4)
    tokens, logits = (t.clone() for t in engine.generate_batch_with_logits(images, ids))
    alone = [engine.generate_batch_with_logits(images[b : b + 1], [ids[b]]) for b in range(4)]
    alone_tokens, alone_logits = (torch.cat([a[i] for a in alone]) for i in (0, 1))
    # the same weights and activations in both: only the kernels (and their rounding) differ
    _agrees_where_decided(tokens, logits, alone_tokens, alone_logits, 0.03)
    if fmt == "fp8" and torch.cuda.get_device_capability() >= (9, 0):  # the RTX 4090's code paths, forced
        ada = build_engine("compiled+fp8", policy.model, max_batch=4, kernel_options=KernelOptions(arch="sm89"))
        assert ada.kernel_options.sm == 89 and not ada.kernel_options.pdl
        # per-tensor activation scales in the 8-bit prefill, where Hopper's are per row
        _agrees_where_decided(*ada.generate_batch_with_logits(images, ids), tokens, logits, QUANT_TOL["fp8"])
