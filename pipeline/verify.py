"""Verify a selection on our own trained models (the last step of ``make demo`` before planning).

    scaling-verify sweep=demo constants=results/fit/demo/fit.json

At N = ``params_factor`` x the sweep's largest model (counted as the fit counts N), ``scaling-select`` (its
``run``) picks the Morph shape: the fastest within ``loss_tolerance`` of the best predicted loss. The conventional
shape is the candidate of that size whose aspect ratio is nearest the sweep's median. Both are trained for real by
``scaling-train`` (two processes in parallel, ``threads`` each, the sweep's training protocol from
``conf/launch/sweep/<train_preset>``, records in ``<results_dir>/<name>/``) on the same D. Their latencies are then
re-measured back to back on ``device`` (interleaved rounds, so both see the same machine load), and predicted vs
measured loss and latency are written to ``<out>/verification.json`` and printed, with whether the Morph claim
(faster at nearly equal loss: measured loss within the tolerance of the conventional shape's) held. Configuration:
``conf/verify.yaml``.

The three latencies compared (the latency law's prediction, the records' measurement after training and the
re-measurement) must come from one device, dtype and graph mode: a law of another device, or runs that would train
(and measure their records' latency) on another device kind than ``device``, is refused in one line before
anything is trained.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from scaling_lab.conf import compose
from scaling_lab.fit import tracking
from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.fit.io import store
from scaling_lab.fit.latency import MissingLatency, load_latency
from scaling_lab.pipeline import device as devices
from scaling_lab.pipeline import select as select_cli
from scaling_lab.pipeline.latency import measure_shapes, protocol_defaults
from scaling_lab.fit.io.store import load_table

N_COLUMN = {"non_embedding": "params_non_embedding", "total": "params_total"}


def sweep_reference(cfg: DictConfig, convention: str) -> dict:
    """The sweep's largest N (in the fit's convention) and median aspect ratio."""
    table = load_table(cfg.results_dir, cfg.sweep)
    table = table[table.status == "ok"]
    if table.empty:
        raise ValueError(f"no finished runs in {cfg.results_dir}/{cfg.sweep}")
    if convention not in N_COLUMN:
        raise ValueError(f"the fit's N convention is {convention!r}; verification needs total or non_embedding")
    return {"largest_N": float(table[N_COLUMN[convention]].max()), "median_R": float(table.aspect_ratio.median()),
            "runs": int(len(table))}


def conventional(candidates: pd.DataFrame, aspect_ratio: float, target_n: float) -> dict:
    """The candidate with the aspect ratio nearest ``aspect_ratio`` (in log), then the N nearest ``target_n``."""
    gap = (candidates.R / aspect_ratio).map(math.log).abs() + 1e-3 * (candidates.N / target_n).map(math.log).abs()
    return candidates.loc[gap.idxmin()].to_dict()


def train_overrides(cfg: DictConfig, shape: dict, tokens: int) -> list[str]:
    return [f"sweep={cfg.train_preset}", f"sweep.name={cfg.name}", f"results_dir={cfg.results_dir}",
            f"model.n_layers={int(shape['n_layers'])}", f"model.d_model={int(shape['d_model'])}",
            "model.params=null", "model.aspect_ratio=null", f"model.head_dim={cfg.arch.head_dim}",
            f"train.tokens={tokens}", "train.tokens_per_param=null", "train.flops=null",
            f"train.threads={cfg.threads}", *cfg.train_overrides]


def train_both(cfg: DictConfig, shapes: dict[str, dict], tokens: int, out: Path) -> dict[str, dict]:
    """Train every shape with ``scaling-train`` in parallel processes; returns each one's record row."""
    jobs = {}
    for label, shape in shapes.items():
        log = open(out / f"train_{label}.log", "w")
        cmd = [sys.executable, "-m", "scaling_lab.pipeline.train", *train_overrides(cfg, shape, tokens)]
        print(f"training {label}: n_layers={shape['n_layers']} d_model={shape['d_model']} on {tokens:,} tokens "
              f"(log: {log.name})", flush=True)
        jobs[label] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    for label, (proc, log) in jobs.items():
        proc.wait()
        log.close()
        if proc.returncode:
            raise RuntimeError(f"training the {label} shape failed (exit {proc.returncode}); see {log.name}")
    table = load_table(cfg.results_dir, cfg.name)
    rows = {}
    for label, shape in shapes.items():
        match = table[(table.n_layers == shape["n_layers"]) & (table.d_model == shape["d_model"])
                      & ((table.tokens_budget - tokens).abs() < table.seq_len) & (table.status == "ok")]
        if match.empty:  # the budget is rounded to whole sequences, hence the tolerance
            raise RuntimeError(f"no ok record of the {label} shape in {cfg.results_dir}/{cfg.name}")
        rows[label] = match.sort_values("finished_at").iloc[-1].to_dict()
    return rows


