"""One tiny real Lightning run through the same run(cfg) the CLI calls; its record, its offline W&B run, and every
kind of bad input stopping before any compute."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from scaling_lab.fit.io import store
from scaling_lab.pipeline.data import DataError
from scaling_lab.pipeline.module import warmup_cosine
from scaling_lab.pipeline.runspec import ConfigError
from scaling_lab.pipeline.train import run

SECRET = "wandb-test-key-0123456789abcdef0123456789abcdef"


def wandb_summary(run_dir: Path) -> dict:
    """Read an offline W&B run back from its .wandb log with wandb's own reader."""
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary", "--json",
                          str(run_dir)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_tiny_run_end_to_end(compose_train, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)  # present in the environment: must never land anywhere
    cfg = compose_train("sweep.name=unit")
    record = run(cfg)

    assert record["status"] == "ok", record.get("error")
    assert record["tokens"]["seen"] == record["tokens"]["budget"] == 16384
    assert 0 < record["loss"]["final"] < math.log(257)  # learned something beyond uniform bytes
    assert record["loss"]["bits_per_byte"] == pytest.approx(record["loss"]["final"] / math.log(2), rel=0.01)
    assert record["params"]["non_embedding"] == 12_384 and record["shape"]["aspect_ratio"] == 32.0
    assert record["flops"]["total"] == record["flops"]["per_token"] * 16384
    lat = record["latency"]
    assert lat["prefill_ms"] > 0 and lat["decode_ms_per_token"] > 0 and lat["batch_sizes"] == [1, 2]
    assert set(lat["by_batch"]["2"]["decode_ms_per_token"]) == {"median", "min", "max", "iqr_rel"}
    assert record["versions"]["torch"] and record["data"]["corpus_hash"] and record["data"]["python"]
    assert len(record["versions"]["commit"].removesuffix("+dirty")) == 40  # which code of this checkout wrote it
    # throughput as GPU users read it: the device, its count and precision, steady-state tokens/s and MFU against
    # the device's peak (on a CPU, a fp32 matmul measured in the run)
    hw = record["hardware"]
    assert hw["accelerator"] == hw["device"] == "cpu" and hw["devices"] == 1 and hw["precision"] == "32-true"
    assert hw["peak_flops"] > 1e9 and "measured" in hw["peak_source"]
    steady, mfu = record["timing"]["tokens_per_s_steady"], record["timing"]["mfu"]
    assert steady > 0 and mfu == pytest.approx(record["flops"]["per_token"] * steady / hw["peak_flops"])
    assert 0 < mfu < 1

    results = Path(cfg.results_dir)
    path = store.record_path(results, "unit", record["run_id"])
    assert json.loads(path.read_text())["loss"]["final"] == record["loss"]["final"]
    table = store.load_table(results, "unit")
    assert len(table) == 1 and table.loc[0, "status"] == "ok" and table.loc[0, "loss"] == record["loss"]["final"]
    assert table.loc[0, "device"] == "cpu" and table.loc[0, "world_size"] == 1 and table.loc[0, "mfu"] == mfu
    assert not list(results.rglob("*.ckpt"))  # a finished run leaves no checkpoint behind

    run_dirs = list((results / "unit" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    summary = wandb_summary(run_dirs[0])
    assert summary["summary"]["loss"] == pytest.approx(record["loss"]["final"])
    assert summary["summary"]["params_non_embedding"] == 12_384
    assert summary["config"]["model"]["d_model"] == 32 and summary["state"] == "finished"

    for f in results.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"credential leaked into {f}"

    again = time.time()
    assert run(cfg)["run_id"] == record["run_id"]  # a finished run is skipped, not retrained
    assert time.time() - again < 5


def test_divergence_is_recorded_as_failed(compose_train):
    cfg = compose_train("train.diverge_loss=0.5", "logger=none", "sweep.name=unit")
    record = run(cfg)
    assert record["status"] == "failed" and "diverged" in record["error"]
    table = store.load_table(cfg.results_dir, "unit")
    assert list(table.status) == ["failed"]


def test_a_finished_run_without_weights_is_rerun_when_asked_to_keep_them(compose_train):
    common = ["logger=none", "sweep.name=unit", "latency.enabled=false", "train.tokens=4096"]
    first = run(compose_train(*common))
    assert first["status"] == "ok" and not first.get("weights")
    again = run(compose_train(*common, "train.save_model=true"))
    assert again["run_id"] == first["run_id"] and again["weights"]["format"] == "safetensors"
    assert run(compose_train(*common, "train.save_model=true"))["finished_at"] == again["finished_at"]  # kept now


@pytest.mark.parametrize("override, error, message", [
    ("model.n_heads=3", ConfigError, "not divisible"),
    ("train.tokens=0", ConfigError, "positive"),
    ("train.tokens=-5", ConfigError, "positive"),
    ("train.tokens=1e12", DataError, "exceeds the .* unique training tokens"),
    ("data=files", DataError, "data.path"),
    ("train.micro_batch_size=3", ConfigError, "must divide each rank's share of the batch, 8 sequences"),
])
def test_bad_input_stops_before_training(compose_train, override, error, message):
    overrides = [override]
    if override == "data=files":
        overrides.append("data.path=/nonexistent/corpus/*.txt")
    cfg = compose_train(*overrides, "logger=none")
    start = time.time()
    with pytest.raises(error, match=message):
        run(cfg)
    assert time.time() - start < 10
    assert not Path(cfg.results_dir).exists() or not list(Path(cfg.results_dir).rglob("*.json"))


def test_unknown_key_is_rejected(compose_train):
    with pytest.raises(ConfigCompositionException, match="model.no_such_key"):
        compose_train("model.no_such_key=1")


def test_cli_reports_bad_input_in_one_line(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run([str(Path(sys.executable).parent / "scaling-train"), "model.d_model=100", "model.n_heads=3",
                          f"results_dir={tmp_path}", "logger=none"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2
    assert "error: model.d_model=100 is not divisible by model.n_heads=3" in out.stderr
    assert "Traceback" not in out.stderr


def test_schedule_ends_at_min_lr_exactly_at_budget():
    total, warmup = 100, 5
    lrs = [warmup_cosine(s, total, warmup, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(0.2) and lrs[warmup] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and min(lrs[warmup:]) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))


WSD = ["train.schedule=wsd", "train.warmup_steps=2", "train.decay_frac=0.25", "logger=none", "latency.enabled=false",
       "sweep.name=wsd"]


def test_wsd_branches_share_one_stable_run_and_see_exactly_their_budget(compose_train, tmp_path):
    short = run(compose_train(*WSD, "train.tokens=8192"))
    long = run(compose_train(*WSD, "train.tokens=16384"))
    for r, steps in ((short, 32), (long, 64)):
        assert r["status"] == "ok", r.get("error")
        assert r["tokens"]["seen"] == r["tokens"]["budget"] == steps * 256  # exactly its budget
        assert r["schedule"]["name"] == "wsd" and r["schedule"]["decay_steps"] == steps // 4
        assert r["timing"]["resumed_from_tokens"] == r["schedule"]["stable_tokens"] == (steps - steps // 4) * 256
    assert short["schedule"]["branched_from"] == long["schedule"]["branched_from"]
    assert short["run_id"] != long["run_id"]
    # the second branch extended the stable run from the first branch's start (24) to its own (48)
    assert short["schedule"]["trunk_steps_trained"] == 24 and long["schedule"]["trunk_steps_trained"] == 24
    assert long["flops"]["spent"] == long["flops"]["per_token"] * (24 + 16) * 256
    table = store.load_table(Path(short["config"]["results_dir"]), "wsd")
    assert set(table.schedule) == {"wsd"} and table.branched_from.nunique() == 1

    # the same branch with its stable run trained in one go, elsewhere: the same model (the stable run resumes exactly)
    alone = run(compose_train(*WSD, "train.tokens=16384", f"results_dir={tmp_path / 'alone'}"))
    assert alone["run_id"] == long["run_id"] and alone["schedule"]["trunk_steps_trained"] == 48
    assert alone["loss"]["final"] == pytest.approx(long["loss"]["final"], rel=1e-6)

    # a branch re-run (its record gone) finds its stable checkpoint and trains only its decay
    store.record_path(short["config"]["results_dir"], "wsd", short["run_id"]).unlink()
    again = run(compose_train(*WSD, "train.tokens=8192"))
    assert again["schedule"]["trunk_steps_trained"] == 0
    assert again["loss"]["final"] == pytest.approx(short["loss"]["final"], rel=1e-6)


def test_wsd_needs_a_budget_free_batch_and_warmup(compose_train):
    with pytest.raises(ConfigError, match="batch_rule=constant"):
        run(compose_train(*WSD, "train.batch_rule=sqrt_tokens"))
    with pytest.raises(ConfigError, match="warmup_steps"):
        run(compose_train(*WSD, "train.warmup_steps=null"))


def test_ranks_get_equal_work_in_every_global_batch(compose_train):
    """Under DDP each global batch, the last one included, splits evenly over the ranks: the plan rounds the budget
    to whole rank shares (523 sequences of 32 tokens become 522 on 2 ranks) and refuses a batch they cannot split."""
    from scaling_lab.pipeline.data import GlobalBatches
    from scaling_lab.pipeline.runspec import plan_run

    one = plan_run(compose_train("train.tokens=16736"))
    two = plan_run(compose_train("train.tokens=16736", "train.devices=2", "train.strategy=ddp"))
    assert (one.tokens, two.tokens) == (523 * 32, 522 * 32) and one.run_id != two.run_id
    sequences = two.tokens // 32
    shares = [[len(b) for b in GlobalBatches(sequences, two.batch_size, rank=r, world=2)] for r in (0, 1)]
    assert shares[0] == shares[1] and min(shares[0]) >= 1 and sum(map(sum, shares)) == sequences
    with pytest.raises(ConfigError, match="multiple of the 2 ranks"):
        plan_run(compose_train("train.batch_size=7", "train.devices=2"))
    assert plan_run(compose_train("train.devices=[0,1]", "train.num_nodes=2", "train.batch_size=8")).tokens % 4 == 0


def test_token_counts_are_exact_beyond_float32():
    """150,001 x 1000 tokens is not a float32 (it would come back as 150,000,992 and fail the end-of-run check)."""
    import lightning as L

    from scaling_lab.models.shapes import GPTConfig
    from scaling_lab.pipeline.module import LitGPT

    module = LitGPT(GPTConfig(n_layers=1, d_model=32, n_heads=2), lr=1e-3, total_steps=10, warmup_steps=1,
                    min_lr_ratio=0.1, weight_decay=0.0, betas=(0.9, 0.95), diverge_loss=10.0, check_every=1)
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.tokens_local = 150_001 * 1000
    assert module.tokens_seen() == 150_001_000


def test_micro_batches_train_the_same_run(compose_train, tmp_path):
    """train.micro_batch_size: each step's batch in micro-batches whose gradients add up to the batch's. The same
    run (its id), the same tokens and, up to rounding, the same losses, through a WSD stable run and its branch and
    the budget's shorter last batch (516 sequences: 64 batches of 8, then 4)."""
    common = ["logger=none", "latency.enabled=false", "train.tokens=16512", "train.schedule=wsd",
              "train.warmup_steps=2"]
    whole = run(compose_train(*common, f"results_dir={tmp_path / 'whole'}"))
    parts = run(compose_train(*common, "train.micro_batch_size=2", f"results_dir={tmp_path / 'parts'}"))
    assert whole["status"] == parts["status"] == "ok", parts.get("error")
    assert whole["run_id"] == parts["run_id"]
    assert parts["tokens"]["seen"] == whole["tokens"]["seen"] == 16512
    assert parts["loss"]["final"] == pytest.approx(whole["loss"]["final"], rel=1e-4)
    assert [t for t, _ in parts["loss"]["train_curve"]] == [t for t, _ in whole["loss"]["train_curve"]]
