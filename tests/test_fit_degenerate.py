"""Degenerate inputs are refused in one line before any fitting (issue 23); the fit writes under results_dir by
default; evaluating grid starts in chunks bounds the memory and finds the same optimum as evaluating them at once."""

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling_lab.conf import compose
from scaling_lab.fit.fitting.cli import run
from scaling_lab.fit.fitting.fitlaw import compile_law
from scaling_lab.fit.fitting.optimize import (Projection, arrays_alive, huber_objective, lbfgs_batch, screen,
                                               start_grid)
from scaling_lab.fit.fitting.sources import FitInputError
from scaling_lab.fit.laws.spec import load_laws

TRUE = {"E": 1.8, "A": 400.0, "B": 2000.0, "alpha": 0.34, "beta": 0.37}


def _runs(n=12, seed=0, random=False):
    """Sizes and token counts along one line (D falling as N rises), or drawn at random (log-uniform)."""
    rng = np.random.default_rng(seed)
    if not random:
        N, D = np.geomspace(1e7, 1e9, n), np.geomspace(1e9, 1e11, n)[::-1]
    else:
        N, D = 10 ** rng.uniform(7, 9, n), 10 ** rng.uniform(9, 11, n)
    loss = TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]
    return pd.DataFrame({"N": N, "D": D, "loss": loss * np.exp(0.01 * rng.standard_normal(n))})


def _csv(tmp_path, frame):
    path = tmp_path / "runs.csv"
    frame.to_csv(path, index=False)
    return path


def _fit(tmp_path, path, *overrides):
    return run(compose("fit", ["source=csv", f"source.path={path}", f"out={tmp_path / 'out'}", "bootstrap.n=0",
                               "plots=false", "logger=none", "law=chinchilla", *overrides]))


