"""Llama decoder in the Hugging Face weight layout, with a static KV cache (after gpt-fast).

Keys: `model.embed_tokens`, `model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`model.layers.N.{input,post_attention}_layernorm`, `model.norm`, `lm_head`. RoPE is Hugging Face's
`rotate_half` form (the checkpoint's q/k weights are permuted for it).

Every call has fixed shapes for a given (batch, tokens) and no data-dependent Python control flow: the
cache is written with `index_copy_` at `input_pos` and the causal mask is a precomputed bool buffer indexed
by `input_pos`, so a decode step can be captured in a CUDA graph (a prefill from position 0 needs no mask:
causal attention over its own tokens). `setup_caches` must run before `forward`. With `set_kernels(True)`
a one-token step runs on rtloop.policy.kernels: each norm and residual add inside a GEMV, and RoPE, the
cache write and the attention in one more kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtloop.policy import kernels
from rtloop.policy.config import LlamaArgs
from rtloop.policy.linear import FusedLinear


class KVCache(nn.Module):
    def __init__(self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, device, dtype):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, D] at positions input_pos [T]; return the whole cache [B, H, S, D]."""
        k_cache, v_cache = self.k_cache[: k.shape[0]], self.v_cache[: k.shape[0]]
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        return k_cache, v_cache


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.hidden_size, bias=False)
        self.qkv: FusedLinear | None = None  # [q; k; v] and o_proj as run: see Llama.fuse_linears
        self.out: FusedLinear | None = None
        self.kv_cache: KVCache | None = None

    def forward(self, x, norm, cos, sin, mask, input_pos, rows=None):
        """The residual stream x [B, T, D] -> x + attention(norm(x)); with `rows` [R], only those positions
        of it, [B, R, D] (every position's key and value still go into the cache)."""
        B, T, _ = x.shape
        qkv, cache = self.qkv(x, norm=norm), self.kv_cache
        if self.qkv.use_kernels and B * T == 1:  # a decode step on rtloop.policy.kernels: cos/sin are the tables
            y = kernels.decode_attention(qkv, cos, sin, input_pos, cache.k_cache, cache.v_cache, self.n_heads)
        else:
            y = self._attention(qkv, cos, sin, mask, input_pos)
        y = y.transpose(1, 2).reshape(B, T, -1)
        if rows is not None:
            y, x = y.index_select(1, rows), x.index_select(1, rows)
        return self.out(y, residual=x)

    def _attention(self, qkv, cos, sin, mask, input_pos) -> torch.Tensor:
        """[q; k; v] [B, T, *] -> attention output [B, H, T, D], writing k and v into the cache."""
        B, T, _ = qkv.shape
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = self.kv_cache.update(input_pos, k, v)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        if mask is None:  # a prefill from position 0: causal over the T cached positions, no mask (FlashAttention)
            return F.scaled_dot_product_attention(q, k[:, :, :T], v[:, :, :T], is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FeedForward(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)
        self.gate_up: FusedLinear | None = None  # silu(gate) * up in one pass, and down_proj, as run
        self.down: FusedLinear | None = None

    def forward(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """The residual stream x -> x + mlp(norm(x))."""
        return self.down(self.gate_up(x, norm=norm), residual=x)


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = SelfAttention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin, mask, input_pos, rows=None):
        # pre-norm blocks; each norm is handed to the linear it feeds, which may fuse it (FusedLinear)
        x = self.self_attn(x, self.input_layernorm, cos, sin, mask, input_pos, rows)
        return self.mlp(x, self.post_attention_layernorm)


class LlamaDecoder(nn.Module):
    """`language_model.model`: embeddings, layers, final norm."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(args) for _ in range(args.num_hidden_layers)])
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Llama(nn.Module):
    """`language_model`: the decoder plus `lm_head`."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = LlamaDecoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.head: FusedLinear | None = None  # lm_head as run
        self.use_kernels = False
        self.max_batch = 0
        self.max_seq_len = 0

    def fuse_linears(self) -> None:
        """(Re)build the FusedLinears the forward runs: [q; k; v], o, [gate; up] (gated), down, lm_head.
        Idempotent; rebuilds only those whose named modules changed (e.g. quantised)."""

        def fused(current, parts, gated=False):
            if current is not None and current.is_built_from(parts):
                current.use_kernels = self.use_kernels
                return current
            return FusedLinear(parts, gated, self.use_kernels)

        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            attn.qkv = fused(attn.qkv, [attn.q_proj, attn.k_proj, attn.v_proj])
            attn.out = fused(attn.out, [attn.o_proj])
            mlp.gate_up = fused(mlp.gate_up, [mlp.gate_proj, mlp.up_proj], gated=True)
            mlp.down = fused(mlp.down, [mlp.down_proj])
        self.head = fused(self.head, [self.lm_head])

    def set_kernels(self, enabled: bool) -> None:
        """Run one-row (decode) linears and quantised prefills on rtloop.policy.kernels (CUDA + Triton)."""
        self.use_kernels = enabled
        self.fuse_linears()

    def setup_caches(self, max_batch: int, max_seq_len: int, device=None, dtype=None) -> None:
        """Allocate the KV caches, the causal mask and the RoPE tables (defaults: the weights' device/dtype),
        and fuse the linears (see `fuse_linears`)."""
        self.fuse_linears()
        weight = self.model.norm.weight  # never quantised, unlike lm_head
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

    def hidden_states(
        self, inputs_embeds: torch.Tensor, input_pos: torch.Tensor | None = None, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """inputs_embeds [B, T, D] at positions input_pos [T] -> the last layer's output [B, T, D], before the
        final norm (`logits` applies it). input_pos None: a prefill, positions 0 .. T-1. `rows` [R]: return
        only those positions, [B, R, D]: the last layer then runs its attention's output projection and its
        MLP on R rows instead of T (a prefill needs one row's logits: a quarter of a layer's matmuls saved)."""
        x = inputs_embeds
        prefill = input_pos is None
        if prefill:
            input_pos = torch.arange(x.shape[1], device=x.device)
        if self.use_kernels and x.shape[0] * x.shape[1] == 1:  # the decode kernel indexes the fp32 tables itself
            cos, sin = self.rope_cos, self.rope_sin
        else:
            cos = self.rope_cos[input_pos].to(x.dtype)  # [T, head_dim], broadcast over batch and heads
            sin = self.rope_sin[input_pos].to(x.dtype)
        mask = None if prefill else self.causal_mask[None, None, input_pos]  # [1, 1, T, max_seq_len]
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, input_pos, rows if i == last else None)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden_states` output [B, T, D] -> logits [B, T, vocab] (final norm fused into lm_head's GEMV)."""
        return self.head(hidden, norm=self.model.norm)

    def forward(
        self,
        input_pos: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [B, T] or embeddings [B, T, D] at positions input_pos [T] -> logits [B, T, vocab]."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        return self.logits(self.hidden_states(inputs_embeds, input_pos))
