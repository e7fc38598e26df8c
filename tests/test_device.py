"""Where serving cost is measured (pipeline/device.py): device resolution, the serving dtype and copy, the graph
option, the four fields every measurement carries, refusing to fit or compare measurements of different devices,
dtypes or graph modes, and the static-cache decode step (the one captured as a CUDA graph on a GPU) against the
eager KV-cache path."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from scaling_lab.conf import UserError, compose
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig
from scaling_lab.pipeline import device as devices
from scaling_lab.pipeline import select as select_cli
from scaling_lab.pipeline import verify
from scaling_lab.pipeline.latency import measure, measure_shapes, run_latency
from tests.helpers import latency_section

FIELDS = {"device", "dtype", "threads", "graph"}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")
TINY = {"prompt_len": 6, "decode_tokens": 3, "batch_sizes": [1, 2], "warmup": 0, "repeats": 1, "threads": 1}


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"n_layers": 2, "d_model": 32, "n_heads": 2, "vocab_size": 50, "seq_len": 24, **kw}))


# ----- resolution, dtype, copy, graph option ---------------------------------------------------------------------

def test_auto_resolves_to_what_is_here():
    assert devices.DEFAULT == "auto"
    assert devices.resolve().type == devices.resolve("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_is_refused_in_one_line_without_a_gpu():
    for name in ("cuda", "cuda:0"):
        with pytest.raises(UserError, match="no CUDA device is visible here") as err:
            devices.resolve(name)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["tpu", "gpu", "CPU", ""])
def test_unknown_devices_are_refused(name):
    if name == "":  # empty is the default, auto
        assert devices.resolve(name).type in ("cpu", "cuda")
        return
    with pytest.raises(UserError, match="choose one of"):
        devices.resolve(name)


def test_serving_dtype_per_device_kind():
    assert devices.serving_dtype("cpu") == torch.float32
    assert devices.serving_dtype(torch.device("cuda")) == torch.bfloat16
    assert devices.serving_dtype("cuda:1") == torch.bfloat16
    assert devices.kind("cuda:1") == "cuda" and devices.kind(torch.device("cpu")) == "cpu"


def test_serving_copy_leaves_the_model_untouched():
    model = tiny_model().to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = devices.serving_copy(model, "cpu")
    assert served is not model and not served.training and model.training
    assert all(p.dtype == torch.float32 for p in served.parameters())  # the CPU serves fp32
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        next(served.parameters()).add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert served.new_cache(1, 4).kv.dtype == torch.float32  # the KV cache in the serving dtype too


def test_graph_option():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.use_graph("auto", cpu) is False and devices.use_graph(None, cpu) is False
    assert devices.use_graph("auto", cuda) is True and devices.use_graph(True, cuda) is True
    assert devices.use_graph(False, cuda) is False and devices.use_graph("false", cpu) is False
    with pytest.raises(UserError, match="needs device=cuda"):
        devices.use_graph(True, cpu)
    with pytest.raises(UserError, match="choose one of"):
        devices.use_graph("sometimes", cuda)
    assert devices.graph_name(True) == "cuda-graph" and devices.graph_name(False) == "eager"


# ----- the static-cache decode step ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,batch", [((1, 16, 1), 1), ((2, 32, 2), 3), ((3, 48, 4), 2)])
def test_static_cache_decode_equals_eager_decode(shape, batch):
    """GPT.decode_step over a StaticKVCache (the step a GPU captures as a CUDA graph), run eagerly here: the logits
    of every decoded token equal the eager KV-cache path's."""
    n_layers, d_model, n_heads = shape
    model = tiny_model(n_layers=n_layers, d_model=d_model, n_heads=n_heads).eval()
    x = torch.randint(0, 50, (batch, 20))
    with torch.inference_mode():
        eager, static = model.new_cache(batch, 20), model.new_cache(batch, 20, static=True)
        torch.testing.assert_close(model(x[:, :7], cache=static), model(x[:, :7], cache=eager))
        assert int(static.pos) == 7
        for i in range(7, 20):
            torch.testing.assert_close(model.decode_step(x[:, i:i + 1], static),
                                       model(x[:, i:i + 1], cache=eager), atol=1e-5, rtol=1e-5)
        assert int(static.pos) == 20
        # rolled back and refilled, the same cache decodes the same tokens again (as the measurement reuses it)
        static.rollback(0)
        model(x[:, :7], cache=static)
        again = [model.decode_step(x[:, i:i + 1], static) for i in range(7, 20)]
        full = model(x)
    torch.testing.assert_close(torch.cat(again, dim=1), full[:, 7:], atol=1e-5, rtol=1e-5)


