"""The latency law (fit/latency.py) and scaling-latency (pipeline/latency.py main/run_latency)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling_lab.conf import compose
from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.fit.latency import (TERMS, LatencyModel, block_weights, features, fit_latency, load_latency,
                                     merge_into_fit_json)
from scaling_lab.fit.io import store
from scaling_lab.pipeline.latency import run_latency

META = {"prompt_len": 16, "decode_tokens": 8, "device": "cpu:test", "threads": 1, "group_size": 64}
# The same fp32 kernels in every mode (0.3 ms a call, 0.1 ms a layer, 20 GB/s weight reads, 5 GFLOP/s matmuls, a
# KV-cache term), and each quantized mode's own: a call per quantized matrix, its bytes, its multiply-adds, its
# activations. At group size 64, INT4 quantizes d 32's MLP output matrix only (in_features 128) and every matrix of
# the wider shapes: shapes whose matrices are partly quantized.
SHARED = {"decode_ms_per_token": (0.3, 0.1, 5e-8, 2e-7, 1e-8), "prefill_ms": (0.5, 0.2, 5e-8, 2e-7, 1e-8)}
OWN = {"none": (0.0, 0.0, 0.0, 0.0), "int8": (0.05, 2e-7, 3e-7, 1e-6), "int4": (0.01, 1e-7, 2e-6, 0.0)}
TRUE = {mode: {q: dict(zip(TERMS, shared + own, strict=True)) for q, shared in SHARED.items()}
        for mode, own in OWN.items()}
SHAPES = [(L, d) for L in (1, 2, 4, 8, 16) for d in (32, 64, 128, 256)]
TINY_PROTOCOL = ["measure.prompt_len=8", "measure.decode_tokens=4", "measure.batch_sizes=[1,2]",
                 "measure.warmup=1", "measure.repeats=2", "measure.threads=1", "measure.rounds=1"]


def measurements(noise=0.0, seed=0, rounds=1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for mode, quantities in TRUE.items():
        for L, d in SHAPES:
            for batch in (1, 8):
                for r in range(rounds):
                    row = {"mode": mode, "n_layers": L, "d_model": d, "vocab_size": 257, "batch": batch, "round": r}
                    for q, coef in quantities.items():
                        x = features(L, d, 257, batch, q, mode, META["prompt_len"], META["decode_tokens"],
                                     META["group_size"])[0]
                        row[q] = float(x @ np.array([coef[k] for k in TERMS])) * np.exp(noise * rng.standard_normal())
                    rows.append(row)
    return pd.DataFrame(rows)


def test_terms_count_weights_head_kv_and_batch():
    # decode, batch 2, context 16 + 3.5: the head's V d weights and the KV cache are in the terms
    x = dict(zip(TERMS, features(2, 64, 100, 2, "decode_ms_per_token", "none", 16, 8)[0]))
    assert x["call"] == 1 and x["layer"] == 2
    assert x["weight_bytes"] == 4 * (2 * 12 * 64 ** 2 + 100 * 64)
    assert x["matmul_flops"] == 2 * 2 * (2 * 12 * 64 ** 2 + 100 * 64)
    assert x["kv"] == 2 * 2 * (16 + 3.5) * 64
    assert x["quant_matrices"] == x["quant_bytes"] == x["quant_flops"] == x["quant_acts"] == 0  # fp32: none
    # int8 quantizes every block matrix (4 a layer): their bytes (1 a weight), FLOPs and input widths apart
    x = dict(zip(TERMS, features(2, 64, 100, 2, "decode_ms_per_token", "int8", 16, 8)[0]))
    assert x["weight_bytes"] == 4 * 100 * 64 and x["matmul_flops"] == 2 * 2 * 100 * 64  # the fp32 head only
    assert x["quant_matrices"] == 8 and x["quant_bytes"] == 2 * 12 * 64 ** 2
    assert x["quant_flops"] == 2 * 2 * 2 * 12 * 64 ** 2 and x["quant_acts"] == 2 * 2 * (1 + 1 + 1 + 4) * 64
    # int4 at width 48 (group 32) packs only the MLP output (4d -> d); the rest stays fp32
    x = dict(zip(TERMS, features(1, 48, 100, 1, "prefill_ms", "int4", 16, 8)[0]))
    assert x["matmul_flops"] == 2 * 16 * (8 * 48 ** 2 + 100 * 48) and x["quant_flops"] == 2 * 16 * 4 * 48 ** 2
    assert x["quant_matrices"] == 1 and x["quant_bytes"] == 0.5 * 4 * 48 ** 2 and x["quant_acts"] == 16 * 4 * 48
    # (fp32 weights, quantized weights, quantized matrices, their input widths): int4 skips a matrix it cannot pack
    assert block_weights(1, 64, "int8") == (0, 12 * 64 ** 2, 4, 7 * 64)
    assert block_weights(1, 64, "int4") == (0, 12 * 64 ** 2, 4, 7 * 64)
    assert block_weights(1, 48, "int4") == (8 * 48 ** 2, 4 * 48 ** 2, 1, 4 * 48)  # only MLP out (4d -> d)
    assert block_weights(1, 40, "int4") == (12 * 40 ** 2, 0, 0, 0)  # out_features 40: no matrix packs
    assert block_weights(1, 40, "int4", packed="all") == (0, 12 * 40 ** 2, 1 * 4, 7 * 40)  # a planned shape


def test_recovers_known_coefficients_exactly_without_noise():
    model = fit_latency(measurements(), META)
    for mode, quantities in TRUE.items():
        for q, coef in quantities.items():
            got = model.coefficients(q, mode)
            np.testing.assert_allclose([got[k] for k in TERMS], [coef[k] for k in TERMS], rtol=1e-5, atol=1e-15)
            err = model.heldout[mode][q]
            assert err["loso_mape"] < 1e-6 and err["largest_mape"] < 1e-6 and err["largest_shapes"] == 5


def test_extrapolates_under_noise_and_reports_heldout_error():
    model = fit_latency(measurements(noise=0.03), META)
    err = model.heldout["none"]["decode_ms_per_token"]
    assert 0.005 < err["loso_mape"] < 0.08 and err["loso_max_ape"] >= err["loso_mape"]
    assert err["largest_shapes"] == 5 and 0 < err["largest_mape"] < 0.15
    # at a fixed N = 12 L d^2 the per-layer term makes deep shapes slower
    ms = [model.predict(L, d) for L, d in zip((1, 4, 16), (128, 64, 32))]
    assert ms[0] < ms[1] < ms[2]


def test_the_fastest_round_sees_through_interference():
    # interference only slows a pass: each round of each measurement is slowed with probability 0.4 (by 1 + an
    # exponential of mean 0.3), on top of 1% noise either way. The fastest of 3 rounds recovers the law where their
    # median does not.
    table = measurements(noise=0.01, rounds=3)
    rng = np.random.default_rng(1)
    slowed = (rng.random(len(table)) < 0.4) * rng.exponential(0.3, len(table))
    for q in ("decode_ms_per_token", "prefill_ms"):
        table[q] *= 1 + slowed
    fastest, median = (fit_latency(table, META, aggregate=a) for a in ("min", "median"))
    assert fastest.meta["aggregate"] == "min" and median.meta["aggregate"] == "median"
    for mode in TRUE:
        best, mid = (m.heldout[mode]["decode_ms_per_token"]["largest_mape"] for m in (fastest, median))
        assert best < 0.04 and best < mid / 2, (mode, best, mid)
    with pytest.raises(ValueError, match="aggregate"):
        fit_latency(table, META, aggregate="mean")


def test_fp32_matrices_cost_the_same_in_every_mode():
    # one law over the modes: a shape whose matrices INT4 cannot pack (width 40, group 64) is an fp32 shape
    model = fit_latency(measurements(noise=0.02), META)
    for q in ("decode_ms_per_token", "prefill_ms"):
        assert model.predict(2, 40, q, mode="int4") == pytest.approx(model.predict(2, 40, q, mode="none"))
        assert model.predict(2, 64, q, mode="int4") != pytest.approx(model.predict(2, 64, q, mode="none"))
        # a planned shape is priced as packed whole (the planner gives it a width its mode packs)
        whole = model.predict(2, 40, q, mode="int4", packed="all")
        assert whole != pytest.approx(model.predict(2, 40, q, mode="none"))
        assert whole == pytest.approx(float(features(2, 40, 257, 1, q, "int8", 16, 8)[0, :5]
                                            @ [model.coefficients(q, "int4")[k] for k in TERMS[:5]])
                                      + float(features(2, 40, 257, 1, q, "int4", 16, 8, packed="all")[0, 5:]
                                              @ [model.coefficients(q, "int4")[k] for k in TERMS[5:]]))
    shared = [k for k in TERMS if not k.startswith("quant_")]
    assert len({tuple(model.coefficients(mode=m)[k] for k in shared) for m in TRUE}) == 1


def test_section_round_trip(tmp_path):
    model = fit_latency(measurements(), META)
    section = model.to_dict()
    assert section["model"] == "roofline" and section["version"] == 4 and section["device"] == "cpu:test"
    assert set(section["modes"]) == {"none", "int8", "int4"} and section["batch_sizes"] == [1, 8]
    again = LatencyModel.from_dict(json.loads(json.dumps(section)))
    for mode in ("none", "int8", "int4"):
        assert again.predict(4, 64, batch=8, mode=mode) == pytest.approx(model.predict(4, 64, batch=8, mode=mode))
    with pytest.raises(ValueError, match="roofline"):
        LatencyModel.from_dict({"model": "linear", "decode_ms_per_token": {}})
    table = measurements()
    with pytest.raises(ValueError, match="int4"):
        fit_latency(table[table["mode"] != "int4"], META).predict(4, 64, mode="int4")
    with pytest.raises(ValueError, match="version 4"):  # a version-3 section (a law per mode) is refused
        LatencyModel.from_dict({**section, "version": 3})


def test_merge_keeps_laws_and_replaces_latency(tmp_path):
    path = write_json_atomic(tmp_path / "fit.json", {"schema_version": 1, "laws": {"x": {"formula": "E", "inputs": [],
                                                                                         "params": {"E": 1.0}}},
                                                      "provenance": {"n_convention": "total"}})
    section = fit_latency(measurements(), META).to_dict()
    merge_into_fit_json(path, section)
    merge_into_fit_json(path, section)
    doc = read_fit_json(path)
    assert doc["laws"]["x"]["params"] == {"E": 1.0} and doc["provenance"] == {"n_convention": "total"}
    assert doc["latency"]["modes"] == section["modes"]
    assert load_latency(path).predict(2, 32) == pytest.approx(fit_latency(measurements(), META).predict(2, 32))
    with pytest.raises(FileNotFoundError):
        merge_into_fit_json(tmp_path / "missing.json", section)


@pytest.mark.parametrize("table,message", [
    (pd.DataFrame({"n_layers": [1, 2], "d_model": [8, 8], "batch": [1, 1], "decode_ms_per_token": [1.0, 2.0]}),
     "at least 5 measurements"),
    (pd.DataFrame({"n_layers": [1, 2, 4, 1, 2, 4], "d_model": [8, 8, 8, 16, 16, 16], "batch": [1] * 6,
                   "decode_ms_per_token": [1.0, 0.0, 2.0, 1.0, 1.0, 1.0]}), "finite and positive"),
    (pd.DataFrame({"n_layers": [1], "d_model": [8]}), "need columns"),
])
def test_bad_measurements(table, message):
    with pytest.raises(ValueError, match=message):
        fit_latency(table, META)


def test_coefficients_are_nonnegative():
    # measurements that fall with size would need negative coefficients: clipped at 0
    table = pd.DataFrame({"n_layers": [1, 2, 4, 8, 1, 2, 4, 8], "d_model": [64] * 4 + [32] * 4, "batch": [1] * 8,
                          "decode_ms_per_token": [8.0, 6.0, 4.0, 2.0, 7.0, 5.0, 3.0, 1.0]})
    coef = fit_latency(table, META).coefficients()
    assert min(coef.values()) >= 0


def latency_config(tmp_path, *overrides):
    return compose("latency_cli", [f"out={tmp_path / 'lat'}", *TINY_PROTOCOL, *overrides])


def test_scaling_latency_measures_writes_csv_and_merges_section(tmp_path, capsys):
    fit_json = write_json_atomic(tmp_path / "fit.json", {"schema_version": 1, "laws": {
        "x": {"formula": "E", "inputs": [], "params": {"E": 1.0}}}})
    section = run_latency(latency_config(tmp_path, "shapes.n_layers=[1,2]", "shapes.params=[2e3]",
                                         "shapes.pairs=[[4,16],[1,32]]", f"constants={fit_json}"))
    table = pd.read_csv(tmp_path / "lat" / "latency.csv")
    assert len(table) == 4 * 2 and set(table.batch) == {1, 2}
    assert (table.d_model % 8 == 0).all() and (table.decode_ms_per_token > 0).all() and (table.prefill_ms > 0).all()
    assert {"params_non_embedding", "params_total", "aspect_ratio", "device", "threads", "dtype", "graph"} <= set(
        table.columns)
    assert (table.threads == 1).all() and (table.dtype == "float32").all() and (table.graph == "eager").all()
    doc = read_fit_json(fit_json)
    assert doc["laws"]["x"]["params"] == {"E": 1.0}
    assert doc["latency"] == section == json.loads((tmp_path / "lat" / "latency.json").read_text())
    assert section["model"] == "roofline" and section["device"].startswith("cpu") and section["threads"] == 1
    assert section["dtype"] == "float32" and section["graph"] == "eager"  # the CPU serves fp32, decoded eagerly
    assert section["prompt_len"] == 8 and section["shapes"]["count"] == 4
    assert section["heldout"]["none"]["decode_ms_per_token"]["loso_mape"] is not None
    assert "leave-one-shape-out" in capsys.readouterr().out


def test_scaling_latency_takes_a_sweeps_shapes_and_protocol(tmp_path):
    for L, d in ((1, 16), (2, 16), (1, 24), (2, 24), (4, 16)):
        store.write_record(tmp_path / "res", {
            "run_id": f"r{L}{d}", "sweep": "s", "status": "ok",
            "shape": {"n_layers": L, "d_model": d, "n_heads": d // 8, "head_dim": 8, "ffn_hidden": 4 * d,
                      "vocab_size": 257, "seq_len": 32, "aspect_ratio": d / L},
            "latency": {"prompt_len": 6, "decode_tokens": 3, "batch_sizes": [1], "warmup": 1, "repeats": 2,
                        "threads": 1}})
    section = run_latency(latency_config(tmp_path, "shapes.n_layers=[]", "sweep=s",
                                         f"results_dir={tmp_path / 'res'}", "measure.prompt_len=null",
                                         "measure.decode_tokens=null", "measure.batch_sizes=null"))
    assert section["prompt_len"] == 6 and section["decode_tokens"] == 3 and section["batch_sizes"] == [1]
    assert section["shapes"] == {"count": 5, "n_layers": [1, 4], "d_model": [16, 24]}


def test_console_script_bad_input_and_nothing_in_cwd(tmp_path):
    script = Path(sys.executable).with_name("scaling-latency")
    bad = subprocess.run([str(script), f"constants={tmp_path / 'missing.json'}", "out=lat"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "scaling-latency: error: no fit file" in bad.stderr
    assert "Traceback" not in bad.stderr and list(tmp_path.iterdir()) == []


def test_rounds_are_rows_and_a_saved_table_is_refitted_without_measuring(tmp_path, capsys):
    section = run_latency(latency_config(tmp_path, "shapes.n_layers=[1,2]", "shapes.params=[2e3]",
                                         "shapes.pairs=[[4,16]]", "measure.rounds=2"))
    csv = tmp_path / "lat" / "latency.csv"
    table = pd.read_csv(csv)
    assert len(table) == 3 * 2 * 2 and sorted(table["round"].unique()) == [0, 1]  # shapes x batches x rounds
    assert (table.prompt_len == 8).all() and (table.decode_tokens == 4).all()
    assert table.group_size.isna().all() and section["group_size"] is None  # no override: each mode's own
    assert section["rounds"] == 2 and section["aggregate"] == "min"
    printed = capsys.readouterr().out
    assert "the min of 2 rounds" in printed and printed.count(" none ") >= 3 * 2  # one printed row a measurement
    assert "the machine's noise: a decode measurement's slowest round over its fastest, median" in printed
    before = csv.stat().st_mtime_ns
    again = run_latency(compose("latency_cli", [f"measurements={csv}", f"out={tmp_path / 'refit'}",
                                                "latency_model.aggregate=median"]))
    assert csv.stat().st_mtime_ns == before and not (tmp_path / "refit" / "latency.csv").exists()
    assert again["aggregate"] == "median" and again["source"] == str(csv.resolve()) and again["prompt_len"] == 8
    assert json.loads((tmp_path / "refit" / "latency.json").read_text()) == again
    refit = fit_latency(table, {k: section[k] for k in ("prompt_len", "decode_tokens", "group_size")},
                        aggregate="median")
    assert again["modes"] == refit.to_dict()["modes"]


@pytest.mark.parametrize("overrides,message", [
    (["measurements=missing.csv"], "no latency measurements at missing.csv"),
    (["measurements=bad.csv"], "is not a latency.csv of scaling-latency: missing columns"),
    (["latency_model.aggregate=mean"], "latency_model.aggregate must be one of"),
])
def test_console_script_refuses_bad_measurements_before_measuring(tmp_path, overrides, message):
    (tmp_path / "bad.csv").write_text("n_layers,d_model\n1,8\n")
    script = Path(sys.executable).with_name("scaling-latency")
    bad = subprocess.run([str(script), "out=lat", "logger=none", *overrides], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and f"scaling-latency: error: " in bad.stderr and message in bad.stderr
    assert "Traceback" not in bad.stderr and "measuring" not in bad.stdout and not (tmp_path / "lat").exists()
