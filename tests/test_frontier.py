"""The compute-optimal frontier from isoFLOP profiles (Approach 2) beside the fitted law (Approach 3), on a
synthetic loss surface whose frontier is known: the minima, the exponent, the tokens per parameter, a budget with
no interior minimum dropped with its reason, the agreement check and the fallback to Approach 2."""

import numpy as np
import pandas as pd
import pytest

from scaling_lab.conf import compose
from scaling_lab.fit.fitting import approaches, isoflop
from scaling_lab.fit.fitting.cli import run

TRUE = {"E": 1.0, "A": 30.0, "B": 300.0, "alpha": 0.4, "beta": 0.4}
BUDGETS = [1.25e11, 2.5e11, 5e11, 1e12, 2e12]


def flops_per_token(n):
    return 6 * n * (1 + 3000 / n) ** 0.5   # attention and head: more than 6N at small N, as the model counts


def true_loss(n, d):
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def surface(path, noise=0.01, extra_budget=None):
    """A grid like the demo's (N 1.5e3-2e5, five budgets 2x apart, 3-1e4 tokens per parameter), 1% noise; with
    ``extra_budget``, a budget whose sizes all lie on one side of its optimum."""
    rng, rows = np.random.default_rng(0), []
    for c in BUDGETS:
        for n in np.geomspace(1.5e3, 2e5, 9):
            d = c / flops_per_token(n)
            if 3 <= d / n <= 1e4:
                rows.append({"N": n, "D": d, "budget": c, "loss": true_loss(n, d) * np.exp(rng.normal(0, noise))})
    if extra_budget:
        for n in np.geomspace(1e5, 4e5, 4):
            d = extra_budget / flops_per_token(n)
            rows.append({"N": n, "D": d, "budget": extra_budget, "loss": true_loss(n, d)})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def fit(path, out, *overrides):
    return run(compose("fit", ["source=csv", f"source.path={path}", "source.columns.N=N", "source.columns.D=D",
                               "source.columns.budget=budget", "law=chinchilla", "bootstrap.n=40",
                               "isoflop.n_bootstrap=100", "isoflop.e_profile=6", "protocol.max_starts=500",
                               "plots=false", "logger=none", f"out={out}", *overrides]))


def test_frontier_recovered_and_approaches_agree(tmp_path):
    doc = fit(surface(tmp_path / "iso.csv", extra_budget=1.6e10), tmp_path)
    iso = doc["isoflop"]
    # the true frontier at the sweep's own budgets, in its own FLOPs convention
    truth = [approaches.law_optimum(true_loss, c, flops_per_token, (1.5e3, 2e5)) for c in BUDGETS]
    a_true = np.polyfit(np.log(BUDGETS), np.log([t[0] for t in truth]), 1)[0]
    assert iso["budgets_used"] == 5
    assert iso["a"] == pytest.approx(a_true, abs=0.1) and iso["a_ci95"][0] < a_true < iso["a_ci95"][1]
    assert iso["a_ci95"][1] - iso["a_ci95"][0] < 0.3
    middle = iso["middle"]
    assert middle["budget"] == 5e11
    assert middle["tokens_per_param"] == pytest.approx(truth[2][1] / truth[2][0], rel=0.2)
    lo, hi = middle["tokens_per_param_ci95"]
    assert hi / lo < 10                                    # the ratio's interval spans less than a decade
    assert "flops_equivalent" in middle["conventions"]
    # the budget whose sizes all lie past its optimum is dropped, and says why
    assert iso["budgets_dropped"] == {
        "1.6e+10": "the lowest loss is at the smallest size trained (not bracketed: add smaller sizes)"}
    hold = iso["holdout"]
    assert hold["budget"] == 2e12 and 0.5 < hold["N_opt_ratio"] < 2 and abs(hold["loss_opt_rel_err"]) < 0.03
    frontier = iso["frontier"]
    assert frontier["agreement"]["a_agree"] and frontier["agreement"]["ratio_agree"]
    assert frontier["use"] == "approach3"
    assert all("sse_log" in p for p in frontier["approach3"]["profile"])


def test_flagged_approach3_falls_back_to_approach2(tmp_path, capsys):
    """E held above the lowest observed loss (a bound a user set): Approach 3 is flagged, and Approach 2's frontier
    is the one to use, with the reason printed."""
    doc = fit(surface(tmp_path / "iso.csv"), tmp_path, "isoflop.e_profile=0", "+law.chinchilla.bounds.E=[2.5,100]")
    frontier = doc["isoflop"]["frontier"]
    assert frontier["use"] == "approach2"
    assert "not below the lowest observed loss" in frontier["why"]
    assert "the frontier to use: Approach 2" in capsys.readouterr().out


