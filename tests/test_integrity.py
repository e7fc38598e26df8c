"""A shared results folder can neither run code nor lie (issue 23): tiny real runs whose checkpoints, weights and token
cache are then tampered with on disk, as a colleague's tool or a bad disk would.

* A pickle payload (an object whose ``__reduce__`` creates a marker file) planted in every kind of checkpoint and
  in a saved weights file (safetensors, or a ``.pt`` of the previous release), even beside a matching checksum,
  never runs: each load is data only, and refuses the file in one line naming it.
* A checkpoint with 4 KiB zeroed is refused in one line and set aside, so the relaunch trains from scratch to the
  same result as a run that was never damaged; ``scaling-sweep-status`` lists the file set aside.
* A corrupted ``val.bin`` or a wrong ``vocab_size`` in the token cache's ``meta.json``, and weights that do not match
  their checksum, are one-line errors naming the file; files without a checksum (the previous release's) still load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scaling_lab.conf import compose
from scaling_lab.fit.io import integrity, store
from scaling_lab.pipeline import serving
from scaling_lab.pipeline.runspec import plan_run
from scaling_lab.pipeline.train import run
from tests.helpers import TINY

# Short runs (16 steps), saved weights; the same run in every test, so every result equals the first one's.
FAST = [*TINY, "train.tokens=4096", "latency.enabled=false", "logger=none", "train.threads=1", "train.save_model=true"]
WSD = ["train.schedule=wsd", "train.warmup_steps=2", "train.decay_frac=0.25"]


class Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint would do if a load ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    """A checkpoint-shaped file carrying the payload, with a matching checksum: only a data-only load stops it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1, "state_dict": {}, "payload": Payload(marker)}, path)
    integrity.write_checksum(path)


