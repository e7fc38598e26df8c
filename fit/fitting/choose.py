"""``protocol=auto``: choose each law's fitting protocol by how well it predicts the largest models from the
smaller ones (leave-largest-out), never by in-sample fit and never from the user's held-out rows.

Candidates are configuration (``conf/protocol/auto.yaml``): a few objectives (other protocols), exponent ties and
N conventions, one of them the default recipe (``protocol.default``: Huber on log loss, no ties, the source's own
N). Each candidate predicts the fit rows' largest size class (by the default's N, or by compute C = 6ND) from a
fit on the smaller classes, and the next largest from the classes below it (``validation.folds``); the same rows
for every candidate. The default is kept unless a candidate beats it clearly (``pick``): a choice made freely
among many candidates on a dozen rows fits those rows' noise. How often the choice would change is measured by
resampling the validation rows with replacement, every candidate's predictions fixed, and applying the same rule
(``stability``). The caller refits the chosen candidate on all fit rows.
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
RULES = ("one_se", "best")


@dataclass
class Choice:
    protocol: Any            # the chosen objective's protocol with the chosen ties (an OmegaConf node)
    n_convention: str
    label: str


def size_class(rows: pd.DataFrame, rule: Mapping[str, Any]) -> np.ndarray:
    """Each row's size class by the rule, 0 for the smallest."""
    holdout = str(rule.get("holdout", "largest_n"))
    if holdout == "largest_n":
        size = rows["N"].to_numpy()
    elif holdout == "largest_c":
        size = 6.0 * rows["N"].to_numpy() * rows["D"].to_numpy()
    else:
        raise FitInputError(f"protocol.validation.holdout must be largest_n or largest_c, not {holdout!r}")
    return size_classes(size, float(rule.get("class_rtol", 0.1)))


def validation_split(rows: pd.DataFrame, rule: Mapping[str, Any]) -> np.ndarray:
    """True on the rows held back for validation: the largest size class of ``rows`` by the rule."""
    classes = size_class(rows, rule)
    if classes.max() < 1:
        raise FitInputError("protocol=auto needs fit rows of at least two size classes (it holds back the largest)")
    return classes == classes.max()


def validation_folds(rows: pd.DataFrame, rule: Mapping[str, Any], n_free: int) -> list[tuple[np.ndarray, ...]]:
    """(fitted, scored) masks of the validation folds: the largest size class predicted from the smaller ones,
    then each next largest (``validation.folds`` in all) while the classes below it are at least two (one size
    leaves the size exponent free) and hold ``n_free`` rows."""
    held = validation_split(rows, rule)
    classes = size_class(rows, rule)
    folds = [(~held, held)]
    for c in range(classes.max() - 1, classes.max() - int(rule.get("folds", 1)), -1):
        if c < 2 or (classes < c).sum() < n_free:
            break
        folds.append((classes < c, classes == c))
    return folds


def score(pred: np.ndarray | None, y: np.ndarray) -> dict[str, float]:
    """The validation scores, and the standard errors of the two that are means (over the validation rows);
    infinite for a candidate without predictions."""
    if pred is None or not np.isfinite(pred).all():
        return {k: float("inf") for k in ("mse", "mean_rel_err", "max_rel_err", "mse_se", "mean_rel_err_se")}
    rel, sq, n = np.abs(pred - y) / y, (pred - y) ** 2, len(y)
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


def pick(scores: list[dict], default: int, metric: str, rule: str, margin: float) -> tuple[int, str]:
    """The index of the candidate chosen from their ``score`` dicts, and why. ``best``: the lowest score.
    ``one_se``: the default (index ``default``) unless the lowest score beats the default's by more than its
    standard error (the one-standard-error rule, with the default as the simple model); max_rel_err has no
    standard error, so there the lowest must be below (1 - ``margin``) x the default's."""
    values = np.array([s[metric] for s in scores])
    best, ref = int(np.argmin(values)), values[default]
    low = f"the lowest score ({values[best]:.4f})"
    if best == default:
        return default, "the default has the lowest score"
    if not np.isfinite(ref):
        return best, "the default could not be fitted outside the validation class"
    if rule == "best":
        return best, "the lowest score (validation.protocol_rule=best)"
    if metric == "max_rel_err":
        if values[best] < (1 - margin) * ref:
            return best, f"{low} is more than {margin:.0%} below the default's ({ref:.4f})"
        return default, f"{low} is within {margin:.0%} of the default's ({ref:.4f})"
    se = scores[best][f"{metric}_se"]
    if ref - values[best] > se:
        return best, f"{low} beats the default's ({ref:.4f}) by more than its standard error ({se:.4f})"
    return default, f"the default's score ({ref:.4f}) is within one standard error ({se:.4f}) of {low}"


