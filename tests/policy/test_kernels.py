"""The compiled engine's kernels against plain torch. Without a GPU the Triton kernel runs in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest.py; numpy on the CPU): the same kernel source, the same indexing and masks, so
a wrong offset or a missing scale fails here; only speed needs the GPU (`rtloop bench`)."""

from __future__ import annotations

import pytest
import torch

from rtloop.policy import kernels
from rtloop.policy.ops import kernel_ops
from rtloop.policy.quant import quantize_, quantize_weight, weight_format

pytestmark = pytest.mark.skipif(not kernels.available(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                                reason="needs Triton (and CUDA, or TRITON_INTERPRET=1 as tests/conftest.py sets)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(y, ref, rel):
    err = (y.float() - ref.float()).abs().max()
    assert err <= rel * ref.float().abs().max(), f"max error {err:.4g} vs max {ref.abs().max():.4g}"


@pytest.mark.parametrize("variant", ["tile sums", "row sums", "widen by conversion"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])  # even tiles, and rows/columns that need masks
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "fp8"])
def test_gemv_matches_torch(fmt, shape, gated, variant):
    """Every way the GEMV can be built: accumulating whole tiles or row sums (ROW_SUMS, chosen by tile),
    int8 weights widened by bit arithmetic or by the conversion instruction."""
    if variant == "widen by conversion" and fmt != "int8":
        pytest.skip("only int8 has two ways")
    tile = [2, 128, 4, int(variant == "row sums")]
    int8_bits = variant != "widen by conversion"
    N, K = shape
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(1, 1, K, generator=g)
    w = torch.randn(N, K, generator=g)
    if fmt in ("int8", "fp8"):
        x = x.bfloat16()
        w, scale = quantize_weight(w.bfloat16(), fmt)
        scale = scale.to(DEVICE)
    else:
        dtype = getattr(torch, fmt)
        x, w, scale = x.to(dtype), w.to(dtype), None
    x, w = x.to(DEVICE), w.to(DEVICE)
    y = kernels.gemv(x, w, scale, gated, tile=tile, int8_bits=int8_bits)
    assert y.shape == (1, 1, N // 2 if gated else N) and y.dtype == x.dtype
    _close(y, kernels.gemv_reference(x, w, scale, gated), 1e-5 if fmt == "float32" else 2e-2)
    if not gated:  # and the reference is the matrix product it claims to be
        wf = w.float() * (1 if scale is None else scale.float()[:, None])
        _close(kernels.gemv_reference(x, w, scale, False), x.float() @ wf.t(), 1e-2)


@pytest.mark.parametrize("rows", [2, 5, 16, 32])
@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])  # even tiles, and rows/columns that need masks
@pytest.mark.parametrize("fmt", ["float32", "int8", "fp8"])
def test_few_rows_matmul_matches_torch(fmt, shape, rows):
    """A batch's decode on the kernel: every row against its own product, in the interpreter's tile (CPU) or
    two fixed ones, and once the autotuned one (GPU: its 32 configs compile per shape); more rows than the
    largest bucket are refused."""
    N, K = shape
    g = torch.Generator().manual_seed(N + K + rows)
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(N, K, generator=g)
    if fmt == "float32":
        scale = None
    else:
        x = x.bfloat16()
        w, scale = quantize_weight(w.bfloat16(), fmt)
        scale = scale.to(DEVICE)
    x, w = x.to(DEVICE), w.to(DEVICE)
    ref = x.float() @ (w.float() * (1 if scale is None else scale.float()[:, None])).t()
    tiles = [None]
    if DEVICE == "cuda":
        autotuned = fmt == "fp8" and shape == (40, 200) and rows == 5
        tiles = [list(kernels.FEW_ROWS_TILE), [64, 128, 4, 2]] + ([None] if autotuned else [])
    for tile in tiles:
        y = kernels.few_rows_matmul(x, w, scale, tile=tile)
        assert y.shape == (rows, N) and y.dtype == x.dtype
        _close(y, ref, 1e-5 if fmt == "float32" else 1e-2)
        for r in (0, rows - 1):  # no row reads another's activations
            _close(y[r], ref[r], 1e-5 if fmt == "float32" else 1e-2)
    with pytest.raises(ValueError, match="at most 32 rows, got 33"):
        kernels.few_rows_matmul(torch.zeros(33, K, device=DEVICE, dtype=x.dtype), w, scale)