def test_static_cache_longer_than_the_positions_is_refused():
    with pytest.raises(ValueError, match="exceeds model.seq_len"):
        tiny_model().new_cache(1, 25, static=True)


# ----- the four fields -------------------------------------------------------------------------------------------

def test_measurements_carry_device_dtype_threads_and_graph():
    torch.set_num_threads(1)
    result = measure(devices.serving_copy(tiny_model(), "cpu"), 6, 3, [1, 2], warmup=0, repeats=1)
    assert FIELDS <= set(result)
    assert result["device"] == devices.device_name("cpu") and result["dtype"] == "float32"
    assert result["threads"] == 1 and result["graph"] == "eager"
    with pytest.raises(UserError, match="needs device=cuda"):
        measure(tiny_model(), 6, 3, [1], graph=True)
    rows = measure_shapes([tiny_model().config], TINY, "cpu", log=lambda _: None)
    assert len(rows) == 2 and all(FIELDS <= set(r) and r["graph"] == "eager" and r["dtype"] == "float32"
                                  for r in rows)


# ----- mixing refused --------------------------------------------------------------------------------------------

def _latency_csv(tmp_path) -> pd.DataFrame:
    section = run_latency(compose("latency_cli", [
        f"out={tmp_path / 'lat'}", "logger=none", "shapes.n_layers=[1,2]", "shapes.params=[2e3]",
        "shapes.pairs=[[4,16],[1,32]]", "measure.prompt_len=6", "measure.decode_tokens=3",
        "measure.batch_sizes=[1,2]", "measure.warmup=0", "measure.repeats=1", "measure.threads=1",
        "measure.rounds=1"]))
    assert FIELDS <= set(section) and section["graph"] == "eager" and section["dtype"] == "float32"
    table = pd.read_csv(tmp_path / "lat" / "latency.csv")
    assert FIELDS <= set(table.columns) and (table.graph == "eager").all()
    return table


def test_latency_law_refuses_a_table_of_two_devices_or_two_graph_modes(tmp_path):
    table = _latency_csv(tmp_path)
    for key, other in (("device", "cuda:NVIDIA H100 80GB HBM3"), ("graph", "cuda-graph"), ("dtype", "bfloat16")):
        mixed = table.copy()
        mixed.loc[mixed.n_layers == 4, key] = other
        mixed.to_csv(tmp_path / f"mixed_{key}.csv", index=False)
        with pytest.raises(UserError, match=f"measurements of {key} .* and of {key} .*{other}") as err:
            run_latency(compose("latency_cli", [f"measurements={tmp_path / f'mixed_{key}.csv'}",
                                                f"out={tmp_path / 'refit'}", "logger=none"]))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "refit").exists()
    # a latency.csv of an older release has no graph column: it was measured eagerly
    table.drop(columns="graph").to_csv(tmp_path / "old.csv", index=False)
    old = run_latency(compose("latency_cli", [f"measurements={tmp_path / 'old.csv'}", f"out={tmp_path / 'old'}",
                                              "logger=none"]))
    assert old["graph"] == "eager" and old["device"] == table.device[0]


def _fit_json(tmp_path, latency: dict):
    law = {"formula": "(E + A / N**alpha + B / D**beta) * (1 + epsilon * R**gamma)", "inputs": ["N", "D", "R"],
           "params": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.336, "beta": 0.283, "epsilon": 0.005,
                      "gamma": 0.5}}
    return write_json_atomic(tmp_path / "fit.json", {"schema_version": 1, "provenance": {
        "n_convention": "non_embedding"}, "laws": {"inference_efficient": law}, "latency": latency})


