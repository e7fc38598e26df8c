"""Shape selection: fit/selection.py (enumerate, predict, rank, Pareto front, rules), scaling-select
(pipeline/select.py), the Bian et al. 2025 selection, and a shrunken verification (pipeline/verify.py)."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling_lab.fit import selection
from scaling_lab.fit.fitting.cli import run as fit_run
from scaling_lab.conf import compose
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.fit.latency import merge_into_fit_json
from scaling_lab.models.shapes import non_embedding_params
from scaling_lab.fit.io import store
from scaling_lab.pipeline import verify
from scaling_lab.pipeline.device import device_name
from scaling_lab.pipeline import select as select_cli
from tests.helpers import latency_section, shared_path
from scaling_lab.fit.latency import LatencyModel

IE_FORMULA = "(E + A / N**alpha + B / D**beta) * (1 + epsilon * R**gamma)"
# Toy law with a noticeable shape term, and the planner tests' latency model: 1 ms + 0.5 ms a layer + 1.2e-8 ms per
# layer weight; at a fixed N it grows linearly with depth (Bian et al.'s finding).
PARAMS = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283, "epsilon": 0.005, "gamma": 0.5}
LATENCY = latency_section("gpu:toy", call=1.0, layer=0.5, weight_bytes=1.2e-8 / 48)


def law(**params) -> LawConstants:
    return LawConstants.from_dict("inference_efficient", {"formula": IE_FORMULA, "inputs": ["N", "D", "R"],
                                                          "params": {**PARAMS, **params}})


def write_fit_json(path, latency=LATENCY, laws=("chinchilla", "inference_efficient"), convention="non_embedding",
                   fitted_range=None):
    specs = {"chinchilla": {"formula": "E + A / N**alpha + B / D**beta", "inputs": ["N", "D"],
                            "params": {k: PARAMS[k] for k in ("E", "A", "B", "alpha", "beta")}},
             "inference_efficient": law().to_dict()}
    provenance = {"n_convention": convention, **({"fitted_range": fitted_range} if fitted_range else {})}
    doc = {"schema_version": 1, "provenance": provenance, "laws": {k: specs[k] for k in laws}}
    if latency is not None:
        doc["latency"] = latency
    return write_json_atomic(path, doc)


def count(L, d):
    return 12 * L * d * d


# ----- enumerate --------------------------------------------------------------------------------------------

def test_enumerate_yields_exactly_the_valid_shapes():
    lo, hi = 0.9e6, 1.1e6
    shapes = selection.enumerate_shapes(count, lo, hi, (2, 12), 16)
    brute = {(L, d) for L in range(2, 13) for d in range(16, 2000, 16) if lo <= count(L, d) <= hi}
    assert set(zip(shapes.n_layers, shapes.d_model)) == brute and len(shapes) == len(brute) > 5
    assert (shapes.d_model % 16 == 0).all() and (shapes.n_heads == shapes.d_model // 16).all()
    assert np.allclose(shapes.R, shapes.d_model / shapes.n_layers) and shapes.N.between(lo, hi).all()
    narrow = selection.enumerate_shapes(count, lo, hi, (2, 12), 16, aspect_ratio=(20, 60))
    assert narrow.R.between(20, 60).all() and 0 < len(narrow) < len(shapes)


@pytest.mark.parametrize("args,message", [
    ((1e3, 1.1e3, (1, 4), 64), "no shape has"),            # even the narrowest shape is too big
    ((1e6, 1e5, (1, 4), 8), "params_min <= params_max"),
    ((1e5, 1e6, (4, 2), 8), "n_layers min <= max"),
])
def test_enumerate_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        selection.enumerate_shapes(count, *args)


def test_given_shapes_need_head_dim_multiples():
    table = selection.given_shapes([[2, 64], [4, 32]], count, 16)
    assert list(table.N) == [count(2, 64), count(4, 32)]
    with pytest.raises(ValueError, match="multiple of head_dim 16"):
        selection.given_shapes([[2, 60]], count, 16)


# ----- rank, front, select ----------------------------------------------------------------------------------

def random_table(seed, n=40):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"n_layers": rng.integers(1, 30, n), "d_model": rng.integers(1, 50, n) * 8,
                         "n_heads": 1, "N": 1e6, "R": 1.0, "loss": rng.choice(np.linspace(2, 3, 15), n),
                         "latency_ms": rng.choice(np.linspace(1, 5, 15), n)})


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_matches_brute_force(seed):
    table = random_table(seed)
    front = selection.pareto_front(table)

    def dominated(i):
        a = table.loc[i]
        return any(b.loss <= a.loss and b.latency_ms <= a.latency_ms
                   and (b.loss < a.loss or b.latency_ms < a.latency_ms) for j, b in table.iterrows() if j != i)

    strict = {i for i in table.index if not dominated(i)}
    kept = set(table.index[front])
    assert kept <= strict  # never a dominated shape
    # of shapes equal on both, exactly one is kept
    assert {tuple(table.loc[i, ["loss", "latency_ms"]]) for i in kept} == \
        {tuple(table.loc[i, ["loss", "latency_ms"]]) for i in strict}
    assert len(kept) == len({tuple(table.loc[i, ["loss", "latency_ms"]]) for i in kept})


def test_rank_orders_by_loss_then_latency():
    ranked = selection.rank(random_table(7))
    assert list(ranked["rank"]) == list(range(1, len(ranked) + 1))
    assert all(ranked.loss.diff().dropna() >= 0)
    ties = ranked.groupby("loss").latency_ms.apply(lambda s: s.is_monotonic_increasing)
    assert ties.all() and ranked.pareto.any()


def test_both_rules_against_brute_force():
    table = random_table(3)
    for budget in (1.5, 3.0, 5.0):
        chosen = selection.select(table, latency_budget_ms=budget)["chosen"]
        ok = table[table.latency_ms <= budget]
        assert chosen["loss"] == ok.loss.min() and chosen["latency_ms"] <= budget
    for tol in (0.0, 0.05, 0.2):
        result = selection.select(table, loss_tolerance=tol)
        ok = table[table.loss <= table.loss.min() * (1 + tol)]
        assert result["chosen"]["latency_ms"] == ok.latency_ms.min()
        assert result["chosen"]["loss"] == ok[ok.latency_ms == ok.latency_ms.min()].loss.min()
        assert result["best_loss"]["loss"] == table.loss.min()
    assert selection.select(table, loss_tolerance=10)["chosen"]["latency_ms"] == table.latency_ms.min()


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one rule"),
    ({"latency_budget_ms": 1.0, "loss_tolerance": 0.01}, "exactly one rule"),
    ({"latency_budget_ms": 0.5}, "no shape meets the latency budget of 0.5 ms; the fastest"),
    ({"latency_budget_ms": -1.0}, "must be > 0"),
    ({"loss_tolerance": -0.1}, "must be >= 0"),
])
def test_select_bad_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        selection.select(random_table(1), **kwargs)


# ----- scaling-select ---------------------------------------------------------------------------------------

def select_config(tmp_path, *overrides):
    return compose("select", [f"out={tmp_path / 'sel'}", "budget.tokens=1e7", *overrides])


def test_cli_selects_and_writes(tmp_path, capsys):
    fit_json = write_fit_json(tmp_path / "fit.json")
    result = select_cli.run(select_config(tmp_path, f"constants={fit_json}", "budget.params=2e5",
                                          "select.loss_tolerance=0.01"))
    table = pd.read_csv(tmp_path / "sel" / "candidates.csv")
    assert result == json.loads((tmp_path / "sel" / "selection.json").read_text())
    assert result["candidates"] == len(table) > 5 and result["n_convention"] == "non_embedding"
    # N counted as the fit counted it: non-embedding parameters of models.gpt
    assert all(row.N == non_embedding_params(row.n_layers, row.d_model, 4.0) for row in table.itertuples())
    assert table.N.between(1.8e5, 2.2e5).all() and (table.d_model % 8 == 0).all()
    assert table.n_layers.between(1, 16).all()
    assert np.allclose(table.loss, law().predict(N=table.N, D=1e7, R=table.R))
    head = 4 * 1.2e-8 / 48 * 257 * table.d_model  # the fp32 output head the law reads per token
    assert np.allclose(table.latency_ms, 1.0 + 0.5 * table.n_layers + 1.2e-8 * table.n_layers * table.d_model ** 2
                       + head)
    assert np.allclose(table.latency_ms, LatencyModel.from_dict(LATENCY).predict(table.n_layers, table.d_model))
    chosen = result["chosen"]
    assert chosen["loss"] <= table.loss.min() * 1.01 and chosen["pareto"]
    assert result["latency"]["source"] == "model" and result["latency"]["device"] == "gpu:toy"
    assert [p["latency_ms"] for p in result["pareto"]] == sorted(p["latency_ms"] for p in result["pareto"])
    out = capsys.readouterr().out
    assert "Pareto front" in out and "selected (fastest within 1%" in out and "Bian et al. 2025" in out


def test_cli_keeps_to_the_aspect_ratios_the_law_was_fitted_on(tmp_path, capsys):
    """Past the fitted R range the law's R term extrapolates: the selection enumerates only shapes inside it (and
    says so when the choice sits at that edge) unless select.within_fitted_R=false."""
    fit_json = write_fit_json(tmp_path / "fit.json", fitted_range={"N": [1e4, 1e5], "R": [8.0, 40.0]})
    args = [f"constants={fit_json}", "budget.params=2e5", "select.loss_tolerance=0.05"]
    inside = select_cli.run(select_config(tmp_path, *args))
    table = pd.read_csv(tmp_path / "sel" / "candidates.csv")
    assert table.R.between(8, 40).all() and inside["aspect_ratio_range"] == [8.0, 40.0]
    # the toy latency model makes depth expensive: the choice is the shallowest shape inside the range, the widest
    assert inside["chosen"]["R"] == table.R.max() and "widest candidate" in inside["R_edge"]
    assert "R in [8, 40]" in capsys.readouterr().out
    everything = select_cli.run(select_config(tmp_path, *args, "select.within_fitted_R=false"))
    assert everything["candidates"] > inside["candidates"] and everything["chosen"]["R"] > 40
    assert everything["R_edge"] is None and everything["aspect_ratio_range"] == [None, None]
    # narrowed further by arch.aspect_ratio, never widened by it
    both = select_cli.run(select_config(tmp_path, *args, "arch.aspect_ratio=[4,20]"))
    assert both["aspect_ratio_range"] == [8.0, 20.0]
    hostile = write_fit_json(tmp_path / "bad.json", fitted_range={"R": "__import__('os')"})
    with pytest.raises(ValueError, match="fitted_range.R must be"):
        select_cli.run(select_config(tmp_path, f"constants={hostile}", *args[1:]))


def test_cli_total_convention_counts_embeddings(tmp_path):
    fit_json = write_fit_json(tmp_path / "fit.json", convention="total")
    result = select_cli.run(select_config(tmp_path, f"constants={fit_json}", "budget.params=2e5",
                                          "select.latency_budget_ms=3"))
    table = pd.read_csv(tmp_path / "sel" / "candidates.csv")
    embedding = (257 + 128) * table.d_model  # tied head, learned positions (conf/arch/demo.yaml)
    assert np.allclose(table.N, [non_embedding_params(r.n_layers, r.d_model, 4.0) for r in table.itertuples()]
                       + embedding)
    assert result["chosen"]["latency_ms"] <= 3 and result["n_convention"] == "total"


def test_cli_measures_candidates_on_this_device(tmp_path):
    fit_json = write_fit_json(tmp_path / "fit.json", latency=None)
    result = select_cli.run(select_config(tmp_path, f"constants={fit_json}", "budget.params=3e3", "budget.band=0.3",
                                          "arch.n_layers=[1,3]", "select.measure=true", "select.loss_tolerance=0.05",
                                          "select.protocol.prompt_len=8", "select.protocol.decode_tokens=4",
                                          "select.protocol.warmup=1", "select.protocol.repeats=2"))
    table = pd.read_csv(tmp_path / "sel" / "candidates.csv")
    assert result["latency"]["source"] == "measured" and result["latency"]["device"].startswith("cpu")
    assert result["latency"]["protocol"]["decode_tokens"] == 4 and (table.latency_ms > 0).all()


@pytest.mark.parametrize("fit_kwargs,overrides,message", [
    ({"laws": ("chinchilla",)}, ["budget.params=2e5", "select.loss_tolerance=0.01"], "no 'inference_efficient' law"),
    ({}, ["budget.params=1e2", "select.loss_tolerance=0.01"], "no shape has"),
    ({}, ["budget.params=2e5", "select.latency_budget_ms=0.01"], "no shape meets the latency budget"),
    ({}, ["budget.params=2e5"], "exactly one rule"),
    ({}, ["select.loss_tolerance=0.01"], "give a parameter budget"),
    ({"latency": None}, ["budget.params=2e5", "select.loss_tolerance=0.01"], "no latency section"),
    ({"convention": "unknown"}, ["budget.params=2e5", "select.loss_tolerance=0.01"], "N convention"),
])
def test_cli_bad_input(tmp_path, fit_kwargs, overrides, message):
    fit_json = write_fit_json(tmp_path / "fit.json", **fit_kwargs)
    with pytest.raises(ValueError, match=message):
        select_cli.run(select_config(tmp_path, f"constants={fit_json}", *overrides))
    assert not (tmp_path / "sel").exists()


def test_cli_missing_fit(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fit file"):
        select_cli.run(select_config(tmp_path, f"constants={tmp_path / 'none.json'}", "budget.params=2e5",
                                     "select.loss_tolerance=0.01"))


# ----- Bian et al. 2025: ~1.5B parameters, 29B tokens --------------------------------------------------------

BIAN_1B = [[24, 2048], [16, 2560], [12, 2816], [12, 3072]]  # their 1B class: v1, v3, v6, v8


@pytest.fixture(scope="module")
def bian_fit(tmp_path_factory):
    path = shared_path("reference", "bian2025", "losses.csv")
    out = tmp_path_factory.mktemp("bian")
    cfg = compose("fit", [
        "source=csv", f"source.path={path}", "source.columns.N=N_params", "source.columns.D=D_tokens",
        "source.columns.R=aspect_ratio_R", "source.columns.group=size_class",
        "source.fit_rows=\"in_main_fit_set == 1\"", "source.n_convention=total", "protocol=bian2025",
        "bootstrap.n=0", "plots=false", f"out={out}"])
    fit_run(cfg)
    merge_into_fit_json(out / "fit.json", LATENCY)
    return out / "fit.json"


def test_bian_selection_prefers_wide_and_shallow(bian_fit, tmp_path):
    result = select_cli.run(select_config(tmp_path, f"constants={bian_fit}", "arch=bian2025", "budget.params=1.5e9",
                                          "budget.tokens=29e9", "select.loss_tolerance=0.01"))
    table = pd.read_csv(tmp_path / "sel" / "candidates.csv")
    chosen, best = result["chosen"], result["best_loss"]
    assert result["n_convention"] == "total" and table.N.between(1.35e9, 1.65e9).all()
    # the law: at equal size, loss grows with R; the latency: at equal size, time grows with depth
    similar = table[table.N.between(1.45e9, 1.55e9)]
    assert similar[["R", "loss"]].corr(method="spearman").iloc[0, 1] > 0.8
    assert similar[["n_layers", "latency_ms"]].corr(method="spearman").iloc[0, 1] > 0.8
    # so the selection trades a little loss for a wider, shallower, faster model than the loss-best one
    assert chosen["n_layers"] < best["n_layers"] and chosen["R"] > best["R"]
    assert result["speedup_vs_best_loss"] > 1.2 and result["loss_increase_vs_best"] <= 0.01
    # along the Pareto front (fastest first) the shapes get deeper and narrower
    front = pd.DataFrame(result["pareto"])
    assert front[["latency_ms", "n_layers"]].corr(method="spearman").iloc[0, 1] > 0.8
    assert front[["latency_ms", "R"]].corr(method="spearman").iloc[0, 1] < -0.8


def test_bian_1b_shapes_ranked(bian_fit, tmp_path):
    result = select_cli.run(select_config(tmp_path, f"constants={bian_fit}", "arch=bian2025", "budget.tokens=29e9",
                                          f"shapes.pairs={BIAN_1B}".replace(" ", ""), "select.loss_tolerance=0.01"))
    table = pd.read_csv(tmp_path / "sel" / "candidates.csv")
    # the paper's measured order (v1 2.896 < v3 2.909 < v8 2.9198 < v6 2.9326), from the law
    assert list(zip(table.n_layers, table.d_model)) == [(24, 2048), (16, 2560), (12, 3072), (12, 2816)]
    # within 1% of the deepest, the 16-layer shape is faster; 12 layers would cost more than 1% loss
    assert (result["chosen"]["n_layers"], result["chosen"]["d_model"]) == (16, 2560)


# ----- verification, shrunk: tiny N, few tokens ---------------------------------------------------------------

def test_conventional_is_nearest_the_median_aspect_ratio():
    candidates = pd.DataFrame({"n_layers": [1, 2, 4, 8], "d_model": [64, 48, 32, 24], "N": [1e4, 1.1e4, 1e4, 9e3],
                               "R": [64, 24, 8, 3]})
    assert verify.conventional(candidates, 10, 1e4)["n_layers"] == 4
    assert verify.conventional(candidates, 30, 1e4)["n_layers"] == 2
    assert verify.conventional(candidates, 40, 1e4)["n_layers"] == 1  # in log: 64 is nearer 40 than 24 is


@pytest.mark.slow
def test_verification_trains_both_and_compares(tmp_path, token_cache):
    results = tmp_path / "res"
    for i, (L, d) in enumerate(itertools.product((1, 2), (16, 24))):
        store.write_record(results, {
            "run_id": f"r{i}", "sweep": "toy", "status": "ok",
            "shape": {"n_layers": L, "d_model": d, "aspect_ratio": d / L},
            "params": {"non_embedding": non_embedding_params(L, d, 4.0), "total": 0},
            "latency": {"prompt_len": 8, "decode_tokens": 4, "batch_sizes": [1], "warmup": 1, "repeats": 2,
                        "threads": 1}})
    # the law the selection predicts latency with describes the device the shapes are re-measured on (the CPU)
    fit_json = write_fit_json(tmp_path / "fit.json", latency={**LATENCY, "device": device_name("cpu")})
    tiny = ["data.eval_tokens=2048", "data.val_curve_tokens=512", f"data.cache_dir={token_cache}", "logger=none",
            "latency.prompt_len=8", "latency.decode_tokens=4", "latency.batch_sizes=[1]", "latency.repeats=2",
            "latency.warmup=1", "train.log_every=4", "model.min_d_model=null", "model.min_heads=null",
            "train.warmup_steps=2"]
    cfg = compose("verify", [f"results_dir={results}", "sweep=toy", "train_preset=demo",
                                       f"constants={fit_json}", "params_factor=1.0", "tokens_per_param=1",
                                       "loss_tolerance=0.05", "remeasure_rounds=1",
                                       "train_overrides=[" + ",".join(f"'{o}'" for o in tiny) + "]"])
    result = verify.run(cfg)
    assert result["target_N"] == pytest.approx(non_embedding_params(2, 24, 4.0))
    assert set(result["models"]) == {"morph", "conventional"}
    for m in result["models"].values():
        assert m["loss_measured"] > 0 and m["latency_remeasured_ms"] > 0 and m["loss_predicted"] > 0
    trained = store.load_table(results, "toy_verify")
    assert (trained.status == "ok").all() and len(trained) == (1 if result["claim"]["same_shape"] else 2)
    assert {"held", "faster", "nearly_equal_loss", "speedup_measured"} <= set(result["claim"])
    assert (results / "verify" / "toy" / "verification.json").is_file()
    # the records' latency and the re-measurement: one device, dtype and graph mode, recorded
    assert {k: result[k] for k in ("device", "dtype", "graph")} == {"device": device_name("cpu"),
                                                                    "dtype": "float32", "graph": "eager"}
    for record in store.iter_records(results, "toy_verify"):
        assert {k: record["latency"][k] for k in ("device", "dtype", "graph")} == {
            "device": device_name("cpu"), "dtype": "float32", "graph": "eager"}


def test_console_script_writes_only_out(tmp_path):
    script = Path(sys.executable).with_name("scaling-select")
    fit_json = write_fit_json(tmp_path / "fit.json")
    work = tmp_path / "cwd"
    work.mkdir()
    done = subprocess.run([str(script), f"constants={fit_json}", "budget.params=2e5", "budget.tokens=1e7",
                           "select.loss_tolerance=0.01", "out=sel"], cwd=work, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in work.iterdir()) == ["sel"]
    assert sorted(p.name for p in (work / "sel").iterdir()) == ["candidates.csv", "selection.json"]
    bad = subprocess.run([str(script), f"constants={fit_json}", "budget.params=2e5", "budget.tokens=1e7",
                          "select.latency_budget_ms=0.001", "out=bad"], cwd=work, capture_output=True, text=True)
    assert bad.returncode != 0 and "scaling-select: error: no shape meets the latency budget" in bad.stderr
    assert "Traceback" not in bad.stderr and not (work / "bad").exists()