def record_conditions(cfg: DictConfig, shape: dict, tokens: int) -> dict | None:
    """How the trained runs' records will measure latency (device kind, serving dtype, graph mode), read from the
    training config before training: ``train.accelerator`` (``auto``: a GPU when one is visible); None when
    ``latency.enabled`` is false."""
    train_cfg = compose("train", train_overrides(cfg, shape, tokens))
    if not train_cfg.latency.enabled:
        return None
    accelerator = str(train_cfg.train.accelerator)
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    kind = "cuda" if gpu else "cpu"
    graph = devices.graph_name(kind == "cuda")  # the records measure with graph=auto
    return {"device": kind, "dtype": str(devices.serving_dtype(kind)).replace("torch.", ""), "graph": graph,
            "accelerator": accelerator}


def check_training_device(cfg: DictConfig, shape: dict, tokens: int, here: dict) -> None:
    """Refuse, before training, runs whose records would measure latency on another device kind, dtype or graph mode
    than the re-measurement here."""
    planned = record_conditions(cfg, shape, tokens)
    if planned is None:
        return
    devices.check_comparable(planned, {**here, "device": here["device"].split(":")[0]},  # device kinds compared
                             f"the runs' records (trained with train.accelerator={planned['accelerator']})",
                             f"the re-measurement here (device={cfg.device}, graph={cfg.graph})")


def remeasure(cfg: DictConfig, shapes: dict[str, dict], device) -> tuple[dict[str, float], dict]:
    """Decode ms/token (batch 1) of both shapes on ``device``, measured back to back in interleaved rounds, same
    protocol; the fastest round of each, as the latency law reduces rounds; and how they were measured (device,
    dtype, threads, graph)."""
    protocol = protocol_defaults(cfg.results_dir, cfg.sweep)
    torch.set_num_threads(int(cfg.threads))
    configs = [select_cli.gpt_config(cfg.arch, s["n_layers"], s["d_model"]) for s in shapes.values()]
    rows = measure_shapes(configs, {**protocol, "batch_sizes": [1]}, device, rounds=cfg.remeasure_rounds,
                          log=lambda _: None, graph=cfg.graph)
    fastest = pd.DataFrame(rows).groupby(["n_layers", "d_model"]).decode_ms_per_token.min()
    how = {k: rows[0][k] for k in ("device", "dtype", "threads", "graph")}
    return {label: float(fastest[c.n_layers, c.d_model]) for label, c in zip(shapes, configs)}, how


