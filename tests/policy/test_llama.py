"""Our Llama vs transformers' LlamaForCausalLM on the same random weights (fp32, CPU).

Tolerance: logits agree to 1e-4 absolute (they are O(1); observed max difference 2.6e-6, float32 rounding
of differently ordered reductions). Greedy tokens must be identical.
"""

import pytest
import torch

from rtloop.policy.config import LlamaArgs
from rtloop.policy.llama import Llama

transformers = pytest.importorskip("transformers")
from hf_llama import hf_twin  # noqa: E402  (needs transformers)

ATOL = 1e-4
# GQA (2 kv heads for 4 query heads) so the repeat path is exercised too; the 7B model has none.
ARGS = LlamaArgs(vocab_size=32064, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=172, rms_norm_eps=1e-6, rope_theta=10000.0,
                 max_position_embeddings=2048)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ours = Llama(ARGS)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:  # random norm weights, so a layout mix-up cannot hide behind ones
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return ours.eval(), hf_twin(ours)


def _prompt(batch=1, length=20, seed=1):
    return torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_prompt_logits_match(pair):
    ours, hf = pair
    ids = _prompt(batch=2)
    ours.setup_caches(2, 64)
    got = ours.prefill(ours.embed(ids))
    want = hf(input_ids=ids).logits
    assert got.shape == want.shape == (2, 20, 32064)
    assert (got - want).abs().max().item() < ATOL


@torch.no_grad()
def test_inputs_embeds_path_matches(pair):
    ours, hf = pair
    embeds = torch.randn(1, 12, ARGS.hidden_size, generator=torch.Generator().manual_seed(2))
    ours.setup_caches(1, 32)
    got = ours.prefill(embeds)
    want = hf(inputs_embeds=embeds).logits
    assert (got - want).abs().max().item() < ATOL


@torch.no_grad()
def test_greedy_with_static_cache_matches_hf_full_forward(pair):
    ours, hf = pair
    ids = _prompt(length=17, seed=3)
    T, n = ids.shape[1], 7

    # HF: a full forward over the growing sequence each step, no cache at all
    seq = ids
    want_tokens, want_logits = [], []
    for _ in range(n):
        logits = hf(input_ids=seq, use_cache=False).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        want_tokens.append(token)
        want_logits.append(logits)
        seq = torch.cat([seq, token], dim=1)

    # ours: one prefill, then one token per step through the static cache (sized larger than needed)
    ours.setup_caches(1, 128)
    logits = ours.prefill(ours.embed(ids))[:, -1]
    got_tokens, got_logits = [logits.argmax(-1, keepdim=True)], [logits]
    input_pos = torch.tensor([T])
    for _ in range(n - 1):
        logits = ours.decode(ours.embed(got_tokens[-1]), input_pos)
        got_tokens.append(logits.argmax(-1, keepdim=True))
        got_logits.append(logits)
        input_pos += 1

    assert torch.equal(torch.cat(got_tokens, 1), torch.cat(want_tokens, 1))
    for g, w in zip(got_logits, want_logits):
        assert (g - w).abs().max().item() < ATOL


@torch.no_grad()
def test_stale_cache_entries_are_masked(pair):
    """A second, shorter prompt reuses the cache written by a longer one: positions past it must not leak."""
    ours, hf = pair
    ours.setup_caches(1, 64)
    ours.prefill(ours.embed(_prompt(length=40, seed=4)))
    ids = _prompt(length=10, seed=5)
    got = ours.prefill(ours.embed(ids))
    assert (got - hf(input_ids=ids).logits).abs().max().item() < ATOL
    # and a decode step after it attends to positions 0..10 only, not to what the long prompt left at 11..39
    token = got[:, -1].argmax(-1, keepdim=True)
    step = ours.decode(ours.embed(token), torch.tensor([10]))
    want = hf(input_ids=torch.cat([ids, token], dim=1)).logits[:, -1]
    assert (step - want).abs().max().item() < ATOL


@torch.no_grad()
def test_a_batch_of_prompts_of_different_lengths_is_each_prompt_alone(pair):
    """Right-padded to one length, each frame with its own last position (prefill) and its own positions
    (decode): every frame's logits are those of its prompt alone, step after step."""
    ours, hf = pair
    prompts = [_prompt(length=n, seed=10 + n)[0] for n in (9, 17, 13)]
    ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=0)
    lengths = torch.tensor([len(p) for p in prompts])
    ours.setup_caches(3, 64)
    logits = ours.prefill(ours.embed(ids), last=lengths - 1)[:, 0]
    seqs = [p[None] for p in prompts]
    for step in range(4):
        for b, seq in enumerate(seqs):
            assert (logits[b] - hf(input_ids=seq).logits[0, -1]).abs().max().item() < ATOL
        token = logits.argmax(-1, keepdim=True)
        seqs = [torch.cat([seq, token[b : b + 1]], dim=1) for b, seq in enumerate(seqs)]
        logits = ours.decode(ours.embed(token), lengths + step)
