"""scaling-plan serving.mode=auto|none|int8|int4|speculative: size, tokens and serving mode chosen together from
measurements (fit/plan/serving.py): the quantization penalty law, the latency law per mode, the speculative speedup."""

import json
import math

import pytest

from scaling_lab.conf import compose
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.latency import LatencyModel
from scaling_lab.fit.plan import cli as plan_cli
from tests.helpers import latency_section

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283}
PENALTY = {"k": 1e-4, "a": 0.5, "b": 0.3}


def measurements(tmp_path, speculative=True):
    folder = tmp_path / "serving"
    rows = [{"mode": m, "loss_delta": d} for m, d in (("int8", 1e-5), ("int8", -2e-5), ("int4", 0.01))]
    write_json_atomic(folder / "quantization.json", {
        "modes": ["int8", "int4"], "rows": rows,
        "penalty": {"int8": {"fitted": False, "why": "0 of 2 runs have loss_delta > 0"},
                    "int4": {"fitted": True, "params": PENALTY, "rows": 5, "fit_json": "penalty_int4/fit.json",
                             "not_identified": []}}})
    (folder / "speculative.json").unlink(missing_ok=True)
    if speculative:
        best = {"draft_run_id": "d", "target_run_id": "t", "mode": "greedy", "k": 2, "speedup_measured": 1.25,
                "cost_ratio": 0.2, "acceptance_rate": 0.7}
        write_json_atomic(folder / "speculative.json", {"best": [best], "rows": [{**best,
                                                                                 "tokens_per_target_step": 2.2}]})
    return folder


def config(tmp_path, *overrides, speculative=True):
    fit_json = write_json_atomic(tmp_path / "fit.json", {
        "schema_version": 1, "laws": {"chinchilla": {"formula": "E + A / N**alpha + B / D**beta",
                                                      "inputs": ["N", "D"], "params": CHINCHILLA}},
        "latency": latency_section("cpu:toy", ("none", "int8", "int4"), call=0.5, layer=0.2, weight_bytes=2e-9,
                                   matmul_flops=1e-10, quant_flops=1e-10)})
    return compose("plan", [f"constants={fit_json}", "objective=cost", "target.loss=2.3", "demand.tokens=1e13",
                            f"serving.measurements={measurements(tmp_path, speculative)}", f"out={tmp_path / 'plan'}",
                            "plot.points=3", *overrides])


def test_auto_lists_every_mode_and_chooses_the_cheapest(tmp_path, capsys):
    doc = plan_cli.run(config(tmp_path, "serving.mode=auto"))
    section = doc["serving_modes"]
    modes = section["modes"]
    assert set(modes) == {"none", "int8", "int4", "speculative"}
    assert section["chosen"] == min(modes, key=lambda m: modes[m]["total_cost"])
    law = LawConstants.from_dict("chinchilla", {"formula": "E + A / N**alpha + B / D**beta", "inputs": ["N", "D"],
                                                "params": CHINCHILLA})
    for name, o in modes.items():  # every mode's trained model reaches the target plus its penalty
        assert float(law.predict(N=o["N"], D=o["D"])) + o["loss_penalty"] == pytest.approx(2.3, abs=1e-8)
    k, a, b = PENALTY.values()
    assert modes["int4"]["loss_penalty"] == pytest.approx(k * modes["int4"]["D"] ** a / modes["int4"]["N"] ** b)
    assert modes["int8"]["loss_penalty"] == 0 and "mean measured delta" in modes["int8"]["source"]
    assert modes["int4"]["N"] > modes["none"]["N"]  # the penalty is paid in size
    # fewer weight bytes decode faster; speculation divides the time by its measured speedup
    assert modes["int8"]["decode_ms_per_token"] < modes["none"]["decode_ms_per_token"]
    assert modes["speculative"]["loss_penalty"] == 0
    latency = LatencyModel.from_dict(json.loads(open(tmp_path / "fit.json").read())["latency"])
    s = modes["speculative"]
    assert s["decode_ms_per_token"] == pytest.approx(latency.predict(s["n_layers"], s["d_model"]) / 1.25)
    assert not any(o["D_at_bound"] for o in modes.values())
    saved = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert saved["serving_modes"]["chosen"] == section["chosen"]
    assert "<- chosen" in capsys.readouterr().out


def test_one_mode_and_bad_input(tmp_path):
    doc = plan_cli.run(config(tmp_path, "serving.mode=int4"))
    assert list(doc["serving_modes"]["modes"]) == ["int4"] and doc["serving_modes"]["chosen"] == "int4"
    with pytest.raises(ValueError, match="no measurement for it"):
        plan_cli.run(config(tmp_path, "serving.mode=speculative", speculative=False))
    with pytest.raises(ValueError, match="objective=cost"):
        plan_cli.run(config(tmp_path, "serving.mode=auto", "objective=flops"))
    with pytest.raises(ValueError, match="serving.mode must be"):
        plan_cli.run(config(tmp_path, "serving.mode=fp8"))
    assert math.isfinite(doc["serving_modes"]["modes"]["int4"]["total_cost"])


def test_the_shape_plan_is_the_full_precision_search(tmp_path):
    """With a shape, `shape` and `serving_modes` are one search: the shape plan's optimum is mode none's, exactly."""
    ie = LawConstants.from_dict("inference_efficient", {
        "formula": "(E + A / N**alpha + B / D**beta) * (1 + epsilon * R**gamma)", "inputs": ["N", "D", "R"],
        "params": {**CHINCHILLA, "epsilon": 0.005, "gamma": 0.5}}).to_dict()
    cfg = config(tmp_path, "serving.mode=none", "shape.enabled=true")
    doc = json.loads(open(cfg.constants).read())
    doc["laws"]["inference_efficient"] = ie
    write_json_atomic(cfg.constants, doc)
    doc = plan_cli.run(cfg)
    none = doc["serving_modes"]["modes"]["none"]
    assert {k: v for k, v in none.items() if k != "cost_vs_none"} == doc["shape"]["optimal"]
    assert none["loss"] == pytest.approx(2.3, rel=1e-9) and none["mode"] == "none"


def test_the_latency_law_from_another_fit(tmp_path):
    """latency=<fit.json>: the loss law from one study (constants, e.g. an isoFLOP study) and the latency law from
    the study that measured it give the plan that one fit.json holding both gives; N counted two ways is refused."""
    both = plan_cli.run(config(tmp_path, "serving.mode=auto"))
    doc = json.loads(open(tmp_path / "fit.json").read())
    write_json_atomic(tmp_path / "latency" / "fit.json", doc)
    write_json_atomic(tmp_path / "law.json", {k: v for k, v in doc.items() if k != "latency"})
    split = [f"constants={tmp_path / 'law.json'}", f"latency={tmp_path / 'latency' / 'fit.json'}"]
    apart = plan_cli.run(config(tmp_path, "serving.mode=auto", *split))
    assert apart["serving_modes"] == both["serving_modes"]
    with pytest.raises(ValueError, match="has no latency section"):
        plan_cli.run(config(tmp_path, "serving.mode=auto", f"constants={tmp_path / 'law.json'}"))
    write_json_atomic(tmp_path / "latency" / "fit.json", {**doc, "provenance": {"n_convention": "total"}})
    with pytest.raises(ValueError, match="counts N as 'total', the constants as None"):
        plan_cli.run(config(tmp_path, "serving.mode=auto", *split))