def test_selection_measured_here_refuses_a_law_of_another_device(tmp_path, capsys):
    fit_json = _fit_json(tmp_path, latency_section("cuda:NVIDIA H100 80GB HBM3", call=1.0, layer=0.5))
    args = [f"constants={fit_json}", f"out={tmp_path / 'sel'}", "budget.tokens=1e7", "budget.params=3e3",
            "budget.band=0.3", "arch.n_layers=[1,2]", "select.measure=true", "select.loss_tolerance=0.05",
            "select.device=cpu", "logger=none"]
    with pytest.raises(UserError, match="with device 'cuda:NVIDIA H100 80GB HBM3'.*with device 'cpu:") as err:
        select_cli.run(compose("select", args))
    assert "\n" not in str(err.value) and not (tmp_path / "sel").exists()
    # a law of this device (graph missing: eager, as older releases measured) is the measurement's protocol
    _fit_json(tmp_path, latency_section(devices.device_name("cpu"), call=1.0, layer=0.5))
    result = select_cli.run(compose("select", args + ["select.protocol.repeats=1", "select.protocol.warmup=0"]))
    assert {k: result["latency"][k] for k in ("device", "dtype", "graph")} == {
        "device": devices.device_name("cpu"), "dtype": "float32", "graph": "eager"}
    assert result["latency"]["protocol"]["prompt_len"] == 8  # the law's protocol
    # modelled, the selection says which device, dtype and graph mode its law describes
    modelled = select_cli.run(compose("select", args[:6] + ["select.loss_tolerance=0.05", "logger=none"]))
    assert modelled["latency"]["source"] == "model" and FIELDS <= set(modelled["latency"])
    assert modelled["latency"]["graph"] == "eager"


def test_verification_refuses_a_law_or_runs_of_another_device_before_training(tmp_path):
    fit_json = _fit_json(tmp_path, latency_section("cuda:NVIDIA H100 80GB HBM3", call=1.0))
    cfg = compose("verify", [f"results_dir={tmp_path / 'res'}", "sweep=toy", f"constants={fit_json}",
                             "device=cpu", "logger=none"])
    with pytest.raises(UserError, match="latency law .* with device 'cuda:NVIDIA H100 80GB HBM3'") as err:
        verify.run(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "res").exists()
    # runs that train (and measure their records' latency) on a GPU, re-measured on the CPU: refused
    here = devices.conditions(torch.device("cpu"), graphed=False)
    shape = {"n_layers": 2, "d_model": 32}
    gpu = compose("verify", ["sweep=toy", "train_preset=demo", "train_overrides=['train=gpu']", "device=cpu"])
    with pytest.raises(UserError, match="device 'cuda'.* with device 'cpu'"):
        verify.check_training_device(gpu, shape, 10_000, here)
    cpu = compose("verify", ["sweep=toy", "train_preset=demo", "train_overrides=['train.accelerator=cpu']", "device=cpu"])
    verify.check_training_device(cpu, shape, 10_000, here)  # the same device kind: accepted
    cuda_here = {**here, "device": "cuda:NVIDIA H100 80GB HBM3", "dtype": "bfloat16", "graph": "cuda-graph"}
    with pytest.raises(UserError, match="device 'cpu'.* with device 'cuda'"):
        verify.check_training_device(cpu, shape, 10_000, cuda_here)


def test_check_comparable_reads_old_sections_as_eager():
    cpu = {"device": "cpu:x", "dtype": "float32"}
    devices.check_comparable(cpu, {**cpu, "graph": "eager"}, "a", "b")  # no graph recorded: eager
    devices.check_comparable({"device": "cpu:x"}, cpu, "a", "b")  # no dtype recorded: not compared
    devices.check_comparable({**cpu, "dtype": "object"}, cpu, "a", "b")  # what 0.1.0's sections hold: not known
    with pytest.raises(UserError, match="a was measured with graph 'eager', b with graph 'cuda-graph'"):
        devices.check_comparable(cpu, {**cpu, "graph": "cuda-graph"}, "a", "b")
    with pytest.raises(UserError, match="dtype 'float32'.*dtype 'bfloat16'"):
        devices.check_comparable(cpu, {**cpu, "dtype": "bfloat16"}, "a", "b")
