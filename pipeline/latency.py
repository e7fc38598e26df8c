"""Inference latency, measured: prefill time for a prompt and per-token decode time with the KV cache.

The protocol is the same for trained models (after each training run) and for randomly initialised shapes
(``scaling-latency``, since latency does not depend on the weights' values): for each batch size, ``warmup``
untimed passes, then ``repeats`` timed ones; we report the median and the spread (min, max, and the interquartile
range relative to the median). Every timing is bracketed by ``pipeline.device.synchronize``.

A model is measured as it is served (``pipeline.device.serving_copy``: bf16 on CUDA, fp32 on the CPU, KV cache in
the same dtype), never under autocast. Decode runs eagerly (a ``KVCache``, one forward per token), or, with
``graph`` (by default on CUDA), by replaying a CUDA graph of ``GPT.decode_step`` over a ``StaticKVCache``, captured
once per batch size before the timed passes; prefill is the same eager forward in both. Every result carries
``device``, ``dtype``, ``threads`` and ``graph``.

``scaling-latency`` (``main``, configuration ``conf/latency_cli.yaml``) measures any list of shapes this way, writes
``<out>/latency.csv``, fits the latency law per serving mode (``fit/latency.py``) and writes its section to
``<out>/latency.json`` and, with ``constants=<fit.json>``, into that file. A fit never mixes devices, dtypes or
graph modes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from scaling_lab.conf import UserError
from scaling_lab.fit import tracking
from scaling_lab.fit.io.fitfile import read_fit_json
from scaling_lab.fit.io.files import write_csv_atomic, write_json_atomic
from scaling_lab.fit.latency import LatencyModel, check_aggregate, fit_latency, merge_into_fit_json, reduce_rounds
from scaling_lab.models.gpt import GPT
from scaling_lab.models.shapes import GPTConfig, resolve_shape
from scaling_lab.conf.train_schema import LatencyConf
from scaling_lab.fit.io.store import iter_records, load_table
from scaling_lab.pipeline import device as devices


def _timed(fn, device) -> float:
    devices.synchronize(device)
    start = time.perf_counter()
    fn()
    devices.synchronize(device)
    return time.perf_counter() - start


def _summary(samples_ms: list[float]) -> dict:
    q = statistics.quantiles(samples_ms, n=4) if len(samples_ms) > 1 else [samples_ms[0]] * 3
    median = statistics.median(samples_ms)
    return {"median": median, "min": min(samples_ms), "max": max(samples_ms),
            "iqr_rel": (q[2] - q[0]) / median if median else 0.0}


@torch.inference_mode()
def measure(model: GPT, prompt_len: int, decode_tokens: int, batch_sizes: list[int], warmup: int = 2,
            repeats: int = 5, graph: str | bool | None = None) -> dict:
    """Measure prefill and per-token decode latency of ``model`` as it is: on its own device, in its own dtype (pass
    a ``pipeline.device.serving_copy``). ``graph``: decode by replaying a captured CUDA graph (``auto``/None: on
    CUDA; ``pipeline.device.use_graph``)."""
    cfg = model.config
    if prompt_len + decode_tokens > cfg.seq_len:
        raise ValueError(f"latency.prompt_len + latency.decode_tokens = {prompt_len + decode_tokens} exceeds "
                         f"model.seq_len={cfg.seq_len}")
    if repeats < 1 or warmup < 0 or not batch_sizes:
        raise ValueError("latency needs repeats >= 1, warmup >= 0 and at least one batch size")
    was_training = model.training
    model.eval()
    first = next(model.parameters())
    device, graphed = first.device, devices.use_graph(graph, first.device)
    gen = torch.Generator().manual_seed(0)
    by_batch = {}
    for bs in batch_sizes:
        prompt = torch.randint(0, cfg.vocab_size, (bs, prompt_len), generator=gen).to(device)
        step = torch.randint(0, cfg.vocab_size, (bs, 1), generator=gen).to(device)
        if graphed:  # one static cache per batch size: the graph replays on its memory (warmed up at positions 0-2)
            cache = model.new_cache(bs, max(3, prompt_len + decode_tokens), static=True)
            try:
                replay = devices.capture(lambda: model.decode_step(step, cache))
            except RuntimeError as err:
                raise RuntimeError(f"decode of this model could not be captured as a CUDA graph "
                                   f"({' '.join(str(err).split())[:300]}); measure it with graph=false") from err
        prefill, decode = [], []
        for i in range(warmup + repeats):
            if graphed:
                cache.rollback(0)

                def run_decode():
                    for _ in range(decode_tokens):
                        replay()
            else:
                cache = model.new_cache(bs, prompt_len + decode_tokens)

                def run_decode():
                    for _ in range(decode_tokens):
                        model(step, cache=cache)

            t_prefill = _timed(lambda: model(prompt, cache=cache), device)
            t_decode = _timed(run_decode, device)
            if i >= warmup:
                prefill.append(t_prefill * 1e3)
                decode.append(t_decode * 1e3 / decode_tokens)
        by_batch[bs] = {"prefill_ms": _summary(prefill), "decode_ms_per_token": _summary(decode)}
        if graphed:
            del replay, cache
    model.train(was_training)
    return {
        **devices.conditions(device, graphed, first.dtype),
        "prompt_len": prompt_len, "decode_tokens": decode_tokens, "warmup": warmup, "repeats": repeats,
        "batch_sizes": list(batch_sizes), "by_batch": {str(k): v for k, v in by_batch.items()},
        # headline figures: batch 1, and the largest batch measured
        "prefill_ms": by_batch[batch_sizes[0]]["prefill_ms"]["median"],
        "decode_ms_per_token": by_batch[batch_sizes[0]]["decode_ms_per_token"]["median"],
        "batch_large": batch_sizes[-1],
        "decode_ms_per_token_batch": by_batch[batch_sizes[-1]]["decode_ms_per_token"]["median"],
    }


# ----- scaling-latency: measure shapes without training them, fit the latency model ---------------------------

PROTOCOL = ("prompt_len", "decode_tokens", "batch_sizes", "warmup", "repeats", "threads")
# the protocol every measurement row carries, so that a latency.csv is refitted without its latency.json
MEASUREMENT_PROTOCOL = ("prompt_len", "decode_tokens", "warmup", "repeats", "group_size")

def protocol_defaults(results_dir: str | None = None, sweep: str | None = None) -> dict:
    """The training runs' latency protocol (and threads): a sweep's records' (the first one that has it), else the
    schema's defaults."""
    protocol = {k: getattr(LatencyConf(), k) for k in PROTOCOL if k != "threads"}
    if sweep:
        for record in iter_records(results_dir, sweep):
            measured = record.get("latency") or {}
            if record.get("status") == "ok" and measured:
                protocol = {k: measured[k] for k in protocol}
                protocol["threads"] = measured.get("threads")
                break
    return protocol


