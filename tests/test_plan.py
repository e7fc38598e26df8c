"""The planner's math (fit/plan/planner.py): Sardana et al. 2024's test vectors and properties of the optimum.

Test vectors: ../shared/reference/sardana2024.md (from the README of nikhilsardana/beyond-chinchilla, with the
paper's constants E=1.69, A=406.4, B=410.7, alpha=0.336, beta=0.283); copied here so the test stands alone.
"""

import math

import numpy as np
import pytest

from scaling_lab.fit.plan import planner as plan
from scaling_lab.fit.laws.law import LawConstants

FORMULA = "E + A / N**alpha + B / D**beta"
SARDANA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283}
PRESETS = [SARDANA, {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
           {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}]


def constants(params=SARDANA):
    return LawConstants.from_dict("chinchilla", {"formula": FORMULA, "inputs": ["N", "D"], "params": params})


def sig4(x):
    return float(f"{x:.4g}")


def a100_prices(train_price, inference_price, mfu_train, mfu_prefill, mfu_decode):
    """A100 BF16 for training, INT8 for inference (peak FLOP/s from the reference)."""
    return plan.Prices(train=plan.dollars_per_flop(train_price, 3.12e14, mfu_train),
                       prefill=plan.dollars_per_flop(inference_price, 6.24e14, mfu_prefill),
                       decode=plan.dollars_per_flop(inference_price, 6.24e14, mfu_decode))


def test_vector_loss():
    assert sig4(constants().predict(N=70e9, D=1e12)) == 1.947


def test_vector_compute_optimal():
    inference = plan.Inference(prefill_tokens=0.0, decode_tokens=2e12)
    result = plan.plan(constants(), 1.947, inference, a100_prices(1.5, 1.1, 0.5, 0.5, 0.01), "flops")
    assert sig4(result["optimal"]["N"]) == 2.418e10
    assert sig4(result["optimal"]["D"]) == 2.657e12
    assert sig4(100 * result["ratios"]["N"]) == 70.96
    assert round(100 * result["ratios"]["D"], 2) == 146.77
    assert sig4(100 * result["ratios"]["total_flops"]) == 95.22


def test_vector_cost_optimal():
    inference = plan.Inference(prefill_tokens=1e10 * 1000, decode_tokens=1e10 * 250)
    prices = a100_prices(1.40, 0.60, 0.5, 0.4, 0.2)
    result = plan.plan(constants(), 1.947, inference, prices, "cost")
    assert sig4(result["optimal"]["N"]) == 2.053e10
    assert sig4(result["optimal"]["D"]) == 3.302e12
    assert sig4(100 * result["ratios"]["N"]) == 60.23
    assert round(100 * result["ratios"]["D"], 2) == 182.41
    assert sig4(100 * result["ratios"]["total_cost"]) == 88.76


def test_chinchilla_frontier_round_trip():
    c = constants()
    n, d = plan.chinchilla_optimal(c, 5.76e23)
    assert 6 * n * d == pytest.approx(5.76e23, rel=1e-12)
    assert plan.chinchilla_compute(c, n) == pytest.approx(5.76e23, rel=1e-12)
    # the Chinchilla-style model of a loss is the frontier model with that loss
    loss = plan.chinchilla_loss(c, n)
    assert plan.chinchilla_style_for_loss(c, loss) == pytest.approx((n, d), rel=1e-9)
    # and the frontier minimises the loss at fixed compute
    for scale in (0.8, 1.25):
        assert c.predict(N=n * scale, D=d / scale) > c.predict(N=n, D=d)


@pytest.mark.parametrize("bad", [1.69, 1.5])
def test_loss_at_or_below_E_is_refused(bad):
    with pytest.raises(ValueError, match="irreducible loss E"):
        plan.inference_optimal(constants(), bad, 1e12)
    with pytest.raises(ValueError, match="irreducible loss E"):
        plan.chinchilla_style_for_loss(constants(), bad)


def test_bad_numbers_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        plan.Inference(prefill_tokens=-1.0, decode_tokens=0.0)
    with pytest.raises(ValueError, match="MFU"):
        plan.dollars_per_flop(1.0, 3.12e14, 1.5)
    with pytest.raises(ValueError, match="MFU"):
        plan.dollars_per_flop(1.0, 3.12e14, 0.0)
    with pytest.raises(ValueError, match="missing"):
        plan.chinchilla_terms(LawConstants.from_dict("x", {"formula": "E + A / N**a", "inputs": ["N"],
                                                            "params": {"E": 1.0, "A": 1.0, "a": 0.3}}))


def _cases(count=30, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        params = PRESETS[rng.integers(len(PRESETS))]
        yield params, params["E"] + rng.uniform(0.05, 1.0), 10 ** rng.uniform(8, 15)


@pytest.mark.parametrize("params,loss,demand", list(_cases()))
def test_optimum_is_on_the_loss_curve_and_never_worse(params, loss, demand):
    c = constants(params)
    n, d = plan.inference_optimal(c, loss, demand)
    nc, dc = plan.chinchilla_style_for_loss(c, loss)
    assert float(c.predict(N=n, D=d)) == pytest.approx(loss, rel=1e-10)
    assert n <= nc * (1 + 1e-12) and d >= dc * (1 - 1e-12)

    def total(n_, d_):
        return 6 * n_ * d_ + 2 * n_ * demand

    assert total(n, d) <= total(nc, dc) * (1 + 1e-12)
    # no model on the same loss curve does better: a grid in D around the optimum
    E, A, B, alpha, beta = plan.chinchilla_terms(c)
    for dd in d * np.logspace(-0.3, 0.3, 13):
        if loss - E - B * dd ** -beta > 0:
            nn = (A / (loss - E - B * dd ** -beta)) ** (1 / alpha)
            assert total(n, d) <= total(nn, dd) * (1 + 1e-9)


@pytest.mark.parametrize("params", PRESETS)
def test_optimum_approaches_chinchilla_as_demand_vanishes(params):
    c = constants(params)
    nc, dc = plan.chinchilla_style_for_loss(c, 2.3)
    assert plan.inference_optimal(c, 2.3, 0.0) == pytest.approx((nc, dc), rel=1e-12)
    gaps = [abs(plan.inference_optimal(c, 2.3, demand)[0] / nc - 1) for demand in (1e12, 1e9, 1e6, 1e3)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-6
    # and the optimal model shrinks as demand grows
    sizes = [plan.inference_optimal(c, 2.3, demand)[0] for demand in (1e10, 1e12, 1e14)]
    assert sizes[0] > sizes[1] > sizes[2]


def test_cost_objective_is_the_compute_problem_with_priced_tokens():
    inference = plan.Inference(prefill_tokens=7e11, decode_tokens=2.15e12)
    prices = a100_prices(1.5, 1.1, 0.5, 0.5, 0.01)
    c = constants()
    n, d = plan.inference_optimal(c, 2.0, plan.equivalent_inference_tokens("cost", inference, prices))

    def cost(d_):
        n_ = (c["A"] / (2.0 - c["E"] - c["B"] * d_ ** -c["beta"])) ** (1 / c["alpha"])
        return plan.lifetime(n_, d_, inference, prices)["total_cost"]

    best = cost(d)
    assert all(best <= cost(d * f) for f in (0.9, 0.99, 1.01, 1.1))


def test_speculative_decoding_factors():
    # Leviathan et al. 2023: alpha = 0.8, k = 4 gives (1 - 0.8^5) / 0.2 = 3.3616 tokens per target step
    assert plan.expected_tokens_per_step(0.8, 4) == pytest.approx(3.3616)
    assert plan.expected_tokens_per_step(1.0, 4) == 5.0
    assert plan.expected_tokens_per_step(0.0, 4) == 1.0
    flops, time = plan.speculative_factors(0.8, 4, 0.05)
    assert time == pytest.approx(1.2 / 3.3616) and flops == pytest.approx(5.2 / 3.3616)
    # cheaper decoding per token makes a larger model affordable than without speculation
    prices = a100_prices(1.5, 1.1, 0.5, 0.5, 0.01)
    plain = plan.Inference(7e11, 2.15e12)
    fast = plan.Inference(7e11, 2.15e12, decode_flops_per_token=flops, decode_time_per_token=time)
    n_plain = plan.plan(constants(), 2.0, plain, prices, "cost")["optimal"]["N"]
    n_fast = plan.plan(constants(), 2.0, fast, prices, "cost")["optimal"]["N"]
    assert n_fast > n_plain
    assert math.isclose(plan.plan(constants(), 2.0, fast, prices, "flops")["equivalent_inference_tokens"],
                        7e11 + 2.15e12 * flops)
