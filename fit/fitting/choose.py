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
from scaling_lab.fit.fitting.sources import FitInputError, Table, n_conventions, size_classes, with_n_convention
from scaling_lab.fit.laws.spec import LawSpec, tie_label

SCORES = ("mean_rel_err", "max_rel_err", "mse")


@dataclass
class Choice:
    protocol: Any            # the chosen objective's protocol with the chosen ties (an OmegaConf node)
    n_convention: str
    label: str


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
    """The validation scores, and the standard errors of the two that are means (over the validation rows)."""
    rel = np.abs(pred - y) / y
    if not np.isfinite(pred).all():
        return {k: float("inf") for k in ("mse", "mean_rel_err", "max_rel_err", "mse_se", "mean_rel_err_se")}
    sq, n = (pred - y) ** 2, len(y)
    se = (lambda v: float(np.std(v, ddof=1) / np.sqrt(n))) if n > 1 else (lambda v: float("inf"))
    return {"mse": float(sq.mean()), "mean_rel_err": float(rel.mean()), "max_rel_err": float(rel.max()),
            "mse_se": se(sq), "mean_rel_err_se": se(rel)}


def best_law(scored: list[dict], n_free: Mapping[str, int], metric: str, rule: str) -> tuple[str, str]:
    """The law the validation supports, and why. ``best``: the lowest score. ``one_se`` (the one-standard-error
    rule, Hastie et al., Elements of Statistical Learning 7.10): the law with the fewest free parameters whose
    score is within one standard error (of the best law's score) of the best; a max-error score has no standard
    error, so it is ``best``."""
    top = min(scored, key=lambda r: r["score"])
    se = top.get(f"{metric}_se")
    if rule == "best" or se is None or not np.isfinite(se):
        return top["law"], "lowest score"
    close = [r for r in scored if r["score"] <= top["score"] + se]
    simplest = min(close, key=lambda r: (n_free[r["law"]], r["score"]))
    if simplest["law"] == top["law"]:
        return top["law"], "lowest score"
    return simplest["law"], (f"within one standard error ({se:.4f}) of the lowest score ({top['law']} "
                             f"{top['score']:.4f}), with fewer parameters")


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
    law_rule = str(rule.get("law_rule", "one_se"))
    if law_rule not in ("one_se", "best"):
        raise FitInputError(f"protocol.validation.law_rule must be one_se or best, not {law_rule!r}")
    rows, chosen, n_free = [], {}, {}
    for name, spec in specs.items():
        best = None
        for objective, label, node, conv in candidates(spec, protocol, conventions):
            data = with_n_convention(fit_only, conv).data
            held = validation_split(data, rule)
            train, val = data[~held], data[held]
            model = compile_law(spec, node)
            n_free[name] = min(n_free.get(name, model.n_free), model.n_free)
            row = {"law": name, "objective": objective, "protocol": str(node.name), "ties": label,
                   "tie_groups": OmegaConf.to_container(node.ties), "n_convention": conv, "n_train": int(len(train)), "n_validation": int(len(val))}
            if len(train) < model.n_free:
                rows.append({**row, "mse": None, "mean_rel_err": None, "max_rel_err": None, "mse_se": None,
                             "mean_rel_err_se": None, "score": None,
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
    law, why = best_law(scored, n_free, metric, law_rule)
    doc = {"rule": {**rule, "score": metric, "law_rule": law_rule}, "candidates": rows,
           "chosen": {r["law"]: {k: r[k] for k in ("objective", "protocol", "ties", "tie_groups", "n_convention",
                                                   "score", f"{metric}_se") if k in r}
                      for r in scored},
           "best_law": law, "best_law_why": why}
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
    lines.append(f"   best law by validation: {doc['best_law']} ({doc.get('best_law_why', 'lowest score')}; "
                 f"validation.law_rule={doc['rule'].get('law_rule', 'best')})")
    return "\n".join(lines)