def stability(preds: list[np.ndarray | None], y: np.ndarray, default: int, chosen: int, labels: list[str],
              metric: str, rule: str, margin: float, resamples: int, seed: int) -> dict | None:
    """How often ``pick`` chooses another candidate when the validation rows are resampled with replacement
    (seeded), every candidate's predictions on them fixed; None with no resamples."""
    if resamples <= 0:
        return None
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(preds), dtype=int)
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        scores = [score(None if p is None else p[idx], y[idx]) for p in preds]
        counts[pick(scores, default, metric, rule, margin)[0]] += 1
    changed = int(resamples - counts[chosen])
    return {"resamples": resamples, "seed": seed, "changed": changed, "changed_frac": changed / resamples,
            "counts": {labels[i]: int(c) for i, c in enumerate(counts) if c}}


def own_convention(table: Table, conventions: list[str]) -> str:
    """The name of the source's own N: its recorded convention, else that of another count equal to it."""
    own = str(table.provenance.get("n_convention", "unknown"))
    if own in conventions:
        return own
    same = [c for c in conventions if np.array_equal(table.data[f"N@{c}"], table.data["N"])]
    return same[0] if same else own


def n_candidates(table: Table, wanted, default: str) -> tuple[str, list[str]]:
    """The default's N convention (``source``: the source's own) and the conventions to try, the default's first;
    one whose counts equal the default's is the default's, not listed again."""
    have = n_conventions(table)
    own = own_convention(table, have)
    conv = own if default == "source" else default
    if conv not in (own, *have):
        raise FitInputError(f"protocol.default.n_convention={default!r}: the data gives {sorted({own, *have})} "
                            "(or source: the source's own)")
    base = with_n_convention(table, conv).data["N"]
    others = [c for c in wanted if c in have and c != conv
              and not np.array_equal(with_n_convention(table, c).data["N"], base)]
    return conv, [conv, *others]


def _ties(node) -> list:
    return OmegaConf.to_container(node) if node is not None else []


def candidates(spec: LawSpec, protocol, conventions: list[str]) -> list[tuple[str, str, Any, str]]:
    """(objective, tie label, protocol node, N convention) for one law, ties that coincide for it listed once."""
    cand = protocol.candidates
    out, seen = [], set()
    for objective in cand.objectives:
        if objective not in protocol.objectives:
            raise FitInputError(f"protocol.candidates.objectives names {objective!r}, not one of "
                                f"protocol.objectives {sorted(protocol.objectives)}")
        for ties in map(_ties, cand.ties.values()):
            label = tie_label(spec, ties)
            for conv in conventions:
                if (objective, label, conv) in seen:
                    continue
                seen.add((objective, label, conv))
                node = OmegaConf.merge(protocol.objectives[objective], {"ties": ties})
                out.append((objective, label, node, conv))
    return out


def label_of(objective: str, ties: str, conv: str) -> str:
    return f"{objective}, ties {ties}, N {conv}"