def run(cfg: DictConfig) -> dict:
    """Select at the verification size, train both shapes, re-measure, compare; returns verification.json."""
    fit_path = Path(str(cfg.constants))
    convention = read_fit_json(fit_path).get("provenance", {}).get("n_convention")
    device = devices.resolve(cfg.device)
    here = devices.conditions(device, devices.use_graph(cfg.graph, device))
    if not cfg.measure:  # the selection's latency is the law's: it must describe the device re-measured here
        try:
            law = load_latency(fit_path)
        except MissingLatency:
            law = None  # the selection says what to do
        if law is not None:
            devices.check_comparable(law.meta, here, f"the latency law of {fit_path}",
                                     f"the re-measurement here (device={cfg.device}, graph={cfg.graph})")
    ref = sweep_reference(cfg, convention)
    target_n = cfg.params_factor * ref["largest_N"]
    tokens = int(round(cfg.tokens_per_param * target_n))
    out = Path(str(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    print(f"== verification at N = {cfg.params_factor:g} x {ref['largest_N']:.4g} = {target_n:.4g} "
          f"({convention}), D = {tokens:,} tokens; conventional R = the sweep's median {ref['median_R']:.4g}")
    select_cfg = compose("select", [
        f"constants={fit_path}", f"budget.params={target_n}",
        f"budget.band={cfg.band}", f"budget.tokens={tokens}", f"select.loss_tolerance={cfg.loss_tolerance}",
        f"select.measure={str(cfg.measure).lower()}", f"select.device={cfg.device}", f"select.graph={cfg.graph}",
        f"out={out / 'selection'}"])
    select_cfg.arch = cfg.arch  # the family chosen for the verification (arch=...), not select.yaml's default
    select_cfg.logger = cfg.logger  # its W&B run as the verification's (logger=none: none)
    selection = select_cli.run(select_cfg)
    candidates = pd.read_csv(out / "selection" / "candidates.csv")
    shapes = {"morph": selection["chosen"], "conventional": conventional(candidates, ref["median_R"], target_n)}
    same = (shapes["morph"]["n_layers"], shapes["morph"]["d_model"]) == (shapes["conventional"]["n_layers"],
                                                                       shapes["conventional"]["d_model"])
    check_training_device(cfg, shapes["morph"], tokens, here)
    trained = train_both(cfg, {"morph": shapes["morph"]} if same else shapes, tokens, out)
    if same:
        trained["conventional"] = trained["morph"]
    records = {r["run_id"]: r for r in store.iter_records(cfg.results_dir, cfg.name)}
    for label, row in trained.items():
        measured = (records.get(row["run_id"]) or {}).get("latency")
        if measured:
            devices.check_comparable(measured, here, f"the {label} run's record ({row['run_id']})",
                                     f"the re-measurement here (device={cfg.device}, graph={cfg.graph})")
    latency, how = remeasure(cfg, shapes, device)
    result = {"sweep": cfg.sweep, "fit_json": str(fit_path.resolve()), "n_convention": convention,
              "reference": ref, "target_N": target_n, "tokens": tokens, "loss_tolerance": cfg.loss_tolerance,
              "latency_source": selection["latency"]["source"], **how, "models": {}}
    for label, shape in shapes.items():
        row = trained[label]
        result["models"][label] = {
            "n_layers": int(shape["n_layers"]), "d_model": int(shape["d_model"]), "R": float(shape["R"]),
            "N": float(shape["N"]), "run_id": row["run_id"],
            "loss_predicted": float(shape["loss"]), "loss_measured": float(row["loss"]),
            "latency_predicted_ms": float(shape["latency_ms"]),
            "latency_record_ms": (float(row["decode_ms_per_token"]) if pd.notna(row.get("decode_ms_per_token"))
                                  else None),
            "latency_remeasured_ms": float(latency[label]),
            "train_s": float(row["train_s"]) if row.get("train_s") is not None else None}
    m, c = result["models"]["morph"], result["models"]["conventional"]
    loss_ratio = m["loss_measured"] / c["loss_measured"]
    speedup = c["latency_remeasured_ms"] / m["latency_remeasured_ms"]
    result["claim"] = {
        "same_shape": same,
        "speedup_measured": speedup, "speedup_predicted": c["latency_predicted_ms"] / m["latency_predicted_ms"],
        "loss_ratio_measured": loss_ratio, "loss_ratio_predicted": m["loss_predicted"] / c["loss_predicted"],
        "faster": (not same) and speedup > 1, "nearly_equal_loss": loss_ratio <= 1 + cfg.loss_tolerance,
    }
    result["claim"]["held"] = result["claim"]["faster"] and result["claim"]["nearly_equal_loss"]
    write_json_atomic(out / "verification.json", result)
    print(format_verification(result))
    print(f"wrote {out / 'verification.json'}")
    tracking.log_verify(cfg, result, out)
    return result


def format_verification(result: dict) -> str:
    lines = ["== selection verified on trained models (loss: held-out nats/token; latency: decode ms/token, batch 1, "
             f"on {result['device']} in {result['dtype']}, decode {result['graph']}, {result['threads']} thread(s))",
             f"   {'shape':<13} {'n_layers':>8} {'d_model':>7} {'R':>6} {'N':>9} {'loss pred':>9} {'measured':>9} "
             f"{'lat pred':>8} {'record':>7} {'re-meas':>7}"]
    for label, m in result["models"].items():
        lines.append(f"   {label:<13} {m['n_layers']:>8} {m['d_model']:>7} {m['R']:>6.3g} {m['N']:>9.4g} "
                     f"{m['loss_predicted']:>9.4f} {m['loss_measured']:>9.4f} {m['latency_predicted_ms']:>8.3g} "
                     f"{_ms(m['latency_record_ms']):>7} {m['latency_remeasured_ms']:>7.3g}")
    c = result["claim"]
    if c["same_shape"]:
        lines.append("   the selection is the conventional shape: no Morph claim to check at this size")
    else:
        lines.append(f"   Morph vs conventional: {c['speedup_measured']:.2f}x faster measured "
                     f"({c['speedup_predicted']:.2f}x predicted), loss x{c['loss_ratio_measured']:.4f} measured "
                     f"(x{c['loss_ratio_predicted']:.4f} predicted; tolerance {1 + result['loss_tolerance']:.4g})")
        lines.append(f"   Morph claim (faster at nearly equal loss): {'HELD' if c['held'] else 'NOT HELD'}"
                     + ("" if c["held"] else f" (faster: {c['faster']}, nearly equal loss: {c['nearly_equal_loss']})"))
    return "\n".join(lines)


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3g}"
