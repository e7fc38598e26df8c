"""The serving modes' table (conf/serving_mode/, conf/serving_modes.py): which torchao config each device kind gets
for each mode (constructed on the CPU, never applied to CUDA weights), the refusals (a mode on a device kind it has
no entry for, a GPU below its requirement), bad mode files as one line naming the file, and a mode added as one
file in the user's own folder (hydra.searchpath) quantized, measured and priced by the real commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from scaling_lab.conf import compose, serving_modes
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.fit.latency import block_weights, features
from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig
from scaling_lab.pipeline import serving
from scaling_lab.pipeline.train import run as train
from tests.helpers import TINY

BIN = Path(sys.executable).parent
# A mode the package does not ship: INT8 with asymmetric activations (another argument of the same config), CPU only.
INT8_ASYM = """description: INT8, activations quantized asymmetrically (CPU only)
cpu:
  config: Int8DynamicActivationInt8WeightConfig
  args: {act_mapping_type: ASYMMETRIC}
  weight_type: Int8Tensor
  bytes_per_weight: 1
  activation: int8
"""


def user_folder(root: Path, **files: str) -> Path:
    """``root`` holding ``serving_mode/<name>.yaml`` for each file given."""
    (root / "serving_mode").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / "serving_mode" / f"{name}.yaml").write_text(text)
    return root


@pytest.fixture
def searchpath(tmp_path):
    """A running command's Hydra config with ``hydra.searchpath=[file://<folder>]``, as ``hydra.main`` sets it."""
    def use(folder: Path):
        HydraConfig.instance().set_config(compose("quantize", ["sweep=x", f"hydra.searchpath=[file://{folder}]"],
                                                  return_hydra_config=True))
    yield use
    HydraConfig.instance().cfg = None


