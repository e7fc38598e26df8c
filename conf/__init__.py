"""The project's Hydra configuration, shipped as package data (``scaling_lab.conf``), and the one command convention.

``CONF_DIR`` is the folder every command composes from, in a checkout and in an installed wheel alike. ``compose``
is the one composer for tests and scripts; ``command`` turns a plain ``run(cfg)`` into a ``scaling-<name>`` entry
point (all of them are listed in ``conf/commands.py``) with the same conventions everywhere:

* ``--help`` is the command's own short page (``conf/hydra/help/<name>.yaml``), printed without Hydra;
* the module that runs a command (torch, pandas, ...) is imported once its config is composed, so that ``--help``
  and a mistyped key answer at once;
* bad input (an unknown key, a value of the wrong type, a renamed key, any ``UserError`` the run raises before
  spending compute) is one line ``scaling-<name>: error: ...`` on stderr and exit code 2, with no traceback;
* anything else is a bug and keeps its traceback.

One vocabulary of keys across all commands: ``results_dir`` (the results folder), ``sweep`` (the sweep's name;
for ``scaling-train`` the preset ``conf/launch/sweep/<name>.yaml``), ``constants`` (a fit.json, or a preset's name where
the command has presets). The old spellings in ``RENAMED`` are refused with the new name, and the keys in ``REMOVED``
with where their contents went.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

CONF_DIR = Path(__file__).resolve().parent

# Old key -> the key every command now uses.
RENAMED = {
    "results.dir": "results_dir",
    "source.sweep": "sweep",
    "shapes.sweep": "sweep",
    "fitted_sweep": "sweep",
    "sweep_name": "sweep",
    "fit": "constants",
    "fit_dir": "constants",
}

# The extra that provides each optional top-level module (pyproject.toml): a command that needs a missing one says
# which to install, in one line.
EXTRAS = {"torch": "train", "lightning": "train", "datasets": "train", "tokenizers": "train",
          "hydra_plugins": "train", "safetensors": "train", "torchao": "serve", "submitit": "slurm",
          "wandb": "wandb", "wandb_workspaces": "wandb", "transformers": "hf"}


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The extra to install for a module that could not be imported (None: not one of ours)."""
    return EXTRAS.get((err.name or "").split(".")[0])


# A key that is gone -> where its contents went.
REMOVED = {
    "presets.quantization": "the serving modes' table conf/serving_mode/<mode>.yaml (cuda.peak_flops_dtype) and "
                            "serving.loss_penalty=<delta> (or the measured one, serving.measurements)",
}


import errno as _errno

# A full disk, a read-only file system, no permission, a quota: storage errors, one line each.
STORAGE_ERRNOS = {_errno.ENOSPC, _errno.EROFS, _errno.EACCES, _errno.EPERM, _errno.EDQUOT}


def storage_message(err: OSError, kept: str = "") -> str:
    what = {_errno.ENOSPC: "the disk is full", _errno.EROFS: "the file system is read-only",
            _errno.EDQUOT: "the disk quota is exceeded"}.get(err.errno, "permission denied")
    where = err.filename or "a file"
    return f"cannot write {where}: {what} ({err.strerror})" + (f"; {kept}" if kept else "; nothing else was changed")


def _hydra_dir_hint(err: OSError) -> str:
    """What to do when Hydra itself cannot create its output folder (before any of our code ran)."""
    import traceback

    ours = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep for d in ("pipeline", "fit", "models"))
    if not any(f.filename.startswith(ours) for f in traceback.extract_tb(err.__traceback__)):
        return ("nothing else was changed; Hydra's output folder must be writable: give another with "
                "hydra.run.dir=... (hydra.sweep.dir=... with -m); finished runs are then skipped as usual")
    return ""


# The commands' typed schemas (structured configs registered in Hydra's ConfigStore when imported): a command imports
# its own before composing (``command(schema=...)``), ``compose`` all of them.
SCHEMAS = ("scaling_lab.conf.train_schema", "scaling_lab.conf.fit_schema")