def test_plan_uses_approach2_where_approach3_is_flagged(tmp_path, capsys):
    """scaling-plan on a fit.json whose law's frontier is flagged: the Chinchilla-style model lies on the isoFLOP
    minima's frontier, its tokens per parameter finite and with an interval, and the printout says why."""
    from scaling_lab.fit.plan import cli as plan_cli

    fit(surface(tmp_path / "iso.csv"), tmp_path / "fit", "isoflop.e_profile=0", "+law.chinchilla.bounds.E=[2.5,100]")
    capsys.readouterr()
    doc = plan_cli.run(compose("plan", [f"constants={tmp_path / 'fit' / 'fit.json'}", "target.chinchilla_params=2e4",
                                        "demand.tokens=1e9", f"out={tmp_path / 'plan'}", "plot.points=3"]))
    frontier, model = doc["frontier"], doc["chinchilla"]
    assert frontier["source"] == "approach2" and "not below the lowest observed loss" in frontier["why"]
    # on the isoFLOP frontier of this surface (a few hundred tokens per parameter at N 2e4), not the law's
    assert model["N"] == pytest.approx(2e4, rel=1e-6) and 50 < frontier["tokens_per_param"] < 2000
    lo, hi = frontier["tokens_per_param_ci95"]
    assert lo < frontier["tokens_per_param"] < hi and hi / lo < 10
    assert "lies on Approach 2's frontier" in capsys.readouterr().out


def test_the_held_out_budget_is_predicted_from_every_fitted_one(tmp_path):
    """The demo's test of extrapolation in compute: the largest budget is held out of the fit (source.fit_rows), so
    the frontier is fitted on the other four and the held-out budget's own parabola is what the prediction meets."""
    doc = fit(surface(tmp_path / "iso.csv"), tmp_path, 'source.fit_rows="budget < 1.5e12"', "isoflop.e_profile=0")
    iso = doc["isoflop"]
    assert iso["budgets_used"] == 4 and [r["budget"] for r in iso["optima"]] == BUDGETS[:4]
    hold = iso["holdout"]
    assert hold["held_out"] and hold["budget"] == 2e12 and hold["fitted_budgets"] == 4
    assert 0.5 < hold["N_opt_ratio"] < 2 and abs(hold["loss_opt_rel_err"]) < 0.03


def test_a_window_keeps_each_parabola_near_its_minimum(tmp_path):
    """isoflop.window=4: each budget's parabola goes through the sizes within 4x of its best one only, and still
    finds the known frontier."""
    doc = fit(surface(tmp_path / "iso.csv"), tmp_path, "isoflop.window=4", "isoflop.e_profile=0")
    iso = doc["isoflop"]
    assert iso["window"] == 4 and iso["budgets_used"] == 5
    assert all(3 <= r["points"] <= 5 for r in iso["optima"])     # of 5-9 sizes per budget, 1.84x apart
    truth = [approaches.law_optimum(true_loss, c, flops_per_token, (1.5e3, 2e5)) for c in BUDGETS]
    a_true = np.polyfit(np.log(BUDGETS), np.log([t[0] for t in truth]), 1)[0]
    assert iso["a"] == pytest.approx(a_true, abs=0.1)


def test_plan_takes_the_frontier_of_another_sweeps_isoflop_fit(tmp_path):
    """frontier=<fit.json>: the demo's shape study cannot locate its own frontier, so its plan takes the isoFLOP
    study's; a fit without isoFLOP profiles, or one counting N another way, is refused in one line."""
    from scaling_lab.fit.plan import cli as plan_cli

    fit(surface(tmp_path / "iso.csv"), tmp_path / "iso", "isoflop.e_profile=0")
    fit(surface(tmp_path / "plain.csv"), tmp_path / "plain", "isoflop.enabled=false", "source.n_convention=total")
    common = ["target.chinchilla_params=2e4", "demand.tokens=1e9", f"out={tmp_path / 'plan'}", "plot.points=3"]
    doc = plan_cli.run(compose("plan", ["constants=sardana2024", f"frontier={tmp_path / 'iso' / 'fit.json'}",
                                        *common]))
    assert doc["frontier"]["source"] == "approach2" and doc["frontier"]["why"].startswith("frontier=")
    assert 50 < doc["frontier"]["tokens_per_param"] < 2000 and len(doc["frontier"]["tokens_per_param_ci95"]) == 2
    with pytest.raises(ValueError, match="has no isoFLOP frontier"):
        plan_cli.run(compose("plan", ["constants=sardana2024", f"frontier={tmp_path / 'plain' / 'fit.json'}",
                                      *common]))
    with pytest.raises(ValueError, match="counts N as 'unknown', the constants as 'total'"):
        plan_cli.run(compose("plan", [f"constants={tmp_path / 'plain' / 'fit.json'}",
                                      f"frontier={tmp_path / 'iso' / 'fit.json'}", *common]))


