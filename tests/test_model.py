"""The model: parameter and FLOP counts checked against independent counts, shape resolution, KV-cache decoding."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig, aspect_ratio, non_embedding_params, resolve_shape


@pytest.mark.parametrize("tie", [True, False])
def test_param_counts_match_numel(tie):
    model = GPT(GPTConfig(n_layers=3, d_model=48, n_heads=3, vocab_size=300, seq_len=40, tie_embeddings=tie))
    counts = model.config.param_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    embedding = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("wte", "wpe", "head")))
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == counts["total"] - embedding


def test_param_counts_match_hand_count():
    # 2 layers, d=64, ffn 256: per layer 4*64*64 + 2*64*256 + 2*64 = 49,280; + final norm 64
    assert non_embedding_params(2, 64, 4.0) == 2 * 49_280 + 64
    counts = GPTConfig(n_layers=2, d_model=64, n_heads=2, vocab_size=257, seq_len=128).param_counts()
    assert counts == {"total": 98_624 + 257 * 64 + 128 * 64, "non_embedding": 98_624, "embedding": 257 * 64 + 128 * 64}


def test_flops_per_token_matches_counted_flops():
    cfg = GPTConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=257, seq_len=32)
    model = GPT(cfg)
    batch, T, d, L = 3, cfg.seq_len, cfg.d_model, cfg.n_layers
    x = torch.randint(0, cfg.vocab_size, (batch, T))
    with FlopCounterMode(display=False) as counter:  # counts the weight matmuls of a real forward + backward
        _, loss = model(x, x)
        loss.backward()
    weights = counter.get_total_flops()
    # the attention term, counted on the same shapes with explicit matmuls (the counter does not see fused SDPA)
    q = torch.randn(batch, cfg.n_heads, T, cfg.head_dim, requires_grad=True)
    k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ((q @ k.transpose(-1, -2)) @ v).sum().backward()
    attention = L * counter.get_total_flops()
    assert attention == 12 * L * T * d * batch * T
    assert cfg.flops_per_token * batch * T == weights + attention


def test_aspect_ratio_has_one_meaning():
    assert aspect_ratio(256, 4) == 64.0
    assert GPTConfig(n_layers=4, d_model=256, n_heads=4).aspect_ratio == 64.0


def test_resolve_shape_from_any_two():
    assert resolve_shape(n_layers=4, d_model=128, head_dim=32) == {"n_layers": 4, "d_model": 128, "n_heads": 4}
    # aspect ratio 50 at 4 layers -> width 200, rounded to the nearest multiple of head_dim 32 -> 192
    assert resolve_shape(n_layers=4, aspect_ratio=50, head_dim=32)["d_model"] == 192
    assert resolve_shape(d_model=256, aspect_ratio=64, head_dim=64)["n_layers"] == 4
    s = resolve_shape(params=1e6, aspect_ratio=32, head_dim=16)
    assert abs(non_embedding_params(s["n_layers"], s["d_model"], 4.0) / 1e6 - 1) < 0.25
    assert 20 <= s["d_model"] / s["n_layers"] <= 48
    s = resolve_shape(params=1e6, n_layers=8, head_dim=16)
    assert s["n_layers"] == 8 and s["d_model"] % 16 == 0
    assert resolve_shape(n_layers=2, d_model=96, n_heads=3)["n_heads"] == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_layers=2, d_model=100, n_heads=3), "not divisible"),
    (dict(n_layers=2, d_model=100, head_dim=32), "not a multiple"),
    (dict(n_layers=2, d_model=64, aspect_ratio=8), "exactly two"),
    (dict(n_layers=0, d_model=64), "positive"),
])
def test_resolve_shape_rejects_bad_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_shape(**kwargs)


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=32, n_heads=2, vocab_size=50, seq_len=24)).eval()
    x = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2, 20)
        steps = [model(x[:, :12], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    out = model.generate(x[:, :4], new_tokens=6)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], x[:, :4])


def test_sequence_longer_than_seq_len_is_an_error():
    model = GPT(GPTConfig(n_layers=1, d_model=16, n_heads=1, vocab_size=10, seq_len=8))
    with pytest.raises(ValueError, match="longer than model.seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
