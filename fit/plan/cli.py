"""scaling-plan: the Chinchilla-style and the inference-aware optimal model for a target quality and demand.

    scaling-plan constants=<fit.json | hoffmann2022 | sardana2024 | epoch2024> objective=flops|cost out=<dir> \\
        target.loss=<l> | target.chinchilla_params=<N> \\
        demand.tokens=<T> | demand.requests=<R> demand.input_tokens=<i> demand.output_tokens=<o> \\
        [hardware.train.{gpu,dtype,peak_flops,price_per_hour,mfu}=...] \\
        [hardware.inference.{gpu,dtype,peak_flops,price_per_hour,mfu_prefill,mfu_decode}=...] \\
        [serving.quantization=<mode> serving.loss_penalty=<delta> serving.speculative.enabled=true ...] \\
        [serving.mode=auto|<mode>|speculative serving.measurements=<results_dir>/serving/<sweep>]

Writes ``<out>/plan.json`` and ``<out>/plan.png`` and prints a table. Configuration: ``conf/plan.yaml``; presets:
``conf/plan_presets/default.yaml``; serving modes: the table ``conf/serving_mode/`` (``conf/serving_modes.py``), whose
mode gives the GPU peak FLOP/s key inference is priced at (``serving.quantization``, unless
``hardware.inference.dtype`` is given) and whose measured loss penalty (``serving.measurements``) or given one
(``serving.loss_penalty``) the served model pays. The math is in ``fit/plan/planner.py`` and ``fit/plan/serving.py``;
``run(cfg)`` is the whole job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from scaling_lab.fit import tracking
from scaling_lab.fit.plan import planner
from scaling_lab.conf import serving_modes as mode_table
from scaling_lab.fit.laws.law import LawConstants
from scaling_lab.fit.io.fitfile import load_law, read_fit_json
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.fit.latency import LatencyModel
from scaling_lab.fit.plan import serving as serving_modes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

PLAN_SCHEMA_VERSION = 1


def load_chinchilla(cfg: DictConfig) -> tuple[LawConstants, dict]:
    """The Chinchilla constants named by ``cfg.constants`` (a preset or a fit.json) and where they came from."""
    law, presets, spec = cfg.law.chinchilla, cfg.presets.constants, str(cfg.constants)
    if spec in presets:
        constants = LawConstants.from_dict("chinchilla", {"formula": law.formula, "inputs": list(law.inputs),
                                                          "params": OmegaConf.to_container(presets[spec])})
        return constants, {"preset": spec}
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"constants={spec!r} is neither a preset ({', '.join(presets)}) nor a fit.json file")
    constants, doc = _law_from_fit(path, "chinchilla", law.formula)
    return constants, {"fit_json": str(path.resolve()), "provenance": doc.get("provenance", {}),
                       "not_identified": doc["laws"]["chinchilla"].get("not_identified", [])}


def load_frontier(source: dict, other: str | None = None) -> tuple[planner.Frontier | None, list[planner.Frontier],
                                                                    dict]:
    """The frontier the Chinchilla-style model lies on: Approach 2's (the isoFLOP minima's power laws) where the
    fit.json's ``isoflop.frontier`` says the law's own is not to be used (``fit.fitting.approaches``: E not
    identified, or the approaches disagree), with its bootstrap resamples; else the law's (None). ``other``: the
    fit.json of an isoFLOP study whose Approach 2 frontier is used instead (``frontier=<fit.json>``), when the
    constants' own sweep cannot locate one; both must count N alike."""
    if other is not None:
        doc = read_fit_json(other)
        iso = doc.get("isoflop") or {}
        if not iso.get("N_coef"):
            raise ValueError(f"frontier={other}: the fit has no isoFLOP frontier (fit an isoFLOP sweep with "
                             "source.columns.budget=...)")
        ours = source.get("provenance") or {}
        if "n_convention" in ours:
            _check_counts_n_alike(f"frontier={other}", doc, ours["n_convention"])
        return _approach2(iso, f"frontier={other}")
    if "fit_json" not in source:
        return None, [], {"source": "law", "why": "preset constants"}
    iso = read_fit_json(source["fit_json"]).get("isoflop") or {}
    choice = iso.get("frontier") or {}
    if choice.get("use") != "approach2":
        return None, [], {"source": "law", "why": choice.get("why") or "the fit has no isoFLOP profiles"}
    return _approach2(iso, choice["why"])


