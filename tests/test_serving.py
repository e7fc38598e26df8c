"""The serving stage on tiny models trained by the real trainer: saved weights, torchao INT8/INT4 (weight types,
bytes, loss), speculative decoding (greedy exactness, the sampled distribution by a chi-square test with a negative
control), and bad input stopping before compute."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from scaling_lab.conf import UserError, compose
from scaling_lab.models.speculative import speculative_generate, target_generate, verify
from scaling_lab.pipeline import quantize, serving, speculate
from scaling_lab.pipeline.device import device_name
from scaling_lab.pipeline.train import run as train
from tests.helpers import TINY

SWEEP = "serve"


@pytest.fixture(scope="module")
def trained(tiny_runs):
    return tiny_runs


def test_saved_weights_reload_to_the_same_loss(trained):
    results, runs = trained
    record = runs["target"]
    assert record["weights"]["path"] == f"weights/{record['run_id']}.safetensors"
    assert serving.weights_file(record, results).is_file()
    assert "weights" not in runs["no_weights"] or runs["no_weights"]["weights"] is None
    model = serving.load_model(record, results)
    _, windows = serving.eval_windows(record)
    assert serving.heldout_loss(model, windows) == pytest.approx(record["loss"]["final"], abs=1e-5)


def test_quantized_weight_types_bytes_and_skipped_layers(trained):
    results, runs = trained
    model = serving.load_model(runs["target"], results)
    full = serving.weight_bytes(model)
    assert full == 4 * sum(p.numel() for p in model.parameters())  # fp32, the tied head counted once
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    linear_weights = sum(m.weight.numel() for n, m in model.named_modules() if n in linears)
    rows = sum(m.weight.shape[0] for n, m in model.named_modules() if n in linears)
    for mode, weight_type in {"int8": "Int8Tensor", "int4": "Int4OpaqueTensor"}.items():  # today's CPU configs
        q, report = serving.quantize(model, mode, 32)
        types = {n: type(m.weight).__name__ for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
        assert {types[n] for n in linears} == {weight_type} and report["quantized"] == linears
        assert type(q.head.weight) is torch.nn.Parameter and q.head.weight is q.wte.weight  # head/embedding fp32
        rest = full - 4 * linear_weights
        if mode == "int8":  # int8 per output row + fp32 scale (+ zero point) per row
            assert rest + linear_weights + 4 * rows <= serving.weight_bytes(q) <= rest + linear_weights + 8 * rows
        else:  # int4: half a byte a weight + an fp32 scale and zero per group of 32
            assert serving.weight_bytes(q) == rest + linear_weights // 2 + 2 * 4 * linear_weights // 32
    q, report = serving.quantize(model, "int4", 64)  # d_model 32: no in_features is a multiple of 64 except 4d
    assert set(report["skipped"]) == {n for n in linears if not n.endswith("mlp.2")}
    assert type(q.blocks[0].attn.qkv.weight) is torch.nn.Parameter


def test_scaling_quantize_int8_loss_close_to_full_precision(trained, tmp_path):
    results, runs = trained
    ids = [runs["target"]["run_id"], runs["draft"]["run_id"]]
    cfg = compose("quantize", [f"results_dir={results}", f"sweep={SWEEP}", f"runs=[{','.join(ids)}]",
                               f"out={tmp_path}", "measure.repeats=1", "measure.warmup=0", "penalty.fit=false"])
    doc = quantize.run(cfg)
    table = pd.read_csv(tmp_path / "quantization.csv")
    for column in ("run_id", "mode", "params_non_embedding", "tokens_seen", "loss_full", "loss_quantized",
                   "loss_delta", "weight_bytes_full", "weight_bytes_quantized", "decode_ms_per_token_full",
                   "decode_ms_per_token_quantized"):
        assert column in table
    assert len(table) == 4 and set(table["mode"]) == {"int8", "int4"}
    int8 = table[table["mode"] == "int8"]
    assert (int8.loss_delta.abs() < 0.01).all()
    assert (table.weight_bytes_quantized < table.weight_bytes_full).all()
    for r in table.itertuples():
        record = runs["target"] if r.run_id == ids[0] else runs["draft"]
        assert r.loss_full == pytest.approx(record["loss"]["final"], abs=1e-5)
    assert doc["layers"][ids[0]]["int4"]["skipped"] == {}


def test_greedy_speculative_decoding_equals_target_greedy(trained):
    results, runs = trained
    target, draft = (serving.load_model(runs[n], results) for n in ("target", "draft"))
    _, windows = serving.eval_windows(runs["target"])
    for i, k in enumerate((1, 3)):
        prompt = windows[i][0][None, :6]
        expected = target.generate(prompt, 20)
        assert torch.equal(target_generate(target, prompt, 20), expected)
        out, st = speculative_generate(target, draft, prompt, 20, k)
        assert torch.equal(out, expected) and st.emitted == 20
        out, st = speculative_generate(target, target, prompt, 20, k)  # the target as its own draft: all accepted
        assert torch.equal(out, expected) and st.acceptance_rate == 1.0


def test_speculative_decoding_is_measured_as_served_and_says_how(trained, tmp_path):
    """scaling-speculate runs both models as served on its device (here the CPU: fp32, eager decode) and every row
    and the document say so; the training records' latency says the same of itself."""
    results, runs = trained
    ids = [f"targets=[{runs['target']['run_id']}]", f"drafts=[{runs['draft']['run_id']}]"]
    common = [f"results_dir={results}", f"sweep={SWEEP}", f"out={tmp_path / 'spec'}", "logger=none", "ks=[2]",
              "modes=[greedy]", "prompts=1", "prompt_len=4", "new_tokens=6", "repeats=1", *ids]
    doc = speculate.run(compose("speculate", common))
    how = {"device": device_name("cpu"), "dtype": "float32", "threads": 1, "graph": "eager"}
    assert {k: doc[k] for k in how} == how
    assert doc["rows"] and all({k: r[k] for k in how} == how and r["greedy_exact"] for r in doc["rows"])
    for record in runs.values():
        assert {k: record["latency"][k] for k in ("device", "dtype", "graph")} == {
            "device": device_name("cpu"), "dtype": "float32", "graph": "eager"}
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is visible here") as err:
            speculate.run(compose("speculate", [*common, "device=cuda", f"out={tmp_path / 'gpu'}"]))
        assert "\n" not in str(err.value) and not (tmp_path / "gpu").exists()


