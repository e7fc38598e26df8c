"""Our own sweep records (source=results), the fit.json export planners consume, and isoFLOP analysis."""

import json

import numpy as np
import pandas as pd
import pytest

from scaling_lab.fit.fitting import isoflop
from scaling_lab.fit.fitting.cli import run
from scaling_lab.fit.io.fitfile import load_constants, read_fit_json
from scaling_lab.fit.io.store import write_record
from tests.helpers import fit_config


def _write_sweep(results_dir, sweep="demo"):
    """A small sweep: 4 sizes x 2 shapes x 2 budgets from the inference-efficient law, plus 2 failed runs."""
    rng = np.random.default_rng(0)
    i = 0
    for n in (2e6, 6e6, 2e7, 6e7):
        for d_model, n_layers in ((128, 8), (256, 2)):
            for tokens in (4e7, 2e8):
                r = d_model / n_layers
                loss = (1.5 + 300 / n ** 0.35 + 900 / tokens ** 0.3) * (1 + 0.002 * r ** 0.6)
                write_record(results_dir, {
                    "run_id": f"r{i}", "sweep": sweep, "status": "ok",
                    "shape": {"d_model": d_model, "n_layers": n_layers, "aspect_ratio": r},
                    "params": {"total": n * 1.3, "non_embedding": n}, "tokens": {"budget": tokens, "seen": tokens},
                    "loss": {"final": loss * np.exp(0.002 * rng.standard_normal())}})
                i += 1
    for j in range(2):
        write_record(results_dir, {"run_id": f"bad{j}", "sweep": sweep, "status": "failed", "error": "OOM"})


def test_results_sweep_fits_both_laws(tmp_path, capsys):
    _write_sweep(tmp_path / "results")
    out = tmp_path / "fit"
    doc = run(fit_config("source=results", "sweep=demo", f"results_dir={tmp_path / 'results'}",
                         f"out={out}", "bootstrap.n=20", "protocol.max_starts=1000"))
    printed = capsys.readouterr().out
    assert "2 failed runs excluded" in printed and "== comparison" in printed
    prov = doc["provenance"]
    assert prov["rows"] == {"total": 16, "fit": 16, "heldout": 0, "excluded_failed": 2}
    assert prov["n_convention"] == "non_embedding" and prov["sweep"] == "demo"
    assert set(doc["laws"]) == {"chinchilla", "inference_efficient"}
    # Spearman within groups of equal size and budget (two shapes each): 8 groups, too small (<3) to rank
    assert doc["laws"]["inference_efficient"]["metrics"]["r2"] > 0.99
    for png in ("loss_vs_n.png", "predicted_vs_actual.png", "residuals.png", "loss_vs_aspect_ratio.png"):
        assert (out / png).stat().st_size > 1000
    rows = pd.read_csv(out / "predictions.csv")
    assert len(rows) == 16
    # where the law was fitted: each input's range over the fit rows (a selection keeps to the R range)
    assert prov["fitted_range"] == {x: [rows[x].min(), rows[x].max()] for x in ("N", "D", "R")}


