"""The latency model (fit/latency_model.py) and scaling-latency (pipeline/latency.py main/run_latency)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scaling_lab.fit.plan import planner as plan
from scaling_lab.conf import compose
from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.fit.latency import (LatencyModel, LinearLatency, fit_latency, fit_linear, load_latency,
                               merge_into_fit_json)
from scaling_lab.fit.io import store
from scaling_lab.pipeline.latency import run_latency

TRUE = {1: LinearLatency(0.2, 0.15, 5e-6), 8: LinearLatency(0.4, 0.2, 1.5e-5)}
SHAPES = [(L, d) for L in (1, 2, 4, 8, 16) for d in (16, 48, 128, 256)]
TINY_PROTOCOL = ["measure.prompt_len=8", "measure.decode_tokens=4", "measure.batch_sizes=[1,2]",
                 "measure.warmup=1", "measure.repeats=2", "measure.threads=1"]


def measurements(noise=0.0, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for L, d in SHAPES:
        for batch, model in TRUE.items():
            wobble = np.exp(noise * rng.standard_normal(2))
            rows.append({"n_layers": L, "d_model": d, "batch": batch,
                         "decode_ms_per_token": model.predict(L, d) * wobble[0],
                         "prefill_ms": 10 * model.predict(L, d) * wobble[1]})
    return pd.DataFrame(rows)


def test_recovers_known_coefficients_exactly_without_noise():
    model = fit_latency(measurements())
    for batch, true in TRUE.items():
        got = model.model("decode_ms_per_token", batch)
        np.testing.assert_allclose([got.intercept, got.per_layer, got.per_layer_d2],
                                   [true.intercept, true.per_layer, true.per_layer_d2], rtol=1e-6)
        assert model.heldout[batch]["decode_ms_per_token"]["loso_mape"] < 1e-6


def test_recovers_coefficients_under_noise_and_reports_heldout_error():
    model = fit_latency(measurements(noise=0.03))
    got, true = model.model("decode_ms_per_token", 1), TRUE[1]
    assert got.per_layer == pytest.approx(true.per_layer, rel=0.1)
    assert got.per_layer_d2 == pytest.approx(true.per_layer_d2, rel=0.1)
    err = model.heldout[1]["decode_ms_per_token"]
    assert 0.005 < err["loso_mape"] < 0.06 and err["loso_max_ape"] >= err["loso_mape"]
    assert err["extrapolation_shapes"] == 5 and 0 < err["extrapolation_mape"] < 0.1
    # linear in depth at fixed N = 12 L d^2: the modelled time rises with n_layers
    widths = [128, 64, 32]  # L = 1, 4, 16: equal L d^2
    ms = [got.predict(L, d) for L, d in zip((1, 4, 16), widths)]
    assert ms[0] < ms[1] < ms[2]


def test_section_round_trip_and_planner_compatibility(tmp_path):
    model = fit_latency(measurements(), meta={"device": "cpu:test", "threads": 1})
    section = model.to_dict()
    assert section["model"] == "linear" and section["device"] == "cpu:test" and section["batch_size"] == 1
    assert set(section["by_batch"]) == {"1", "8"} and set(section["heldout"]["8"]) == {"decode_ms_per_token",
                                                                                       "prefill_ms"}
    again = LatencyModel.from_dict(json.loads(json.dumps(section)))
    assert again.predict(4, 64, batch=8) == pytest.approx(model.predict(4, 64, batch=8))
    # what scaling-plan reads (fit/plan_cli.py load_shape_inputs)
    planner = plan.DecodeLatency(**section["decode_ms_per_token"])
    assert planner.ms_per_token(4, 64) == pytest.approx(model.predict(4, 64))
    # the planner's minimal section is enough for selection
    minimal = LatencyModel.from_dict({"model": "linear", "device": "x", "decode_ms_per_token": section[
        "decode_ms_per_token"]})
    assert minimal.predict(4, 64) == pytest.approx(model.predict(4, 64))


def test_merge_keeps_laws_and_replaces_latency(tmp_path):
    path = write_json_atomic(tmp_path / "fit.json", {"schema_version": 1, "laws": {"x": {"formula": "E", "inputs": [],
                                                                                         "params": {"E": 1.0}}},
                                                      "provenance": {"n_convention": "total"}})
    section = fit_latency(measurements()).to_dict()
    merge_into_fit_json(path, section)
    merge_into_fit_json(path, section)
    doc = read_fit_json(path)
    assert doc["laws"]["x"]["params"] == {"E": 1.0} and doc["provenance"] == {"n_convention": "total"}
    assert doc["latency"]["decode_ms_per_token"] == section["decode_ms_per_token"]
    assert load_latency(path).predict(2, 32) == pytest.approx(fit_latency(measurements()).predict(2, 32))
    with pytest.raises(FileNotFoundError):
        merge_into_fit_json(tmp_path / "missing.json", section)


@pytest.mark.parametrize("table,message", [
    (pd.DataFrame({"n_layers": [1, 2], "d_model": [8, 8], "batch": [1, 1], "decode_ms_per_token": [1.0, 2.0]}),
     "at least 3 shapes"),
    (pd.DataFrame({"n_layers": [1, 2, 4], "d_model": [8, 8, 8], "batch": [1, 1, 1],
                   "decode_ms_per_token": [1.0, 0.0, 2.0]}), "finite and positive"),
    (pd.DataFrame({"n_layers": [1], "d_model": [8]}), "need columns"),
])
def test_bad_measurements(table, message):
    with pytest.raises(ValueError, match=message):
        fit_latency(table)


def test_fit_linear_is_nonnegative():
    # measurements that fall with size would need a negative coefficient: clipped at 0
    model = fit_linear([1, 2, 4, 8], [64, 64, 64, 64], [4.0, 3.0, 2.0, 1.0])
    assert min(model.intercept, model.per_layer, model.per_layer_d2) >= 0


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
    assert {"params_non_embedding", "params_total", "aspect_ratio", "device", "threads"} <= set(table.columns)
    assert (table.threads == 1).all()
    doc = read_fit_json(fit_json)
    assert doc["laws"]["x"]["params"] == {"E": 1.0}
    assert doc["latency"] == section == json.loads((tmp_path / "lat" / "latency.json").read_text())
    assert section["model"] == "linear" and section["device"].startswith("cpu") and section["threads"] == 1
    assert section["prompt_len"] == 8 and section["shapes"]["count"] == 4
    assert section["heldout"]["1"]["decode_ms_per_token"]["loso_mape"] is not None
    assert "leave-one-shape-out" in capsys.readouterr().out


def test_scaling_latency_takes_a_sweeps_shapes_and_protocol(tmp_path):
    for L, d in ((1, 16), (2, 16), (1, 24)):
        store.write_record(tmp_path / "res", {
            "run_id": f"r{L}{d}", "sweep": "s", "status": "ok",
            "shape": {"n_layers": L, "d_model": d, "n_heads": d // 8, "head_dim": 8, "ffn_hidden": 4 * d,
                      "vocab_size": 257, "seq_len": 32, "aspect_ratio": d / L},
            "latency": {"prompt_len": 6, "decode_tokens": 3, "batch_sizes": [1], "warmup": 1, "repeats": 2,
                        "threads": 1}})
    section = run_latency(latency_config(tmp_path, "shapes.n_layers=[]", "sweep=s",
                                         f"results_dir={tmp_path / 'res'}", "measure.prompt_len=null",
                                         "measure.decode_tokens=null", "measure.batch_sizes=null"))
    assert section["prompt_len"] == 6 and section["decode_tokens"] == 3 and list(section["by_batch"]) == ["1"]
    assert section["shapes"] == {"count": 3, "n_layers": [1, 2], "d_model": [16, 24]}


def test_console_script_bad_input_and_nothing_in_cwd(tmp_path):
    script = Path(sys.executable).with_name("scaling-latency")
    bad = subprocess.run([str(script), f"constants={tmp_path / 'missing.json'}", "out=lat"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "scaling-latency: error: no fit file" in bad.stderr
    assert "Traceback" not in bad.stderr and list(tmp_path.iterdir()) == []
