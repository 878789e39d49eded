"""The assembled OpenVLA on a random tiny model: key names, patch splicing after BOS, greedy decoding through
the static cache against transformers' Llama run without any cache, batching, and the 7B layout on meta."""

import pytest
import torch

from rtloop.policy.checkpoint import build_meta_model, build_random_model, count_parameters

transformers = pytest.importorskip("transformers")
from hf_llama import hf_twin  # noqa: E402  (needs transformers)

PROMPT = torch.tensor([[1, 512, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 29973, 13, 3744, 29901, 29871]])


def _pixels(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 6, 224, 224, generator=torch.Generator().manual_seed(seed))


def _is_action(tokens: torch.Tensor) -> bool:
    return bool(((tokens >= 31744) & (tokens <= 31999)).all())


@pytest.fixture(scope="module")
def model():
    return build_random_model("tiny", "cpu", torch.float32, seed=0)




@torch.no_grad()
def test_generate_matches_hf_llama_on_spliced_embeddings(model):
    """Official splice: [BOS, 256 patch embeddings, rest of prompt]; HF runs the full sequence each step."""
    pixels = _pixels(1)
    tokens = model.generate_action_tokens(pixels, PROMPT, n_tokens=7)
    assert tokens.shape == (1, 7) and tokens.dtype == torch.long

    hf = hf_twin(model.language_model)
    embed = hf.get_input_embeddings()
    patches = model.embed_images(pixels)
    assert patches.shape == (1, 256, 64)
    x = torch.cat([embed(PROMPT[:, :1]), patches, embed(PROMPT[:, 1:])], dim=1)
    want = []
    for _ in range(7):
        token = hf(inputs_embeds=x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        want.append(token)
        x = torch.cat([x, embed(token)], dim=1)
    assert torch.equal(tokens, torch.cat(want, dim=1))


@torch.no_grad()
def test_prefill_logits_depend_on_the_image_through_the_splice(model):
    model.setup_caches(1, 320)
    last = torch.tensor([PROMPT.shape[1] + 255])
    a = model.prefill(PROMPT, model.embed_images(_pixels(2)), last)
    b = model.prefill(PROMPT, model.embed_images(_pixels(3)), last)
    assert a.shape == (1, 32064)
    assert not torch.allclose(a, b)


@torch.no_grad()
def test_prefill_of_some_rows_is_those_rows_of_the_full_prefill(model):
    """`rows` cuts the last layer's work to the positions asked for; nothing else may change, the cache
    included (the decode steps read every position's key and value)."""
    lm = model.language_model
    lm.setup_caches(2, 64)
    x = torch.randn(2, 20, lm.args.hidden_size, generator=torch.Generator().manual_seed(3))
    full = lm.prefill(x)
    cache = lm.model.layers[-1].self_attn.kv_cache
    keys = cache.k_cache.clone()
    rows = torch.tensor([7, 19])  # frame 0's position 7, frame 1's position 19
    torch.testing.assert_close(lm.prefill(x, last=rows)[:, 0], full[torch.arange(2), rows])
    assert torch.equal(cache.k_cache, keys)


@torch.no_grad()
def test_batch_of_two_equals_two_single_runs(model):
    pixels = _pixels(4, batch=2)
    prompts = PROMPT.repeat(2, 1)
    both = model.generate_action_tokens(pixels, prompts)
    for i in range(2):
        assert torch.equal(both[i : i + 1], model.generate_action_tokens(pixels[i : i + 1], PROMPT))


@torch.no_grad()
def test_random_tiny_model_emits_image_dependent_action_tokens(model):
    """A property of the generated tiny checkpoint (lm_head favours action ids), relied on by policy tests."""
    runs = [model.generate_action_tokens(_pixels(10 + i), PROMPT) for i in range(4)]
    assert all(_is_action(t) for t in runs)
    assert len({tuple(t[0].tolist()) for t in runs}) > 1


@torch.no_grad()
def test_cache_is_reused_and_results_are_repeatable(model):
    pixels = _pixels(5)
    first = model.generate_action_tokens(pixels, PROMPT)
    cache = model.language_model.model.layers[0].self_attn.kv_cache.k_cache
    again = model.generate_action_tokens(pixels, PROMPT)
    assert torch.equal(first, again)
    assert model.language_model.model.layers[0].self_attn.kv_cache.k_cache is cache


def test_7b_layout_on_meta():
    model = build_meta_model("7b", torch.bfloat16, seed=0)
    state = model.state_dict()
    assert count_parameters(model) == 7_541_237_184
    assert state["projector.fc1.weight"].shape == (8704, 2176)
    assert state["projector.fc2.weight"].shape == (4096, 8704)
    assert state["projector.fc3.weight"].shape == (4096, 4096)
    assert state["language_model.model.embed_tokens.weight"].shape == (32064, 4096)
    assert state["language_model.lm_head.weight"].shape == (32064, 4096)
    assert state["language_model.model.layers.31.mlp.down_proj.weight"].shape == (4096, 11008)
    assert "vision_backbone.featurizer.blocks.23.ls2.scale_factor" in state
    assert "vision_backbone.fused_featurizer.attn_pool.latent" in state
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in state}
    assert prefixes == {"vision_backbone.featurizer", "vision_backbone.fused_featurizer", "projector.fc1",
                        "projector.fc2", "projector.fc3", "language_model.model", "language_model.lm_head"}


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_decode_step_replays_in_a_cuda_graph():
    """decode has static shapes and no host syncs: capture it once, replay it at later positions."""
    model = build_random_model("tiny", "cuda", torch.float32, seed=0)
    pixels, prompt = _pixels(6).cuda(), PROMPT.cuda()
    want = model.generate_action_tokens(pixels, prompt)  # eager reference; also sizes the cache

    model.prefill(prompt, model.embed_images(pixels), torch.tensor([prompt.shape[1] + 255], device="cuda"))
    token = want[:, :1].clone()
    input_pos = torch.tensor([prompt.shape[1] + 256], device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as CUDA graph capture requires
        model.decode(token, input_pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.decode(token, input_pos)
    got = [want[0, 0].item()]
    for i in range(1, 7):
        token.copy_(want[:, i - 1 : i])
        graph.replay()
        got.append(logits.argmax(-1).item())
        input_pos += 1
    assert got == want[0].tolist()


@gpu
@pytest.mark.gpu
@torch.no_grad()
def test_7b_random_model_builds_on_gpu_in_bf16():
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # what earlier tests in this process still hold
    model = build_random_model("7b", "cuda", torch.bfloat16, seed=0)
    assert torch.cuda.max_memory_allocated() - before < 15.5e9  # 7.54e9 bf16 parameters, no fp32 or CPU copy
    pixels, prompt = _pixels(7).cuda(), PROMPT.cuda()
    model.setup_caches(1, 320)
    logits = model.prefill(prompt, model.embed_images(pixels), torch.tensor([prompt.shape[1] + 255], device="cuda"))
    assert torch.isfinite(logits.float()).all()
    tokens = model.generate_action_tokens(pixels, prompt)
    assert tokens.shape == (1, 7)