def one_line(message: str, *names: str) -> bool:
    return "\n" not in message.strip() and all(name in message for name in names)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A token cache of this module's own (the session's may predate checksums, and these tests damage copies)."""
    return tmp_path_factory.mktemp("integrity-cache")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache) -> dict:
    """The run, undamaged, with its weights."""
    results = tmp_path_factory.mktemp("straight")
    record = run(compose("train", [*FAST, f"results_dir={results}", f"data.cache_dir={cache}"]))
    assert record["status"] == "ok", record.get("error")
    return record


@pytest.fixture
def config(tmp_path, cache, straight):
    def _config(*overrides: str, cache_dir: Path = cache):
        return compose("train", [*FAST, f"results_dir={tmp_path / 'results'}", f"data.cache_dir={cache_dir}",
                                 *overrides])
    return _config


def test_a_payload_in_the_resume_checkpoint_never_runs(config, tmp_path, cache):
    cfg = config()
    ckpt = store.checkpoint_path(cfg.results_dir, "default", plan_run(cfg).run_id)
    marker = tmp_path / "pwned"
    plant(ckpt, marker)
    out = subprocess.run([str(Path(sys.executable).parent / "scaling-train"), *FAST, f"results_dir={cfg.results_dir}",
                          f"data.cache_dir={cache}"], capture_output=True, text=True, timeout=300)
    output = out.stdout + out.stderr
    assert not marker.exists()
    assert out.returncode == 1 and "Traceback" not in output, output[-3000:]
    (failed,) = [line for line in out.stdout.splitlines() if line.startswith("failed:")]
    assert str(ckpt) in failed and "not plain data" in failed and "io.open" in failed
    record = store.read_record(store.record_path(cfg.results_dir, "default", plan_run(cfg).run_id))
    assert record["status"] == "failed" and one_line(record["error"], str(ckpt), "set aside")
    assert not ckpt.exists() and ckpt.with_name(ckpt.name + ".damaged").exists()


@pytest.mark.parametrize("kind", ["partial", "step"])
def test_a_payload_in_a_stable_run_checkpoint_never_runs(kind, config, tmp_path):
    cfg = config(*WSD)
    spec = plan_run(cfg, vocab_size=257)
    folder = store.trunk_dir(cfg.results_dir, "default", spec.trunk_id)
    ckpt = folder / ("partial.ckpt" if kind == "partial" else f"step_{1:08d}.ckpt")  # before the branch's start
    marker = tmp_path / "pwned"
    plant(ckpt, marker)
    record = run(cfg)
    assert not marker.exists()
    assert record["status"] == "failed" and one_line(record["error"], str(ckpt), "not plain data")


def test_a_payload_in_saved_weights_never_runs(straight, tmp_path):
    results = Path(straight["config"]["results_dir"])
    weights = serving.weights_file(straight, results)
    assert weights.suffix == ".safetensors" and straight["weights"]["format"] == "safetensors"
    copy = tmp_path / "results"
    shutil.copytree(results, copy)
    marker = tmp_path / "pwned"
    planted = serving.weights_file(straight, copy)
    plant(planted, marker)  # a pickle where safetensors belong
    with pytest.raises(integrity.IntegrityError) as err:
        serving.load_model(straight, copy)
    assert not marker.exists()
    assert one_line(str(err.value), str(planted), "is not a safetensors file")
    assert serving.load_model(straight, results) is not None and weights.exists()  # the original is untouched

    # a run of the previous release: its record names a torch state dict (.pt), read data only
    legacy = {**straight, "weights": {"path": f"weights/{straight['run_id']}.pt", "format": "torch_state_dict"}}
    old = serving.weights_file(legacy, copy)
    plant(old, marker)
    with pytest.raises(integrity.IntegrityError) as err:
        serving.load_model(legacy, copy)
    assert not marker.exists()
    assert one_line(str(err.value), str(old), "not plain data")
    model = serving.load_model(straight, results)
    torch.save(model.state_dict(), old)
    integrity.write_checksum(old)
    assert torch.equal(serving.load_model(legacy, copy).wte.weight, model.wte.weight)


def test_weights_that_do_not_match_their_checksum_are_refused(straight, tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(straight["config"]["results_dir"], copy)
    weights = serving.weights_file(straight, copy)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit-flipped byte in the middle of a tensor
    weights.write_bytes(data)
    with pytest.raises(integrity.IntegrityError) as err:
        serving.load_model(straight, copy)
    assert one_line(str(err.value), str(weights), "do not match its checksum", "delete it")

    from scaling_lab.pipeline.sweep import format_status, status

    shown = format_status("default", status(copy, "default"), copy)
    assert f"damaged file {weights}:" in shown

    integrity.sidecar(weights).unlink()  # a file of the previous release, written without a checksum: it loads
    assert serving.load_model(straight, copy) is not None


def test_a_zeroed_checkpoint_is_set_aside_and_the_relaunch_trains_from_scratch(config, straight):
    cfg = config()
    blocker = store.sweep_dir(cfg.results_dir, "default") / "weights"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the weights folder goes")  # the run fails after training: its checkpoint stays
    first = run(cfg)
    assert first["status"] == "failed" and "weights" in first["error"]
    ckpt = store.checkpoint_path(cfg.results_dir, "default", first["run_id"])
    assert integrity.sidecar(ckpt).exists()
    with open(ckpt, "r+b") as f:  # 4 KiB of zeros in the middle, as a bad block or a cut-short copy leaves
        f.seek(os.path.getsize(ckpt) // 2)
        f.write(bytes(4096))
    blocker.unlink()

    damaged = run(config("sweep.retry_failed=true"))
    assert damaged["status"] == "failed"
    assert one_line(damaged["error"], str(ckpt), "do not match its checksum", "set aside", ".damaged")
    aside = ckpt.with_name(ckpt.name + ".damaged")
    assert aside.exists() and not ckpt.exists()

    from scaling_lab.pipeline.sweep import format_status, status

    assert f"damaged file {aside}: set aside" in format_status("default", status(cfg.results_dir, "default"),
                                                               cfg.results_dir)

    again = run(config("sweep.retry_failed=true"))
    assert again["status"] == "ok", again.get("error")
    assert again["timing"]["resumed_from_tokens"] == 0
    assert again["tokens"] == straight["tokens"] and again["loss"]["final"] == straight["loss"]["final"]
    assert "set aside" in again["attempts"][-2]["error"]  # the record still says what happened
    assert not ckpt.exists() and not integrity.sidecar(ckpt).exists()  # a finished run leaves no checkpoint


def _token_cache_copy(cache: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(cache / "tokens", copy / "tokens")
    return copy


def test_a_corrupted_heldout_stream_is_refused(config, cache, tmp_path):
    copy = _token_cache_copy(cache, tmp_path)
    (val,) = (copy / "tokens").glob("*/val.bin")
    with open(val, "r+b") as f:
        f.seek(1000)
        f.write(bytes(4096))
    with pytest.raises(integrity.IntegrityError) as err:
        run(config(cache_dir=copy))
    assert one_line(str(err.value), str(val), "delete the token cache")


def test_a_wrong_vocab_size_in_the_cache_is_refused(config, cache, tmp_path):
    copy = _token_cache_copy(cache, tmp_path)
    (meta,) = (copy / "tokens").glob("*/meta.json")
    doc = json.loads(meta.read_text())
    meta.write_text(json.dumps({**doc, "vocab_size": doc["vocab_size"] + 43}, indent=2))
    with pytest.raises(integrity.IntegrityError) as err:
        run(config(cache_dir=copy))
    assert one_line(str(err.value), str(meta), "delete the token cache")
