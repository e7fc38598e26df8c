"""Secrets never reach a file the run writes: records, Hydra's ``.hydra/*.yaml`` dumps and log files, W&B's config.

Two rules, applied to every config before it is written and to every text file Hydra wrote for a job:

* a key whose name looks like a credential (token, secret, password, api key, credentials, auth, private key) has
  its value replaced by ``<redacted>``, wherever it sits (``hydra.job.env_set.HF_TOKEN``, ``+foo.api_key``...);
* every value of ``hydra.job.env_set`` (environment values are set there, not configured) and the value of every
  environment variable whose name looks like a credential (``WANDB_API_KEY``, ``HF_TOKEN``...) is replaced wherever
  it appears in a written string.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

REDACTED = "<redacted>"
_WORDS = {"secret", "secrets", "password", "passwd", "credential", "credentials", "apikey", "auth",
          "passphrase"}
_NOT_A_SECRET_TOKEN = {"per", "eos", "bos", "pad", "unk", "mask", "sep", "cls", "first", "last", "next", "special",
                       "start", "end"}
_PAIRS = {("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key"), ("client", "secret")}
_ASSIGNMENT = re.compile(r"([A-Za-z_][\w.+~-]*)(\s*[=:]\s*)(['\"]?)([^\s,'\"\]}]+)")
_MIN_SECRET = 6  # shorter values would match everywhere (and are not worth hiding)


def looks_like_credential(name: Any) -> bool:
    """HF_TOKEN, api_key, WANDB_API_KEY, db.password, authToken: yes; tokens, eval_tokens, tokenizer, per_token,
    decode_ms_per_token, PWD (the shell's working directory): no."""
    if not isinstance(name, str):
        return False
    last = re.split(r"[.+~/]", name)[-1]
    words = [w.lower() for w in re.split(r"[_\-\s]+|(?<=[a-z])(?=[A-Z])", last) if w]
    if words[-1:] == ["token"]:  # HF_TOKEN, auth_token: yes; per_token, eos_token (counts and vocabulary): no
        return len(words) == 1 or words[-2] not in _NOT_A_SECRET_TOKEN
    return any(w in _WORDS for w in words) or any(p in _PAIRS for p in zip(words, words[1:]))


def secret_values(extra: Iterable[Any] = ()) -> list[str]:
    """Values to hide: credential-named environment variables' and ``extra`` (e.g. the env_set values)."""
    values = {v for k, v in os.environ.items() if looks_like_credential(k) and v}
    values.update(str(v) for v in extra if v is not None)
    return sorted((v for v in values if len(v) >= _MIN_SECRET), key=len, reverse=True)


def _env_set_values(doc: Any) -> list[str]:
    try:
        env = doc["hydra"]["job"]["env_set"]
    except (KeyError, TypeError):
        return []
    return [str(v) for v in (env or {}).values() if v is not None]


def redact(doc: Any, secrets: Iterable[str] | None = None) -> Any:
    """A copy of ``doc`` (plain dicts/lists/scalars) with credential keys and secret values replaced."""
    if secrets is None:
        secrets = secret_values(_env_set_values(doc))
    secrets = list(secrets)

    def walk(node: Any, key: Any = None) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, k) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v) for v in node]
        if key is not None and looks_like_credential(key) and node not in (None, "", "???"):
            return REDACTED
        if isinstance(node, str):
            return redact_text(node, secrets)
        return node

    return walk(doc)


def redact_text(text: str, secrets: Iterable[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    # key=value and key: value with a credential-looking key (command lines in overrides and logs, YAML)

    def hide(m: re.Match) -> str:
        if not looks_like_credential(m.group(1)) or m.group(4) == REDACTED or m.group(4) in ("null", "???"):
            return m.group(0)
        return f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}"

    return _ASSIGNMENT.sub(hide, text)


def redact_files(folder: str | Path, secrets: Iterable[str],
                 suffixes: tuple[str, ...] = (".yaml", ".yml", ".json", ".log", ".txt")) -> list[Path]:
    """Rewrite, in place (atomically), every text file under ``folder`` that holds a secret; returns them."""
    secrets = list(secrets)
    changed = []
    folder = Path(folder)
    if not folder.is_dir():
        return changed
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix not in suffixes:
            continue
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        new = redact_text(text, secrets)
        if new != text:
            tmp = path.with_name(f".{path.name}.redact.tmp")
            tmp.write_text(new)
            os.replace(tmp, path)
            changed.append(path)
    return changed


def run_secrets() -> list[str]:
    """The secrets of this process: credential-named environment variables, and the values of
    ``hydra.job.env_set`` when a Hydra job is running."""
    extra: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            extra = [str(v) for v in (HydraConfig.get().job.env_set or {}).values() if v is not None]
    except ImportError:
        pass
    return secret_values(extra)


def redact_config(cfg) -> dict:
    """A resolved OmegaConf config as a plain dict, redacted (what records and W&B receive)."""
    from omegaconf import OmegaConf

    return redact(OmegaConf.to_container(cfg, resolve=True), run_secrets())


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object


class RedactHydraFiles(_HydraCallback):
    """A Hydra callback: Hydra's own dumps (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``,
    ``multirun.yaml``) and the job's log file are rewritten without secrets as soon as Hydra has written them."""

    @staticmethod
    def _secrets(config) -> list[str]:
        env = {}
        try:
            env = dict(config.hydra.job.env_set or {})
        except Exception:  # noqa: BLE001 - no hydra node: nothing to add
            pass
        return secret_values([str(v) for v in env.values() if v is not None])

    @staticmethod
    def _dirs(config) -> list[Path]:
        from hydra.core.hydra_config import HydraConfig

        dirs = []
        try:
            dirs.append(Path(HydraConfig.get().runtime.output_dir))
        except Exception:  # noqa: BLE001
            pass
        try:
            dirs.append(Path(str(config.hydra.sweep.dir)))
        except Exception:  # noqa: BLE001
            pass
        return dirs

    def _redact(self, config) -> None:
        secrets = self._secrets(config)
        for folder in self._dirs(config):
            for sub in (folder / ".hydra", folder):
                if sub.is_dir():
                    files = [p for p in sub.iterdir() if p.is_file()] if sub == folder else None
                    if files is None:
                        redact_files(sub, secrets)
                    else:
                        for p in files:
                            if p.suffix in (".yaml", ".log"):
                                redact_files_one(p, secrets)

    def on_job_start(self, config, **kwargs) -> None:
        self._redact(config)

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        self._redact(config)

    def on_multirun_end(self, config, **kwargs) -> None:
        secrets = self._secrets(config)
        for folder in self._dirs(config):
            redact_files(folder, secrets, suffixes=(".yaml", ".log"))


def redact_files_one(path: Path, secrets: Iterable[str]) -> bool:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    new = redact_text(text, secrets)
    if new == text:
        return False
    tmp = path.with_name(f".{path.name}.redact.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    return True
