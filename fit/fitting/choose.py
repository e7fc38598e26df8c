"""``protocol=auto``: choose each law's fitting protocol by how well it predicts the largest models from the
smaller ones (leave-largest-out), never by in-sample fit and never from the user's held-out rows.

Candidates are configuration (``conf/protocol/auto.yaml``): objectives (other protocols), exponent ties and N
conventions. Each candidate is fitted on the fit rows minus their largest size class (by N, or by compute
C = 6ND) and scored on that class; the best score wins, and the caller refits it on all fit rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from scaling_lab.fit.fitting.fitlaw import compile_law
from scaling_lab.fit.fitting.optimize import fit
from scaling_lab.fit.fitting.sources import FitInputError, Table, n_conventions, with_n_convention
from scaling_lab.fit.laws.spec import LawSpec, tie_label

SCORES = ("mean_rel_err", "max_rel_err", "mse")


@dataclass
class Choice:
    protocol: Any            # the chosen objective's protocol with the chosen ties (an OmegaConf node)
    n_convention: str
    label: str


def size_classes(size: np.ndarray, rtol: float) -> np.ndarray:
    """Class index of each row, 0 for the smallest: sorted sizes within ``rtol`` of a class's smallest are one."""
    order = np.argsort(size, kind="stable")
    labels = np.empty(len(size), dtype=int)
    cls, start = -1, None
    for i in order:
        if start is None or size[i] > start * (1 + rtol):
            cls, start = cls + 1, size[i]
        labels[i] = cls
    return labels


def validation_split(rows: pd.DataFrame, rule: Mapping[str, Any]) -> np.ndarray:
    """True on the rows held back for validation: the largest size class of ``rows`` by the rule."""
    holdout = str(rule.get("holdout", "largest_n"))
    if holdout == "largest_n":
        size = rows["N"].to_numpy()
    elif holdout == "largest_c":
        size = 6.0 * rows["N"].to_numpy() * rows["D"].to_numpy()
    else:
        raise FitInputError(f"protocol.validation.holdout must be largest_n or largest_c, not {holdout!r}")
    classes = size_classes(size, float(rule.get("class_rtol", 0.1)))
    if classes.max() < 1:
        raise FitInputError("protocol=auto needs fit rows of at least two size classes (it holds back the largest)")
    return classes == classes.max()