def _sample_size(p: np.ndarray, effect: float, alpha: float, power: float) -> int:
    """Samples for a chi-square goodness-of-fit test of p to reach ``power`` at level ``alpha`` against any
    alternative of Cohen's effect size w = ``effect`` (noncentrality n w^2)."""
    df, crit = len(p) - 1, stats.chi2.ppf(1 - alpha, len(p) - 1)
    n = 100
    while stats.ncx2.sf(crit, df, n * effect ** 2) < power:
        n = int(n * 1.1) + 1
    return n


def _chi2_pvalue(tokens: torch.Tensor, p: np.ndarray) -> float:
    """Goodness of fit on the cells p allows; a token p forbids makes the p-value 0."""
    counts = np.bincount(tokens.numpy(), minlength=len(p))
    if counts[p == 0].any():
        return 0.0
    return float(stats.chisquare(counts[p > 0], p[p > 0] * counts.sum()).pvalue)


def test_sampled_tokens_follow_the_target_distribution_and_accept_all_does_not():
    """Adversarial (p, q) on a 10-token vocabulary: q puts its mass where p has little, and p has a token q never
    proposes. The first emitted token must follow p_1, and the second (after an accepted first draft) p_2."""
    V, k = 10, 2
    p1 = np.array([0.30, 0.20, 0.15, 0.10, 0.08, 0.06, 0.05, 0.03, 0.02, 0.01])
    q1 = np.array([0.01, 0.02, 0.03, 0.05, 0.06, 0.08, 0.10, 0.15, 0.20, 0.30])
    p2 = np.array([0.0, 0.25, 0.25, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0])
    q2 = np.array([0.5, 0.0, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])
    p3 = np.full(V, 0.1)
    alpha, power, effect = 1e-3, 0.99, 0.1
    # sized so that both tests (the second sees only the samples whose first draft was accepted) have the power
    accept_first = np.minimum(p1, q1).sum()
    n2 = _sample_size(p2[p2 > 0], effect, alpha, power)
    n = max(_sample_size(p1, effect, alpha, power), int(n2 / accept_first * 1.2))
    # the negative control's distribution (q1) is far beyond the detectable effect: w = sqrt(sum (q-p)^2/p)
    assert math.sqrt(((q1 - p1) ** 2 / p1).sum()) > effect
    gen = torch.Generator().manual_seed(0)
    P = torch.tensor(np.stack([p1, p2, p3]))[None].expand(n, k + 1, V)
    Q = torch.tensor(np.stack([q1, q2]))[None].expand(n, k, V)
    drafted = torch.stack([torch.multinomial(Q[0, i], n, replacement=True, generator=gen) for i in range(k)], 1)
    accepted, nxt = verify(P, Q, drafted, gen)
    first = torch.where(accepted >= 1, drafted[:, 0], nxt)
    assert _chi2_pvalue(first, p1) > alpha
    second_n = int((accepted >= 1).sum())
    second = torch.where(accepted[accepted >= 1] >= 2, drafted[accepted >= 1, 1], nxt[accepted >= 1])
    assert second_n > n2 and _chi2_pvalue(second, p2) > alpha
    # negative control: accepting every draft token emits q, and the same test must reject it
    accepted, nxt = verify(P, Q, drafted, gen, accept_all=True)
    assert _chi2_pvalue(drafted[:, 0], p1) < alpha


def test_bad_input_is_one_line_before_compute(trained, tmp_path):
    results, runs = trained
    common = [f"results_dir={results}", f"sweep={SWEEP}", f"out={tmp_path / 'out'}"]
    cases = [
        (quantize, "quantize", ["runs=[nosuchrun]"], "unknown run id"),
        (quantize, "quantize", [f"runs=[{runs['no_weights']['run_id']}]"], "no saved weights"),
        (speculate, "speculate", [f"targets=[{runs['target']['run_id']}]", f"drafts=[{runs['bpe']['run_id']}]"],
         "do not share a tokenizer"),
        (quantize, "quantize", ['rows="tokens_budget > 1e12"'], "selects none"),
        (quantize, "quantize", ['rows="__import__(\'os\').system(\'true\')"'], "rows"),
        (quantize, "quantize", ['rows="tokens_budget < 1e4"', f"runs=[{runs['no_weights']['run_id']}]"],
         "unknown run id"),  # rows narrows the pool first: the run it leaves out is unknown
        (speculate, "speculate", [f"targets=[{runs['target']['run_id']}]", "drafts=[nosuchrun]"], "unknown run id"),
        (speculate, "speculate", [f"targets=[{runs['target']['run_id']}]",
                                  f"drafts=[{runs['no_weights']['run_id']}]"], "no saved weights"),
    ]
    for module, name, overrides, message in cases:
        with pytest.raises(UserError, match=message) as err:
            module.run(compose(name, common + overrides))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing computed, nothing written
