"""``scaling-quantize``: what post-training quantization (INT8, INT4, or any mode of the serving modes' table,
``conf/serving_mode/``) costs a sweep's trained models in loss, and what it saves in weight bytes and decode time;
then the penalty law ``delta = k D^a / N^b`` fitted per mode.

For every chosen ``ok`` run with saved weights (``train.save_model=true``), served on ``cfg.device`` in its serving
dtype (``pipeline/device.py``), and every mode of ``cfg.modes`` (``pipeline/serving.py``): weight bytes, the
held-out loss on the run's fixed evaluation slice, and prefill and decode latency with the training runs' protocol
(``pipeline.latency.measure``), each beside the full-precision model's, measured in the same process right before.
Writes ``<out>/quantization.csv`` (one row per run and mode) and ``<out>/quantization.json`` (the rows, every run's
skipped layers, the protocol, the penalty fits). The penalty law is fitted by the fit stage (``scaling-fit`` on that
CSV, ``law=quant_penalty``) into ``<out>/penalty_<mode>/`` and printed beside the published exponents.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from scaling_lab.conf import compose
from scaling_lab.fit import tracking
from scaling_lab.fit.io.files import write_csv_atomic, write_json_atomic
from scaling_lab.pipeline import device as devices
from scaling_lab.pipeline import serving
from scaling_lab.pipeline.latency import PROTOCOL, measure, protocol_defaults

# Published exponents of the same law (delta = k D^a / N^b), printed beside ours.
PUBLISHED = {"Kumar et al. 2024 (arXiv 2411.04330)": (0.5068, 0.3439),
             "Ouyang et al. 2024 (arXiv 2411.17691)": (0.5251, 0.2261)}


def run(cfg: DictConfig) -> dict:
    modes = [str(m) for m in cfg.modes]
    known = serving.modes()
    bad = [m for m in modes if m not in known]
    if bad or not modes:
        raise serving.ServingInputError(f"modes must be some of {known} (conf/serving_mode/; your own: "
                                        f"hydra.searchpath=[file://<dir>] with <dir>/serving_mode/<name>.yaml), got "
                                        f"{modes}")
    device = devices.resolve(cfg.device)
    group_size = None if cfg.group_size is None else int(cfg.group_size)
    serving.check_modes(modes, device, group_size)
    records = serving.pick_records(serving.ok_records(cfg.results_dir, cfg.sweep), list(cfg.runs), cfg.results_dir,
                                   cfg.sweep, rows=cfg.rows)
    protocol = protocol_defaults(cfg.results_dir, cfg.sweep)
    protocol.update({k: v for k, v in cfg.measure.items() if v is not None and k in PROTOCOL})
    threads = cfg.threads or protocol.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    print(f"quantizing {len(records)} runs of {cfg.sweep} to {modes} on {devices.device_name(device)}"
          + (f" (group size {group_size})" if group_size else "") + "; latency: "
          f"prompt {protocol['prompt_len']}, {protocol['decode_tokens']} decode tokens, batch "
          f"{protocol['batch_sizes'][0]}, {torch.get_num_threads()} threads")

    rows, reports = [], {}
    started = time.time()
    for i, record in enumerate(sorted(records, key=lambda r: r["params"]["non_embedding"])):
        model = devices.serving_copy(serving.load_model(record, cfg.results_dir), device)
        _, windows = serving.eval_windows(record)
        loss_full = serving.heldout_loss(model, windows)
        bytes_full = serving.weight_bytes(model)
        lat_full = _latency(model, protocol)
        reports[record["run_id"]] = {}
        for mode in modes:
            qmodel, report = serving.quantize(model, mode, group_size)
            loss_q = serving.heldout_loss(qmodel, windows)
            lat_q = _latency(qmodel, protocol)
            reports[record["run_id"]][mode] = report
            rows.append({
                "run_id": record["run_id"], "mode": mode, "group_size": report["group_size"],
                "n_layers": record["shape"]["n_layers"], "d_model": record["shape"]["d_model"],
                "params_non_embedding": record["params"]["non_embedding"], "params_total": record["params"]["total"],
                "tokens_seen": record["tokens"]["seen"],
                "tokens_per_param": record["tokens"]["seen"] / record["params"]["non_embedding"],
                "loss_full": loss_full, "loss_quantized": loss_q, "loss_delta": loss_q - loss_full,
                "weight_bytes_full": bytes_full, "weight_bytes_quantized": serving.weight_bytes(qmodel),
                "decode_ms_per_token_full": lat_full["decode_ms_per_token"],
                "decode_ms_per_token_quantized": lat_q["decode_ms_per_token"],
                "prefill_ms_full": lat_full["prefill_ms"], "prefill_ms_quantized": lat_q["prefill_ms"],
                "layers_quantized": len(report["quantized"]), "layers_skipped": len(report["skipped"]),
            })
            del qmodel
        print(f"  [{i + 1}/{len(records)}] {record['run_id']} L={record['shape']['n_layers']} "
              f"d={record['shape']['d_model']}: loss {loss_full:.4f}, "
              + ", ".join(f"{r['mode']} {r['loss_delta']:+.4f}" for r in rows[-len(modes):]))
    table = pd.DataFrame(rows)
    table["bytes_ratio"] = table.weight_bytes_quantized / table.weight_bytes_full
    table["decode_speedup"] = table.decode_ms_per_token_full / table.decode_ms_per_token_quantized
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "quantization.csv", table)
    penalties = fit_penalties(cfg, out / "quantization.csv", table, modes) if cfg.penalty.fit else {}
    doc = {"schema_version": 1, "sweep": cfg.sweep, "modes": modes, "group_size": group_size,
           "device": lat_full["device"], "threads": torch.get_num_threads(),
           "protocol": {k: protocol[k] for k in ("prompt_len", "decode_tokens", "warmup", "repeats")},
           "batch": int(protocol["batch_sizes"][0]),
           "quantized": "every nn.Linear of the blocks the mode packs; embedding, positions, layer norms and the "
                        "(tied) output head stay in full precision",
           "rows": table.to_dict(orient="records"), "layers": reports, "penalty": penalties,
           "wall_s": time.time() - started}
    write_json_atomic(out / "quantization.json", doc)
    tracking.log_serving(cfg, "quantize", cfg.sweep, cfg.results_dir, out)
    print(format_table(table))
    for mode, p in penalties.items():
        print(format_penalty(mode, p))
    print(f"wrote {out / 'quantization.csv'} and {out / 'quantization.json'}")
    return doc


def _latency(model, protocol) -> dict:
    batch = [int(protocol["batch_sizes"][0])]
    return measure(model, int(protocol["prompt_len"]), int(protocol["decode_tokens"]), batch,
                   int(protocol["warmup"]), int(protocol["repeats"]))


def fit_penalties(cfg: DictConfig, csv: Path, table: pd.DataFrame, modes: list[str]) -> dict:
    """The penalty law fitted per mode by the fit stage, on the rows whose delta is positive (a power law's
    domain); a mode with too few such rows is reported, not fitted."""
    from scaling_lab.fit.fitting import cli as fit_cli

    fits = {}
    for mode in modes:
        if mode == "none":
            continue
        rows = table[(table["mode"] == mode)]
        if cfg.penalty.fully_quantized_only:  # a run whose layers were partly skipped measures less than the mode
            rows = rows[rows.layers_skipped == 0]
        positive = int((rows.loss_delta > 0).sum())
        what = "fully quantized " if cfg.penalty.fully_quantized_only else ""
        if positive < int(cfg.penalty.min_rows) or rows.params_non_embedding.nunique() < 2:
            fits[mode] = {"fitted": False, "why": f"{positive} of {len(rows)} {what}runs have loss_delta > 0 "
                          f"(need {cfg.penalty.min_rows}, over at least 2 sizes)",
                          "mean_delta": float(rows.loss_delta.mean()) if len(rows) else None}
            continue
        fit_out = Path(cfg.out) / f"penalty_{mode}"
        fit_cfg = compose("fit", [
            "source=csv", f"source.path={csv}", "source.columns.N=params_non_embedding",
            "source.columns.D=tokens_seen", "source.columns.loss=loss_delta", "source.n_convention=non_embedding",
            f"source.rows='mode == \"{mode}\" and loss_delta > 0"
            + (" and layers_skipped == 0" if cfg.penalty.fully_quantized_only else "") + "'",
            "law=[quant_penalty]", "plots=false",
            f"bootstrap.n={int(cfg.penalty.bootstrap)}", f"out={fit_out}", "isoflop.enabled=false"])
        doc = fit_cli.run(fit_cfg)
        law = doc["laws"]["quant_penalty"]
        fits[mode] = {"fitted": True, "fit_json": str(fit_out / "fit.json"), "rows": positive, "of": len(rows),
                      "params": law["params"], "ci95": law.get("ci95", {}),
                      "not_identified": law.get("not_identified", [])}
    return fits


def format_table(table: pd.DataFrame) -> str:
    lines = ["== quantization (held-out loss in nats/token; bytes of all weights; decode ms/token at batch 1)",
             f"   {'run_id':>12} {'mode':>4} {'L':>2} {'d':>4} {'N':>8} {'D/N':>5} {'loss':>7} {'delta':>9} "
             f"{'bytes':>6} {'decode ms':>9} {'speedup':>7} {'skipped':>7}"]
    for r in table.itertuples():
        lines.append(f"   {r.run_id:>12} {r.mode:>4} {r.n_layers:>2} {r.d_model:>4} {r.params_non_embedding:>8.3g} "
                     f"{r.tokens_per_param:>5.3g} {r.loss_full:>7.4f} {r.loss_delta:>+9.5f} {r.bytes_ratio:>6.3f} "
                     f"{r.decode_ms_per_token_quantized:>9.3f} {r.decode_speedup:>6.2f}x "
                     f"{r.layers_skipped:>3}/{r.layers_skipped + r.layers_quantized}")
    for mode, rows in table.groupby("mode"):
        lines.append(f"   {mode}: mean delta {rows.loss_delta.mean():+.5f} nats (median {rows.loss_delta.median():+.5f},"
                     f" max {rows.loss_delta.max():+.5f}); bytes x{rows.bytes_ratio.median():.3f}; decode speed "
                     f"x{rows.decode_speedup.median():.2f} (median over runs)")
    return "\n".join(lines)


def format_penalty(mode: str, p: dict) -> str:
    if not p.get("fitted"):
        return f"== penalty law {mode}: not fitted ({p['why']}); mean delta {p.get('mean_delta')}"
    v, ci = p["params"], p["ci95"]

    def interval(name):
        return f" [{ci[name][0]:.3g}, {ci[name][1]:.3g}]" if name in ci else ""

    lines = [f"== penalty law {mode}: delta = {v['k']:.3g} D^{v['a']:.3f} / N^{v['b']:.3f}  "
             f"(scaling-fit on {p['rows']} of {p['of']} runs with delta > 0; 95% bootstrap a{interval('a')}, "
             f"b{interval('b')})"]
    for name, (a, b) in PUBLISHED.items():
        lines.append(f"   {name}: a {a:.2f}, b {b:.2f}")
    longer = ("yes" if v["a"] > 0 and ci.get("a", (1, 1))[0] > 0 else
              "not resolved (the interval of a includes 0)" if "a" in ci and ci["a"][0] <= 0 <= ci["a"][1] else
              "no" if v["a"] <= 0 else "a > 0, no interval")
    lines.append(f"   models trained longer suffer more (a > 0)? {longer}"
                 + (f"; not identified: {p['not_identified']}" if p["not_identified"] else ""))
    return "\n".join(lines)
