"""Secrets set where they would really be read never reach a file the run writes.

The run is the installed ``scaling-train`` in W&B *online* mode (so it reads WANDB_API_KEY) pointed at a local
address that refuses connections, with a token set through ``+hydra.job.env_set`` (Hydra dumps it in
``.hydra/hydra.yaml`` and ``overrides.yaml`` unless redacted) and HOME, TMPDIR and W&B's folders inside the test's
directory, so every file the run writes anywhere is searched. A control run without redaction would fail this test:
``test_the_search_can_fail`` checks the search sees a secret that is written.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scaling_lab.conf.redact import REDACTED, looks_like_credential, redact, redact_text
from tests.conftest import TINY

BIN = Path(sys.executable).parent
WANDB_KEY = "wk" + "0123456789abcdef" * 3           # 50 characters: W&B accepts its length
HF_TOKEN = "hf_SECRETtokenVALUE0123456789"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed: connections are refused


def _files_with(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            found += [f"{f}: {s[:6]}..." for s in secrets if s.encode() in data]
    return found


def test_the_search_can_fail(tmp_path):
    (tmp_path / "leak.yaml").write_text(f"token: {HF_TOKEN}\n")
    assert _files_with(tmp_path, [HF_TOKEN])


def test_redaction_rules():
    doc = {"hydra": {"job": {"env_set": {"HF_TOKEN": HF_TOKEN}}}, "train": {"tokens": 5, "tokens_per_param": 4},
           "db": {"password": "pw-123456"}, "note": f"ran with {HF_TOKEN}"}
    out = redact(doc)
    assert out["hydra"]["job"]["env_set"]["HF_TOKEN"] == REDACTED and out["db"]["password"] == REDACTED
    assert out["train"] == {"tokens": 5, "tokens_per_param": 4} and HF_TOKEN not in out["note"]
    assert not looks_like_credential("eval_tokens") and looks_like_credential("WANDB_API_KEY")
    assert redact_text(f"+hydra.job.env_set.HF_TOKEN={HF_TOKEN} train.tokens=5", []) == \
        f"+hydra.job.env_set.HF_TOKEN={REDACTED} train.tokens=5"


@pytest.mark.slow
def test_no_secret_in_any_file_the_run_writes(tmp_path, token_cache):
    home = tmp_path / "home"
    for d in ("home", "tmp", "wandb-cache", "wandb-config", "wandb-data"):
        (tmp_path / d).mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp_path / "tmp"), "WANDB_API_KEY": WANDB_KEY,
           "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}", "WANDB_INIT_TIMEOUT": "5",
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("WANDB_MODE", None)
    proc = subprocess.run([str(BIN / "scaling-train"), *TINY, "latency.enabled=false", "logger.wandb.mode=online",
                           f"+hydra.job.env_set.HF_TOKEN={HF_TOKEN}", f"results_dir={tmp_path / 'results'}",
                           f"data.cache_dir={token_cache}"], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    (tmp_path / "stdout.txt").write_text(proc.stdout)
    (tmp_path / "stderr.txt").write_text(proc.stderr)
    assert (tmp_path / "results" / "default").is_dir(), proc.stderr[-3000:]
    hydra_files = list((tmp_path / "results").rglob(".hydra/*.yaml"))
    assert hydra_files, "Hydra wrote its dumps"  # they exist, and were searched below
    assert any("HF_TOKEN" in f.read_text() for f in hydra_files)  # the key is kept, its value is not
    leaks = _files_with(tmp_path, [WANDB_KEY, HF_TOKEN])
    assert not leaks, "\n".join(leaks)