def shapes_to_measure(cfg) -> list[GPTConfig]:
    """The model configs of ``cfg.shapes`` (grid, pairs) and of ``cfg.sweep``'s records, without duplicates, in order."""
    a, s = cfg.arch, cfg.shapes

    def config(**shape) -> GPTConfig:
        resolved = resolve_shape(**shape, head_dim=a.head_dim, ffn_ratio=a.ffn_ratio)
        return GPTConfig(**resolved, vocab_size=a.vocab_size, seq_len=a.seq_len, ffn_ratio=a.ffn_ratio,
                         tie_embeddings=a.tie_embeddings)

    configs = [config(n_layers=int(L), params=float(p)) for L in s.n_layers for p in s.params]
    for pair in s.pairs:
        if len(pair) != 2:
            raise ValueError(f"shapes.pairs holds [n_layers, d_model] pairs; got {list(pair)}")
        configs.append(config(n_layers=int(pair[0]), d_model=int(pair[1])))
    if cfg.sweep:
        table = load_table(cfg.results_dir, cfg.sweep)
        table = table[table.status == "ok"]
        if table.empty:
            raise ValueError(f"no finished runs in {cfg.results_dir}/{cfg.sweep}")
        for row in table.drop_duplicates(["n_layers", "d_model", "n_heads", "ffn_hidden", "vocab_size",
                                          "seq_len"]).itertuples():
            configs.append(GPTConfig(n_layers=int(row.n_layers), d_model=int(row.d_model), n_heads=int(row.n_heads),
                                     vocab_size=int(row.vocab_size), seq_len=int(row.seq_len),
                                     ffn_ratio=row.ffn_hidden / row.d_model, tie_embeddings=a.tie_embeddings))
    unique = list({repr(c): c for c in configs}.values())  # equal configs have equal reprs
    if not unique:
        raise ValueError("no shapes to measure: give shapes.n_layers and shapes.params, shapes.pairs or sweep")
    return unique


