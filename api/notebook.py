"""The Python API that ``scaling_lab`` exports (its docstring shows the use): imported on first use of one of
its names, since every command imports the ``scaling_lab`` package and pandas would slow each one's start."""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd


def load_sweep(results_dir: str | Path, sweep: str) -> pd.DataFrame:
    """Every record of a sweep as one row (the columns of ``scaling-sweep-status`` and ``runs.parquet``)."""
    from scaling_lab.fit.io.store import load_table

    return load_table(results_dir, sweep)


@dataclass(frozen=True)
class FitResult:
    """A fit.json and what it holds: ``doc`` (the parsed file), the laws' constants, their frontier."""

    path: Path
    doc: dict

    @property
    def laws(self) -> list[str]:
        return list(self.doc["laws"])

    def constants(self, law: str = "chinchilla") -> dict[str, float]:
        return dict(self.doc["laws"][law]["params"])

    def predict(self, law: str = "chinchilla", **inputs: Any) -> np.ndarray:
        """The law's loss at ``inputs`` (N=..., D=..., R=...; scalars or arrays)."""
        from scaling_lab.fit.io.fitfile import load_constants

        return np.asarray(load_constants(self.path, law).predict(**inputs), dtype=float)

    def frontier(self, budgets: Sequence[float], law: str = "chinchilla") -> pd.DataFrame:
        """N_opt and D_opt at each compute budget C = 6ND: the law's closed form, or Approach 2's isoFLOP power laws
        where the fit flagged the law's (``isoflop.frontier.use``); the ``source`` column says which."""
        from scaling_lab.fit.laws.chinchilla import frontier

        budgets = np.asarray(budgets, dtype=float)
        iso = self.doc.get("isoflop") or {}
        if (iso.get("frontier") or {}).get("use") == "approach2":
            n_opt, d_opt, source = iso["N_coef"] * budgets ** iso["a"], iso["D_coef"] * budgets ** iso["b"], "approach2"
        else:
            point = frontier(self.constants(law), budgets)
            n_opt, d_opt, source = point["N_opt"], point["D_opt"], law
        return pd.DataFrame({"C": budgets, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt,
                             "source": source})

    def to_json(self, path: str | Path) -> Path:
        """A copy of the fit.json at ``path`` (what planners and ``scaling-plan constants=`` read)."""
        from scaling_lab.fit.io.files import write_json_atomic

        write_json_atomic(Path(path), self.doc)
        return Path(path)


def load_fit(path: str | Path) -> FitResult:
    """A fit.json written by ``scaling-fit`` (or ``fit_laws``), validated as the commands validate it."""
    from scaling_lab.fit.io.fitfile import read_fit_json

    return FitResult(path=Path(path), doc=read_fit_json(path))


def fit_laws(data: pd.DataFrame, N: str = "N", D: str | None = "D", loss: str = "loss", *, C: str | None = None,
             budget: str | None = None, laws: Iterable[str] = ("chinchilla",), protocol: str = "default",
             fit_rows: str | None = None, out: str | Path | None = None, overrides: Sequence[str] = (),
             verbose: bool = False) -> FitResult:
    """Fit ``laws`` to the rows of ``data`` (columns named by ``N``, ``D`` or ``C``, ``loss``, ``budget`` for isoFLOP
    profiles) exactly as ``scaling-fit source=csv`` does; ``fit_rows`` a row query (the others held out), ``out`` the
    folder for fit.json (a temporary one by default), ``overrides`` any other ``scaling-fit`` settings, ``verbose``
    prints what the command prints."""
    from scaling_lab.conf import compose
    from scaling_lab.fit.fitting.cli import run

    columns = {"N": N, "D": D, "loss": loss, "C": C, "budget": budget}
    missing = [c for c in columns.values() if c and c not in data.columns]
    if missing:
        raise ValueError(f"fit_laws: no column(s) {missing} in the data (columns: {list(data.columns)})")
    out = Path(out or tempfile.mkdtemp(prefix="scaling-fit-"))
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "data.csv"
    # the CSV's columns renamed to plain names, so that no column name needs quoting on the command line
    frame = pd.DataFrame({key: data[col].to_numpy() for key, col in columns.items() if col})
    frame.to_csv(csv, index=False)
    args = ["source=csv", f"source.path={csv}", f"protocol={protocol}", f"law=[{','.join(laws)}]", f"out={out}",
            "logger=none", *(f"source.columns.{k}={k if v else 'null'}" for k, v in columns.items() if k != "loss"),
            *([f'source.fit_rows="{fit_rows}"'] if fit_rows else []), *overrides]
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        run(compose("fit", args))
    return load_fit(out / "fit.json")


def plan(constants: str | Path, *, target_loss: float | None = None, target_params: float | None = None,
         demand_tokens: float | None = None, overrides: Sequence[str] = (), out: str | Path | None = None,
         verbose: bool = False) -> dict:
    """``scaling-plan`` for a fit.json or a preset's name: the Chinchilla-style and the demand-aware optimal model
    (plan.json, read back)."""
    from scaling_lab.conf import compose
    from scaling_lab.fit.plan.cli import run

    out = Path(out or tempfile.mkdtemp(prefix="scaling-plan-"))
    args = [f"constants={constants}", f"out={out}", "logger=none",
            *([f"target.loss={target_loss}"] if target_loss is not None else []),
            *([f"target.chinchilla_params={target_params}"] if target_params is not None else []),
            *([f"demand.tokens={demand_tokens}"] if demand_tokens is not None else []), *overrides]
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        return run(compose("plan", args))
