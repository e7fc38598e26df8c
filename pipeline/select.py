"""``scaling-select``: which shape to train at a parameter and token budget, given a fitted inference-efficient law
and decode latency (modelled, or measured here with ``select.measure=true`` on ``select.device``, each shape as
served there; a latency law beside such a measurement must come from the same device, dtype and graph mode).

Enumerates the shapes of ``conf/arch/<family>`` within the budget (or takes ``shapes.pairs``), counts their N with
the convention the law was fitted with (``models.gpt``'s own counts), predicts loss and latency, prints the ranked
table, the Pareto front and the choice, and writes ``<out>/selection.json`` and ``<out>/candidates.csv``. The
ranking, front and rules are ``fit/selection.py``; ``run(cfg)`` is the whole job. Configuration: ``conf/select.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from scaling_lab.fit import selection, tracking
from scaling_lab.fit.io.files import write_csv_atomic, write_json_atomic
from scaling_lab.fit.latency import FORM, LatencyModel, MissingLatency, load_latency
from scaling_lab.models.shapes import GPTConfig, non_embedding_params
from scaling_lab.pipeline import device as devices
from scaling_lab.pipeline.latency import measure_shapes, protocol_defaults

SELECTION_SCHEMA_VERSION = 1
CONVENTIONS = ("total", "non_embedding")
# Printed beside every selection: what the latency model's form stands for.
PAPER_CONTEXT = ("Bian et al. 2025 (arXiv 2501.18107): at a fixed parameter count, decode latency grows linearly "
                 "with depth, so wide-and-shallow shapes decode faster at nearly equal loss.")


def gpt_config(arch, n_layers: int, d_model: int) -> GPTConfig:
    """The model of one shape of the family ``arch`` (conf/arch/*.yaml)."""
    return GPTConfig(n_layers=int(n_layers), d_model=int(d_model), n_heads=int(d_model) // int(arch.head_dim),
                     vocab_size=int(arch.vocab_size), seq_len=int(arch.seq_len), ffn_ratio=float(arch.ffn_ratio),
                     tie_embeddings=bool(arch.tie_embeddings))


def param_counter(arch, convention: str) -> Callable[[int, int], float]:
    """N of a shape, counted as the law's fit counted it: ``non_embedding`` or ``total`` (embeddings, positions and
    an untied head included), both from ``models.gpt``."""
    if convention == "non_embedding":
        return lambda n_layers, d_model: non_embedding_params(n_layers, d_model, arch.ffn_ratio)
    if convention == "total":
        return lambda n_layers, d_model: gpt_config(arch, n_layers, d_model).param_counts()["total"]
    raise ValueError(f"the fit's N convention is {convention!r}: set n_convention=total or non_embedding (what the "
                     f"N the law was fitted on counts)")


def budget_range(budget) -> tuple[float, float]:
    """(params_min, params_max) from ``budget.params`` +- ``budget.band`` or from an explicit range."""
    if budget.params is not None:
        if budget.params_min is not None or budget.params_max is not None:
            raise ValueError("give budget.params (with budget.band) or budget.params_min/params_max, not both")
        if not budget.params > 0 or not 0 <= budget.band < 1:
            raise ValueError(f"need budget.params > 0 and 0 <= budget.band < 1, got {budget.params}, {budget.band}")
        return budget.params * (1 - budget.band), budget.params * (1 + budget.band)
    if budget.params_min is None or budget.params_max is None:
        raise ValueError("give a parameter budget: budget.params=<N> or budget.params_min and budget.params_max")
    return float(budget.params_min), float(budget.params_max)


def aspect_ratio_range(cfg: DictConfig, provenance: dict) -> tuple[float | None, float | None]:
    """The R range to enumerate: ``arch.aspect_ratio``, narrowed to the fit's R range if ``select.within_fitted_R``
    (and the fit.json records one)."""
    lo, hi = (None if x is None else float(x) for x in cfg.arch.aspect_ratio)
    fitted = (provenance.get("fitted_range") or {}).get("R")
    if not (cfg.select.within_fitted_R and fitted):
        return lo, hi
    try:
        f_lo, f_hi = (float(x) for x in fitted)
    except (TypeError, ValueError):
        raise ValueError(f"{cfg.constants}: provenance.fitted_range.R must be [min, max], got {fitted!r}") from None
    return (f_lo if lo is None else max(lo, f_lo)), (f_hi if hi is None else min(hi, f_hi))


def candidate_shapes(cfg: DictConfig, count: Callable[[int, int], float],
                     aspect_ratio: tuple[float | None, float | None] = (None, None)) -> pd.DataFrame:
    """``shapes.pairs`` if given, else every shape of the family within the budget (and ``aspect_ratio``)."""
    arch = cfg.arch
    if cfg.shapes.pairs:
        return selection.given_shapes(cfg.shapes.pairs, count, arch.head_dim)
    lo, hi = budget_range(cfg.budget)
    return selection.enumerate_shapes(count, lo, hi, tuple(arch.n_layers), arch.head_dim, aspect_ratio)


def measure_candidates(shapes: pd.DataFrame, arch, protocol: dict, batch: int, device: str = devices.DEFAULT,
                       graph: str | bool | None = "auto") -> tuple[np.ndarray, dict]:
    """Decode ms/token of every shape, measured here on randomly initialised weights in their serving copies on
    ``device`` (``pipeline.latency``), and how: device, dtype, threads and graph mode."""
    if protocol.get("threads"):
        torch.set_num_threads(int(protocol["threads"]))
    configs = [gpt_config(arch, r.n_layers, r.d_model) for r in shapes.itertuples()]
    rows = measure_shapes(configs, {**protocol, "batch_sizes": [int(batch)]}, device, log=lambda _: None,
                          graph=graph)
    return (np.array([r["decode_ms_per_token"] for r in rows]),
            {k: rows[0][k] for k in ("device", "dtype", "threads", "graph")})


def latency_source(cfg: DictConfig, fit_path: Path) -> LatencyModel | None:
    """The latency model of ``cfg.latency`` or of the fit.json; None when measuring and there is none."""
    path = Path(cfg.latency) if cfg.latency else fit_path
    try:
        return load_latency(path)
    except MissingLatency:
        if cfg.select.measure:
            return None
        raise MissingLatency(f"{path} has no latency section: run scaling-latency constants={path}, give "
                             f"latency=<latency.json>, or measure here with select.measure=true") from None


def predicted_latency(cfg: DictConfig, shapes: pd.DataFrame, model: LatencyModel | None) -> tuple[np.ndarray, dict]:
    """Decode ms/token per shape (measured or modelled) and a record of where it came from."""
    batch = cfg.select.batch if cfg.select.batch is not None else (model.batch_size if model else 1)
    if cfg.select.measure:
        device = devices.resolve(cfg.select.device)
        here = devices.conditions(device, devices.use_graph(cfg.select.graph, device))
        if model is not None:  # its protocol is the measurement's: it must describe the same device
            devices.check_comparable(model.meta, here, f"the latency law of {cfg.latency or cfg.constants}",
                                     f"select.measure=true here (select.device={cfg.select.device}, "
                                     f"select.graph={cfg.select.graph})")
        protocol = protocol_defaults()
        if model is not None:
            protocol.update({k: model.meta[k] for k in ("prompt_len", "decode_tokens", "warmup", "repeats", "threads")
                             if model.meta.get(k) is not None})
        protocol.update({k: v for k, v in cfg.select.protocol.items() if v is not None})
        if cfg.select.threads is not None:
            protocol["threads"] = cfg.select.threads
        ms, measured_under = measure_candidates(shapes, cfg.arch, protocol, batch, device, cfg.select.graph)
        return ms, {"source": "measured", **measured_under, "batch": int(batch), "protocol": protocol}
    ms = model.predict(shapes.n_layers.to_numpy(), shapes.d_model.to_numpy(), "decode_ms_per_token", batch,
                       vocab_size=int(cfg.arch.vocab_size))
    measured = model.meta.get("shapes") or {}
    size = shapes.n_layers * shapes.d_model ** 2
    extrapolated = bool(measured) and bool((size > measured["n_layers"][1] * measured["d_model"][1] ** 2).any()
                                           or (shapes.n_layers > measured["n_layers"][1]).any())
    return np.asarray(ms), {"source": "model", **devices.measured_under(model.meta),
                            "threads": model.meta.get("threads"), "batch": int(batch), "form": FORM,
                            "coefficients": model.coefficients("decode_ms_per_token", "none"),
                            "heldout": model.heldout.get("none", {}).get("decode_ms_per_token"),
                            "measured_shapes": measured, "extrapolated": extrapolated}


def run(cfg: DictConfig) -> dict:
    """Enumerate, predict, rank, select; print and write ``selection.json``; returns its content."""
    fit_path = Path(str(cfg.constants))
    constants, provenance = selection.load_law(fit_path, cfg.law)
    convention = cfg.n_convention or provenance.get("n_convention")
    count = param_counter(cfg.arch, convention)
    if cfg.budget.tokens is None or not cfg.budget.tokens > 0:
        raise ValueError(f"budget.tokens (training tokens D) must be > 0, got {cfg.budget.tokens}")
    selection.check_rule(cfg.select.latency_budget_ms, cfg.select.loss_tolerance)
    ratios = aspect_ratio_range(cfg, provenance)
    shapes = candidate_shapes(cfg, count, ratios)
    model = latency_source(cfg, fit_path)
    ms, latency = predicted_latency(cfg, shapes, model)
    table = selection.rank(selection.predict(shapes, constants, float(cfg.budget.tokens), ms))
    choice = selection.select(table, cfg.select.latency_budget_ms, cfg.select.loss_tolerance)
    result = {
        "schema_version": SELECTION_SCHEMA_VERSION, "fit_json": str(fit_path.resolve()), "law": cfg.law,
        "formula": constants.law.formula, "params": dict(constants.values), "n_convention": convention,
        "tokens": float(cfg.budget.tokens),
        "budget": ({"pairs": OmegaConf.to_container(cfg.shapes.pairs)} if cfg.shapes.pairs else
                   dict(zip(("params_min", "params_max"), budget_range(cfg.budget)))),
        "arch": OmegaConf.to_container(cfg.arch), "latency": latency, "candidates": int(len(table)),
        **choice,
        "pareto": [selection.row_dict(r) for _, r in table[table.pareto].sort_values("latency_ms").iterrows()],
        "context": PAPER_CONTEXT,
    }
    result["aspect_ratio_range"] = None if cfg.shapes.pairs else list(ratios)
    result["depth_edge"] = None if cfg.shapes.pairs else depth_edge(result, table, tuple(cfg.arch.n_layers))
    result["R_edge"] = None if cfg.shapes.pairs else r_edge(result, table, ratios,
                                                                  provenance.get("fitted_range") or {})
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "candidates.csv", table)
    write_json_atomic(out / "selection.json", result)
    print(format_report(result, table, cfg.top))
    print(f"wrote {out / 'selection.json'}, {out / 'candidates.csv'}")
    tracking.log_select(cfg, result, out)
    return result


def depth_edge(result: dict, table: pd.DataFrame, depths: tuple[int, int]) -> str | None:
    """Why the chosen shape sits at the shallowest or deepest depth enumerated, or None when it does not."""
    lo, hi = int(depths[0]), int(depths[1])
    L = int(result["chosen"]["n_layers"])
    if L not in (lo, hi):
        return None
    side = "shallowest" if L == lo else "deepest"
    best = int(result["best_loss"]["n_layers"])
    if result["rule"] == "loss_tolerance":
        why = (f"the rule takes the fastest shape within {100 * result['loss_tolerance']:g}% of the best predicted "
               f"loss (best: n_layers={best}), and the {side} shape is still within it")
    else:
        why = f"it has the lowest predicted loss within the latency budget (best overall: n_layers={best})"
    return (f"the selected depth {L} is the {side} that arch.n_layers [{lo}, {hi}] enumerates: {why}; a shape "
            "past the edge might be chosen if the range were wider (widen arch.n_layers to check)")


def r_edge(result: dict, table: pd.DataFrame, ratios: tuple[float | None, float | None],
           fitted: dict) -> str | None:
    """Why the chosen shape is the widest (or narrowest) candidate when the fit's R range (not arch.aspect_ratio)
    bounds the candidates on that side, or None."""
    if "R" not in fitted:
        return None
    r, (lo, hi) = float(result["chosen"]["R"]), ratios
    side = ("widest", hi) if hi == float(fitted["R"][1]) and r >= table.R.max() else \
        ("narrowest", lo) if lo == float(fitted["R"][0]) and r <= table.R.min() else None
    if side is None:
        return None
    return (f"the selected shape is the {side[0]} candidate: the law was fitted on R in [{fitted['R'][0]:.3g}, "
            f"{fitted['R'][1]:.3g}], and shapes past R {side[1]:.3g}, where its R term would extrapolate, are not "
            f"enumerated (select.within_fitted_R=false enumerates them)")


def format_report(result: dict, table: pd.DataFrame, top: int) -> str:
    lat = result["latency"]
    where = f"{lat['device']}, {lat.get('dtype') or 'dtype not recorded'}, decode {lat['graph']}"
    how = (f"measured here ({where}, batch {lat['batch']})" if lat["source"] == "measured" else
           f"latency model of {where} (batch {lat['batch']}, ms = {lat['form']}"
           + (f", leave-one-shape-out MAPE {100 * lat['heldout']['loso_mape']:.1f}%"
              if (lat.get("heldout") or {}).get("loso_mape") is not None else "") + ")")
    n = result["budget"]
    r_lo, r_hi = result.get("aspect_ratio_range") or (None, None)
    lines = [f"== {result['candidates']} shapes, N ({result['n_convention']}) "
             + (f"in [{n['params_min']:.4g}, {n['params_max']:.4g}]" if "params_min" in n else "as given")
             + (f", R in [{r_lo or 0:.3g}, {r_hi or float('inf'):.3g}]" if (r_lo, r_hi) != (None, None) else "")
             + f", D = {result['tokens']:.4g} tokens; loss: {result['law']} law of {result['fit_json']}",
             f"   latency (decode ms/token): {how}"]
    if lat.get("extrapolated"):
        m = lat["measured_shapes"]
        lines.append(f"   note: shapes beyond the measured ones (n_layers {m['n_layers']}, d_model {m['d_model']}): "
                     f"latency extrapolated by the model's form")
    lines += [f"   context: {result['context']}", "== ranked by predicted loss (* chosen, P Pareto front)",
              selection.format_table(table, result["chosen"], top), "== loss-latency Pareto front (fastest first)"]
    front = pd.DataFrame(result["pareto"])
    lines.append(selection.format_table(front, result["chosen"]))
    c, b = result["chosen"], result["best_loss"]
    rule = (f"lowest predicted loss within {result['latency_budget_ms']:g} ms/token"
            if result["rule"] == "latency_budget" else f"fastest within {100 * result['loss_tolerance']:g}% of the best predicted loss "
                 f"({b['loss']:.4f} -> limit {result['loss_limit']:.4f})")
    lines += [f"== selected ({rule}; {result['eligible']} eligible): n_layers={c['n_layers']} d_model={c['d_model']} "
              f"heads={c['n_heads']} R={c['R']:.4g} N={c['N']:.4g}: loss {c['loss']:.4f}, "
              f"{c['latency_ms']:.4g} ms/token",
              f"   vs the best predicted loss (n_layers={b['n_layers']} d_model={b['d_model']} R={b['R']:.4g}): "
              f"{result['speedup_vs_best_loss']:.2f}x faster, loss +{100 * result['loss_increase_vs_best']:.2f}%"]
    lines += [f"   note: {result[k]}" for k in ("depth_edge", "R_edge") if result.get(k)]
    return "\n".join(lines)