def test_a_plan_far_outside_the_fitted_range_says_so(tmp_path, capsys):
    from scaling_lab.fit.plan import cli as plan_cli

    fit(surface(tmp_path / "iso.csv"), tmp_path / "fit", "isoflop.e_profile=0")
    common = [f"constants={tmp_path / 'fit' / 'fit.json'}", "demand.tokens=1e9", f"out={tmp_path / 'plan'}",
              "plot.points=3"]
    inside = plan_cli.run(compose("plan", [*common, "target.chinchilla_params=2e4"]))
    assert not [n for n in inside["extrapolation"] if n.startswith("chinchilla N")]
    far = plan_cli.run(compose("plan", [*common, "target.chinchilla_params=2e7"]))  # 100x the largest N fitted
    assert any(n.startswith("chinchilla N 2e+07 is 100x above the largest N fitted") for n in far["extrapolation"])
    assert "warning: the plan extrapolates the law: chinchilla N" in capsys.readouterr().out


def test_the_interval_of_a_covers_the_truth_on_a_sparse_grid():
    """The sizes a sweep trains are its design, not a sample: the residual bootstrap keeps them and redraws only the
    noise. On noisy replicates of a grid like the demo's, each parabola through 3 to 5 sizes (isoflop.window=4),
    a's 95% interval holds the true exponent in nearly all of them."""
    truth = [approaches.law_optimum(true_loss, c, flops_per_token, (1.5e3, 2e5)) for c in BUDGETS]
    a_true = np.polyfit(np.log(BUDGETS), np.log([t[0] for t in truth]), 1)[0]
    covered, widths = 0, []
    for seed in range(20):
        rng, rows = np.random.default_rng(seed), []
        for c in BUDGETS:
            for n in np.geomspace(1.5e3, 2e5, 9):
                d = c / flops_per_token(n)
                if 3 <= d / n <= 1e4:
                    rows.append({"N": n, "D": d, "budget": c, "loss": true_loss(n, d) * np.exp(rng.normal(0, 0.01))})
        iso = isoflop.analyse(pd.DataFrame(rows), min_points=3, n_boot=80, seed=seed, window=4)
        lo, hi = iso["a_ci95"]
        covered += lo < a_true < hi
        widths.append(hi - lo)
    assert covered >= 17, (covered, a_true)
    assert np.median(widths) < 0.5


def test_a_budget_not_bracketed_names_the_sizes_to_add():
    """A profile still falling at its largest size (or rising from its smallest) has no minimum among the sizes
    trained, whatever a parabola through them says: it is dropped, and the note says which way to extend the grid."""
    sizes = np.geomspace(1e3, 1e5, 5)
    rising = pd.DataFrame({"N": sizes, "D": 1e12 / (6 * sizes), "budget": 1e12, "loss": [2.0, 2.1, 2.3, 2.6, 3.0]})
    falling = rising.assign(budget=2e12, loss=[3.0, 2.6, 2.3, 2.1, 2.05])
    table = isoflop.optima(pd.concat([rising, falling]), min_points=3).set_index("budget")
    assert table.loc[1e12, "note"].endswith("(not bracketed: add smaller sizes)")
    assert table.loc[2e12, "note"].endswith("(not bracketed: add larger sizes)")
    assert table["N_opt"].isna().all()


def test_without_residuals_there_is_no_interval_and_the_printout_says_why():
    """Three sizes per budget: every parabola is exact, so the noise is not measured and no interval is given."""
    from scaling_lab.fit.fitting import summary

    rows = [{"N": n, "D": c / (6 * n), "budget": c, "loss": true_loss(n, c / (6 * n))}
            for c in BUDGETS[:3] for n in (3e3, 1e4, 3e4)]
    iso = isoflop.analyse(pd.DataFrame(rows), min_points=3, n_boot=50, seed=0)
    assert iso["budgets_used"] == 3 and "a_ci95" not in iso
    assert "no interval: every budget's parabola goes through exactly 3 points" in summary.isoflop_block(iso, {})