def test_constant_input_is_one_line_from_the_console_script(tmp_path):
    path = _csv(tmp_path, _runs().assign(N=1e8))
    proc = subprocess.run([str(Path(sys.executable).parent / "scaling-fit"), "source=csv", f"source.path={path}",
                           f"out={tmp_path / 'out'}", "law=chinchilla", "logger=none"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "scaling-fit: error: no selected law can be fitted to this data: N=1e+08 in all 12 fit rows: the effect of "
        "a constant input cannot be fitted (vary it, or fit a law without it)"]
    assert not (tmp_path / "out").exists()


def test_constant_input_over_the_fit_rows_only(tmp_path):
    """D varies over the table but not over the rows fitted: the fit rows are what count."""
    frame = _runs().assign(D=lambda f: np.where(f["N"] < 3e8, 1e10, f["D"]))
    with pytest.raises(FitInputError, match=r"D=1e\+10 in all \d+ fit rows"):
        _fit(tmp_path, _csv(tmp_path, frame), 'source.fit_rows="N < 3e8"')
    assert not (tmp_path / "out").exists()


def test_a_law_whose_input_is_constant_is_skipped_and_the_others_fitted(tmp_path, capsys):
    """One shape in every run (R constant): the inference-efficient law is skipped with the reason, Chinchilla fits."""
    doc = _fit(tmp_path, _csv(tmp_path, _runs().assign(R=32.0)), "law=[chinchilla,inference_efficient]",
               "source.columns.R=R")
    assert set(doc["laws"]) == {"chinchilla"}
    assert "skipping law inference_efficient: R=32 in all 12 fit rows" in capsys.readouterr().out


def test_duplicated_column_names_are_named(tmp_path):
    path = tmp_path / "runs.csv"
    frame = _runs()
    frame.assign(loss2=frame["loss"] + 1).to_csv(path, index=False, header=["N", "D", "loss", "loss"])
    with pytest.raises(FitInputError, match=r"runs.csv has duplicated column name\(s\) \['loss'\]"):
        _fit(tmp_path, path)


def test_law_parameter_named_like_an_input(tmp_path):
    with pytest.raises(FitInputError, match=r"law 'clash': parameter\(s\) \['N'\] named like input\(s\)"):
        _fit(tmp_path, _csv(tmp_path, _runs()), "~law", "+law.clash.formula='E + N / D**beta'",
             "+law.clash.inputs=[N,D]", "+law.clash.params=[E,N,beta]")


def test_default_out_follows_results_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    cfg = compose("fit", ["source=csv", f"source.path={_csv(tmp_path, _runs())}", f"results_dir={elsewhere}",
                          "bootstrap.n=0", "plots=false", "logger=none", "law=chinchilla"])
    assert cfg.out == f"{elsewhere}/fit/csv"
    run(cfg)
    assert (elsewhere / "fit" / "csv" / "fit.json").is_file()
    assert not (tmp_path / "results").exists()


def _problem(n=40, law="chinchilla", protocol="default"):
    frame = _runs(n, seed=1, random=True)
    proto = compose("fit", [f"protocol={protocol}"]).protocol
    spec = load_laws(compose("fit", [f"law={law}"]).law)[law]
    log_inputs = {"N": np.log(frame["N"].to_numpy()), "D": np.log(frame["D"].to_numpy())}
    return compile_law(spec, proto), log_inputs, frame["loss"].to_numpy(), proto


def test_chunked_huber_grid_finds_the_same_optimum():
    """The default protocol's screen of the full grid and the refinement, in chunks of 7 starts (the last one
    shorter) against every start at once."""
    model, log_inputs, y, protocol = _problem()
    starts, _ = start_grid(model, protocol.grid, list(protocol.grid_default), int(protocol.max_starts), 0)
    lower, upper = model.theta_bounds()
    optima = []
    for budget in (7 * 8 * len(y) * arrays_alive(model), 2 ** 40):    # 7 starts a chunk; all at once
        fg = huber_objective(model, log_inputs, y, float(protocol.delta), budget=budget)
        xs, fs = screen(fg, starts, lower, upper, int(protocol.screen_iter))
        kept = xs[np.argsort(fs, kind="stable")[:int(protocol.refine)]]
        x, f, _ = lbfgs_batch(fg, kept, lower, upper, max_iter=int(protocol.max_iter))
        optima.append((fs, x[np.argmin(f)], f.min()))
    (fs_chunked, x_chunked, f_chunked), (fs_whole, x_whole, f_whole) = optima
    np.testing.assert_allclose(fs_chunked, fs_whole, rtol=1e-12)
    np.testing.assert_allclose(x_chunked, x_whole, rtol=1e-10)
    assert f_chunked == pytest.approx(f_whole, rel=1e-12)
    assert model.values(x_chunked)["alpha"] == pytest.approx(TRUE["alpha"], abs=0.05)


def test_chunked_projection_with_weights():
    """vpnls's projected objective with bootstrap weights (each start naming its row of weights), in chunks of one
    start and at once: the same objective, gradient and solved linear parameters."""
    model, log_inputs, y, protocol = _problem(protocol="vpnls")
    weights = np.random.default_rng(0).multinomial(len(y), np.full(len(y), 1 / len(y)), size=3).astype(float)
    theta = np.random.default_rng(1).uniform(0.1, 1.0, size=(7, 2))
    rows = np.array([0, 2, 1, 1, 0, 2, 2])
    chunked, whole = (Projection(model, log_inputs, y, weights=weights, budget=b) for b in (1, 2 ** 40))
    for a, b in zip(chunked.fg(theta, rows), whole.fg(theta, rows)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_allclose(chunked.full(theta, rows), whole.full(theta, rows), rtol=1e-12)


def test_chunks_bound_the_memory():
    """1000 starts over 5000 rows: at once, each (starts x rows) array is 40 MB; within an 8 MB budget the whole
    evaluation stays near the budget."""
    model, log_inputs, y, protocol = _problem(n=5000)
    starts, _ = start_grid(model, protocol.grid, list(protocol.grid_default), 1000, 0)
    budget = 8 * 2 ** 20
    fg = huber_objective(model, log_inputs, y, float(protocol.delta), budget=budget)
    tracemalloc.start()
    f, g = fg(starts, np.arange(len(starts)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f.shape == (1000,) and g.shape == (1000, model.n_free)
    assert peak < 2 * budget, f"peak {peak / 2 ** 20:.1f} MiB"


def test_prediction_bands_in_blocks_of_rows(monkeypatch):
    """The bands over resampled laws come out the same whether the rows are taken at once or block by block (a
    small memory budget); the prediction intervals, drawn at random, keep their width."""
    from scaling_lab.fit.fitting import fitlaw

    model = _problem()[0]
    rng = np.random.default_rng(0)
    inputs = {"N": 10 ** rng.uniform(6, 9, 3000), "D": 10 ** rng.uniform(8, 11, 3000)}
    base = model.theta({"E": 1.8, "A": 480.0, "B": 2000.0, "alpha": 0.35, "beta": 0.36})
    samples = base + 0.01 * rng.standard_normal((50, len(base)))
    residuals = np.exp(0.01 * rng.standard_normal(500))
    whole = fitlaw.prediction_bands(model, samples, inputs, residuals, True, 1)
    monkeypatch.setattr(fitlaw, "MEMORY_BUDGET", 8 * 50 * arrays_alive(model) * 64)  # blocks of 64 rows
    blocks = fitlaw.prediction_bands(model, samples, inputs, residuals, True, 1)
    np.testing.assert_allclose(blocks[0], whole[0], rtol=1e-12)
    width = lambda band: np.median(band[1] - band[0])  # noqa: E731
    assert abs(width(blocks[1]) / width(whole[1]) - 1) < 0.05