def test_a_batch_of_frames_on_the_kernels_picks_each_frames_tokens(tiny_checkpoint):
    """The tiny model quantised to int8, two frames with one prompt: at batch 2 the decode linears run on
    `few_rows_matmul` (weight-only, as the batch-1 GEMV); against the plain torch ops on the same batch."""
    from rtloop.bench import DEFAULT_FRAMES, load_frames
    from rtloop.policy.processor import build_prompt, pixel_values, prepare_libero_image, tokenize_prompt

    policy = _tiny_policy(tiny_checkpoint)
    quantize_(policy.model, "int8")
    frames = load_frames(DEFAULT_FRAMES)[:2]
    ids = tokenize_prompt(policy.tokenizer, build_prompt(frames[0].instruction)).to(DEVICE).repeat(2, 1)
    pixels = torch.cat([pixel_values(prepare_libero_image(f.image), DEVICE, policy.dtype) for f in frames])
    options = kernels.DEFAULT_OPTIONS.resolve(torch.device(DEVICE))
    assert kernel_ops(options, batch=2).decode_linear.func.__name__ == "few_rows_linear"
    plain = policy.model.generate_action_tokens(pixels, ids)
    fast = policy.model.generate_action_tokens(pixels, ids, ops=kernel_ops(options, batch=2))
    assert not torch.equal(plain[0], plain[1])  # the frames differ: a mix-up would show
    # the prefill's activations are quantised too (int8_matmul, where the shapes fit): one flip a frame
    assert (plain == fast).float().mean() >= 6 / 7


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", [(64, 256), (40, 200)])
@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
def test_gemv_fuses_the_rmsnorm_before_and_the_residual_after(fmt, shape, gated):
    """(on a GPU a fixed tile, and the autotuned GEMV once: its ~40 tiles compile per flags, minutes for all;
    the interpreter's fixed tile on the CPU)"""
    from rtloop.policy.llama import RMSNorm

    N, K = shape
    g = torch.Generator().manual_seed(N * K)
    x = (3 * torch.randn(1, 1, K, generator=g)).bfloat16()  # far from unit RMS, so a missing norm shows
    w = torch.randn(N, K, generator=g).bfloat16()
    w, scale = quantize_weight(w, fmt) if fmt == "int8" else (w, None)
    norm = RMSNorm(K, eps=1e-5)
    norm.weight.data = (1 + torch.rand(K, generator=g)).bfloat16()
    residual = (10 * torch.randn(1, 1, N // 2 if gated else N, generator=g)).bfloat16()
    x, w, residual, norm = x.to(DEVICE), w.to(DEVICE), residual.to(DEVICE), norm.to(DEVICE)
    scale = None if scale is None else scale.to(DEVICE)

    autotuned = DEVICE != "cuda" or (fmt, shape, gated) == ("int8", (40, 200), True)
    tile = None if autotuned else [2, 128, 4, 0]
    fused = kernels.gemv(x, w, scale, gated, norm.weight, norm.eps, residual, tile=tile)
    unfused = residual + kernels.gemv(norm(x), w, scale, gated, tile=tile)  # the eager order: norm, linear, add
    _close(fused, unfused, 2e-2)
    _close(fused, kernels.gemv_reference(x, w, scale, gated, norm.weight, norm.eps, residual), 2e-2)
    _close(kernels.gemv(x, w, scale, gated, norm.weight, norm.eps), unfused - residual, 2e-2)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("pos", [0, 31, 32, 70, 95])  # one key; chunk edges; the last cache slot
def test_decode_attention_is_rope_cache_write_and_masked_sdpa(pos, n_kv_heads):
    import torch.nn.functional as F

    from rtloop.policy.config import LlamaArgs
    from rtloop.policy.llama import KVCache, rope_tables
    from rtloop.policy.ops import rotate_half

    n_heads, head_dim, max_seq_len = 4, 16, 96
    g = torch.Generator().manual_seed(pos)
    qkv = torch.randn(1, 1, (n_heads + 2 * n_kv_heads) * head_dim, generator=g).bfloat16().to(DEVICE)
    args = LlamaArgs(hidden_size=n_heads * head_dim, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=8)
    cos, sin = rope_tables(args, max_seq_len, DEVICE)
    input_pos = torch.tensor([pos], device=DEVICE)
    fused_cache, plain_cache = (KVCache(1, max_seq_len, n_kv_heads, head_dim, DEVICE, torch.bfloat16) for _ in "ab")
    scale = torch.tensor([3.0, 1.0]).view(2, 1, 1, 1, 1)  # peaked scores, unit values
    earlier = (scale * torch.randn(2, *fused_cache.k_cache.shape, generator=g)).bfloat16().to(DEVICE)
    for cache in (fused_cache, plain_cache):
        cache.k_cache.copy_(earlier[0])
        cache.v_cache.copy_(earlier[1])

    y = kernels.decode_attention(qkv, cos, sin, input_pos, fused_cache.k_cache, fused_cache.v_cache, n_heads)

    # unfused, in float32: RoPE at pos, the cache write, SDPA over positions 0..pos
    q, k, v = qkv.float().split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q, k, v = (t.view(1, 1, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    c, s = cos[pos], sin[pos]
    q = (q * c + rotate_half(q) * s).bfloat16()
    k = (k * c + rotate_half(k) * s).bfloat16()
    plain_cache.k_cache.index_copy_(2, input_pos, k)
    plain_cache.v_cache.index_copy_(2, input_pos, v.bfloat16())
    k_all, v_all = plain_cache.k_cache, plain_cache.v_cache
    group = n_heads // n_kv_heads
    mask = (torch.arange(max_seq_len, device=DEVICE) <= pos)[None, None, None]  # the causal mask's row `pos`
    ref = F.scaled_dot_product_attention(q.float(), k_all.float().repeat_interleave(group, 1),
                                         v_all.float().repeat_interleave(group, 1), attn_mask=mask)
    assert y.shape == (1, n_heads, 1, head_dim) and y.dtype == qkv.dtype
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    bf16 = dict(rtol=1e-2, atol=1e-2)  # one bf16 rounding apart at most (the GPU may fuse a multiply-add)
    torch.testing.assert_close(fused_cache.k_cache, plain_cache.k_cache, **bf16)
    assert torch.equal(fused_cache.v_cache, plain_cache.v_cache)
    assert torch.equal(fused_cache.k_cache[:, :, :pos], earlier[0][:, :, :pos])  # earlier positions survive
    assert torch.equal(fused_cache.k_cache[:, :, pos + 1 :], earlier[0][:, :, pos + 1 :])
    # the last chunk of each head combines, counted with atomics: the same answer every time (a race would
    # differ), and the counters back at zero for the next call
    for _ in range(100 if DEVICE == "cuda" else 1):
        again = kernels.decode_attention(qkv, cos, sin, input_pos, fused_cache.k_cache, fused_cache.v_cache, n_heads)
        assert torch.equal(again, y)
    assert not kernels._arrivals(qkv.device, n_heads).any()


@pytest.mark.parametrize("fmt, matmul, rel", [("int8", kernels.int8_matmul, 0.03), ("fp8", kernels.fp8_matmul, 0.08)])
def test_8bit_prefill_matmuls_approximate_the_float_product(fmt, matmul, rel):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 256, generator=g).bfloat16()
    w = torch.randn(64, 256, generator=g)
    q, scale = quantize_weight(w.bfloat16(), fmt)
    y = matmul(x.to(DEVICE), q.to(DEVICE), scale.to(DEVICE))
    assert y.shape == (32, 64) and y.dtype == torch.bfloat16
    _close(y.cpu(), x.float() @ w.t(), rel)



def test_prefill_split_takes_off_a_mostly_empty_last_row_of_tiles():
    assert kernels.prefill_split(288) == 256  # the LIBERO prefill: 256 patches + a 32-token prompt bucket
    assert kernels.prefill_split(272) == 256
    assert kernels.prefill_split(256) == 0  # whole tiles: nothing to gain
    assert kernels.prefill_split(352) == 0  # the last tile is more than half full: it pays its way
    assert kernels.prefill_split(100) == 0  # one row of tiles


def test_kernel_options_resolve_against_the_device():
    cpu = kernels.KernelOptions().resolve(torch.device("cpu"))
    assert cpu.sm is None and cpu.pdl is False and cpu.rowwise_fp8  # the CPU's _scaled_mm is row-wise
    with pytest.raises(ValueError, match="cannot be forced on a CPU"):
        kernels.KernelOptions(arch="sm89").resolve(torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown kernel architecture 'sm7'"):
        kernels.KernelOptions(arch="sm7").resolve(torch.device("cpu"))
    with pytest.raises(ValueError, match="PDL needs sm90"):
        kernels.KernelOptions(pdl=True).resolve(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (9, 0), reason="needs sm90+")
def test_the_sm89_code_paths_can_be_forced_on_hopper():
    hopper = kernels.KernelOptions().resolve(torch.device("cuda"))
    assert hopper.pdl and hopper.rowwise_fp8
    ada = kernels.KernelOptions(arch="sm89").resolve(torch.device("cuda"))
    assert ada.sm == 89 and not ada.pdl and not ada.rowwise_fp8
    assert not kernels.KernelOptions(pdl=False).resolve(torch.device("cuda")).pdl
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(48, 64, device="cuda", generator=g).bfloat16()
    w = torch.randn(32, 64, device="cuda", generator=g)
    q, scale = quantize_weight(w.bfloat16(), "fp8")
    _close(kernels.fp8_matmul(x, q, scale, ada).float(), x.float() @ w.t(), 0.08)  # one scale per tensor


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability() < (9, 0), reason="row-wise fp8 needs Hopper")
def test_fp8_prefill_matmul_whole_is_scaled_mm():
    """The unsplit path (row-wise fp8 runs on Hopper, and on the CPU since torch 2.13); the split needs CUDA
    streams (below)."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(48, 64, device=DEVICE, generator=g).bfloat16()
    q, scale = quantize_weight(torch.randn(32, 64, device=DEVICE, generator=g).bfloat16(), "fp8")
    x_scale = x.abs().amax(dim=-1, keepdim=True).float() / 448.0
    xq = (x.float() / x_scale).to(torch.float8_e4m3fn)
    y = kernels._scaled_mm(xq, q, x_scale, scale.float()[None, :], torch.bfloat16, 0)
    _close(y.cpu(), (x.float() @ (q.float() * scale.float()[:, None]).t()).cpu(), 0.08)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability() < (9, 0), reason="row-wise fp8 needs Hopper")
def test_split_fp8_prefill_matmul_equals_the_whole_one_also_in_a_graph():
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(288, 512, device="cuda", generator=g).bfloat16()
    q, scale = quantize_weight(torch.randn(384, 512, device="cuda", generator=g).bfloat16(), "fp8")
    x_scale = x.abs().amax(dim=-1, keepdim=True).float() / 448.0
    xq = (x.float() / x_scale).to(torch.float8_e4m3fn)
    args = (xq, q, x_scale, scale.float()[None, :], torch.bfloat16)
    whole = kernels._scaled_mm(*args, 0)
    split = kernels.prefill_fp8_matmul(*args, 256, False)  # untuned: split wherever it is told
    assert kernels.split_choices()[-1] == {"rows": 288, "k": 512, "n": 384, "dtype": "float8_e4m3fn", "split": 256}
    _close(split, whole, 0.01)  # cuBLAS may pick another kernel (accumulation order) for 32 rows
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.prefill_fp8_matmul(*args, 256, False)
    for _ in range(20):  # a missing join would let a replay read rows the side stream has not written
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, split)

def test_fused_weights_keep_the_checkpoint_names_both_ways():
    """[q; k; v] is one matrix in the model; state_dict() names its parts as the checkpoint does (views, not
    copies), and load_state_dict() of the parts fills it."""
    from rtloop.policy.config import LlamaArgs
    from rtloop.policy.llama import SelfAttention

    args = LlamaArgs(hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=8)
    attn = SelfAttention(args)
    state = attn.state_dict()
    assert list(state) == ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    assert [t.shape for t in state.values()][:3] == [(16, 16), (8, 16), (8, 16)]
    assert state["k_proj.weight"].data_ptr() == attn.qkv_proj.weight[16:].data_ptr()
    g = torch.Generator().manual_seed(2)
    parts = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    attn.load_state_dict(parts, strict=True)
    assert torch.equal(attn.qkv_proj.weight, torch.cat([parts["q_proj.weight"], parts["k_proj.weight"],
                                                        parts["v_proj.weight"]]))
    attn.qkv_proj.quantize_("int8")  # in place: the parts now carry 1-byte weights and their scales
    assert set(attn.state_dict()) == {"q_proj.weight", "q_proj.scale", "k_proj.weight", "k_proj.scale",
                                      "v_proj.weight", "v_proj.scale", "o_proj.weight"}
    assert attn.state_dict()["v_proj.scale"].shape == (8,)


def _tiny_policy(checkpoint):
    from rtloop.policy.openvla import OpenVLAPolicy

    return OpenVLAPolicy(checkpoint, device=DEVICE)


@pytest.mark.parametrize("fmt", ["none", "int8"])
def test_llama_on_the_kernels_picks_the_same_tokens(tiny_checkpoint, fmt):
    """The whole tiny model, decode steps through `gemv` (and int8 prefill through int8_matmul) vs plain torch."""
    from rtloop.bench import DEFAULT_FRAMES, load_frames
    from rtloop.policy.processor import build_prompt, pixel_values, prepare_libero_image, tokenize_prompt

    policy = _tiny_policy(tiny_checkpoint)
    if fmt != "none":
        quantize_(policy.model, fmt)
        assert weight_format(policy.model) == fmt
    frame = load_frames(DEFAULT_FRAMES)[0]
    ids = tokenize_prompt(policy.tokenizer, build_prompt(frame.instruction)).to(DEVICE)
    pixels = pixel_values(prepare_libero_image(frame.image), DEVICE, policy.dtype)
    plain = policy.model.generate_action_tokens(pixels, ids)
    ops = kernel_ops(kernels.DEFAULT_OPTIONS.resolve(torch.device(DEVICE)), batch=1)
    fast = policy.model.generate_action_tokens(pixels, ids, ops=ops)
    if fmt == "none":
        assert torch.equal(plain, fast)
    else:  # the prefill's activations are quantised too: allow one flipped token of seven
        assert (plain == fast).float().mean() >= 6 / 7
