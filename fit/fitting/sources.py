"""Where the runs come from: our sweep records (``source=results``) or any CSV (``source=csv``), as one table.

The table has canonical columns ``N, D, loss`` and, when the source has them, ``R`` (d_model / n_layers),
``group`` and ``budget``; boolean columns ``fit`` and ``heldout`` mark the fit and held-out sets. Every check a
fit needs happens here, before any fitting, and fails with one clear line (``FitInputError``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from scaling_lab.conf import UserError


class FitInputError(UserError):
    """Bad input for a fit: the CLI prints the message alone and exits."""


@dataclass
class Table:
    data: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def fit_rows(self) -> pd.DataFrame:
        return self.data[self.data["fit"]]

    def has(self, column: str) -> bool:
        return column in self.data and self.data[column].notna().all()


def _query(frame: pd.DataFrame, query: str | None, what: str) -> pd.Series:
    if not query:
        return pd.Series(True, index=frame.index)
    # Parsed against a whitelist (comparisons, arithmetic, and/or/not over columns and numbers), never evaluated.
    from scaling_lab.fit.expr import ExpressionError, query_mask

    try:
        return query_mask(frame, str(query), f"{what} query")
    except ExpressionError as err:
        raise FitInputError(str(err)) from None


def _read_csv(path: str) -> pd.DataFrame:
    if not path or path == "???":
        raise FitInputError("source=csv needs source.path=<file.csv>")
    p = Path(path)
    if not p.is_file():
        raise FitInputError(f"no CSV file at {p}")
    try:
        with open(p, newline="") as fh:
            header = next(csv.reader(fh), [])
        frame = pd.read_csv(p)
    except Exception as err:
        raise FitInputError(f"cannot read {p} as CSV: {err}") from None
    # pandas would silently rename a second 'loss' to 'loss.1' and fit whichever the columns name
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise FitInputError(f"{p} has duplicated column name(s) {twice}: rename them so each column is named once")
    return frame


def _read_results(src: Mapping[str, Any]) -> tuple[pd.DataFrame, dict]:
    from scaling_lab.fit.io.store import damaged_records, load_table   # torch-free; CSV users need no pipeline

    sweep = src.get("sweep")
    if not sweep or sweep == "???":
        raise FitInputError("source=results needs sweep=<name>")
    folder = Path(str(src["results_dir"])) / str(sweep)
    if not folder.is_dir():
        raise FitInputError(f"no results for sweep {sweep!r}: {folder} does not exist")
    damaged = damaged_records(src["results_dir"], sweep)
    if damaged and not src.get("skip_damaged", False):
        names = ", ".join(p.name for p in damaged[:10]) + (", ..." if len(damaged) > 10 else "")
        raise FitInputError(f"{len(damaged)} damaged record(s) (empty, truncated or not a record) in {folder}: "
                            f"{names}; re-run those points (scaling-train re-trains them) or set "
                            f"source.skip_damaged=true to fit without them")
    if damaged:
        import sys

        print(f"warning: skipped {len(damaged)} damaged record(s) in {folder}: "
              + ", ".join(p.name for p in damaged), file=sys.stderr)
    table = load_table(src["results_dir"], sweep)
    if table.empty:
        raise FitInputError(f"sweep {sweep!r} has no records in {folder}")
    ok = table["status"] == "ok"
    n_col = {"total": "params_total", "non_embedding": "params_non_embedding"}.get(str(src["n_convention"]))
    if n_col is None:
        raise FitInputError(f"source.n_convention must be total or non_embedding, not {src['n_convention']!r}")
    columns = {"N": n_col, **{k: v for k, v in src["columns"].items() if v}}
    info = {"sweep": str(sweep), "results_dir": str(src["results_dir"]), "excluded_failed": int((~ok).sum()),
            "excluded_damaged": [p.name for p in damaged]}
    table = table[ok].reset_index(drop=True)
    if {"params_non_embedding", "vocab_size", "d_model"} <= set(table.columns):
        # the output head (vocab x d_model) counted as compute, tied to the embedding or not
        table["params_non_embedding_head"] = table["params_non_embedding"] + table["vocab_size"] * table["d_model"]
    n_columns = {"total": "params_total", "non_embedding": "params_non_embedding",
                 "non_embedding_head": "params_non_embedding_head"}
    info["n_columns"] = {k: v for k, v in n_columns.items() if v in table.columns and table[v].notna().all()}
    return table, {"columns": columns, **info}


def size_classes(size: np.ndarray, rel: float = 0.1) -> np.ndarray:
    """Size class of each row, 0 for the smallest, from the actual sizes: sorted, a class holds every size up to
    (1 + ``rel``) / (1 - ``rel``) times its smallest (shapes each within +-``rel`` of one target are one class)."""
    span = (1 + rel) / (1 - rel)
    order = np.argsort(size, kind="stable")
    labels = np.empty(len(size), dtype=int)
    cls, start = -1, None
    for i in order:
        if start is None or size[i] > span * start:
            cls, start = cls + 1, size[i]
        labels[i] = cls
    return labels


def _groups_of_equal_size(N: np.ndarray, D: np.ndarray, rel: float = 0.1) -> np.ndarray:
    """Shapes of one size at one budget, from their actual N: rows with the same D (to 2 significant digits) in one
    size class (``size_classes``). Labelled by the geometric mean of the group's N."""
    key_d = np.array([f"{d:.2g}" for d in D])
    labels = np.empty(len(N), dtype=object)
    for d in np.unique(key_d):
        rows = np.flatnonzero(key_d == d)
        classes = size_classes(N[rows], rel)
        for c in np.unique(classes):
            g = rows[classes == c]
            centre = float(np.exp(np.mean(np.log(N[g]))))
            for i in g:
                labels[i] = f"N~{centre:.3g},D~{d}"
    return labels


