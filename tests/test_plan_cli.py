"""scaling-plan end to end (fit/plan/cli.py): config composition, plan.json, bad input, the console script."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_lab.fit.plan import cli as plan_cli
from scaling_lab.conf import compose
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.io.files import write_json_atomic

KEYS = ("N", "D", "train_flops", "inference_flops", "total_flops", "total_cost")
# Sardana et al. 2024's cost vector (../shared/reference/sardana2024.md)
COST_VECTOR = ["constants=sardana2024", "objective=cost", "target.loss=1.947", "demand.requests=1e10",
               "demand.input_tokens=1000", "demand.output_tokens=250", "hardware.train.price_per_hour=1.40",
               "hardware.inference.price_per_hour=0.60", "hardware.inference.mfu_prefill=0.4",
               "hardware.inference.mfu_decode=0.2"]


def config(tmp_path, *overrides):
    return compose("plan", [f"out={tmp_path / 'plan'}", "plot.points=5", *overrides])


def write_fit_json(path, laws):
    write_json_atomic(path, {"schema_version": 1, "laws": laws, "provenance": {"source": "test"}})
    return path


def chinchilla_law(**params):
    values = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283, **params}
    return LawConstants.from_dict("chinchilla", {"formula": "E + A / N**alpha + B / D**beta", "inputs": ["N", "D"],
                                                 "params": values}).to_dict()


def test_run_writes_plan_json_with_the_named_keys(tmp_path, capsys):
    doc = plan_cli.run(config(tmp_path, *COST_VECTOR))
    on_disk = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert (tmp_path / "plan" / "plan.png").stat().st_size > 10_000
    for model in ("chinchilla", "optimal"):
        assert set(KEYS) <= set(on_disk[model])
    assert set(KEYS) <= set(on_disk["ratios"])
    assert float(f"{on_disk['ratios']['total_cost']:.4g}") == 0.8876
    assert float(f"{on_disk['optimal']['N']:.4g}") == 2.053e10
    assert on_disk["optimal"] == pytest.approx(doc["optimal"])
    assert on_disk["hardware"]["inference"]["dtype"] == "int8"
    assert "88.76%" in capsys.readouterr().out


def test_fit_json_constants_and_chinchilla_params_target(tmp_path):
    fit_json = write_fit_json(tmp_path / "fit.json", {"chinchilla": chinchilla_law()})
    doc = plan_cli.run(config(tmp_path, f"constants={fit_json}", "target.chinchilla_params=70e9",
                              "demand.tokens=2e12"))
    assert doc["constants"]["fit_json"] == str(fit_json)
    # the Chinchilla-style model of "as good as the Chinchilla-optimal 70B model" is that 70B model
    assert doc["chinchilla"]["N"] == pytest.approx(70e9, rel=1e-9)
    assert doc["optimal"]["N"] < 70e9


def test_presets_differ(tmp_path):
    sizes = {name: plan_cli.run(config(tmp_path, f"constants={name}", "target.loss=2.2", "demand.tokens=1e12"))
             ["chinchilla"]["N"] for name in ("hoffmann2022", "sardana2024", "epoch2024")}
    assert len({f"{n:.3g}" for n in sizes.values()}) == 3


def test_serving_modifiers(tmp_path):
    base = ["objective=cost", "target.loss=2.0", "demand.requests=1e9"]
    plain = plan_cli.run(config(tmp_path, *base))
    # a measured quantization penalty: training must reach a lower loss, so everything grows
    penalised = plan_cli.run(config(tmp_path, *base, "serving.loss_penalty=0.02"))
    assert penalised["target"]["trained_loss"] == pytest.approx(1.98)
    assert penalised["optimal"]["total_cost"] > plain["optimal"]["total_cost"]
    # int4 serving on an A100 doubles the inference peak: a larger optimal model
    int4 = plan_cli.run(config(tmp_path, *base, "serving.quantization=int4"))
    assert int4["hardware"]["inference"]["dtype"] == "int4"
    assert int4["optimal"]["N"] > plain["optimal"]["N"]
    # speculative decoding cuts decode time per token
    fast = plan_cli.run(config(tmp_path, *base, "serving.speculative.enabled=true"))
    assert fast["serving"]["decode_time_per_token"] < 1
    assert fast["optimal"]["inference_cost"] < plain["optimal"]["inference_cost"]
    # an explicit peak FLOP/s replaces the gpu table
    custom = plan_cli.run(config(tmp_path, *base, "hardware.inference.gpu=null",
                                 "hardware.inference.peak_flops=6.24e14"))
    assert custom["optimal"]["N"] == pytest.approx(plain["optimal"]["N"], rel=1e-12)


@pytest.mark.parametrize("overrides,message", [
    (["target.loss=1.69", "demand.tokens=1e12"], "irreducible loss E"),
    (["target.loss=1.5", "demand.tokens=1e12"], "irreducible loss E"),
    (["target.loss=2.0", "serving.loss_penalty=0.31", "demand.tokens=1e12"], "quantization penalty"),
    (["target.loss=2.0", "demand.tokens=-1"], "demand.tokens must be >= 0"),
    (["target.loss=2.0", "demand.requests=-5"], "demand.requests must be >= 0"),
    (["target.loss=2.0", "demand.requests=5", "demand.output_tokens=-1"], "input_tokens and demand.output_tokens"),
    (["target.loss=2.0"], "exactly one of demand.tokens or demand.requests"),
    (["target.loss=2.0", "demand.tokens=1", "demand.requests=1"], "exactly one of demand.tokens"),
    (["demand.tokens=1e12"], "exactly one of target.loss or target.chinchilla_params"),
    (["target.loss=2.0", "target.chinchilla_params=7e10", "demand.tokens=1e12"], "exactly one of target.loss"),
    (["target.chinchilla_params=-7", "demand.tokens=1e12"], "chinchilla_params must be > 0"),
    (["target.loss=2.0", "demand.tokens=1e12", "hardware.train.gpu=V100"], "unknown gpu"),
    (["target.loss=2.0", "demand.tokens=1e12", "hardware.train.dtype=fp8"], "unknown dtype"),
    (["target.loss=2.0", "demand.tokens=1e12", "hardware.inference.gpu=H100", "serving.quantization=int4"],
     "unknown dtype"),
    (["target.loss=2.0", "demand.tokens=1e12", "serving.quantization=int2"], "unknown serving.quantization"),
    (["target.loss=2.0", "demand.tokens=1e12", "hardware.train.mfu=1.2"], "MFU"),
    (["target.loss=2.0", "demand.tokens=1e12", "hardware.inference.mfu_decode=0"], "MFU"),
    (["target.loss=2.0", "demand.tokens=1e12", "objective=latency"], "objective must be one of"),
    (["target.loss=2.0", "demand.tokens=1e12", "constants=nonesuch.json"], "neither a preset"),
])
def test_bad_input_is_one_clear_error(tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        plan_cli.run(config(tmp_path, *overrides))
    assert not (tmp_path / "plan").exists()


def test_fit_json_without_chinchilla_or_with_another_formula(tmp_path):
    other = write_fit_json(tmp_path / "other.json", {"power": {"formula": "E + A / N**alpha", "inputs": ["N"],
                                                               "params": {"E": 1.0, "A": 1.0, "alpha": 0.3}}})
    with pytest.raises(ValueError, match="no 'chinchilla' law"):
        plan_cli.run(config(tmp_path, f"constants={other}", "target.loss=2.0", "demand.tokens=1e12"))
    law = {**chinchilla_law(), "formula": "E + A / N**alpha + B / D**beta + 0.0 * N"}
    changed = write_fit_json(tmp_path / "changed.json", {"chinchilla": law})
    with pytest.raises(ValueError, match="not the configured"):
        plan_cli.run(config(tmp_path, f"constants={changed}", "target.loss=2.0", "demand.tokens=1e12"))


def test_console_script_writes_only_out(tmp_path):
    script = Path(sys.executable).parent / "scaling-plan"
    done = subprocess.run([str(script), "constants=sardana2024", "target.loss=1.947", "demand.tokens=2e12", "out=p"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "95.22%" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["plan.json", "plan.png"]
    bad = subprocess.run([str(script), "target.loss=1.0", "demand.tokens=2e12", "out=q"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("scaling-plan: error:")
    assert "Traceback" not in bad.stderr and not (tmp_path / "q").exists()


def test_a_gpu_added_from_the_command_line(tmp_path):
    """The documented way to price another GPU (conf/plan_presets/default.yaml): ``+presets.gpus.<gpu>.<dtype>=``
    adds to the open GPU table, past the guard that refuses other added keys."""
    script = Path(sys.executable).parent / "scaling-plan"
    done = subprocess.run([str(script), "+presets.gpus.L40S.fp8=7.33e14", "hardware.inference.gpu=L40S",
                           "hardware.inference.dtype=fp8", "target.loss=2.2", "demand.tokens=1e12", "out=p"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["hardware"]["inference"]["peak_flops"] == 7.33e14
    typo = subprocess.run([str(script), "+presets.gpu.L40S.fp8=7.33e14", "target.loss=2.2", "demand.tokens=1e12"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert typo.returncode == 2 and "unknown key 'presets.gpu.L40S.fp8'" in typo.stderr