def _check_counts_n_alike(key: str, doc: dict, ours: str | None) -> None:
    """The fit.json given as ``key`` (parsed: ``doc``) must count N as the constants do (``ours``)."""
    theirs = doc.get("provenance", {}).get("n_convention")
    if theirs != ours:
        raise ValueError(f"{key} counts N as {theirs!r}, the constants as {ours!r}")


def _approach2(iso: dict, why: str) -> tuple[planner.Frontier, list[planner.Frontier], dict]:
    frontier = planner.Frontier.from_isoflop(iso["a"], iso["N_coef"], iso["b"], iso["D_coef"])
    draws = [planner.Frontier.from_isoflop(*d) for d in iso.get("draws") or [] if min(d) > 0]
    return frontier, draws, {"source": "approach2", "why": why, "a": iso["a"], "b": iso["b"]}


def _law_from_fit(path: Path, name: str, formula: str) -> tuple[LawConstants, dict]:
    """Law ``name`` of a fit.json, refused unless it has the configured ``formula`` the planner's math assumes."""
    constants, doc = load_law(path, name, formula, needed_by="the planner")
    planner.chinchilla_terms(constants)
    return constants, doc


def load_latency_law(cfg: DictConfig, why: str) -> tuple[LatencyModel, dict]:
    """The latency law of the fit.json in ``cfg.latency``, else in ``cfg.constants`` (``why`` names what needs it).
    ``latency=<fit.json>``: the loss law from one study (an isoFLOP study, where the frontier is identified) and the
    latency law from another (the shape study, where latency was measured); both must count N alike."""
    own = cfg.latency is None
    if own and str(cfg.constants) in cfg.presets.constants:
        raise ValueError(f"{why} needs constants=<fit.json> with a latency section, or latency=<fit.json>; the "
                         f"preset {cfg.constants!r} has none")
    path = Path(str(cfg.constants if own else cfg.latency))
    if not path.is_file():
        raise FileNotFoundError(f"latency={path} is not a file: give the fit.json scaling-latency wrote into")
    doc = read_fit_json(path)
    if not doc.get("latency"):
        raise ValueError(f"{path} has no latency section ({why} prices decode by it): run scaling-latency "
                         f"constants={path}")
    if not own and str(cfg.constants) not in cfg.presets.constants:
        constants = read_fit_json(Path(str(cfg.constants)))
        _check_counts_n_alike(f"latency={path}", doc, constants.get("provenance", {}).get("n_convention"))
    try:
        model = LatencyModel.from_dict(doc["latency"])
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path}: {err}") from None
    return model, {"latency": {k: v for k, v in doc["latency"].items() if k not in ("modes",)},
                   "n_convention": doc.get("provenance", {}).get("n_convention")}


def load_shape_inputs(cfg: DictConfig) -> tuple[LawConstants, LatencyModel, dict]:
    """The inference-efficient law, the latency law and the record of both (latency section, the fit's N
    convention) from the fit.json in ``cfg.constants``."""
    if cfg.objective != "cost":
        raise ValueError("shape.enabled=true prices decode by latency: it needs objective=cost")
    if str(cfg.constants) in cfg.presets.constants:
        raise ValueError(f"shape.enabled=true needs constants=<fit.json> with an inference_efficient law and a "
                         f"latency section; the preset {cfg.constants!r} has neither")
    if cfg.shape.decode_batch < 1:
        raise ValueError(f"shape.decode_batch must be >= 1, got {cfg.shape.decode_batch}")
    path = Path(str(cfg.constants))
    constants, _ = _law_from_fit(path, "inference_efficient", cfg.law.inference_efficient.formula)
    model, record = load_latency_law(cfg, "shape.enabled=true")
    return constants, model, record


