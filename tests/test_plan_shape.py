"""Size, tokens and shape planned together (fit.plan.serving.shape_plan; `shape.enabled=true` in scaling-plan).

Toy constants: Sardana et al.'s Chinchilla constants with an inference-efficient factor (1 + 0.005 R^0.5), and a
decode latency of 1 ms + 0.5 ms a layer + 1.2e-8 ms per layer weight (d_model^2).
"""

import math

import numpy as np
import pytest

from scaling_lab.fit.plan import planner as plan
from scaling_lab.fit.plan import cli as plan_cli
from scaling_lab.fit.plan import serving
from scaling_lab.conf import compose
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.models.shapes import continuous_shape, non_embedding_params
from scaling_lab.fit.io.files import write_json_atomic
from tests.helpers import latency_section

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283}
IE_FORMULA = "(E + A / N**alpha + B / D**beta) * (1 + epsilon * R**gamma)"
LATENCY = {"intercept": 1.0, "per_layer": 0.5, "per_layer_d2": 1.2e-8}
# The same in the latency law's terms (fit/latency.py): 1.2e-8 ms per layer weight = 1e-9 ms per fp32 weight byte
# of the blocks (12 d^2 weights, 4 bytes each) when the head is negligible (vocab 0 here).
SECTION = latency_section(call=1.0, layer=0.5, weight_bytes=1.2e-8 / 48)


def linear(intercept, per_layer, per_layer_d2):
    return lambda n_layers, d_model: intercept + per_layer * n_layers + per_layer_d2 * n_layers * d_model ** 2
PRICES = plan.Prices(plan.dollars_per_flop(1.5, 3.12e14, 0.5), plan.dollars_per_flop(1.1, 6.24e14, 0.5),
                     plan.dollars_per_flop(1.1, 6.24e14, 0.01))
DEMAND = plan.Inference(prefill_tokens=7e11, decode_tokens=2.15e12)
PER_MS = 1.1 / 3.6e6


def shape_plan(constants, loss, latency):
    """The full-precision search at ``loss`` with decode timed by ``latency(n_layers, d_model)``, R in [16, 512]."""
    def decode_ms(n_layers, d_model, _mode):
        return latency(n_layers, d_model)

    problem = serving.Problem(constants, loss, DEMAND, PRICES, decode_ms, PER_MS, serving.token_range(constants, loss))
    return serving.shape_plan(problem, (16, 512), 128)


def ie_law(epsilon=0.005, gamma=0.5):
    return LawConstants.from_dict("inference_efficient", {"formula": IE_FORMULA, "inputs": ["N", "D", "R"],
                                                          "params": {**CHINCHILLA, "epsilon": epsilon,
                                                                     "gamma": gamma}})


def test_continuous_shape_inverts_the_parameter_count():
    n_layers, d_model = continuous_shape(7e9, 128)
    # the trainer's count (models.shapes), with real-valued widths: 12 L d^2 + 2 L d + d at ffn_ratio 4
    assert 12 * n_layers * d_model ** 2 + 2 * n_layers * d_model + d_model == pytest.approx(7e9)
    assert d_model / n_layers == pytest.approx(128)
    L, d = continuous_shape(non_embedding_params(4, 64, 4.0), 16.0)
    assert (L, d) == (pytest.approx(4.0), pytest.approx(64.0))
    assert d_model / n_layers == pytest.approx(128)


def test_joint_optimum_is_cheapest_and_reaches_the_loss():
    constants, latency = ie_law(), linear(**LATENCY)
    result = shape_plan(constants, 2.1, latency)
    best, at_ref, chin = result["optimal"], result["optimal_at_reference_shape"], result["chinchilla"]
    assert best["total_cost"] <= at_ref["total_cost"] <= chin["total_cost"]
    for model in (best, at_ref, chin):
        assert model["loss"] == pytest.approx(2.1, rel=1e-9)
    assert result["ratios"]["total_cost"] == pytest.approx(best["total_cost"] / chin["total_cost"])
    # brute force over (R, D) on the loss surface: nothing cheaper than the reported optimum
    E, A, B, alpha, beta = plan.chinchilla_terms(constants)
    for r in np.geomspace(16, 512, 25):
        target = 2.1 / (1 + 0.005 * r ** 0.5)
        for d in np.geomspace(1e11, 1e15, 60):
            excess = target - E - B / d ** beta
            if excess > 0:
                n = (A / excess) ** (1 / alpha)
                layers, width = continuous_shape(n, r)
                cost = plan.lifetime(n, d, DEMAND, PRICES, latency(layers, width) * PER_MS)
                assert best["total_cost"] <= cost["total_cost"] * (1 + 1e-6)


