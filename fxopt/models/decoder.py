"""A Llama-architecture decoder with its own static KV cache, for batch-1 autoregressive decoding (issue 19).

One decode step is ``forward(ids [B, 1], pos [1]) -> logits [B, vocab]``: the position is a tensor, the cache a set
of fixed-shape buffers written in place with ``index_copy_`` at ``pos``, and nothing in the step reads a tensor's
value on the host. So torch.fx and torch.export capture it whole, and one CUDA graph replays every step.

>>> from fxopt.models.decoder import Decoder, PRESETS, greedy_generate
>>> step = Decoder(PRESETS["small"]).eval()
>>> tokens = greedy_generate(step, torch.tensor([[1]]), start_pos=0, n=8)

``transformers_step`` builds the same architecture from transformers' LlamaForCausalLM with an allocated
StaticCache, the way users write it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int = 1024
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mlp: int = 512
    max_seq_len: int = 256
    batch: int = 1  # the KV buffers' batch dimension: fixed, as their sequence dimension is
    rope_theta: float = 10000.0
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, DecoderConfig] = {
    "small": DecoderConfig(),
    # GPT-2 small's width and depth (about 110M parameters with this vocabulary), Llama's layer layout
    "gpt2_small_size": DecoderConfig(vocab_size=32000, hidden=768, layers=12, heads=12, kv_heads=4, mlp=2048),
}


def preset(name: str, **overrides) -> DecoderConfig:
    try:
        return replace(PRESETS[name], **overrides)
    except KeyError:
        raise KeyError(f"no decoder preset named {name!r}; known: {', '.join(PRESETS)}") from None


class RMSNorm(nn.Module):
    """Llama's RMSNorm: computed in float32, scaled in the input's dtype (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention over this layer's KV buffers.

    With one query token, the ``heads // kv_heads`` query heads that share a KV head are laid out as that KV head's
    query rows: q [B, kv_heads, group, head_dim] attends to the cache [B, kv_heads, max_seq, head_dim] directly, so
    the cache is never repeated per query head (transformers' repeat_kv copies it on every step), and the mask
    (one row over key positions) is the same for every row.
    """

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        shape = (cfg.batch, cfg.kv_heads, cfg.max_seq_len, cfg.head_dim)
        # state, not weights: left out of state_dict, written in place by every step
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x, pos, cos, sin, mask):
        b = x.shape[0]
        q = self.q_proj(x).view(b, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, self.kv_heads, 1, self.head_dim)
        v = self.v_proj(x).view(b, self.kv_heads, 1, self.head_dim)
        q = q * cos + rotate_half(q) * sin  # cos, sin: [1, head_dim], the rows at pos
        k = k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        q = q.view(b, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        return self.o_proj(out.reshape(b, 1, self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.eps)
        self.gate_proj = nn.Linear(cfg.hidden, cfg.mlp, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.mlp, bias=False)
        self.down_proj = nn.Linear(cfg.mlp, cfg.hidden, bias=False)

    def forward(self, x, pos, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), pos, cos, sin, mask)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))  # SwiGLU


class Decoder(nn.Module):
    """A causal LM whose ``forward`` is one decode step: ``ids`` [B, 1] int64 at position ``pos`` [1] int64 ->
    the logits of that token [B, vocab]; its keys and values go into the KV buffers at ``pos``."""

    def __init__(self, cfg: DecoderConfig = PRESETS["small"]):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        # rotary tables as Llama computes them (float32, then the model's dtype), one row per position
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
        freqs = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.register_buffer("positions", torch.arange(cfg.max_seq_len), persistent=False)

    def forward(self, ids, pos):
        x = self.embed_tokens(ids)  # [B, 1, hidden]
        cos = self.rope_cos.index_select(0, pos)  # [1, head_dim]
        sin = self.rope_sin.index_select(0, pos)
        mask = (self.positions <= pos).view(1, 1, 1, -1)  # bool over key positions: those written, this step's too
        for layer in self.layers:
            x = layer(x, pos, cos, sin, mask)
        return self.lm_head(self.norm(x))[:, -1]

    @torch.no_grad()
    def reset_cache(self) -> None:
        for layer in self.layers:
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()

    def kv_buffers(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in (layer.self_attn.k_cache, layer.self_attn.v_cache)]


def prefill(step: Callable, ids: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Write a prompt ``ids`` [B, T] into ``step``'s cache one token at a time through the decode step itself, so one
    captured graph (and one CUDA graph) serves prefill and decode; returns the last token's logits [B, vocab]. A
    one-pass prefill would be faster for long prompts but is a second graph with another shape."""
    logits = None
    positions = torch.arange(start_pos, start_pos + ids.shape[1], device=ids.device)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            logits = step(ids[:, t:t + 1], positions[t:t + 1])
    return logits


def greedy_generate(step: Callable, first_ids: torch.Tensor, start_pos: int, n: int,
                    logits_out: list | None = None) -> list[int]:
    """The ``n`` tokens greedy decoding produces from ``first_ids`` [1, 1] at position ``start_pos``, with any
    callable ``step(ids, pos) -> logits`` (eager, torch.compile'd, fxopt's). Tokens stay on the device until the
    end: one host sync per call, not per token. ``logits_out`` collects a copy of every step's logits."""
    assert first_ids.shape == (1, 1), f"batch-1 decoding: first_ids must be [1, 1], got {list(first_ids.shape)}"
    positions = torch.arange(start_pos, start_pos + n, device=first_ids.device)
    ids, tokens = first_ids, []
    with torch.no_grad():
        for t in range(n):
            logits = step(ids, positions[t:t + 1])
            if logits_out is not None:
                logits_out.append(logits.float().clone())  # a graph's output buffer is overwritten by the next step
            ids = logits.argmax(-1, keepdim=True)
            tokens.append(ids)
    return torch.cat(tokens, 1).view(-1).tolist()


# -- the same architecture through transformers -------------------------------------------------------------------
class TransformersStep(nn.Module):
    """One decode step of a transformers causal LM: the cache is a Python object on the module, written in place."""

    def __init__(self, model: nn.Module, cache):
        super().__init__()
        self.model, self.cache = model, cache
        # transformers 5.25 names it cache (past_key_values warns on every call); older versions past_key_values
        self.cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, ids, pos):
        # transformers 5.25 ignores cache_position: a StaticCache counts its own length (cumulative_length), so
        # ``pos`` must be where the cache is (reset_cache() between prompts)
        out = self.model(input_ids=ids, cache_position=pos, use_cache=True, **{self.cache_kwarg: self.cache})
        return out.logits[:, -1]

    def kv_buffers(self) -> list[torch.Tensor]:
        return [t for layer in self.cache.layers for t in (layer.keys, layer.values)]

    def reset_cache(self) -> None:
        self.cache.reset()  # in place: the tensors a captured graph (or a CUDA graph) writes stay the same


def llama_config(cfg: DecoderConfig):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.mlp, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.eps, rope_theta=cfg.rope_theta, attn_implementation="sdpa")