def measure_shapes(configs: list[GPTConfig], protocol: dict, device: str = devices.DEFAULT, rounds: int = 1,
                   log=print, modes: tuple[str, ...] = ("none",), group_size: int | None = None,
                   graph: str | bool | None = "auto") -> list[dict]:
    """Measure each shape with ``measure`` on randomly initialised weights in its serving copy on ``device``
    (``pipeline.device``), in each serving mode (quantized by ``pipeline/serving.py``: latency does not depend on the
    weights' values), in ``rounds`` interleaved rounds (every shape once a round, so the machine's drift is spread
    over all of them); one row per shape, mode, batch size and round (``fit_latency`` aggregates the rounds), each
    with its device, dtype, threads and graph mode."""
    device = devices.resolve(device)
    devices.use_graph(graph, device)  # a bad graph option is refused before anything is measured
    if protocol["prompt_len"] + protocol["decode_tokens"] > min(c.seq_len for c in configs):
        raise ValueError(f"measure.prompt_len + measure.decode_tokens = "
                         f"{protocol['prompt_len'] + protocol['decode_tokens']} exceeds the shortest seq_len "
                         f"{min(c.seq_len for c in configs)}")
    torch.manual_seed(0)
    rounds = max(1, int(rounds))
    total, rows = len(configs) * len(modes) * rounds, []
    carried = {k: {**protocol, "group_size": group_size}[k] for k in MEASUREMENT_PROTOCOL}
    if any(m != "none" for m in modes):
        from scaling_lab.pipeline.serving import check_modes, quantize

        check_modes([m for m in modes if m != "none"], device, group_size)  # each served here, before measuring
    for r in range(rounds):
        for c in configs:
            base, counts = devices.serving_copy(GPT(c), device), c.param_counts()
            for mode in modes:
                model = base if mode == "none" else quantize(base, mode, group_size)[0]
                result = measure(model, protocol["prompt_len"], protocol["decode_tokens"], protocol["batch_sizes"],
                                 protocol["warmup"], protocol["repeats"], graph)
                log(f"  [{len(rows) // len(result['batch_sizes']) + 1}/{total}] n_layers={c.n_layers} "
                    f"d_model={c.d_model} {mode}: decode {result['decode_ms_per_token']:.3f} ms/token, prefill "
                    f"{result['prefill_ms']:.3f} ms (batch {result['batch_sizes'][0]})")
                for b in result["batch_sizes"]:
                    per = result["by_batch"][str(b)]
                    rows.append({
                        "mode": mode, "n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
                        "aspect_ratio": c.aspect_ratio, "params_non_embedding": counts["non_embedding"],
                        "params_total": counts["total"], "vocab_size": c.vocab_size, "batch": int(b), "round": r,
                        "decode_ms_per_token": per["decode_ms_per_token"]["median"],
                        "prefill_ms": per["prefill_ms"]["median"],
                        "decode_iqr_rel": per["decode_ms_per_token"]["iqr_rel"],
                        "prefill_iqr_rel": per["prefill_ms"]["iqr_rel"],
                        **{k: result[k] for k in ("device", "threads", "dtype", "graph")},
                        **carried,
                    })
            del base, model
    return rows