class UserError(ValueError):
    """Bad input the user can fix. Raised before any compute is spent; a command prints it as one line, exit 2."""


def compose(config_name: str, overrides: Iterable[str] = (), return_hydra_config: bool = False):
    """A command's config composed from ``CONF_DIR`` with ``overrides``, as the command itself would see it."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    for schema in SCHEMAS:  # the typed schemas register themselves with Hydra's ConfigStore on import
        importlib.import_module(schema)

    if GlobalHydra.instance().is_initialized():  # inside a running Hydra app (e.g. a callback)
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides),
                             return_hydra_config=return_hydra_config)


def fail(prog: str, message: Any) -> None:
    """Print ``prog: error: message`` (one line) on stderr and exit 2."""
    text = " ".join(str(message).split())
    print(f"{prog}: error: {text}", file=sys.stderr)
    sys.exit(2)


def renamed_keys(argv: Iterable[str]) -> list[tuple[str, str]]:
    """(old, new) for every override in ``argv`` that uses an old spelling of a key."""
    found = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            found.append((key, RENAMED[key]))
    return found


def removed_keys(argv: Iterable[str]) -> list[str]:
    """Every key of ``REMOVED`` (or a key under it) that ``argv`` sets."""
    found = []
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        found += [old for old in REMOVED if key == old or key.startswith(old + ".")]
    return found


# Where ``+key=value`` may add a key: Hydra's own settings (``+hydra.job.env_set.X=...``) and the open tables of laws
# (``+law.<name>.formula=...``) and of scaling-plan's GPUs (``+presets.gpus.<gpu>.<dtype>=...``). Anywhere else a ``+`` would slip a typo past the unknown-key check (and into the
# run id), so it is refused like any unknown key.
OPEN_PREFIXES = ("hydra.", "law.", "presets.gpus.")


def added_keys(argv: Iterable[str], config_dirs: Iterable[Path] = ()) -> list[str]:
    """``+key=...`` overrides that add a key outside ``OPEN_PREFIXES`` (appending a config group, ``+group=x``,
    stays allowed)."""
    dirs = [CONF_DIR, CONF_DIR / "launch", *config_dirs]
    found = []
    for arg in argv:
        if not arg.startswith("+") or arg.startswith("++") or "=" not in arg:
            continue
        key = arg[1:].split("=", 1)[0]
        if key.startswith(OPEN_PREFIXES) or any((d / key).is_dir() for d in dirs):
            continue
        found.append(key)
    return found


def _config_dirs(argv: list[str]) -> list[Path]:
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def _hydra_message(err: BaseException) -> str:
    """The first line of a Hydra/OmegaConf error and of its cause: what a user needs, without the noise."""
    lines = [str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        if first not in lines[0]:
            lines.append(f"({first})")
    return " ".join(lines)


def print_help(name: str) -> None:
    """The command's own help page (``conf/hydra/help/<name>.yaml``): its template, printed as Hydra would, read
    without composing (Hydra's ``--help`` first lists every config group and takes seconds)."""
    import string

    import yaml

    template = yaml.safe_load((CONF_DIR / "hydra" / "help" / f"{name}.yaml").read_text())["template"]
    print(string.Template(template).safe_substitute(FLAGS_HELP="", HYDRA_CONFIG_GROUPS="", APP_CONFIG_GROUPS="",
                                                    APP_CONFIG=""))


def _job_error(prog: str, err: BaseException) -> None:
    """A submitit job that was pre-empted, timed out or cancelled: one line with its state, not a traceback."""
    lines = str(err).strip().splitlines() or [""]
    # submitit puts the job's state (CANCELLED, TIMEOUT, ...) on its second line: keep it
    first = " ".join(lines[:2]) if len(lines) > 1 and "(state: " in lines[1] else lines[0]
    print(f"{prog}: a job did not complete ({type(err).__name__}: {first}); an interrupted run keeps its checkpoint "
          "and resumes when the sweep is relaunched (or requeued)", file=sys.stderr)
    sys.exit(1)


def _resolve(target: str) -> Callable[[Any], Any]:
    """``module:function`` imported."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _reader_gone() -> None:
    """The reader of our output went away (``| head``): stop quietly, as command-line tools do."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(1)


def command(prog: str, config_name: str, run: str | Callable[[Any], Any],
            errors: tuple[type[BaseException], ...] = (), help: str | None = None,
            schema: str | None = None, extra: str | None = None) -> Callable[[], None]:
    """The entry point ``prog`` (e.g. ``scaling-fit``): Hydra composes ``config_name`` and calls ``run(cfg)``.

    ``run`` is a function or ``"module:function"``, imported once the config is composed; ``schema``, a module to
    import first (one that registers a structured config the composition needs); ``help``, the help page's name
    (default ``config_name``); ``extra``, the extra that provides everything the command needs (named when an
    optional module is missing). ``errors`` are exception types besides ``UserError`` and ``ValueError`` that ``run``
    raises for bad input (e.g. a missing file)."""
    expected = (UserError, ValueError, *errors)

    def needs(err: ModuleNotFoundError | None) -> str | None:
        """The one-line message for a missing optional module (None: not one of ours)."""
        name = missing_extra(err) if err is not None else None
        if name is None:
            return None
        name = extra or name
        return f"needs the [{name}] extra (no module named {err.name!r}): pip install 'scaling-lab[{name}]'"

    def _run(cfg) -> None:
        try:
            (_resolve(run) if isinstance(run, str) else run)(cfg)
        except expected as err:
            fail(prog, err)
        except ModuleNotFoundError as err:
            if needs(err) is None:
                raise
            fail(prog, needs(err))
        except BrokenPipeError:
            _reader_gone()

    def main() -> None:
        if {"--help", "-h"} & set(sys.argv[1:]):
            try:
                print_help(help or config_name)
            except BrokenPipeError:
                _reader_gone()
            return
        old = renamed_keys(sys.argv[1:])
        if old:
            fail(prog, "; ".join(f"{a} is now {b} (write {b}=...)" for a, b in old))
        gone = removed_keys(sys.argv[1:])
        if gone:
            fail(prog, "; ".join(f"{key} is gone: it is now {REMOVED[key]}" for key in gone))
        added = added_keys(sys.argv[1:], _config_dirs(sys.argv[1:]))
        if added:
            fail(prog, "; ".join(f"unknown key {k!r}: +{k}=... adds a key this command does not have (a typo?); "
                                 f"set existing keys without the +, see {prog} --help" for k in added))
        import hydra
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        if schema:
            importlib.import_module(schema)
        # Hydra then raises composition errors instead of printing them over several lines with a hint; we print one.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        if not any(a.startswith("hydra.job.name=") for a in sys.argv[1:]):
            # the log file's name, <prog>.log, not that of this module; placed among the other overrides, since
            # argparse takes them in one run (`scaling-train a=1 --cfg job` would leave an appended one over)
            at = next((i for i, a in enumerate(sys.argv) if i and "=" in a and not a.startswith("-")), len(sys.argv))
            sys.argv.insert(at, f"hydra.job.name={prog}")
        try:
            hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(_run)()
        except (HydraException, OmegaConfBaseException) as err:
            cause = err  # a missing optional module can surface in Hydra (a callback's or launcher's import)
            while cause is not None and not isinstance(cause, ModuleNotFoundError):
                cause = cause.__cause__ or cause.__context__
            fail(prog, needs(cause) or _hydra_message(err))
        except OSError as err:
            if err.errno not in STORAGE_ERRNOS:
                raise
            fail(prog, storage_message(err, _hydra_dir_hint(err)))
        except Exception as err:  # noqa: BLE001 - only submitit's job errors are turned into a report
            if not type(err).__module__.startswith("submitit"):
                raise
            _job_error(prog, err)

    main.__doc__ = f"{prog}: see `{prog} --help`."
    return main