def score(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    rel = np.abs(pred - y) / y
    ok = bool(np.isfinite(pred).all())
    return {"mse": float(np.mean((pred - y) ** 2)) if ok else float("inf"),
            "mean_rel_err": float(rel.mean()) if ok else float("inf"),
            "max_rel_err": float(rel.max()) if ok else float("inf")}


def candidates(spec: LawSpec, protocol, conventions: list[str]) -> list[tuple[str, str, Any, str]]:
    """(objective, tie label, protocol node, N convention) for one law, ties that coincide for it listed once."""
    cand = protocol.candidates
    out, seen = [], set()
    wanted = [c for c in cand.n_conventions if c in conventions] or conventions[:1]
    for objective in cand.objectives:
        if objective not in protocol.objectives:
            raise FitInputError(f"protocol.candidates.objectives names {objective!r}, not one of "
                                f"protocol.objectives {sorted(protocol.objectives)}")
        for ties in cand.ties.values():
            ties = OmegaConf.to_container(ties) if ties is not None else []
            label = tie_label(spec, ties)
            for conv in wanted:
                if (objective, label, conv) in seen:
                    continue
                seen.add((objective, label, conv))
                node = OmegaConf.merge(protocol.objectives[objective], {"ties": ties})
                out.append((objective, label, node, conv))
    return out


def choose(specs: Mapping[str, LawSpec], table: Table, protocol) -> tuple[dict[str, Choice], dict]:
    """Per law, the candidate with the best validation score, and the ``protocol_selection`` block of fit.json.
    Only the fit rows are read (the held-out flags are dropped before anything is fitted)."""
    rule = OmegaConf.to_container(protocol.validation)
    metric = str(rule.get("score", "mean_rel_err"))
    if metric not in SCORES:
        raise FitInputError(f"protocol.validation.score must be one of {list(SCORES)}, not {metric!r}")
    fit_only = Table(data=table.fit_rows.drop(columns=["heldout"]).reset_index(drop=True),
                     provenance=table.provenance)
    conventions = n_conventions(fit_only)
    rows, chosen = [], {}
    for name, spec in specs.items():
        best = None
        for objective, label, node, conv in candidates(spec, protocol, conventions):
            data = with_n_convention(fit_only, conv).data
            held = validation_split(data, rule)
            train, val = data[~held], data[held]
            model = compile_law(spec, node)
            row = {"law": name, "objective": objective, "protocol": str(node.name), "ties": label,
                   "tie_groups": OmegaConf.to_container(node.ties), "n_convention": conv, "n_train": int(len(train)), "n_validation": int(len(val))}
            if len(train) < model.n_free:
                rows.append({**row, "mse": None, "mean_rel_err": None, "max_rel_err": None, "score": None,
                             "chosen": False, "note": f"{len(train)} rows for {model.n_free} parameters"})
                continue
            result = fit(model, {x: np.log(train[x].to_numpy()) for x in spec.law.inputs},
                         train["loss"].to_numpy(), node)
            pred, _ = model.predict_jac(result.theta[None, :], {x: np.log(val[x].to_numpy()) for x in spec.law.inputs})
            scores = score(pred[0], val["loss"].to_numpy())
            rows.append({**row, **scores, "score": scores[metric], "chosen": False})
            if best is None or scores[metric] < rows[best]["score"]:
                best = len(rows) - 1
        if best is None:
            raise FitInputError(f"protocol=auto: no candidate for law {name} has enough rows outside the largest "
                                "size class")
        rows[best]["chosen"] = True
        r = rows[best]
        node = next(n for o, lab, n, c in candidates(spec, protocol, conventions)
                    if (o, lab, c) == (r["objective"], r["ties"], r["n_convention"]))
        chosen[name] = Choice(protocol=node, n_convention=r["n_convention"],
                              label=f"{r['objective']}, ties {r['ties']}, N {r['n_convention']}")
    scored = [r for r in rows if r["chosen"]]
    doc = {"rule": {**rule, "score": metric}, "candidates": rows,
           "chosen": {r["law"]: {k: r[k] for k in ("objective", "protocol", "ties", "tie_groups", "n_convention",
                                                   "score")}
                      for r in scored},
           "best_law": min(scored, key=lambda r: r["score"])["law"]}
    return chosen, doc


def table_text(doc: Mapping[str, Any]) -> str:
    """The printed candidates' table."""
    rule = doc["rule"]
    first = doc["candidates"][0]
    lines = [f"== protocol choice: fit on {first['n_train']} rows, validated on the largest size class "
             f"({rule['holdout']}, {first['n_validation']} rows); chosen by {rule['score']} (held-out rows unseen)",
             f"   {'law':<20}{'objective':<15}{'ties':<22}{'N':<20}{'val MSE':>11}{'mean rel':>10}{'max rel':>10}"
             "  chosen"]
    fmt = lambda v, spec: "-" if v is None or not np.isfinite(v) else format(v, spec)
    for r in doc["candidates"]:
        lines.append(f"   {r['law']:<20}{r['objective']:<15}{r['ties']:<22}{r['n_convention']:<20}"
                     f"{fmt(r['mse'], '.4g'):>11}{fmt(r['mean_rel_err'], '.4f'):>10}{fmt(r['max_rel_err'], '.4f'):>10}"
                     + ("  <-" if r["chosen"] else (f"  ({r['note']})" if r.get("note") else "")))
    lines.append(f"   best law by validation: {doc['best_law']}")
    return "\n".join(lines)