def _settings(protocol) -> dict[str, Any]:
    """The validation rule, checked (one line per bad value, before any fitting)."""
    rule = OmegaConf.to_container(protocol.validation)
    rule.setdefault("score", "mean_rel_err")
    rule.setdefault("law_rule", "one_se")
    rule.setdefault("protocol_rule", "one_se")
    rule["margin"] = float(rule.get("margin", 0.1))
    rule["resamples"] = int(rule.get("resamples", 0))
    rule["seed"] = int(rule.get("seed", 0))
    if rule["score"] not in SCORES:
        raise FitInputError(f"protocol.validation.score must be one of {list(SCORES)}, not {rule['score']!r}")
    for key in ("law_rule", "protocol_rule"):
        if rule[key] not in RULES:
            raise FitInputError(f"protocol.validation.{key} must be one_se or best, not {rule[key]!r}")
    if not 0 <= rule["margin"] < 1:
        raise FitInputError(f"protocol.validation.margin must be in [0, 1), not {rule['margin']}")
    if rule["resamples"] < 0:
        raise FitInputError(f"protocol.validation.resamples must be >= 0, not {rule['resamples']}")
    default = protocol.default
    if default.objective not in protocol.candidates.objectives or default.ties not in protocol.candidates.ties:
        raise FitInputError(f"protocol.default ({default.objective}, ties {default.ties}) must be one of the "
                            f"candidates: objectives {list(protocol.candidates.objectives)}, ties "
                            f"{list(protocol.candidates.ties)}")
    return rule


def validate(spec: LawSpec, node, data: pd.DataFrame, folds) -> np.ndarray | None:
    """The candidate's predictions of every fold's scored rows from its fitted rows (None: too few rows)."""
    model = compile_law(spec, node)
    if min(train.sum() for train, _ in folds) < model.n_free:
        return None
    log = lambda rows: {x: np.log(rows[x].to_numpy()) for x in spec.law.inputs}
    pred = []
    for train, val in folds:
        result = fit(model, log(data[train]), data.loc[train, "loss"].to_numpy(), node)
        pred.append(model.predict_jac(result.theta[None, :], log(data[val]))[0][0])
    return np.concatenate(pred)


def choose(specs: Mapping[str, LawSpec], table: Table, protocol) -> tuple[dict[str, Choice], dict]:
    """Per law, the candidate ``pick`` chooses, and the ``protocol_selection`` block of fit.json. Only the fit
    rows are read (the held-out flags are dropped before anything is fitted)."""
    rule = _settings(protocol)
    metric = rule["score"]
    fit_only = Table(data=table.fit_rows.drop(columns=["heldout"]).reset_index(drop=True),
                     provenance=table.provenance)
    default_conv, conventions = n_candidates(fit_only, protocol.candidates.n_conventions,
                                             str(protocol.default.n_convention))
    default_ties = _ties(protocol.candidates.ties[protocol.default.ties])
    base = with_n_convention(fit_only, default_conv).data
    rows, chosen, summary, n_free = [], {}, {}, {}
    for name, spec in specs.items():
        cands = candidates(spec, protocol, conventions)
        labels = [label_of(o, lab, c) for o, lab, _, c in cands]
        default = labels.index(label_of(protocol.default.objective, tie_label(spec, default_ties), default_conv))
        folds = validation_folds(base, rule, compile_law(spec, cands[default][2]).n_free)
        y = np.concatenate([base.loc[val, "loss"].to_numpy() for _, val in folds])
        first, preds, scores = len(rows), [], []
        fewest = min(int(train.sum()) for train, _ in folds)
        for i, (objective, label, node, conv) in enumerate(cands):
            params = compile_law(spec, node).n_free
            n_free[name] = min(n_free.get(name, params), params)
            pred = validate(spec, node, with_n_convention(fit_only, conv).data, folds)
            s = score(pred, y)
            preds.append(pred)
            scores.append(s)
            rows.append({"law": name, "candidate": labels[i], "objective": objective, "protocol": str(node.name),
                         "ties": label, "tie_groups": OmegaConf.to_container(node.ties), "n_convention": conv,
                         "n_train": int(folds[0][0].sum()), "n_validation": int(len(y)),
                         **{k: (v if pred is not None else None) for k, v in s.items()},
                         "score": s[metric] if pred is not None else None, "default": i == default,
                         "best": False, "chosen": False,
                         **({} if pred is not None else {"note": f"{fewest} rows for {params} parameters"})})
        if all(p is None for p in preds):
            raise FitInputError(f"protocol=auto: no candidate for law {name} has enough rows outside the largest "
                                "size class")
        best = int(np.argmin([s[metric] for s in scores]))
        at, why = pick(scores, default, metric, rule["protocol_rule"], rule["margin"])
        rows[first + best]["best"] = rows[first + at]["chosen"] = True
        chosen[name] = Choice(protocol=cands[at][2], n_convention=cands[at][3], label=labels[at])
        summary[name] = {"candidate": labels[at], "default": labels[default], "best": labels[best],
                         "best_score": scores[best][metric], "why": why,
                         "folds": [{"n_train": int(train.sum()), "n_validation": int(val.sum()),
                                    "N": [float(base.loc[val, "N"].min()), float(base.loc[val, "N"].max())]}
                                   for train, val in folds],
                         "stability": stability(preds, y, default, at, labels, metric, rule["protocol_rule"],
                                                rule["margin"], rule["resamples"], rule["seed"])}
    scored = [r for r in rows if r["chosen"]]
    law, why = best_law(scored, n_free, metric, rule["law_rule"])
    doc = {"rule": rule, "default": {**OmegaConf.to_container(protocol.default), "n_convention": default_conv},
           "candidates": rows,
           "chosen": {r["law"]: {**{k: r[k] for k in ("objective", "protocol", "ties", "tie_groups", "n_convention",
                                                       "score", f"{metric}_se")}, **summary[r["law"]]}
                      for r in scored},
           "best_law": law, "best_law_why": why}
    return chosen, doc


