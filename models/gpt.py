"""A small decoder-only transformer (pre-norm, causal SDPA attention, KV-cache decoding), in the manner of nanoGPT.

The model knows nothing of training, Hydra, W&B or fitting: a config, a shape helper, parameter and FLOP counts, and
a forward pass that can prefill and then decode one token at a time with a KV cache.

Parameter counts (``GPT.param_counts``), with d = d_model, L = n_layers, f = ffn_hidden, V = vocab_size, T = seq_len:
    per layer      4*d*d (q, k, v, out projections) + 2*d*f (MLP) + 2*d (two LayerNorm weights)
    non_embedding  L * per layer + d (final LayerNorm)
    embedding      V*d (token embedding) + T*d (learned positions) + V*d more if the output head is not tied
    total          non_embedding + embedding
FLOPs per token (``GPT.flops_per_token``), forward + backward, the PaLM / nanoGPT convention:
    6 * (L * (4*d*d + 2*d*f) + V*d)  +  12 * L * T * d
    6 FLOPs per matmul weight (2 forward, 4 backward; the output head counts, embedding lookups and LayerNorm
    weights do not), plus the attention scores and weighted values (2*T*d FLOPs each per token per layer forward,
    twice that backward), without causal halving. 6N (N non-embedding) is the usual approximation of the first
    term. The inference (forward-only) figure is a third of the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    vocab_size: int = 257
    seq_len: int = 128
    ffn_ratio: float = 4.0
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        return int(round(self.ffn_ratio * self.d_model))

    @property
    def aspect_ratio(self) -> float:
        return aspect_ratio(self.d_model, self.n_layers)

    @property
    def non_embedding_params(self) -> int:
        return non_embedding_params(self.n_layers, self.d_model, self.ffn_ratio)

    def __post_init__(self):
        for name in ("n_layers", "d_model", "n_heads", "vocab_size", "seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.ffn_ratio <= 0:
            raise ValueError(f"model.ffn_ratio must be positive, got {self.ffn_ratio}")


def aspect_ratio(d_model: int, n_layers: int) -> float:
    """The one meaning of aspect ratio in this project: R = d_model / n_layers (Bian et al. 2025)."""
    return d_model / n_layers


def non_embedding_params(n_layers: int, d_model: int, ffn_ratio: float) -> int:
    """Non-embedding parameters of a shape, from the formula in the module docstring (no model built)."""
    ffn = int(round(ffn_ratio * d_model))
    return n_layers * (4 * d_model * d_model + 2 * d_model * ffn + 2 * d_model) + d_model


def resolve_shape(n_layers: int | None = None, d_model: int | None = None, aspect_ratio: float | None = None,
                  params: float | None = None, n_heads: int | None = None, head_dim: int | None = 64,
                  ffn_ratio: float = 4.0) -> dict:
    """Resolve (n_layers, d_model, n_heads) from exactly two of n_layers, d_model, aspect_ratio and params.

    ``params`` is a target non-embedding parameter count; ``aspect_ratio`` is d_model / n_layers. A d_model that is
    derived (not given) is the multiple of ``head_dim`` (or of ``n_heads``) closest to the target; a given d_model
    must divide into heads exactly. Heads come from ``n_heads`` if given, else from ``head_dim``.
    """
    given = {k: v for k, v in dict(n_layers=n_layers, d_model=d_model, aspect_ratio=aspect_ratio, params=params).items()
             if v is not None}
    if len(given) != 2:
        raise ValueError(f"a shape needs exactly two of n_layers, d_model, aspect_ratio, params; got {sorted(given)}")
    for k, v in given.items():
        if v <= 0:
            raise ValueError(f"model.{k} must be positive, got {v}")
    if n_heads is None and not head_dim:
        raise ValueError("give model.n_heads or model.head_dim")
    unit = head_dim if n_heads is None else n_heads
    widths = range(unit, 64 * unit * unit + 1, unit)  # every width a derived d_model may take

    def log_gap(a: float, b: float) -> float:
        return abs(math.log(a / b))

    if params is None:
        if d_model is None:
            d_model = min(widths, key=lambda d: log_gap(d, aspect_ratio * n_layers))
        elif n_layers is None:
            n_layers = max(1, int(round(d_model / aspect_ratio)))
    elif n_layers is not None:
        d_model = min(widths, key=lambda d: log_gap(non_embedding_params(n_layers, d, ffn_ratio), params))
    elif d_model is not None:
        n_layers = min(range(1, 1025), key=lambda L: log_gap(non_embedding_params(L, d_model, ffn_ratio), params))
    else:  # params and aspect ratio: the shape closest to both, on the grid of whole layers and rounded widths
        shapes = [(L, min(widths, key=lambda d: log_gap(d, aspect_ratio * L))) for L in range(1, 257)]
        n_layers, d_model = min(shapes, key=lambda s: log_gap(non_embedding_params(*s, ffn_ratio), params)
                                + log_gap(s[1] / s[0], aspect_ratio))
    if n_heads is None:
        if d_model % head_dim:
            raise ValueError(f"model.d_model={d_model} is not a multiple of model.head_dim={head_dim}")
        n_heads = d_model // head_dim
    elif d_model % n_heads:
        raise ValueError(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}")
    return {"n_layers": int(n_layers), "d_model": int(d_model), "n_heads": int(n_heads)}


class KVCache:
    """Preallocated keys and values for every layer; ``length`` tokens are filled."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layers, 2, batch_size, config.n_heads, max_len, config.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, asked for {end}")
        self.kv[layer, 0, :, :, start:end] = k
        self.kv[layer, 1, :, :, start:end] = v
        return self.kv[layer, 0, :, :, :end], self.kv[layer, 1, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
            if T > 1 and past > 0:
                raise ValueError("prefill into a non-empty KV cache is not supported; decode one token at a time")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # a single query attends to the whole cache
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, config.ffn_hidden, bias=False), nn.GELU(),
                                 nn.Linear(config.ffn_hidden, config.d_model, bias=False))

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, bias=False)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of the residual projections
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache: KVCache | None = None):
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than model.seq_len={self.config.seq_len}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch_size, max_len or self.config.seq_len, p.device, p.dtype)

    @torch.inference_mode()
    def generate(self, prompt, new_tokens: int):
        """Greedy decoding with the KV cache: one prefill, then one token at a time."""
        cache = self.new_cache(prompt.size(0), prompt.size(1) + new_tokens)
        logits = self(prompt, cache=cache)
        out = [prompt]
        for _ in range(new_tokens):
            nxt = logits[:, -1:].argmax(-1)
            out.append(nxt)
            logits = self(nxt, cache=cache)
        return torch.cat(out, dim=1)

    # ----- counts -----
    def param_counts(self) -> dict:
        """Total, non-embedding and embedding parameter counts (see module docstring)."""
        c = self.config
        embedding = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2) + c.seq_len * c.d_model
        non_embedding = c.non_embedding_params
        return {"total": non_embedding + embedding, "non_embedding": non_embedding, "embedding": embedding}

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token: 6*(L*(4d^2 + 2df) + Vd) + 12*L*T*d."""
        c = self.config
        matmul_weights = c.n_layers * (4 * c.d_model ** 2 + 2 * c.d_model * c.ffn_hidden) + c.vocab_size * c.d_model
        return 6 * matmul_weights + 12 * c.n_layers * c.seq_len * c.d_model