def _exactly_one(section: DictConfig, a: str, b: str, name: str):
    given = [k for k in (a, b) if section[k] is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {name}.{a} or {name}.{b} (got {len(given)})")
    return given[0], float(section[given[0]])


def split_demand(cfg: DictConfig, tokens: float | None = None) -> planner.Inference:
    """Prefill and decode tokens of ``cfg.demand`` (or of ``tokens`` split like it), with speculative decoding."""
    demand, spec = cfg.demand, cfg.serving.speculative
    i, o = float(demand.input_tokens), float(demand.output_tokens)
    if min(i, o) < 0 or i + o == 0:
        raise ValueError(f"demand.input_tokens and demand.output_tokens must be >= 0 and not both 0, got {i}, {o}")
    if tokens is None:
        kind, amount = _exactly_one(demand, "tokens", "requests", "demand")
        if amount < 0:
            raise ValueError(f"demand.{kind} must be >= 0, got {amount:g}")
        tokens = amount * (i + o) if kind == "requests" else amount
    flops, time = ((1.0, 1.0) if not spec.enabled else
                   planner.speculative_factors(float(spec.acceptance_rate), int(spec.draft_tokens),
                                               float(spec.draft_cost_ratio)))
    return planner.Inference(tokens * i / (i + o), tokens * o / (i + o), flops, time)


def _peak_flops(side: DictConfig, dtype: str | None, gpus: DictConfig, name: str, why: str = "") -> float:
    if side.peak_flops is not None:
        return float(side.peak_flops)
    if side.gpu not in gpus:
        raise ValueError(f"unknown gpu hardware.{name}.gpu={side.gpu!r}: known {list(gpus)}; "
                         f"or give hardware.{name}.peak_flops")
    if dtype not in gpus[side.gpu]:
        raise ValueError(f"unknown dtype hardware.{name}.dtype={dtype!r}{why} for {side.gpu}: known "
                         f"{list(gpus[side.gpu])}; or give hardware.{name}.peak_flops")
    return float(gpus[side.gpu][dtype])


def inference_dtype(cfg: DictConfig) -> tuple[str | None, str]:
    """The key of ``presets.gpus`` inference is priced at: ``hardware.inference.dtype``, or the GPU entry of the
    serving mode ``serving.quantization`` (its ``peak_flops_dtype``); and where it came from."""
    if cfg.hardware.inference.dtype is not None:
        return str(cfg.hardware.inference.dtype), ""
    mode = mode_table.get(cfg.serving.quantization)
    cuda = mode.kernels.get("cuda")
    if cuda is None or cuda.peak_flops_dtype is None:
        if cfg.hardware.inference.peak_flops is not None:
            return None, ""
        raise ValueError(f"serving.quantization={mode.name} names no GPU peak FLOP/s (no cuda.peak_flops_dtype in "
                         f"{mode.source}): give hardware.inference.dtype=<key of presets.gpus> or "
                         f"hardware.inference.peak_flops")
    return cuda.peak_flops_dtype, f" (serving.quantization={mode.name}'s peak_flops_dtype)"


def resolve_hardware(cfg: DictConfig) -> tuple[planner.Prices, dict]:
    """Dollars per FLOP for training, prefill and decode, and the resolved hardware for the record."""
    train, inference, gpus = cfg.hardware.train, cfg.hardware.inference, cfg.presets.gpus
    dtype, why = inference_dtype(cfg)
    record = {"train": {**OmegaConf.to_container(train, resolve=True),
                        "peak_flops": _peak_flops(train, train.dtype, gpus, "train")},
              "inference": {**OmegaConf.to_container(inference, resolve=True), "dtype": dtype,
                            "peak_flops": _peak_flops(inference, dtype, gpus, "inference", why)}}
    tr, inf = record["train"], record["inference"]
    prices = planner.Prices(
        train=planner.dollars_per_flop(float(tr["price_per_hour"]), tr["peak_flops"], float(tr["mfu"])),
        prefill=planner.dollars_per_flop(float(inf["price_per_hour"]), inf["peak_flops"], float(inf["mfu_prefill"])),
        decode=planner.dollars_per_flop(float(inf["price_per_hour"]), inf["peak_flops"], float(inf["mfu_decode"])))
    record["dollars_per_flop"] = {"train": prices.train, "prefill": prices.prefill, "decode": prices.decode}
    return prices, record


def measurements(cfg: DictConfig) -> dict[str, dict | None]:
    """``quantization.json`` and ``speculative.json`` of ``serving.measurements`` (None where absent)."""
    folder = Path(str(cfg.serving.measurements)) if cfg.serving.measurements else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"serving.measurements={folder} is not a folder: give <results_dir>/serving/<sweep> "
                                f"(scaling-quantize and scaling-speculate write it)")
    docs = {}
    for name in ("quantization", "speculative"):
        path = folder / f"{name}.json" if folder else None
        docs[name] = json.loads(path.read_text()) if path and path.is_file() else None
    return docs


