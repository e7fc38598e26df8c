"""Bad inputs a new user tries, each through the installed console script: one line ``scaling-<cmd>: error: ...``,
exit 2, no traceback. The test writes the reference table scripts/output/bad-inputs.md (one line per case and its message),
so the documented messages are the ones the commands print."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BIN = Path(sys.executable).parent
DOC = Path(__file__).resolve().parents[1] / "scripts" / "output" / "bad-inputs.md"
TABLE: dict[str, tuple[str, str]] = {}


def _csv(tmp: Path) -> Path:
    N, D = np.geomspace(1e6, 1e8, 12), np.geomspace(1e8, 1e10, 12)[::-1]
    path = tmp / "runs.csv"
    pd.DataFrame({"N": N, "D": D, "loss": 2 + 400 / N ** 0.34 + 400 / D ** 0.28}).to_csv(path, index=False)
    return path


def _jsonl(tmp: Path) -> Path:
    path = tmp / "corpus.jsonl"
    path.write_text(json.dumps({"text": "fine " * 50}) + "\n{'text': not json}\n")
    return path


def _random_bytes(tmp: Path) -> Path:
    path = tmp / "noise.txt"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


TRAIN = ["logger=none", "latency.enabled=false", "train.tokens=16384"]
# label -> (command, args(tmp), expected part of the message)
CASES = {
    "unknown key added with +": ("scaling-train", lambda t: [*TRAIN, "+foo=1"], "unknown key 'foo'"),
    "typo'd key added with +": ("scaling-train", lambda t: [*TRAIN, "+train.lrr=0.1"], "unknown key 'train.lrr'"),
    "unknown key without +": ("scaling-train", lambda t: [*TRAIN, "train.lrr=0.1"], "train.lrr"),
    "a schedule that does not exist": ("scaling-train", lambda t: [*TRAIN, "train.schedule=cosin"],
                                       "Invalid value 'cosin', expected one of [cosine, wsd]"),
    "a binary file as corpus": ("scaling-train", lambda t: [*TRAIN, "data=files", f"data.path={shutil.which('ls')}",
                                                            f"data.cache_dir={t}/cache"], "not a text file"),
    "random bytes as corpus": ("scaling-train", lambda t: [*TRAIN, "data=files", f"data.path={_random_bytes(t)}",
                                                           f"data.cache_dir={t}/cache"], "not a text file"),
    "malformed JSONL line": ("scaling-train", lambda t: [*TRAIN, "data=files", f"data.path={_jsonl(t)}",
                                                         f"data.cache_dir={t}/cache"], "corpus.jsonl:2: not a JSON line"),
    "negative bootstrap.n": ("scaling-fit", lambda t: ["source=csv", f"source.path={_csv(t)}", "bootstrap.n=-1"],
                             "bootstrap.n=-1 is out of range"),
    "report of a sweep with no records": ("scaling-report", lambda t: ["sweep=nosuch", f"results_dir={t}/results"],
                                          "has no records"),
    "damaged record in the fit": ("scaling-fit", lambda t: _damaged(t), "1 damaged record(s)"),
    "a record nested 100,000 deep in the fit": ("scaling-fit", lambda t: _damaged(t, "[" * 100_000),
                                                "1 damaged record(s)"),
    "a sweep name that leads out of results_dir": ("scaling-train", lambda t: [*TRAIN, "sweep.name=../.."],
                                                   "sweep name '../..' is not a plain name"),
    "an absolute sweep name": ("scaling-sweep-status", lambda t: ["sweep=/etc", f"results_dir={t}"],
                               "sweep name '/etc' is not a plain name"),
    "a record from a later release": ("scaling-sweep-status", lambda t: _future(t),
                                      "pip install -U 'scaling-lab>=9.0.0'"),
    "a token cache whose val.bin was damaged": ("scaling-train", lambda t: _damaged_cache(t, _flip_val),
                                                "val.bin is damaged: its contents do not match its checksum"),
    "a token cache whose meta.json says another vocab_size": ("scaling-train",
                                                              lambda t: _damaged_cache(t, _vocab_in_meta),
                                                              "meta.json is damaged"),
    "an input constant in every fit row": ("scaling-fit", lambda t: ["source=csv", f"source.path={_constant_n(t)}"],
                                           "N=1e+07 in all 12 fit rows"),
    "a CSV column name given twice": ("scaling-fit", lambda t: ["source=csv", f"source.path={_loss_twice(t)}"],
                                      "has duplicated column name(s) ['loss']"),
    "a law parameter named like an input": ("scaling-fit", lambda t: [
        "source=csv", f"source.path={_csv(t)}", "+law.clash.formula='E + N / D**beta'", "+law.clash.inputs=[N,D]",
        "+law.clash.params=[E,N,beta]"], "parameter(s) ['N'] named like input(s)"),
}


def _constant_n(tmp: Path) -> Path:
    path = _csv(tmp)
    pd.read_csv(path).assign(N=1e7).to_csv(path, index=False)
    return path


def _loss_twice(tmp: Path) -> Path:
    path = _csv(tmp)
    pd.read_csv(path).assign(again=1.0).to_csv(path, index=False, header=["N", "D", "loss", "loss"])
    return path


def _damaged(tmp: Path, text: str = '{"run_id": "aaaa", "status": "o') -> list[str]:
    sweep = tmp / "results" / "broken"
    sweep.mkdir(parents=True)
    (sweep / "aaaa.json").write_text(text)  # by default truncated by a full disk
    return [f"results_dir={tmp}/results", "sweep=broken", f"out={tmp}/fit"]


def _small_corpus(tmp: Path) -> list[str]:
    """A small text corpus of its own (its token cache in ``tmp``): the data overrides."""
    (tmp / "corpus").mkdir()
    words = " ".join(f"word{i % 97}" for i in range(8000))
    (tmp / "corpus" / "train.txt").write_text(words)
    (tmp / "val.txt").write_text(words[:4000])
    return ["data=files", f"data.path={tmp}/corpus", f"data.val_path={tmp}/val.txt", f"data.cache_dir={tmp}/cache"]


def _damaged_cache(tmp: Path, damage) -> list[str]:
    """A small corpus prepared by scaling-prepare, then one file of its token cache changed by ``damage``."""
    data = _small_corpus(tmp)
    prepared = subprocess.run([str(BIN / "scaling-prepare"), *data], capture_output=True, text=True, cwd=tmp,
                              timeout=300)
    assert prepared.returncode == 0, prepared.stderr
    (cache,) = [p for p in (tmp / "cache" / "tokens").iterdir() if p.is_dir()]
    damage(cache)
    return [*TRAIN, *data]


def _flip_val(cache: Path) -> None:
    data = bytearray((cache / "val.bin").read_bytes())
    data[100:104] = b"\xff\xff\xff\xff"
    (cache / "val.bin").write_bytes(bytes(data))


def _vocab_in_meta(cache: Path) -> None:
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "vocab_size": 300}))


def _future(tmp: Path) -> list[str]:
    sweep = tmp / "results" / "later"
    sweep.mkdir(parents=True)
    (sweep / "aaaa.json").write_text(json.dumps({"schema_version": 7, "run_id": "aaaa", "sweep": "later",
                                                 "status": "ok", "versions": {"project": "9.0.0"}}))
    return [f"results_dir={tmp}/results", "sweep=later"]


def _planted_checkpoint(tmp: Path, code: bool) -> list[str]:
    """The run's resume checkpoint, planted in its results folder with a matching checksum: one that asks to run
    code (``code``), or a plain one with 4 KiB zeroed after its checksum was written."""
    import torch

    from scaling_lab.conf import compose
    from scaling_lab.fit.io import integrity, store
    from scaling_lab.pipeline.runspec import plan_run
    from tests.test_integrity import Payload

    args = [*TRAIN, *_small_corpus(tmp), "data.eval_tokens=2048", "data.val_curve_tokens=512",
            f"results_dir={tmp}/results"]
    path = store.checkpoint_path(tmp / "results", "default", plan_run(compose("train", args)).run_id)
    path.parent.mkdir(parents=True)
    doc = {"global_step": 1, "state_dict": {"w": torch.arange(4096.0)}}
    torch.save({**doc, "payload": Payload(tmp / "marker")} if code else doc, path)
    integrity.write_checksum(path)
    if not code:
        with open(path, "r+b") as f:
            f.seek(1024)
            f.write(bytes(4096))
    return args


# label -> (args(tmp), expected part of the error): damage a run finds in its own files. The run is recorded failed
# with the reason (exit 1; in a sweep the other runs go on) and the file is set aside, so a relaunch trains without it
RUN_FAILURES = {
    "a resume checkpoint that asks to run code": (lambda t: _planted_checkpoint(t, code=True), "is not plain data"),
    "a resume checkpoint with 4 KiB zeroed": (lambda t: _planted_checkpoint(t, code=False),
                                              "is damaged: its contents do not match its checksum"),
}
FAILED: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def write_table():
    yield
    if len(TABLE) == len(CASES) and len(FAILED) == len(RUN_FAILURES):  # the whole set ran: regenerate the reference
        lines = ["# Bad inputs and what the commands say", "",
                 "Generated by `tests/test_bad_inputs.py` (each row is a case it runs through the console script; "
                 "every one exits 2 with this single line).", "", "| input | command | message |", "|---|---|---|"]
        for label, (cmd, message) in TABLE.items():
            lines.append(f"| {label} | `{cmd}` | `{message.replace('|', '/')}` |")
        lines += ["", "Damage a run finds in its own files: the run is recorded `failed` with this reason, printed as "
                  "one line `failed: run <id>: ...` (exit 1; in a sweep the other runs go on), and the file is set "
                  "aside as `<name>.damaged`.", "", "| input | message |", "|---|---|"]
        lines += [f"| {label} | `{message.replace('|', '/')}` |" for label, message in FAILED.items()]
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("label", list(CASES))
def test_bad_input_is_one_line(label, tmp_path):
    cmd, args, expected = CASES[label]
    proc = subprocess.run([str(BIN / cmd), *args(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ})
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith(f"{cmd}: error: ")]
    assert proc.returncode == 2 and lines and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert expected in lines[-1], lines[-1]
    message = lines[-1].split(": error: ", 1)[1]
    TABLE[label] = (cmd, message.replace(str(tmp_path), "<dir>"))


@pytest.mark.slow
@pytest.mark.parametrize("label", list(RUN_FAILURES))
def test_damage_a_run_finds_fails_it_in_one_line(label, tmp_path):
    args, expected = RUN_FAILURES[label]
    proc = subprocess.run([str(BIN / "scaling-train"), *args(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("failed: run ")]
    assert proc.returncode == 1 and lines and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expected in lines[-1] and "set aside" in lines[-1], lines[-1]
    assert not (tmp_path / "marker").exists()  # the planted code never ran
    message = lines[-1].split(": ", 2)[2].split("; record ")[0].replace(str(tmp_path), "<dir>")
    FAILED[label] = re.sub(r"\b[0-9a-f]{12}\b", "<run_id>", message)  # the id hashes data.path, a temporary folder