def transformers_step(config_preset: str | DecoderConfig = "small", dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", max_cache_len: int | None = None,
                      seed: int = 0) -> TransformersStep:
    """A decode step over ``LlamaForCausalLM`` with random weights (seeded) and a StaticCache allocated up front
    (``early_initialization``): fxopt optimizes a step whose cache exists; a lazily allocated one runs unoptimized."""
    import transformers

    cfg = preset(config_preset) if isinstance(config_preset, str) else config_preset
    max_cache_len = max_cache_len or cfg.max_seq_len
    config = llama_config(cfg)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval().to(device=device, dtype=dtype)
    cache = transformers.StaticCache(config=config, max_cache_len=max_cache_len)
    cache.early_initialization(batch_size=cfg.batch, num_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype=dtype,
                               device=torch.device(device))
    return TransformersStep(model, cache).eval()


def decoder(config_preset: str | DecoderConfig = "small", dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu", seed: int = 0) -> Decoder:
    """The plain decoder with random weights (seeded), in eval mode on ``device`` in ``dtype``."""
    cfg = preset(config_preset) if isinstance(config_preset, str) else config_preset
    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(cfg)
    for p in model.parameters():  # GPT-2's initialization of every matrix: logits of a sensible size at any depth
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    for block in model.layers:  # residual projections scaled down with depth, as GPT-2 does
        for w in (block.self_attn.o_proj.weight, block.down_proj.weight):
            nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.layers))
    return model.eval().to(dtype=dtype)


def build_step(model: str, config_preset: str, dtype: torch.dtype, device: str | torch.device,
               seed: int = 0) -> nn.Module:
    """``model``: "plain" (:class:`Decoder`) or "transformers" (:func:`transformers_step`)."""
    if model == "plain":
        return decoder(config_preset, dtype, device, seed)
    if model == "transformers":
        return transformers_step(config_preset, dtype, device, seed=seed)
    raise ValueError(f"model must be 'plain' or 'transformers', got {model!r}")