def _one_corpus(raw: pd.DataFrame) -> dict[str, int]:
    """Runs per corpus and tokenizer; more than one in a table is an error (losses of different corpora or
    tokenizers are not on one scale), unless source.rows picks one."""
    if not {"corpus", "tokenizer"} <= set(raw.columns) or raw.empty:
        return {}
    key = raw["corpus"].astype(str) + " (" + raw["tokenizer"].astype(str)
    if "corpus_hash" in raw:
        key = key + ", hash " + raw["corpus_hash"].astype(str).str[:8]
    counts = (key + ")").value_counts().to_dict()
    if len(counts) > 1:
        named = "; ".join(f"{k}: {v} runs" for k, v in counts.items())
        raise FitInputError(f"the runs mix {len(counts)} corpora/tokenizers ({named}); pick one with "
                            "source.rows, e.g. 'source.rows=\"tokenizer == \'bytes\'\"'")
    return {k: int(v) for k, v in counts.items()}


def load(src: Mapping[str, Any]) -> Table:
    """The runs named by ``cfg.source`` as a checked Table."""
    kind = src.get("kind")
    if kind == "csv":
        raw = _read_csv(str(src.get("path")))
        columns = {k: v for k, v in src["columns"].items() if v}
        info = {"path": str(Path(str(src["path"])).resolve()),
                "n_columns": {k: v for k, v in (src.get("n_columns") or {}).items() if v}}
    elif kind == "results":
        raw, info = _read_results(src)
        columns = info.pop("columns")
    else:
        raise FitInputError(f"unknown source kind {kind!r} (csv or results)")

    n_columns = info.pop("n_columns")
    missing = [f"{k}={v!r}" for k, v in {**columns, **n_columns}.items() if v not in raw.columns]
    if missing:
        raise FitInputError(f"missing column(s) {', '.join(missing)}; the data has {list(raw.columns)}")
    if "D" not in columns and "C" not in columns:
        raise FitInputError("need source.columns.D (tokens) or source.columns.C (FLOPs, D = C / 6N)")

    rows = _query(raw, src.get("rows"), "source.rows")
    raw = raw[rows].reset_index(drop=True)
    corpora = _one_corpus(raw) if kind == "results" else {}
    fit = _query(raw, src.get("fit_rows"), "source.fit_rows")
    heldout = _query(raw, src.get("heldout_rows"), "source.heldout_rows") if src.get("heldout_rows") else ~fit

    data = pd.DataFrame({"fit": fit.to_numpy(), "heldout": heldout.to_numpy()})
    for name in ("N", "D", "loss", "C", "R", "budget"):
        if name in columns:
            data[name] = pd.to_numeric(raw[columns[name]], errors="coerce").to_numpy(dtype=float)
    for convention, column in n_columns.items():     # N under other conventions, for the protocol choice
        data[f"N@{convention}"] = pd.to_numeric(raw[column], errors="coerce").to_numpy(dtype=float)
    if "D" not in data:
        data["D"] = data["C"] / (6.0 * data["N"])
    if "R" not in data and "d_model" in columns and "n_layers" in columns:
        data["R"] = (pd.to_numeric(raw[columns["d_model"]], errors="coerce")
                     / pd.to_numeric(raw[columns["n_layers"]], errors="coerce")).to_numpy(dtype=float)
    for name in ("N", "D", "loss"):
        bad = ~np.isfinite(data[name])
        if bad.any():
            raise FitInputError(f"column {columns.get(name, name)!r} ({name}) has {int(bad.sum())} NaN or "
                                f"non-numeric value(s), e.g. row {int(np.flatnonzero(bad)[0])}")
        if (data[name] <= 0).any():
            raise FitInputError(f"column {columns.get(name, name)!r} ({name}) must be positive")
    if "R" in data and (~np.isfinite(data["R"]) | (data["R"] <= 0)).any():
        data = data.drop(columns="R")        # laws needing R are then skipped with a message
        info["R_dropped"] = "aspect ratio missing or non-positive in some rows"
    if "seed" in columns:
        data["seed"] = raw[columns["seed"]].to_numpy()
    if "group" in columns and raw[columns["group"]].notna().any():
        data["group"] = raw[columns["group"]].fillna("none").astype(str).to_numpy()
    elif "R" in data:
        data["group"] = _groups_of_equal_size(data["N"].to_numpy(), data["D"].to_numpy())

    if len(data) == 0:
        raise FitInputError("no rows left after source.rows")
    if not data["fit"].any():
        raise FitInputError(f"source.fit_rows {src.get('fit_rows')!r} selects no rows")
    if np.ptp(data.loc[data["fit"], "loss"]) == 0:
        raise FitInputError("the loss is constant over the fit rows: nothing to fit")

    counts = {"total": int(len(data)), "fit": int(data["fit"].sum()), "heldout": int(data["heldout"].sum())}
    if "excluded_failed" in info:
        counts["excluded_failed"] = info.pop("excluded_failed")
    provenance = {"source": kind, **info, "columns": dict(columns), "rows": counts,
                  "queries": {k: src.get(k) for k in ("rows", "fit_rows", "heldout_rows")},
                  "n_convention": str(src.get("n_convention", "unknown"))}
    if corpora:
        provenance["corpora"] = corpora
    return Table(data=data, provenance=provenance)


def n_conventions(table: Table) -> list[str]:
    """The N conventions the table can give (each a column ``N@<convention>``, positive everywhere); the
    table's own when it has no others."""
    have = [c.split("@", 1)[1] for c in table.data.columns if c.startswith("N@")
            and np.isfinite(table.data[c]).all() and (table.data[c] > 0).all()]
    return have or [str(table.provenance.get("n_convention", "unknown"))]


def with_n_convention(table: Table, convention: str) -> Table:
    """The table with N counted by ``convention`` (D derived from C follows it, as the source derives it)."""
    if f"N@{convention}" not in table.data or convention == table.provenance.get("n_convention"):
        return table
    data = table.data.copy()
    data["N"] = data[f"N@{convention}"]
    if "C" in data and "D" not in table.provenance.get("columns", {}):
        data["D"] = data["C"] / (6.0 * data["N"])
    return Table(data=data, provenance={**table.provenance, "n_convention": convention})