def test_fit_json_schema(tmp_path):
    _write_sweep(tmp_path / "results")
    run(fit_config("source=results", "sweep=demo", f"results_dir={tmp_path / 'results'}",
                   f"out={tmp_path}", "bootstrap.n=5", "protocol.max_starts=300", "plots=false", "law=chinchilla"))
    doc = read_fit_json(tmp_path / "fit.json")
    json.loads((tmp_path / "fit.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    law = doc["laws"]["chinchilla"]
    assert set(law["params"]) == {"E", "A", "B", "alpha", "beta"} and set(law["ci95"]) == set(law["params"])
    assert {"mse", "r2", "mse_heldout", "r2_heldout", "max_rel_err_heldout", "spearman"} <= set(law["metrics"])
    assert law["metrics"]["mse_heldout"] is None            # no held-out rows: null, not NaN
    assert {"a", "b", "N_opt", "D_opt", "a_ci95"} <= set(law["compute_optimal"])
    assert isinstance(law["not_identified"], list) and set(law["not_identified"]) == set(law["not_identified_why"])
    constants = load_constants(tmp_path / "fit.json", "chinchilla")
    assert constants.predict(N=1e7, D=1e8) == pytest.approx(
        law["params"]["E"] + law["params"]["A"] / 1e7 ** law["params"]["alpha"]
        + law["params"]["B"] / 1e8 ** law["params"]["beta"])


def test_isoflop_recovers_exponent():
    """Parabola minima of a Chinchilla law's isoFLOP profiles follow a = beta / (alpha + beta)."""
    alpha, beta = 0.34, 0.28
    rows = []
    for c in np.geomspace(1e18, 1e21, 6):
        for n in np.geomspace(1e7, 1e11, 25):
            d = c / (6 * n)
            rows.append({"N": n, "D": d, "budget": c, "loss": 1.69 + 406.4 / n ** alpha + 410.7 / d ** beta})
    points = pd.DataFrame(rows)
    points = points[points.groupby("budget")["loss"].rank(method="first") <= 9]      # 9 sizes around each minimum
    result = isoflop.analyse(points, min_points=3, n_boot=20, seed=0)
    assert result["a"] == pytest.approx(beta / (alpha + beta), abs=0.01)
    assert result["b"] == pytest.approx(alpha / (alpha + beta), abs=0.01)
    snapped = isoflop.snap_budgets(np.array([1e18, 1.02e18, 3e18]), 0.05)
    assert snapped.tolist() == pytest.approx([1.01e18, 1.01e18, 3e18])


def test_groups_come_from_actual_n_not_the_target():
    from scaling_lab.fit.fitting.sources import _groups_of_equal_size

    # a size class of 8e4 whose solved shapes span 74k-83k (each within 10% of the target), one of 1.6e5, and the
    # 8e4 class again at another budget
    N = np.array([74_144, 75_544, 77_200, 83_280, 148_160, 153_840, 166_464, 74_144, 83_280])
    D = np.array([1.2e5] * 7 + [2.4e5] * 2)
    labels = _groups_of_equal_size(N, D)
    assert len(set(labels[:4])) == 1 and len(set(labels[4:7])) == 1 and labels[0] != labels[4]
    assert labels[7] == labels[8] != labels[0]  # another budget, another group
    assert labels[0].startswith("N~7.75e+04")  # named by the group's actual N (geometric mean), not the target
    # sizes 2x apart never share a group, however the grid's targets were spelled
    assert len(set(_groups_of_equal_size(np.array([5e4, 6e4, 1e5, 1.2e5]), np.full(4, 1e6)))) == 2


def test_protocol_choice_holds_back_the_whole_largest_size_class():
    """protocol=auto validates on the largest size class formed as the fit's groups are: every shape of the class
    (the demo's 1.6e5 shapes span 147,904-166,512), not only the one whose solved width came out largest."""
    from scaling_lab.fit.fitting.choose import validation_split

    N = np.array([74_144, 75_544, 77_160, 83_280, 147_904, 151_032, 154_000, 166_512] * 2, dtype=float)
    rows = pd.DataFrame({"N": N, "D": [5.12e4] * 8 + [5.12e5] * 8})
    held = validation_split(rows, {"holdout": "largest_n", "class_rtol": 0.1})
    assert held.tolist() == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4
    by_compute = validation_split(rows, {"holdout": "largest_c", "class_rtol": 0.1})
    assert by_compute.tolist() == [False] * 12 + [True] * 4  # the 1.6e5 class at the 10x budget


def test_mixed_corpora_are_refused_unless_rows_pick_one(tmp_path):
    _write_sweep(tmp_path / "results")
    for i, (corpus, tok) in enumerate((("python3.12-stdlib", "bytes"), ("/data/prose", "bytes"))):
        for r in range(8):
            path = tmp_path / "results" / "demo" / f"r{8 * i + r}.json"
            rec = json.loads(path.read_text())
            rec["data"] = {"corpus": corpus, "tokenizer": tok, "corpus_hash": f"{i}" * 16}
            path.write_text(json.dumps(rec))
    base = ("source=results", "sweep=demo", f"results_dir={tmp_path / 'results'}", f"out={tmp_path / 'fit'}",
            "bootstrap.n=0", "protocol.max_starts=200", "plots=false", "law=chinchilla")
    with pytest.raises(Exception, match=r"mix 2 corpora.*python3.12-stdlib \(bytes.*: 8 runs.*/data/prose"):
        run(fit_config(*base))
    doc = run(fit_config(*base, "source.rows=\"corpus == '/data/prose'\""))
    assert doc["provenance"]["corpora"] == {"/data/prose (bytes, hash 11111111)": 8}