def run_latency(cfg) -> dict:
    """The whole ``scaling-latency`` job: measure (or read ``measurements``), write latency.csv, fit, write
    latency.json and merge into ``constants``."""
    if cfg.constants:
        read_fit_json(cfg.constants)  # a missing or invalid fit.json stops the run before measuring
    check_aggregate(cfg.latency_model.aggregate)
    out = Path(cfg.out)
    if cfg.measurements:
        table = read_measurements(cfg.measurements)
        source = Path(cfg.measurements)
    else:
        table = pd.DataFrame(measure_from_config(cfg))
        check_one_kind(table, "the measurements")
        out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(out / "latency.csv", table)
        source = out / "latency.csv"
    first = table.iloc[0]
    meta = {"device": str(first["device"]), "threads": int(first["threads"]), "dtype": str(first["dtype"]),
            "graph": str(first["graph"]), **{k: None if pd.isna(first[k]) else int(first[k])
                                             for k in MEASUREMENT_PROTOCOL},
            "rounds": int(table["round"].max()) + 1, "source": str(source.resolve())}
    if cfg.latency_model.batch_size is not None:
        meta["batch_size"] = int(cfg.latency_model.batch_size)
    model = fit_latency(table, meta, cfg.latency_model.extrapolate_frac, cfg.latency_model.aggregate)
    section = model.to_dict()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "latency.json", section)
    if cfg.constants:
        merge_into_fit_json(cfg.constants, section)
    print(format_latency(table, section))
    print(f"wrote {'' if cfg.measurements else str(out / 'latency.csv') + ', '}{out / 'latency.json'}"
          + (f"; the latency section of {cfg.constants}" if cfg.constants else ""))
    tracking.log_latency(cfg, section, out)
    return section


def measure_from_config(cfg) -> list[dict]:
    """Resolve the device, the shapes and the protocol of a ``scaling-latency`` config and measure them."""
    device = devices.resolve(cfg.measure.device)
    graph = devices.graph_name(devices.use_graph(cfg.measure.graph, device))
    configs = shapes_to_measure(cfg)
    protocol = protocol_defaults(cfg.results_dir, cfg.sweep)
    protocol.update({k: v for k, v in cfg.measure.items() if v is not None and k in PROTOCOL})
    protocol["batch_sizes"] = [int(b) for b in protocol["batch_sizes"]]
    if protocol.get("threads"):
        torch.set_num_threads(int(protocol["threads"]))
    print(f"measuring {len(configs)} shapes on {devices.device_name(device)} "
          f"({str(devices.serving_dtype(device)).replace('torch.', '')}, decode {graph}): prompt "
          f"{protocol['prompt_len']}, {protocol['decode_tokens']} decode tokens, batches {protocol['batch_sizes']}, "
          f"warmup {protocol['warmup']}, repeats {protocol['repeats']}, {torch.get_num_threads()} threads, "
          f"{cfg.measure.rounds} rounds")
    return measure_shapes(configs, protocol, device, cfg.measure.rounds,
                          modes=tuple(str(m) for m in cfg.measure.modes),
                          group_size=None if cfg.measure.group_size is None else int(cfg.measure.group_size),
                          graph=cfg.measure.graph)


def check_one_kind(table: pd.DataFrame, what) -> pd.DataFrame:
    """``table``'s measurements all of one device, dtype and graph mode (a one-line error naming two values that
    differ); a table without a ``graph`` column (written by older releases) was measured eagerly."""
    if "graph" not in table.columns:
        table["graph"] = devices.EAGER
    for key in devices.COMPARED:
        values = list(dict.fromkeys(table[key].astype(str)))
        if len(values) > 1:
            raise UserError(f"{what} holds measurements of {key} {values[0]!r} and of {key} {values[1]!r}: one "
                            f"latency law is fitted to measurements of one device, dtype and graph mode")
    return table