def quantization_penalty(cfg: DictConfig) -> tuple[float, str]:
    """The loss the classic plan's serving mode (``serving.quantization``) gives up, and where it came from: the
    given ``serving.loss_penalty`` (unless it is that of another ``serving.mode``), else its mean measured delta
    (``serving.measurements``), else 0 (Sardana et al.: quantization lowers the cost per FLOP and nothing else)."""
    mode = str(cfg.serving.quantization)
    if cfg.serving.loss_penalty is not None and cfg.serving.mode in (None, mode):
        penalty = float(cfg.serving.loss_penalty)
        if penalty < 0:
            raise ValueError(f"serving.loss_penalty must be >= 0, got {penalty}")
        return penalty, "serving.loss_penalty (given)"
    measured = serving_modes.measured_penalty(measurements(cfg)["quantization"], mode) if mode != "none" else None
    if measured is None:
        return 0.0, ("full precision" if mode == "none" else
                     f"not measured (no {mode} rows in serving.measurements): 0, as Sardana et al. assume")
    return measured[0], f"mean measured delta over {measured[1]} fully quantized runs ({cfg.serving.measurements})"


def target_loss(cfg: DictConfig, constants: LawConstants, frontier: planner.Frontier | None = None) -> dict:
    """The loss the served model must reach and the (lower) loss training must reach under quantization."""
    kind, value = _exactly_one(cfg.target, "loss", "chinchilla_params", "target")
    if kind == "chinchilla_params" and value <= 0:
        raise ValueError(f"target.chinchilla_params must be > 0, got {value:g}")
    served = value if kind == "loss" else planner.chinchilla_loss(constants, value, frontier)
    penalty, source = quantization_penalty(cfg)
    trained = served - penalty
    if not trained > constants["E"]:
        raise ValueError(f"target loss {served:g}" + (f" minus the quantization penalty {penalty:g}" if penalty else "")
                         + f" is not above the irreducible loss E = {constants['E']:g}: no finite model reaches it")
    return {kind: value, "served_loss": served, "loss_penalty": penalty, "loss_penalty_source": source,
            "trained_loss": trained}


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg``, plan, write ``<out>/plan.json`` and ``<out>/plan.png``, print the table; return the plan."""
    if cfg.objective not in planner.OBJECTIVES:
        raise ValueError(f"objective must be one of {planner.OBJECTIVES}, got {cfg.objective!r}")
    known = mode_table.names()
    if cfg.serving.quantization not in known:
        raise ValueError(f"unknown serving.quantization={cfg.serving.quantization!r}: known {known} (the serving "
                         f"modes' table conf/serving_mode/; your own: hydra.searchpath=[file://<dir>])")
    constants, source = load_chinchilla(cfg)
    frontier, draws, frontier_info = load_frontier(source, cfg.frontier)
    target = target_loss(cfg, constants, frontier)
    inference = split_demand(cfg)
    prices, hardware = resolve_hardware(cfg)
    shape_inputs = load_shape_inputs(cfg) if cfg.shape.enabled else None
    serving_inputs = load_serving_inputs(cfg) if cfg.serving.mode is not None else None

    result = planner.plan(constants, target["trained_loss"], inference, prices, cfg.objective, frontier)
    n = result["chinchilla"]["N"]
    frontier_info.update(tokens_per_param=result["chinchilla"]["tokens_per_param"],
                         n_convention=(source.get("provenance") or {}).get("n_convention", "as the constants count N"))
    if draws:  # the resamples' tokens for the same N: the ratio's interval
        ratios = [d.tokens(n) / n for d in draws]
        frontier_info["tokens_per_param_ci95"] = [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]
    if shape_inputs:
        result["shape"] = shape_plan(cfg, shape_inputs, constants, target["trained_loss"], inference, prices)
    if serving_inputs:
        result["serving_modes"] = plan_serving_modes(cfg, serving_inputs, constants, target["served_loss"],
                                                     inference, prices, shape_inputs)
    doc = {"schema_version": PLAN_SCHEMA_VERSION, "objective": cfg.objective,
           "constants": {**source, "params": dict(constants.values), "formula": constants.law.formula},
           "target": target, "frontier": frontier_info,
           "demand": {"prefill_tokens": inference.prefill_tokens, "decode_tokens": inference.decode_tokens,
                      **OmegaConf.to_container(cfg.demand)},
           "hardware": hardware,
           "serving": {**OmegaConf.to_container(cfg.serving),
                       "decode_flops_per_token": inference.decode_flops_per_token,
                       "decode_time_per_token": inference.decode_time_per_token},
           **result}
    doc["extrapolation"] = extrapolation(doc)
    out = Path(cfg.out)
    write_json_atomic(out / "plan.json", doc)
    plot(cfg, constants, target["trained_loss"], inference, prices, doc, out / "plan.png", frontier)
    print(table(doc))
    print(f"wrote {out / 'plan.json'} and {out / 'plan.png'}")
    tracking.log_plan(cfg, doc, out)
    return doc


EXTRAPOLATION_FACTOR = 10  # a planned N or D this far outside the fitted range is named


def extrapolation(doc: dict) -> list[str]:
    """The planned models' N and D that lie EXTRAPOLATION_FACTOR or more outside the range the constants were fitted
    on (a fit.json's ``provenance.fitted_range``; nothing for a preset): where the plan rests on the law alone."""
    fitted = ((doc["constants"].get("provenance") or {}).get("fitted_range")) or {}
    notes = []
    for label in ("chinchilla", "optimal"):
        for key in ("N", "D"):
            value, (lo, hi) = doc[label][key], fitted.get(key) or (None, None)
            if lo and value * EXTRAPOLATION_FACTOR <= lo:
                notes.append(f"{label} {key} {value:.3g} is {lo / value:.3g}x below the smallest {key} fitted ({lo:.3g})")
            elif hi and value >= EXTRAPOLATION_FACTOR * hi:
                notes.append(f"{label} {key} {value:.3g} is {value / hi:.3g}x above the largest {key} fitted ({hi:.3g})")
    return notes


def search_problem(cfg: DictConfig, law: LawConstants, latency: LatencyModel, target: float,
                   inference: planner.Inference, prices: planner.Prices,
                   constants: LawConstants) -> serving_modes.Problem:
    """The cost-optimal search for a model of ``target`` under ``law``: decode is one step of ``shape.decode_batch``
    sequences (the latency law's batch input), priced at the inference GPU-hour shared by them, a planned shape given
    a width its mode packs whole (INT4's group size: every block matrix quantized); D searched around the
    Chinchilla-style D of ``constants``."""
    batch = int(cfg.shape.decode_batch)

    def decode_ms(n_layers, d_model, mode):
        return latency.predict(n_layers, d_model, "decode_ms_per_token", batch, mode, packed="all")

    return serving_modes.Problem(law, target, inference, prices, decode_ms,
                                 float(cfg.hardware.inference.price_per_hour) / 3.6e6 / batch,
                                 serving_modes.token_range(constants, target))


def shape_plan(cfg: DictConfig, shape_inputs: tuple, constants: LawConstants, loss: float,
               inference: planner.Inference, prices: planner.Prices) -> dict:
    """``serving.shape_plan`` with ``cfg.shape``: the full-precision search, speculative decoding as
    ``serving.speculative`` sets it."""
    law, latency, record = shape_inputs
    problem = search_problem(cfg, law, latency, loss, inference, prices, constants)
    result = serving_modes.shape_plan(problem, (float(cfg.shape.aspect_ratio_min), float(cfg.shape.aspect_ratio_max)),
                                      float(cfg.shape.reference_aspect_ratio))
    return {**result, **record, "params": dict(law.values), "dollars_per_ms": problem.dollars_per_ms}


def load_serving_inputs(cfg: DictConfig) -> tuple[dict, list[str], LatencyModel, dict]:
    """The serving modes our measurements support, the ones asked for, and the latency law (every check here)."""
    mode = str(cfg.serving.mode)
    known = serving_modes.planned_modes()
    if mode not in (*known, "auto"):
        raise ValueError(f"serving.mode must be auto or one of {known}, got {mode!r} (the serving modes' table "
                         f"conf/serving_mode/; your own: hydra.searchpath=[file://<dir>])")
    if cfg.objective != "cost":
        raise ValueError("serving.mode prices decode by the measured latency law: it needs objective=cost")
    given = cfg.serving.loss_penalty
    if given is not None and float(given) < 0:
        raise ValueError(f"serving.loss_penalty must be >= 0, got {given}")
    if given is not None and mode in ("auto", "none", serving_modes.SPECULATIVE):
        raise ValueError(f"serving.loss_penalty replaces the measured penalty of one quantized serving.mode; "
                         f"serving.mode={mode} " + ("names several" if mode == "auto" else "is exact"))
    latency, record = load_latency_law(cfg, f"serving.mode={mode}")
    folder = Path(str(cfg.serving.measurements)) if cfg.serving.measurements else None
    if mode != "none" and given is None and (folder is None or not folder.is_dir()):
        raise FileNotFoundError(f"serving.mode={mode} needs serving.measurements=<results_dir>/serving/<sweep> "
                                f"(scaling-quantize and scaling-speculate write it) or, for a quantized mode, "
                                f"serving.loss_penalty=<delta>; got {folder}")
    docs = measurements(cfg)
    penalties = {mode: float(given)} if given is not None else None
    modes = serving_modes.modes_from_measurements(docs["quantization"], docs["speculative"], penalties)
    modes = {m: v for m, v in modes.items() if v.latency_mode in latency.modes}
    wanted = [m for m in known if m in modes] if mode == "auto" else [mode]
    if mode != "auto" and mode not in modes:
        raise ValueError(f"serving.mode={mode}: no measurement for it (in {folder} and the latency law's modes "
                         f"{sorted(latency.modes)}); measured: {sorted(modes)}")
    return modes, wanted, latency, {**record, "measurements": str(folder) if folder else None}


def plan_serving_modes(cfg: DictConfig, serving_inputs: tuple, constants: LawConstants, served_loss: float,
                       inference: planner.Inference, prices: planner.Prices, shape_inputs) -> dict:
    """Each serving mode's cheapest model of ``served_loss`` and the chosen mode (``fit/plan/serving.py``)."""
    modes, wanted, latency, record = serving_inputs
    shape = cfg.shape
    law = shape_inputs[0] if shape_inputs else constants  # with a shape: the inference-efficient law
    ratios = (float(shape.aspect_ratio_min), float(shape.aspect_ratio_max)) if shape_inputs else None
    # each mode carries its own decode factors (serving.speculative.* belongs to the classic plan)
    plain = planner.Inference(inference.prefill_tokens, inference.decode_tokens)
    problem = search_problem(cfg, law, latency, served_loss, plain, prices, constants)
    result = serving_modes.serving_plan(problem, modes, wanted, ratios, float(shape.reference_aspect_ratio))
    return {"requested": str(cfg.serving.mode), **result, "law": "inference_efficient" if shape_inputs else
            "chinchilla", "dollars_per_ms": problem.dollars_per_ms, "decode_batch": int(shape.decode_batch), **record}


def serving_table(section: dict) -> str:
    lines = ["", f"serving modes (requested {section['requested']}; loss law {section['law']}; decode priced by the "
                 f"{section['latency'].get('device', '?')} latency law per mode)",
             f"{'mode':>12}{'N':>11}{'D':>11}{'R':>8}{'penalty':>10}{'decode ms':>11}{'train $':>11}"
             f"{'infer $':>11}{'total $':>11}{'vs none':>9}"]
    for name, o in section["modes"].items():
        if not math.isfinite(o["total_cost"]):
            lines.append(f"{name:>12}  does not reach the target")
            continue
        vs = "" if o.get("cost_vs_none") is None else f"{100 * o['cost_vs_none']:.2f}%"
        lines.append(f"{name:>12}{o['N']:11.4g}{o['D']:11.4g}{o['R']:8.3g}{o['loss_penalty']:10.3g}"
                     f"{o['decode_ms_per_token']:11.4g}{o['train_cost']:11.4g}{o['inference_cost']:11.4g}"
                     f"{o['total_cost']:11.4g}{vs:>9}" + ("  <- chosen" if name == section["chosen"] else ""))
    for name, o in section["modes"].items():
        if "source" in o:
            lines.append(f"   {name}: {o['source']}")
    edge = [name for name, o in section["modes"].items() if o.get("D_at_bound")]
    if edge:
        lo, hi = serving_modes.TOKEN_RANGE
        lines.append(f"   note: D sits at the search's edge (e^{lo:g} to e^{hi:g} x the Chinchilla D) for {edge}: "
                     f"decode cost barely changes with N there, so the cheapest model is as small and as over-trained "
                     f"as allowed")
    return "\n".join(lines)


def table(doc: dict) -> str:
    """The plan as a fixed-width text table (4 significant figures)."""
    c, o, r = doc["chinchilla"], doc["optimal"], doc["ratios"]
    constants = doc["constants"].get("preset") or doc["constants"]["fit_json"]
    lines = [f"constants {constants}; objective {doc['objective']}; served loss {doc['target']['served_loss']:.4g} "
             f"(trained {doc['target']['trained_loss']:.4g}); demand {doc['demand']['prefill_tokens']:.4g} prefill + "
             f"{doc['demand']['decode_tokens']:.4g} decode tokens",
             f"{'':16}{'chinchilla':>12}{'optimal':>12}{'optimal/chin':>14}"]
    for key in planner.REPORTED:
        ratio = "" if r[key] is None else f"{100 * r[key]:.2f}%"
        lines.append(f"{key:16}{c[key]:12.4g}{o[key]:12.4g}{ratio:>14}")
    f = doc.get("frontier") or {}
    if f.get("source") == "approach2":
        lines.append(f"the Chinchilla-style model lies on Approach 2's frontier (isoFLOP minima: N_opt ~ C^{f['a']:.3f}, "
                     f"D_opt ~ C^{f['b']:.3f}), not the law's: {f['why']}")
    elif doc["constants"].get("not_identified"):
        lines.append(f"warning: the fit did not identify {doc['constants']['not_identified']}; the plan inherits that")
    if f.get("tokens_per_param"):
        ci = f.get("tokens_per_param_ci95")
        lines.append(f"Chinchilla-style tokens per parameter: {f['tokens_per_param']:.4g}"
                     + (f" [{ci[0]:.4g}, {ci[1]:.4g}] (95%, the isoFLOP resamples)" if ci else "")
                     + f", N counted as {f['n_convention']}")
    lines.append(f"saving in total {'FLOPs' if doc['objective'] == 'flops' else 'cost'}: {100 * doc['saving']:.4g}%")
    if doc.get("extrapolation"):
        lines.append("warning: the plan extrapolates the law: " + "; ".join(doc["extrapolation"]))
    if "serving_modes" in doc:
        lines.append(serving_table(doc["serving_modes"]))
    if "shape" in doc:
        shape = doc["shape"]
        models = ("chinchilla", "optimal_at_reference_shape", "optimal")
        device = shape["latency"].get("device", "?")
        lines += ["", f"with shape (inference-efficient law, decode priced by the {device} latency model)",
                  f"{'':20}{'chinchilla':>12}{'opt. at ref R':>14}{'optimal':>12}{'optimal/chin':>14}"]
        for key in ("N", "D") + serving_modes.SHAPE_REPORTED + ("train_cost", "inference_cost", "total_cost"):
            ratio = shape["ratios"].get(key)
            lines.append(f"{key:20}{shape[models[0]][key]:12.4g}{shape[models[1]][key]:14.4g}"
                         f"{shape[models[2]][key]:12.4g}" + (f"{100 * ratio:13.2f}%" if ratio else ""))
        lines.append(f"saving in total cost: {100 * shape['saving']:.4g}%"
                     + (" (optimal R at the edge of [shape.aspect_ratio_min, max]: widen it)" if shape["R_at_bound"]
                        else ""))
        if shape["n_convention"] != "non_embedding":
            lines.append(f"note: shapes count N without embeddings (models/shapes.py); this fit's N convention is "
                         f"{shape['n_convention']!r}, so n_layers and d_model are upper estimates")
    return "\n".join(lines)


def plot(cfg: DictConfig, constants: LawConstants, loss: float, inference: planner.Inference,
         prices: planner.Prices, doc: dict, path: Path, frontier: planner.Frontier | None = None) -> None:
    """Optimal N and D (left) and the saving (right) against lifetime inference demand around the requested one."""
    reference = inference if inference.tokens > 0 else split_demand(cfg, tokens=doc["chinchilla"]["D"])
    factors = np.logspace(-cfg.plot.decades_below, cfg.plot.decades_above, cfg.plot.points)
    sweep = [planner.plan(constants, loss, reference.scaled(f), prices, cfg.objective, frontier) for f in factors]
    tokens = factors * reference.tokens
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, colour in (("N", "tab:blue"), ("D", "tab:orange")):
        left.loglog(tokens, [s["optimal"][key] for s in sweep], color=colour, label=f"optimal {key}")
        left.axhline(doc["chinchilla"][key], color=colour, ls="--", lw=1, label=f"Chinchilla-style {key}")
    left.set_ylabel("parameters / training tokens")
    right.semilogx(tokens, [100 * s["saving"] for s in sweep], color="tab:green")
    right.set_ylabel(f"saving in total {'FLOPs' if cfg.objective == 'flops' else 'cost'} (%)")
    for ax in (left, right):
        if inference.tokens > 0:
            ax.axvline(inference.tokens, color="grey", ls=":", lw=1, label="requested demand")
        ax.set_xlabel("lifetime inference demand (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"loss {loss:.4g}, objective {cfg.objective}, constants {doc['constants'].get('preset', 'fit.json')}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan_command(cfg: DictConfig) -> None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.out = HydraConfig.get().runtime.output_dir  # <out>/<job number>
    run(cfg)