def test_each_device_kind_gets_its_own_config():
    """CPU: today's configs exactly; CUDA: bf16, INT8 weight-only, tinygemm INT4, float8 (sm89+)."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                      Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig)

    assert list(serving_modes.table())[:1] == ["none"] and {"int8", "int4", "float8"} <= set(serving_modes.table())
    built = {(m, k): serving.build_config(entry) for m, spec in serving_modes.table().items()
             for k, entry in spec.kernels.items()}
    assert built[("none", "cpu")] is None and built[("none", "cuda")] is None
    assert built[("int8", "cpu")] == Int8DynamicActivationInt8WeightConfig()
    assert built[("int4", "cpu")] == PrototypeInt4WeightOnlyConfig(group_size=32)
    assert built[("int8", "cuda")] == Int8WeightOnlyConfig()
    assert built[("int4", "cuda")] == Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d")
    assert built[("float8", "cuda")] == Float8DynamicActivationFloat8WeightConfig()
    assert ("float8", "cpu") not in built
    none, int8, int4 = (serving_modes.get(m) for m in ("none", "int8", "int4"))
    assert (none.on("cpu").activation, none.on("cuda").activation) == ("float32", "bfloat16")
    assert (none.on("cpu").bytes_per_weight, none.on("cuda").bytes_per_weight) == (4, 2)
    assert int4.on("cuda").activation == "bfloat16" and int4.on("cpu").weight_type == "Int4OpaqueTensor"
    assert {m: serving_modes.get(m).on("cuda").peak_flops_dtype for m in ("none", "int8", "int4", "float8")} == \
        {"none": "bf16", "int8": "int8", "int4": "int4", "float8": "fp8"}
    # the packing rule: INT4 on the CPU needs in_features % 32 and out_features % 16; the group size may be chosen
    assert int4.on("cpu").packs(48, 64) == False and int4.on("cpu").packs(64, 40) == False  # noqa: E712
    assert int4.on("cpu").packs(64, 48) and int4.on("cpu").packs(64, 64, group_size=64)
    assert int8.on("cpu").packs(40, 40)
    with pytest.raises(serving_modes.ServingModeError, match="group size 256 is not one"):
        int4.on("cpu").group(256)
    assert int4.on("cuda").group(256) == 256


def test_a_mode_is_refused_on_a_device_it_has_no_entry_for(tmp_path, searchpath):
    float8 = serving_modes.get("float8")
    with pytest.raises(serving_modes.ServingModeError) as err:
        float8.on("cpu")
    assert str(err.value).startswith("serving mode float8 has no entry for device cpu: it runs on cuda")
    # below its compute capability (an A100 is 8.0; float8 needs 8.9, tinygemm INT4 8.0)
    with pytest.raises(serving_modes.ServingModeError, match=r"needs compute capability >= 8\.9.*has 8\.0"):
        float8.on("cuda", (8, 0))
    assert float8.on("cuda", (9, 0)).config == "Float8DynamicActivationFloat8WeightConfig"
    with pytest.raises(serving_modes.ServingModeError, match=r">= 8\.0"):
        serving_modes.get("int4").on("cuda", (7, 5))
    # a CPU-only mode asked for on CUDA: refused by the table before the device is asked anything
    searchpath(user_folder(tmp_path, int8_asym=INT8_ASYM))
    with pytest.raises(serving_modes.ServingModeError) as err:
        serving.kernel_for("int8_asym", torch.device("cuda"))
    assert "serving mode int8_asym has no entry for device cuda: it runs on cpu" in str(err.value)
    assert len(str(err.value).splitlines()) == 1
    # quantize refuses a mode the model's device cannot run before copying anything
    model = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=64, seq_len=16))
    with pytest.raises(serving_modes.ServingModeError, match="float8 has no entry for device cpu"):
        serving.quantize(model, "float8")
    with pytest.raises(serving_modes.ServingModeError, match="unknown serving mode 'int3'.*hydra.searchpath"):
        serving.quantize(model, "int3")
    # a weight-only kernel serves the device's serving dtype: a model in another dtype is refused, not cast
    with pytest.raises(serving_modes.ServingModeError, match="serves float32 .* this model is bfloat16"):
        serving.quantize(model.to(torch.bfloat16), "int4")


GOOD = INT8_ASYM


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("Int8DynamicActivationInt8WeightConfig", "os.system"), "cpu.config='os.system' is not one of"),
    (GOOD + "gpu: {}\n", "unknown key 'gpu'"),
    (GOOD.replace("  activation: int8", "  activation: int8\n  packing: 4"), "unknown key cpu.packing"),
    (GOOD.replace("bytes_per_weight: 1", "bytes_per_weight: one"), "cpu.bytes_per_weight must be a number"),
    (GOOD.replace("  weight_type: Int8Tensor\n", ""), "cpu.weight_type is required"),
    (GOOD.replace("activation: int8", "activation: int9"), "cpu.activation='int9' is not one of"),
    (GOOD + "group_size: 30.5\n", "group_size must be an integer"),
    (GOOD.replace("{act_mapping_type: ASYMMETRIC}", "{group_size: 64}"), "the group size is the mode's"),
    (GOOD.replace("{act_mapping_type: ASYMMETRIC}", "{act_mapping_type: {a: 1}}"), "must be a plain value"),
    ("cpu: [\n", "not valid YAML"),
    ("description: nothing to serve\n", "at least one device kind"),
])
def test_a_bad_mode_file_is_one_line_naming_it(tmp_path, text, message):
    folder = user_folder(tmp_path, int8_bad=text)
    with pytest.raises(serving_modes.ServingModeError) as err:
        serving_modes.table([folder])
    assert str(err.value).startswith(str(folder / "serving_mode" / "int8_bad.yaml") + ": ")
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    ("{act_mapping_typo: ASYMMETRIC}", "has no argument 'act_mapping_typo'"),
    ("{act_mapping_type: SIDEWAYS}", "'SIDEWAYS' is not one of"),
    ("{reduce_range: 3}", "expected a bool"),
])
def test_a_bad_config_argument_is_one_line_naming_the_file(tmp_path, args, message):
    folder = user_folder(tmp_path, int8_bad=GOOD.replace("{act_mapping_type: ASYMMETRIC}", args))
    entry = serving_modes.table([folder])["int8_bad"].on("cpu")
    with pytest.raises(serving_modes.ServingModeError) as err:
        serving.build_config(entry)
    assert str(err.value).startswith(str(folder / "serving_mode" / "int8_bad.yaml")) and message in str(err.value)


def test_a_name_given_twice_or_reserved_is_refused(tmp_path):
    with pytest.raises(serving_modes.ServingModeError, match="int8 is defined twice"):
        serving_modes.table([user_folder(tmp_path / "a", int8=GOOD)])
    with pytest.raises(serving_modes.ServingModeError, match="letters, digits and _"):
        serving_modes.table([user_folder(tmp_path / "b", speculative=GOOD)])


def test_a_new_mode_file_quantizes_and_is_priced_by_its_packing_rule(tmp_path, searchpath):
    """INT4 in groups of 64, added as one file: quantized by the real torchao kernel on a random GPT, and the
    latency law's terms follow its packing rule (the same as the package's int4 at group size 64)."""
    int4 = (serving_modes.CONF_DIR / "serving_mode" / "int4.yaml").read_text()
    searchpath(user_folder(tmp_path, int4_g64=int4.replace("group_size: 32", "group_size: 64")))
    assert "int4_g64" in serving.modes()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100, seq_len=32)).eval()
    x = torch.randint(0, 100, (2, 16))
    quantized, report = serving.quantize(model, "int4_g64")
    assert report["group_size"] == 64 and report["config"] == "PrototypeInt4WeightOnlyConfig"
    assert report["quantized"] == [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                                   and n != "head"]  # every block matrix: d 64 and 4d 256 are multiples of 64
    assert type(quantized.blocks[0].attn.qkv.weight).__name__ == "Int4OpaqueTensor"
    error = (quantized(x)[0] - model(x)[0]).abs().max().item()
    assert 0 < error < 0.1
    assert serving.weight_bytes(quantized) < serving.weight_bytes(serving.quantize(model, "int4")[0])  # fewer scales
    narrow = GPT(GPTConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=100, seq_len=32))
    _, report = serving.quantize(narrow, "int4_g64")  # only the MLP output (in_features 128) packs at 64
    assert list(report["skipped"]) == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0"]
    assert "not a multiple of group size 64" in report["skipped"]["blocks.0.attn.qkv"]
    assert block_weights(1, 32, "int4_g64") == block_weights(1, 32, "int4", group_size=64) == \
        (8 * 32 ** 2, 4 * 32 ** 2, 1, 4 * 32)
    np.testing.assert_array_equal(features(2, 64, 100, 1, "prefill_ms", "int4_g64", 16, 8),
                                  features(2, 64, 100, 1, "prefill_ms", "int4", 16, 8, group_size=64))


def test_torchao_skips_its_cuda_extensions_only_without_cuda():
    code = ("import os; from scaling_lab.pipeline import serving; from scaling_lab.conf import serving_modes; "
            "before = os.environ.get('TORCHAO_FORCE_SKIP_LOADING_SO_FILES'); "
            "serving.build_config(serving_modes.get('int8').on('cpu')); "
            "print(before, os.environ.get('TORCHAO_FORCE_SKIP_LOADING_SO_FILES'))")
    env = {k: v for k, v in os.environ.items() if k != "TORCHAO_FORCE_SKIP_LOADING_SO_FILES"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = "None None" if torch.cuda.is_available() else "None 1"
    assert done.stdout.strip().splitlines()[-1] == expected


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_a_mode_added_as_one_file_is_measured_and_priced_by_the_commands(tmp_path, token_cache):
    """int8_asym, one file in the user's folder: scaling-quantize quantizes a tiny trained model with it,
    scaling-latency measures random GPTs in it and fits the law, scaling-plan prices it; with no code change."""
    folder = user_folder(tmp_path / "my_conf", int8_asym=INT8_ASYM)
    search = f"hydra.searchpath=[file://{folder}]"
    results = tmp_path / "results"
    record = train(compose("train", [*TINY, f"results_dir={results}", f"data.cache_dir={token_cache}", "logger=none",
                                     "sweep.name=modes", "train.save_model=true"]))
    assert record["status"] == "ok", record.get("error")

    serving_dir = tmp_path / "serving"
    quantized = cli(tmp_path, "scaling-quantize", "sweep=modes", f"results_dir={results}", "modes=[int8,int8_asym]",
                    "device=cpu", "penalty.fit=false", "measure.repeats=1", "measure.warmup=0", "logger=none",
                    f"out={serving_dir}", search)
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    table = pd.read_csv(serving_dir / "quantization.csv")
    asym, sym = (table[table["mode"] == m].iloc[0] for m in ("int8_asym", "int8"))
    assert asym.layers_quantized == 4 and asym.layers_skipped == 0 and asym.bytes_ratio < 1
    assert abs(asym.loss_delta) < 0.01 and asym.loss_quantized != sym.loss_quantized  # its own argument applied
    doc = json.loads((serving_dir / "quantization.json").read_text())
    assert doc["layers"][record["run_id"]]["int8_asym"]["config"] == "Int8DynamicActivationInt8WeightConfig"

    fit_json = write_json_atomic(tmp_path / "fit.json", {"schema_version": 1, "laws": {"chinchilla": {
        "formula": "E + A / N**alpha + B / D**beta", "inputs": ["N", "D"],
        "params": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283}}}})
    measured = cli(tmp_path, "scaling-latency", "shapes.n_layers=[]", "shapes.pairs=[[1,32],[2,32],[1,64],[3,48],"
                   "[2,64],[4,32]]", "measure.modes=[none,int8_asym]", "measure.device=cpu", "measure.rounds=1",
                   "measure.prompt_len=8", "measure.decode_tokens=4", "measure.batch_sizes=[1,2]",
                   "measure.warmup=1", "measure.repeats=2", "measure.threads=1", "logger=none",
                   f"constants={fit_json}", f"out={tmp_path / 'latency'}", search)
    assert measured.returncode == 0, measured.stderr[-3000:]
    law = json.loads(fit_json.read_text())["latency"]
    assert set(law["modes"]) == {"none", "int8_asym"}

    plan = ["scaling-plan", f"constants={fit_json}", "objective=cost", "target.loss=2.3", "demand.tokens=1e13",
            f"serving.measurements={serving_dir}", "plot.points=3", "logger=none"]
    priced = cli(tmp_path, *plan, "serving.mode=auto", f"out={tmp_path / 'plan'}", search)
    assert priced.returncode == 0, priced.stderr[-3000:]
    section = json.loads((tmp_path / "plan" / "plan.json").read_text())["serving_modes"]
    assert set(section["modes"]) == {"none", "int8_asym"} and "int8_asym" in priced.stdout
    assert "mean measured delta" in section["modes"]["int8_asym"]["source"]
    assert section["modes"]["int8_asym"]["loss_penalty"] == pytest.approx(max(0.0, asym.loss_delta), abs=1e-12)
    # a given penalty replaces the measured one; the classic plan needs a GPU key the CPU-only mode does not give
    given = cli(tmp_path, *plan, "serving.mode=int8_asym", "serving.loss_penalty=0.01", f"out={tmp_path / 'p2'}",
                search)
    assert given.returncode == 0, given.stderr[-3000:]
    assert json.loads((tmp_path / "p2" / "plan.json").read_text())["serving_modes"]["modes"]["int8_asym"][
        "loss_penalty"] == 0.01
    classic = cli(tmp_path, *plan, "serving.quantization=int8_asym", f"out={tmp_path / 'p3'}", search)
    assert classic.returncode == 2 and "names no GPU peak FLOP/s" in classic.stderr
    assert len(classic.stderr.strip().splitlines()) == 1 and str(folder) in classic.stderr
    # without its folder the mode is unknown, in one line saying how to add it
    alone = cli(tmp_path, *plan, "serving.mode=int8_asym", f"out={tmp_path / 'p4'}")
    assert alone.returncode == 2 and "hydra.searchpath" in alone.stderr and len(alone.stderr.splitlines()) == 1
    gone = cli(tmp_path, "scaling-plan", "presets.quantization.int8.loss_penalty=0.1")
    assert gone.returncode == 2 and "presets.quantization is gone" in gone.stderr
