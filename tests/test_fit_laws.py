"""Laws from configuration: ties, the sympy-compiled prediction and its exact gradient, the batched optimiser."""

import numpy as np
import pytest
from omegaconf import OmegaConf

from scaling_lab.fit.laws.spec import CompiledLaw, load_laws, tie_map
from scaling_lab.fit.fitting.optimize import huber_objective, lbfgs_batch, polish
from tests.helpers import fit_config


def _laws():
    return load_laws(OmegaConf.to_container(fit_config("source=csv").law))


def test_ties_ignore_names_a_law_lacks():
    tied = tie_map(["E", "alpha", "beta"], [["alpha", "beta", "gamma"]])
    assert tied == {"E": "E", "alpha": "alpha", "beta": "alpha"}
    with pytest.raises(ValueError, match="two ties"):
        tie_map(["alpha", "beta", "gamma"], [["alpha", "beta"], ["gamma", "beta"]])


@pytest.mark.parametrize("log_space", [True, False])
def test_compiled_law_matches_formula_and_finite_differences(log_space):
    spec = _laws()["inference_efficient"]
    model = CompiledLaw(spec, ties=[["alpha", "beta"]], log_space=log_space)
    assert model.free == ("E", "A", "B", "alpha", "epsilon", "gamma")
    values = {"E": 2.0, "A": 500.0, "B": 3000.0, "alpha": 0.35, "beta": 0.35, "epsilon": 0.01, "gamma": 0.5}
    theta = model.theta(values)
    x = {"N": np.array([1e7, 3e8]), "D": np.array([1e9, 5e10]), "R": np.array([16.0, 200.0])}
    logs = {k: np.log(v) for k, v in x.items()}
    pred, jac = model.predict_jac(theta[None, :], logs)
    assert pred[0] == pytest.approx(spec.law.evaluate(values, **x), rel=1e-12)
    for j in range(model.n_free):
        step = np.zeros_like(theta)
        step[j] = 1e-6 * max(1.0, abs(theta[j]))
        up, _ = model.predict_jac((theta + step)[None, :], logs)
        down, _ = model.predict_jac((theta - step)[None, :], logs)
        assert jac[j][0] == pytest.approx((up - down)[0] / (2 * step[j]), rel=1e-5)


def test_batched_lbfgs_agrees_with_scipy():
    """Many starts at once reach what scipy's L-BFGS-B reaches from the best of them."""
    model = CompiledLaw(_laws()["chinchilla"], ties=[], log_space=True)
    rng = np.random.default_rng(0)
    N, D = np.exp(rng.uniform(np.log(1e7), np.log(1e10), 60)), np.exp(rng.uniform(np.log(1e9), np.log(1e11), 60))
    y = (1.8 + 400 / N ** 0.34 + 2000 / D ** 0.37) * np.exp(0.005 * rng.standard_normal(60))
    fg = huber_objective(model, {"N": np.log(N), "D": np.log(D)}, y, 1e-3)
    lower, upper = model.theta_bounds()
    starts = np.column_stack([rng.uniform(-1, 1, 40), rng.uniform(0, 25, 40), rng.uniform(0, 25, 40),
                              rng.uniform(0, 2, 40), rng.uniform(0, 2, 40)])
    x, f, iters = lbfgs_batch(fg, starts, lower, upper)
    best = int(np.argmin(f))
    _, f_polished, _, _ = polish(fg, x[best], lower, upper)
    assert f[best] == pytest.approx(f_polished, rel=1e-6)
    assert (iters > 0).all()