def table_text(doc: Mapping[str, Any]) -> str:
    """The printed candidates' table, and per law how it was validated, what was chosen and why, and how often
    the choice changes when the validation rows are resampled."""
    rule, metric = doc["rule"], doc["rule"]["score"]
    margin = f"{rule['margin']:.0%} of its score" if metric == "max_rel_err" else "one standard error"
    how = "the lowest score" if rule["protocol_rule"] == "best" else f"the default unless beaten by more than {margin}"
    lines = [f"== protocol choice: each candidate predicts the largest size classes of the fit rows "
             f"({rule['holdout']}, up to {rule.get('folds', 1)}) from the smaller ones; by {metric}: {how} "
             "(held-out rows unseen)",
             f"   {'law':<20}{'objective':<15}{'ties':<22}{'N':<15}{'val MSE':>11}{'mean rel':>10}{'+- se':>8}"
             f"{'max rel':>9}"]
    fmt = lambda v, spec: "-" if v is None or not np.isfinite(v) else format(v, spec)
    for r in doc["candidates"]:
        marks = [m for m, on in (("default", r["default"]), ("best", r["best"]), ("<- chosen", r["chosen"])) if on]
        lines.append(f"   {r['law']:<20}{r['objective']:<15}{r['ties']:<22}{r['n_convention']:<15}"
                     f"{fmt(r['mse'], '.4g'):>11}{fmt(r['mean_rel_err'], '.4f'):>10}"
                     f"{fmt(r['mean_rel_err_se'], '.4f'):>8}{fmt(r['max_rel_err'], '.4f'):>9}"
                     + (f"  ({r['note']})" if r.get("note") else "") + "".join(f"  {m}" for m in marks))
    for law, c in doc["chosen"].items():
        span = lambda lo, hi: f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}-{hi:.3g}"
        folds = "; ".join(f"{f['n_validation']} rows of N {span(*f['N'])} from the {f['n_train']} below"
                          for f in c["folds"])
        kept = "the default" if c["candidate"] == c["default"] else f"not the default ({c['default']})"
        lines.append(f"   {law}: validated on {folds}")
        lines.append(f"      chose {c['candidate']}, {kept}: {c['why']}")
        s = c.get("stability")
        if s:
            n = sum(f["n_validation"] for f in c["folds"])
            lines.append(f"      the choice changes in {s['changed']} of {s['resamples']} resamples of the {n} "
                         f"validation rows ({s['changed_frac']:.0%}); chosen: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(s["counts"].items(), key=lambda kv: -kv[1])))
    lines.append(f"   best law by validation: {doc['best_law']} ({doc.get('best_law_why', 'lowest score')}; "
                 f"validation.law_rule={rule.get('law_rule', 'best')})")
    return "\n".join(lines)
