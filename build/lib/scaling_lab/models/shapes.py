"""A model's shape, from its config alone (no torch): the config dataclass, the shape resolver, counts and FLOPs.

Planner, selection and trainer all count N here, so N has one meaning across the project.

Parameter counts (``GPTConfig.param_counts``), with d = d_model, L = n_layers, f = ffn_hidden, V = vocab_size, T = seq_len:
    per layer      4*d*d (q, k, v, out projections) + 2*d*f (MLP) + 2*d (two LayerNorm weights)
    non_embedding  L * per layer + d (final LayerNorm)
    embedding      V*d (token embedding) + T*d (learned positions) + V*d more if the output head is not tied
    total          non_embedding + embedding
FLOPs per token (``GPTConfig.flops_per_token``), forward + backward, the PaLM / nanoGPT convention:
    6 * (L * (4*d*d + 2*d*f) + V*d)  +  12 * L * T * d
    6 FLOPs per matmul weight (2 forward, 4 backward; the output head counts, embedding lookups and LayerNorm
    weights do not), plus the attention scores and weighted values (2*T*d FLOPs each per token per layer forward,
    twice that backward), without causal halving. 6N (N non-embedding) is the usual approximation of the first
    term. The inference (forward-only) figure is a third of the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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

    @property
    def embedding_params(self) -> int:
        """Token embedding, learned positions, and the output head when it is not tied."""
        return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2) + self.seq_len * self.d_model

    @property
    def head_params(self) -> int:
        """The output head's V*d weights (shared with the token embedding when tied)."""
        return self.vocab_size * self.d_model

    def param_counts(self) -> dict:
        """Total, non-embedding and embedding parameter counts (see the module docstring)."""
        ne, emb = self.non_embedding_params, self.embedding_params
        return {"total": ne + emb, "non_embedding": ne, "embedding": emb}

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token: 6*(L*(4d^2 + 2df) + Vd) + 12*L*T*d."""
        matmul_weights = self.n_layers * (4 * self.d_model ** 2 + 2 * self.d_model * self.ffn_hidden) + self.head_params
        return 6 * matmul_weights + 12 * self.n_layers * self.seq_len * self.d_model

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
