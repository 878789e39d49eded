"""Llama decoder in the Hugging Face weight layout, with a static KV cache (after gpt-fast).

Keys: `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`model.layers.N.{input,post_attention}_layernorm`, `model.norm`, `lm_head`. RoPE is Hugging Face's
`rotate_half` form (the checkpoint's q/k weights are permuted for it). [q; k; v] and [gate; up] are held
fused, one copy each, under the checkpoint's names in `state_dict()` (rtloop.policy.linear).

Two forwards, each written once: `prefill` (a batch of prompts from position 0, causal attention over their
own tokens, no mask) and `decode` (one token per frame, each frame at its own position, attending to its
cache through the causal-mask row of that position). Both take the engine's `Ops` (rtloop.policy.ops),
which say how the linears and the decode attention run; plain PyTorch by default. Fixed shapes for a given
(batch, tokens) and no data-dependent Python control flow, so both can be captured in CUDA graphs.
`setup_caches` must run first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtloop.policy.config import LlamaArgs
from rtloop.policy.linear import Linear, fuse_parts
from rtloop.policy.ops import TORCH_OPS, Ops, repeat_kv, rotate_half, split_heads


class KVCache(nn.Module):
    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(args: LlamaArgs, max_seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] in fp32, laid out for rotate_half (the frequencies repeated twice)."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class SelfAttention(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        q_rows, kv_rows = self.n_heads * args.head_dim, self.n_kv_heads * args.head_dim
        self.qkv_proj = Linear(args.hidden_size, q_rows + 2 * kv_rows)
        self.o_proj = Linear(q_rows, args.hidden_size)
        fuse_parts(self, "qkv_proj", {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows})
        self.kv_cache: KVCache | None = None

    def prefill(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[q; k; v] [B, T, *] of positions 0 .. T-1 -> attention output [B, T, H * D]; k and v go into the
        cache. Causal over the T positions alone, so no mask (FlashAttention), and whatever a longer earlier
        prompt left in the cache past T is never read."""
        B, T, _ = qkv.shape
        q, k, v = split_heads(qkv, self.n_heads, self.n_kv_heads)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache = self.kv_cache
        cache.k_cache[:B, :, :T] = k
        cache.v_cache[:B, :, :T] = v
        k, v = repeat_kv(cache.k_cache[:B, :, :T], cache.v_cache[:B, :, :T], self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(B, T, -1)


class FeedForward(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_up_proj = Linear(args.hidden_size, 2 * args.intermediate_size)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size)
        fuse_parts(self, "gate_up_proj", {"gate_proj": args.intermediate_size, "up_proj": args.intermediate_size})


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = SelfAttention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args)

    def mlp_block(self, linear, x: torch.Tensor) -> torch.Tensor:
        """The residual stream x -> x + down(silu(gate(norm(x))) * up(norm(x))), the norm and the residual
        handed to the linears (which may fuse them)."""
        h = linear(x, self.mlp.gate_up_proj, norm=self.post_attention_layernorm, gated=True)
        return linear(h, self.mlp.down_proj, residual=x)


class LlamaDecoder(nn.Module):
    """`language_model.model`: embeddings, layers, final norm."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(args) for _ in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], rows [B] -> [B, 1, D]: position rows[b] of frame b."""
    return x.gather(1, rows.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))


class Llama(nn.Module):
    """`language_model`: the decoder plus `lm_head`."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = LlamaDecoder(args)
        self.lm_head = Linear(args.hidden_size, args.vocab_size)
        self.max_batch = 0
        self.max_seq_len = 0

    def setup_caches(self, max_batch: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Allocate the KV caches, the causal mask and the RoPE tables (defaults: the weights' device/dtype)."""
        weight = self.model.norm.weight  # never quantised, unlike the linears
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        a = self.args
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch, max_seq_len, a.num_key_value_heads, a.head_dim, device, dtype)
        mask = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device))
        self.register_buffer("causal_mask", mask, persistent=False)
        cos, sin = rope_tables(a, max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def prefill(self, x: torch.Tensor, last: torch.Tensor | None = None, ops: Ops = TORCH_OPS) -> torch.Tensor:
        """Embeddings x [B, T, D] at positions 0 .. T-1 -> logits [B, T, vocab]; with `last` [B], only the
        logits of position last[b] of frame b, [B, 1, vocab]: the last layer then runs its attention's
        output projection and its MLP on that one row per frame (as `ops.decode_linear`, a decode step's
        shape), which saves a quarter of a layer's matmuls. Every position's key and value go into the cache."""
        T = x.shape[1]
        cos = self.rope_cos[:T].to(x.dtype)  # [T, head_dim], broadcast over batch and heads
        sin = self.rope_sin[:T].to(x.dtype)
        layers = self.model.layers
        linear = ops.prefill_linear
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            y = attn.prefill(linear(x, attn.qkv_proj, norm=layer.input_layernorm), cos, sin)
            if last is not None and i == len(layers) - 1:
                y, x, linear = take_rows(y, last), take_rows(x, last), ops.decode_linear
            x = layer.mlp_block(linear, linear(y, attn.o_proj, residual=x))
        return linear(x, self.lm_head, norm=self.model.norm)

    def decode(self, x: torch.Tensor, input_pos: torch.Tensor, ops: Ops = TORCH_OPS) -> torch.Tensor:
        """One token's embedding per frame x [B, 1, D], frame b at position input_pos[b] -> logits [B, vocab]."""
        B = x.shape[0]
        linear = ops.decode_linear
        for layer in self.model.layers:
            attn = layer.self_attn
            qkv = linear(x, attn.qkv_proj, norm=layer.input_layernorm)
            y = ops.decode_attention(qkv, input_pos, attn.kv_cache, attn.n_heads, self.rope_cos, self.rope_sin,
                                     self.causal_mask)
            x = layer.mlp_block(linear, linear(y.transpose(1, 2).reshape(B, 1, -1), attn.o_proj, residual=x))
        return linear(x, self.lm_head, norm=self.model.norm)[:, 0]