def test_shape_follows_the_latency_model():
    constants = ie_law()
    # per-layer overhead dominates: fewer, wider layers than the reference
    deep_is_slow = shape_plan(constants, 2.1, linear(0.0, 5.0, 0.0))
    assert deep_is_slow["optimal"]["R"] > 128
    # latency blind to shape: only the loss factor (1 + eps R^gamma) matters, so the narrowest allowed R wins
    blind = shape_plan(constants, 2.1, linear(0.0, 0.0, 1.2e-8))
    assert blind["optimal"]["R"] == pytest.approx(16, rel=1e-3)


def test_unreachable_loss_is_refused():
    with pytest.raises(ValueError, match="no aspect ratio"):
        shape_plan(ie_law(epsilon=0.5), 1.75, linear(**LATENCY))


def write_fit_json(path, latency=None, laws=("chinchilla", "inference_efficient")):
    specs = {"chinchilla": {"formula": "E + A / N**alpha + B / D**beta", "inputs": ["N", "D"], "params": CHINCHILLA},
             "inference_efficient": ie_law().to_dict()}
    doc = {"schema_version": 1, "laws": {k: specs[k] for k in laws}}
    if latency is not None:
        doc["latency"] = latency
    write_json_atomic(path, doc)
    return path


def config(tmp_path, *overrides):
    return compose("plan", [f"out={tmp_path / 'plan'}", "plot.points=5", "objective=cost",
                                      "target.loss=2.1", "demand.requests=1e10", "shape.enabled=true",
                                      *overrides])


def test_cli_writes_the_shape_plan(tmp_path, capsys):
    fit_json = write_fit_json(tmp_path / "fit.json", SECTION)
    doc = plan_cli.run(config(tmp_path, f"constants={fit_json}"))
    shape = doc["shape"]
    for model in ("chinchilla", "optimal_at_reference_shape", "optimal"):
        assert {"N", "D", "R", "n_layers", "d_model", "decode_ms_per_token", "total_cost"} <= set(shape[model])
    assert shape["latency"]["device"] == "cpu" and 0 < shape["saving"] < 1
    assert "opt. at ref R" in capsys.readouterr().out
    assert math.isclose(shape["dollars_per_ms"], 1.1 / 3.6e6)


@pytest.mark.parametrize("latency,laws,overrides,message", [
    (None, ("chinchilla", "inference_efficient"), [], "latency section"),
    ({"model": "linear", "decode_ms_per_token": LATENCY}, ("chinchilla", "inference_efficient"), [],
     "roofline"),
    ({**SECTION, "modes": {"none": {"decode_ms_per_token": {"call": 1.0}}}}, ("chinchilla", "inference_efficient"),
     [], "layer"),
    (SECTION, ("chinchilla",), [], "no 'inference_efficient' law"),
    (SECTION, ("chinchilla", "inference_efficient"), ["objective=flops"], "objective=cost"),
    (SECTION, ("chinchilla", "inference_efficient"), ["shape.decode_batch=0"], "decode_batch"),
])
def test_cli_shape_bad_input(tmp_path, latency, laws, overrides, message):
    fit_json = write_fit_json(tmp_path / "fit.json", latency, laws)
    with pytest.raises(ValueError, match=message):
        plan_cli.run(config(tmp_path, f"constants={fit_json}", *overrides))


def test_cli_shape_needs_a_fit_json(tmp_path):
    with pytest.raises(ValueError, match="needs constants=<fit.json>"):
        plan_cli.run(config(tmp_path, "constants=sardana2024"))