def read_measurements(path) -> pd.DataFrame:
    """A latency.csv written by ``scaling-latency``, checked: the columns the law needs, one device, dtype and graph
    mode (``check_one_kind``), one protocol."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no latency measurements at {path}: measurements= takes a latency.csv written by "
                                f"scaling-latency")
    table = pd.read_csv(path)
    need = {"mode", "n_layers", "d_model", "vocab_size", "batch", "round", "decode_ms_per_token", "prefill_ms",
            "device", "threads", "dtype", *MEASUREMENT_PROTOCOL}
    missing = sorted(need - set(table.columns))
    if missing or table.empty:
        raise ValueError(f"{path} is not a latency.csv of scaling-latency: missing columns {missing or 'rows'}")
    check_one_kind(table, path)
    mixed = [k for k in ("threads", *MEASUREMENT_PROTOCOL) if table[k].nunique() > 1]
    if mixed:
        raise ValueError(f"{path} mixes measurements taken with different {mixed}: fit one device and protocol at "
                         f"a time")
    return table


def format_latency(table, section: dict) -> str:
    """The measurements (each shape, mode and batch's rounds reduced as the law reduces them) beside the law's
    predictions, the coefficients and the held-out errors."""
    model = LatencyModel.from_dict(section)
    spread = round_spread(table)
    table = reduce_rounds(table, section["aggregate"], by=("params_non_embedding",))
    lines = [f"== latency law on {section['device']} ({section['threads']} threads, {section['dtype']}, decode "
             f"{section.get('graph', devices.EAGER)}; context: "
             f"prompt {section['prompt_len']}, {section['decode_tokens']} decoded; the {section['aggregate']} of "
             f"{section['rounds']} rounds): ms = {section['form']}",
             f"   {'mode':>4} {'n_layers':>8} {'d_model':>7} {'N (non-emb)':>11} {'batch':>5} {'decode ms/tok':>13} "
             f"{'law':>8} {'prefill ms':>10} {'law':>8}"]
    for row in table.itertuples():
        decode, prefill = (model.predict(row.n_layers, row.d_model, q, row.batch, row.mode, row.vocab_size)
                           for q in ("decode_ms_per_token", "prefill_ms"))
        lines.append(f"   {row.mode:>4} {row.n_layers:>8} {row.d_model:>7} {row.params_non_embedding:>11.3g} "
                     f"{row.batch:>5} {row.decode_ms_per_token:>13.4g} {decode:>8.4g} {row.prefill_ms:>10.4g} "
                     f"{prefill:>8.4g}")
    for mode, quantities in section["modes"].items():
        for quantity, c in quantities.items():
            err = section["heldout"][mode][quantity]
            terms = " + ".join(f"{v:.3g} {k}" for k, v in c.items())
            lines.append(f"   {mode} {quantity}: {terms}")
            lines.append(f"      held out: leave-one-shape-out MAPE {_pct(err['loso_mape'])} (max "
                         f"{_pct(err['loso_max_ape'])}); largest {err['largest_shapes']} shapes from the rest MAPE "
                         f"{_pct(err['largest_mape'])} (max {_pct(err['largest_max_ape'])})")
    if spread is not None:
        worst = spread.loc[spread.ratio.idxmax()]
        lines.append(f"   the machine's noise: a decode measurement's slowest round over its fastest, median "
                     f"{spread.ratio.median():.2f}x, worst {worst.ratio:.2f}x ({worst['mode']} {worst.n_layers} x "
                     f"{worst.d_model}, batch {worst.batch})")
    return "\n".join(lines)


def round_spread(table: pd.DataFrame) -> pd.DataFrame | None:
    """Per measurement, its slowest decode round over its fastest (None with one round): how noisy the machine
    was, beside the law's errors."""
    if "round" not in table or table["round"].nunique() < 2:
        return None
    slowest, fastest = (reduce_rounds(table, a) for a in ("max", "min"))
    return fastest.assign(ratio=slowest.decode_ms_per_token / fastest.decode_ms_per_token)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
