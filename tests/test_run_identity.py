"""Run identity (conf/train_schema.py's RUN_IDENTITY): pinned ids, keys added with a baseline that keep them,
operational keys that never move them, and run records that say their schema version."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_lab.conf import compose
from scaling_lab.conf import train_schema as schema
from scaling_lab.fit.io import store
from scaling_lab.models.shapes import GPTConfig
from scaling_lab.pipeline.runspec import plan_run
from tests.extended_schema import NAME, extended_schema
from tests.run_id_cases import GOLDEN, ids

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PINNED = json.loads(GOLDEN.read_text())["cases"]
# a few of the pinned cases, for the tests that plan them several times: single runs of every kind and demo points
SOME = [c for c in PINNED if not c["case"].startswith("sweep=")] + \
       [c for c in PINNED if c["case"] == "sweep=demo"][::12]


def test_pinned_run_ids_do_not_move():
    moved = []
    for case in PINNED:
        now = ids(case["overrides"])
        if now != {"run_id": case["run_id"], "trunk_id": case["trunk_id"]}:
            moved.append(f"{case['case']} {case['overrides']}: {case['run_id']}/{case['trunk_id']} -> "
                         f"{now['run_id']}/{now['trunk_id']}")
    assert not moved, (f"{len(moved)} pinned run ids moved: every user's finished runs of these configurations would "
                       "train again. Keep them (a new key needs a baseline in conf/train_schema.py's RUN_IDENTITY), "
                       "or regenerate the table on purpose and say why in the commit and CHANGELOG.md:\n"
                       + "\n".join(moved[:20]))


@pytest.mark.parametrize("group, fields", [
    ("train", {f.name for f in dataclasses.fields(schema.TrainConf)}),
    ("data", {f.name for f in dataclasses.fields(schema.DataConf)}),
    ("model", {f.name for f in dataclasses.fields(GPTConfig)}),  # the resolved shape, which the id hashes
])
def test_every_key_is_declared_once(group, fields):
    declared, operational = set(schema.RUN_IDENTITY[group]), schema.OPERATIONAL[group]
    assert not declared & operational
    assert declared | operational == fields


def _plan(case: dict, *extra: str) -> dict:
    spec = plan_run(compose("train", [*case["overrides"], *extra]))
    return {"run_id": spec.run_id, "trunk_id": spec.trunk_id}


def _pinned(case: dict) -> dict:
    return {"run_id": case["run_id"], "trunk_id": case["trunk_id"]}


def test_a_new_key_at_its_baseline_keeps_every_id_and_moves_them_elsewhere():
    with extended_schema(schema.Key(baseline=0.0)):
        assert [_plan(c) for c in SOME] == [_pinned(c) for c in SOME]
        moved = [_plan(c, f"train.{NAME}=0.1") for c in SOME]
    for case, now in zip(SOME, moved):
        assert now["run_id"] != case["run_id"]
        if case["trunk_id"]:
            assert now["trunk_id"] != case["trunk_id"]
    # a branch-only key moves the branch but not the stable run it shares with the other budgets
    wsd = next(c for c in SOME if c["case"] == "wsd branch")
    with extended_schema(schema.Key(baseline=0.0, branch=True)):
        now = _plan(wsd, f"train.{NAME}=0.1")
    assert now["run_id"] != wsd["run_id"] and now["trunk_id"] == wsd["trunk_id"]


def test_a_new_key_without_a_baseline_would_move_every_id_and_an_undeclared_one_stops_the_plan():
    with extended_schema(schema.Key()):  # what hashing every key did: an upgrade retrained every finished run
        assert all(_plan(c)["run_id"] != c["run_id"] for c in SOME[:3])
    with extended_schema("undeclared"):
        with pytest.raises(RuntimeError, match=f"train.{NAME} is declared neither in RUN_IDENTITY nor in OPERATIONAL"):
            plan_run(compose("train", []))


def test_operational_keys_never_enter_the_id():
    case = next(c for c in PINNED if c["case"] == "wsd branch")
    operational = ["train.threads=3", "train.devices=2", "train.accelerator=cpu", "train.compile=true",
                   "train.ckpt_every=7", "train.log_every=3", "train.val_every=5", "train.save_model=true",
                   "train.progress_bar=false", "data.cache_dir=/elsewhere", "data.num_workers=4",
                   "data.val_curve_tokens=1024", "data.streaming=false", "latency.repeats=9", "logger=none",
                   "results_dir=/other"]
    assert _plan(case, *operational) == _pinned(case)
    with extended_schema(None):
        assert _plan(case, f"train.{NAME}=0.3") == _pinned(case)
    # the model group's inputs enter through the shape they resolve to: one shape asked for two ways is one run
    by_width = plan_run(compose("train", ["model.n_layers=2", "model.d_model=64"])).run_id
    by_ratio = plan_run(compose("train", ["model.n_layers=2", "model.d_model=null", "model.aspect_ratio=32"])).run_id
    assert by_width == by_ratio


def test_a_run_record_carries_its_schema_version_and_identity(compose_train):
    from scaling_lab.pipeline.train import run

    cfg = compose_train("logger=none", "latency.enabled=false")
    record = run(cfg)
    on_disk = json.loads(store.record_path(cfg.results_dir, record["sweep"], record["run_id"]).read_text())
    assert on_disk["schema_version"] == store.RECORD_SCHEMA_VERSION and "record_version" not in on_disk
    assert store.run_id_for(on_disk["identity"]) == on_disk["run_id"]
    assert on_disk["versions"]["project"] == store.tool_version()


def _records(results_dir: Path, version: dict, sweep: str = "old") -> None:
    """Ten finished runs as the given record version writes them (a Chinchilla-like loss)."""
    for i, (n, d) in enumerate((n, d) for n in (2e5, 5e5, 1e6, 3e6, 1e7) for d in (1e7, 1e8)):
        doc = {**version, "run_id": f"r{i:02d}", "sweep": sweep, "status": "ok", "seed": 0,
               "shape": {"n_layers": 4, "d_model": 64, "aspect_ratio": 16.0},
               "params": {"total": 1.2 * n, "non_embedding": n, "embedding": 0.2 * n},
               "tokens": {"budget": d, "seen": d}, "flops": {"per_token": 6 * n, "total": 6 * n * d},
               "loss": {"final": 1.8 + 400 / n ** 0.34 + 410 / d ** 0.28}, "versions": {"project": "0.1.0"}}
        path = store.record_path(results_dir, sweep, doc["run_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))


def _cli(*args):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300)


def test_records_of_the_previous_shape_still_load(tmp_path):
    results = tmp_path / "results"
    _records(results, {"record_version": 1})
    status = _cli("scaling-sweep-status", "sweep=old", f"results_dir={results}")
    assert status.returncode == 0, status.stderr
    assert "10 points: 10 done" in status.stdout
    fit = _cli("scaling-fit", "sweep=old", f"results_dir={results}", f"out={tmp_path / 'fit'}", "bootstrap.n=0",
               "law=[chinchilla]", "logger=none", "plots=false")
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert json.loads((tmp_path / "fit" / "fit.json").read_text())["provenance"]["rows"]["fit"] == 10
    record = store.read_record(store.record_path(results, "old", "r00"))
    assert record["schema_version"] == store.RECORD_SCHEMA_VERSION and record["identity"] is None


def test_a_record_from_a_later_release_is_refused_in_one_line(tmp_path, compose_train):
    results = tmp_path / "results"
    _records(results, {"schema_version": store.RECORD_SCHEMA_VERSION})
    future = store.record_path(results, "old", "r03")
    future.write_text(json.dumps({**json.loads(future.read_text()), "schema_version": 99,
                                  "versions": {"project": "7.1.0"}}))
    message = (f"a run record of schema_version 99, written by scaling-lab 7.1.0; this scaling-lab "
               f"{store.tool_version()} reads schema_version 1 to {store.RECORD_SCHEMA_VERSION}: "
               "pip install -U 'scaling-lab>=7.1.0'")
    for command in (["scaling-sweep-status", "sweep=old", f"results_dir={results}"],
                    ["scaling-fit", "sweep=old", f"results_dir={results}", f"out={tmp_path / 'fit'}"]):
        out = _cli(*command)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    # a run whose record a later release wrote is neither trained nor overwritten
    from scaling_lab.pipeline.train import run

    cfg = compose_train("logger=none", f"results_dir={results}", "sweep.name=old")
    spec = plan_run(cfg)
    path = store.record_path(results, "old", spec.run_id)
    path.write_text(future.read_text().replace('"r03"', f'"{spec.run_id}"'))
    before = path.read_text()
    with pytest.raises(store.RecordVersionError, match="pip install -U 'scaling-lab>=7.1.0'"):
        run(cfg)
    assert path.read_text() == before and not store.checkpoint_path(results, "old", spec.run_id).exists()


def test_the_changelog_opens_with_this_release_and_its_record_version():
    import re
    import tomllib

    text = (ROOT / "CHANGELOG.md").read_text()
    release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(r"^## (\S+)", text, re.M).group(1) == release
    assert f"`schema_version` {store.RECORD_SCHEMA_VERSION}" in text
