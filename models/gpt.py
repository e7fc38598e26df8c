"""A small decoder-only transformer (pre-norm, causal SDPA attention, KV-cache decoding), in the manner of nanoGPT.

The model knows nothing of training, Hydra, W&B or fitting: the modules and a forward pass that can prefill and
then decode one token at a time with a KV cache. Its config, shape and counts live in ``models/shapes.py``.

Two caches: ``KVCache`` grows with a Python position (prefill, decoding, speculative verification); a
``StaticKVCache`` is filled the same way, then ``GPT.decode_step`` decodes one token at a time with no Python-side
state (the position a device tensor, every shape fixed), so that the step can be captured as a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaling_lab.models.shapes import GPTConfig


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

    def advance(self, tokens: int) -> None:
        """``tokens`` more are filled (every layer has been updated)."""
        self.length += tokens

    def rollback(self, length: int) -> None:
        """Forget every token after the first ``length`` (speculative decoding rejects a draft's tail); the
        stale keys and values past ``length`` are overwritten by the next update."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a KV cache of {self.length} tokens back to {length}")
        self.length = length


class StaticKVCache(KVCache):
    """A ``KVCache`` that ``GPT.decode_step`` can also decode into without Python-side state: the next position is
    ``pos``, a device tensor; one token's key and value are written there with ``index_copy_``, and attention runs
    over the whole preallocated cache with a mask of the filled positions. The ordinary forward (a prefill) fills it
    as a ``KVCache`` and sets ``pos``; ``decode_step`` advances ``pos`` alone, so ``length`` then counts only what
    the ordinary forward filled."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        if max_len > config.seq_len:
            raise ValueError(f"a static KV cache of {max_len} tokens exceeds model.seq_len={config.seq_len}")
        super().__init__(config, batch_size, max_len, device, dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)

    def advance(self, tokens: int) -> None:
        super().advance(tokens)
        self.pos.fill_(self.length)

    def rollback(self, length: int) -> None:
        super().rollback(length)
        self.pos.fill_(self.length)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """One token's key and value (B, heads, 1, head_dim) at ``pos``; the whole cache of the layer."""
        self.kv[layer, 0].index_copy_(2, self.pos, k)
        self.kv[layer, 1].index_copy_(2, self.pos, v)
        return self.kv[layer, 0], self.kv[layer, 1]

    def filled(self) -> torch.Tensor:
        """The attention mask of a token at ``pos``: every position up to it (1, 1, 1, max_len)."""
        return (self.slots <= self.pos).view(1, 1, 1, -1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, filled: torch.Tensor | None = None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = None
        if filled is not None:  # one token at a static cache's position (GPT.decode_step): the filled ones attended
            k, v = cache.write(layer, k, v)
            mask = filled
        elif cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
            if T > 1 and past > 0:  # several new tokens after a cached prefix (speculative verification)
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # a single query attends to the whole cache; T > 1 queries causally (offset by the cached prefix)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and mask is None)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, config.ffn_hidden, bias=False), nn.GELU(),
                                 nn.Linear(config.ffn_hidden, config.d_model, bias=False))

    def forward(self, x, cache=None, layer=0, filled=None):
        x = x + self.attn(self.ln1(x), cache, layer, filled)
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
            cache.advance(T)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    def decode_step(self, idx, cache: StaticKVCache):
        """Logits (B, 1, vocab) of one new token per sequence (``idx`` (B, 1)) at the static cache's position, which
        it then advances; nothing here reads a value back to Python, so the step can be captured as a CUDA graph
        (the caller keeps the position within the cache)."""
        x = self.wte(idx) + self.wpe(cache.pos)
        filled = cache.filled()
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, filled)
        cache.pos.add_(1)
        return self.head(self.ln_f(x))

    def new_cache(self, batch_size: int, max_len: int | None = None, static: bool = False) -> KVCache:
        """A cache in the model's device and dtype; ``static``: one ``decode_step`` can decode into."""
        p = next(self.parameters())
        kind = StaticKVCache if static else KVCache
        return kind(self.config, batch_size, max_len or self.config.seq_len, p.device, p.dtype)

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
