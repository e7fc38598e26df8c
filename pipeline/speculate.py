"""``scaling-speculate``: speculative decoding between a sweep's trained runs, measured.

For every (draft, target, k) and mode (greedy; sampled with the configured temperature and top-k, applied the same
to both models): the acceptance rate (accepted / proposed draft tokens), tokens per target step, the wall-clock
speedup over target-only decoding with the same warping (both timed here, ``repeats`` times, median), the speedup
Leviathan et al.'s formula predicts from the measured acceptance and cost ratio, and in greedy mode whether the
output equals target-only greedy decoding token for token. Every model is measured as served on ``device``
(``pipeline.device.serving_copy``: bf16 on CUDA, fp32 on the CPU), decoding eagerly (the draft-verify loop changes
shape every step: no CUDA graph), each timing bracketed by ``pipeline.device.synchronize``. Writes
``<out>/speculative.csv`` and ``<out>/speculative.json`` (with the best k per pair and mode, and the device, dtype,
threads and graph mode). Algorithm: ``models/speculative.py``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from scaling_lab.fit import tracking
from scaling_lab.fit.io.files import write_csv_atomic, write_json_atomic
from scaling_lab.models.speculative import speculative_generate, target_generate
from scaling_lab.pipeline import device as devices
from scaling_lab.pipeline import serving

MODES = ("greedy", "sampled")


def _decode_ms(record: dict) -> float:
    return float((record.get("latency") or {}).get("decode_ms_per_token") or 0.0)


def choose_pairs(cfg: DictConfig) -> tuple[list[dict], list[dict]]:
    """(targets, drafts): named runs, or the largest and smallest shapes (by non-embedding N, then by their
    records' decode time: timings taken beside other jobs are too noisy to rank shapes alone), each by its
    best-trained run (the one a user would serve: most tokens, then lowest loss); every check before any compute."""
    records = serving.ok_records(cfg.results_dir, cfg.sweep)
    with_weights = serving.pick_records(records, [], cfg.results_dir, cfg.sweep) if not (cfg.targets and cfg.drafts) \
        else []
    served = {}  # shape -> its best-trained run (sorted ascending, so the best comes last and stays)
    for r in sorted(with_weights, key=lambda r: (r["tokens"]["seen"], -r["loss"]["final"])):
        served[(r["shape"]["n_layers"], r["shape"]["d_model"])] = r
    by_size = sorted(served.values(), key=lambda r: (r["params"]["non_embedding"], _decode_ms(r)))
    targets = (serving.pick_records(records, list(cfg.targets), cfg.results_dir, cfg.sweep) if cfg.targets
               else by_size[::-1][:int(cfg.n_targets)])
    drafts = (serving.pick_records(records, list(cfg.drafts), cfg.results_dir, cfg.sweep) if cfg.drafts
              else by_size[:int(cfg.n_drafts)])
    for t in targets:
        for d in drafts:
            vt, vd = t["shape"]["vocab_size"], d["shape"]["vocab_size"]
            tt, td = t.get("data", {}).get("tokenizer"), d.get("data", {}).get("tokenizer")
            if vt != vd or tt != td:
                raise serving.ServingInputError(
                    f"draft {d['run_id']} (vocabulary {vd}, tokenizer {td}) and target {t['run_id']} (vocabulary "
                    f"{vt}, tokenizer {tt}) do not share a tokenizer: speculative decoding needs one vocabulary")
    if not targets or not drafts:
        raise serving.ServingInputError("no draft or no target run to pair")
    return targets, drafts


def _timed(fn, repeats: int, device):
    times, out = [], None
    for _ in range(repeats):
        devices.synchronize(device)
        start = time.perf_counter()
        out = fn()
        devices.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(cfg: DictConfig) -> dict:
    modes = [str(m) for m in cfg.modes]
    if not modes or any(m not in MODES for m in modes):
        raise serving.ServingInputError(f"modes must be some of {list(MODES)}, got {modes}")
    ks = [int(k) for k in cfg.ks]
    if not ks or min(ks) < 1:
        raise serving.ServingInputError(f"ks must be positive integers, got {ks}")
    if cfg.prompt_len < 2 or cfg.new_tokens < 1:
        raise serving.ServingInputError("prompt_len must be >= 2 and new_tokens >= 1")
    device = devices.resolve(cfg.device)
    targets, drafts = choose_pairs(cfg)
    need = int(cfg.prompt_len) + int(cfg.new_tokens) + max(ks) + 1
    for r in targets + drafts:
        if need > r["shape"]["seq_len"]:
            raise serving.ServingInputError(f"prompt_len + new_tokens + max(ks) + 1 = {need} exceeds run "
                                            f"{r['run_id']}'s seq_len {r['shape']['seq_len']}")
    torch.set_num_threads(int(cfg.threads))
    _, windows = serving.eval_windows(targets[0])
    prompts = [windows[i][0][None, :int(cfg.prompt_len)] for i in range(min(int(cfg.prompts), len(windows)))]
    models = {r["run_id"]: devices.serving_copy(serving.load_model(r, cfg.results_dir), device)
              for r in targets + drafts}
    measured_under = devices.conditions(device, graphed=False)
    reps, n = int(cfg.repeats), int(cfg.new_tokens)
    print(f"speculative decoding on {cfg.sweep}: {len(targets)} target(s) x {len(drafts)} draft(s) x k {ks} x "
          f"{modes}; {len(prompts)} held-out prompts of {cfg.prompt_len} tokens, {n} new tokens, {reps} repeats, "
          f"on {measured_under['device']} in {measured_under['dtype']}, {measured_under['threads']} thread(s)")

    def settings(mode, seed):
        temperature = 0.0 if mode == "greedy" else float(cfg.temperature)
        gen = torch.Generator().manual_seed(seed)
        return dict(temperature=temperature, top_k=int(cfg.top_k) or None, generator=gen)

    rows = []
    for t in targets:
        target = models[t["run_id"]]
        for mode in modes:
            base_s, base_out = _timed(lambda: [target_generate(target, p, n, **settings(mode, int(cfg.seed) + i))
                                               for i, p in enumerate(prompts)], reps, device)
            for d in drafts:
                if d["run_id"] == t["run_id"]:
                    continue
                draft = models[d["run_id"]]
                draft_s, _ = _timed(lambda: [target_generate(draft, p, n, **settings(mode, int(cfg.seed) + i))
                                             for i, p in enumerate(prompts)], reps, device)
                cost_ratio = draft_s / base_s
                for k in ks:
                    spec_s, results = _timed(lambda: [
                        speculative_generate(target, draft, p, n, k, **settings(mode, int(cfg.seed) + i))
                        for i, p in enumerate(prompts)], reps, device)
                    drafted = sum(s.drafted for _, s in results)
                    accepted = sum(s.accepted for _, s in results)
                    steps = sum(s.target_steps for _, s in results)
                    emitted = sum(s.emitted for _, s in results)
                    alpha = accepted / drafted
                    predicted = ((1 - alpha ** (k + 1)) / ((1 - alpha) * (k * cost_ratio + 1)) if alpha < 1
                                 else (k + 1) / (k * cost_ratio + 1))
                    exact = (all(torch.equal(o, b) for (o, _), b in zip(results, base_out)) if mode == "greedy"
                             else None)
                    rows.append({
                        "draft_run_id": d["run_id"], "target_run_id": t["run_id"], "mode": mode, "k": k,
                        "temperature": settings(mode, 0)["temperature"], "top_k": int(cfg.top_k),
                        "draft_n_layers": d["shape"]["n_layers"], "draft_d_model": d["shape"]["d_model"],
                        "draft_params_non_embedding": d["params"]["non_embedding"],
                        "target_n_layers": t["shape"]["n_layers"], "target_d_model": t["shape"]["d_model"],
                        "target_params_non_embedding": t["params"]["non_embedding"],
                        "acceptance_rate": alpha, "tokens_per_target_step": emitted / steps,
                        "cost_ratio": cost_ratio, "target_ms_per_token": 1e3 * base_s / (n * len(prompts)),
                        "speculative_ms_per_token": 1e3 * spec_s / (n * len(prompts)),
                        "speedup_measured": base_s / spec_s, "speedup_predicted": predicted, "greedy_exact": exact,
                        **measured_under,
                    })
                    r = rows[-1]
                    print(f"  target {t['run_id']} draft {d['run_id']} {mode} k={k}: acceptance {alpha:.3f}, "
                          f"{r['tokens_per_target_step']:.2f} tokens/step, speedup {r['speedup_measured']:.2f}x "
                          f"(formula {predicted:.2f}x)" + ("" if exact is None else f", greedy exact {exact}"))
    table = pd.DataFrame(rows)
    table["best_k"] = False
    best = table.loc[table.groupby(["draft_run_id", "target_run_id", "mode"]).speedup_measured.idxmax()]
    table.loc[best.index, "best_k"] = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "speculative.csv", table)
    doc = {"schema_version": 1, "sweep": cfg.sweep, **measured_under,
           "prompts": len(prompts), "prompt_len": int(cfg.prompt_len), "new_tokens": n, "repeats": reps,
           "rows": table.to_dict(orient="records"),
           "best": best[["draft_run_id", "target_run_id", "mode", "k", "acceptance_rate", "speedup_measured",
                         "cost_ratio"]].to_dict(orient="records")}
    write_json_atomic(out / "speculative.json", doc)
    tracking.log_serving(cfg, "speculate", cfg.sweep, cfg.results_dir, out)
    print(format_table(table))
    print(f"wrote {out / 'speculative.csv'} and {out / 'speculative.json'}")
    return doc


def format_table(table: pd.DataFrame) -> str:
    lines = ["== speculative decoding (acceptance = accepted / proposed draft tokens; speedup = target-only time / "
             "speculative time, measured; formula = Leviathan et al. from the measured acceptance and cost ratio)",
             f"   {'target':>12} {'(L,d)':>8} {'draft':>12} {'(L,d)':>8} {'mode':>7} {'k':>2} {'accept':>6} "
             f"{'tok/step':>8} {'c':>5} {'speedup':>7} {'formula':>7} {'exact':>5}"]
    for r in table.itertuples():
        lines.append(f"   {r.target_run_id:>12} {f'({r.target_n_layers},{r.target_d_model})':>8} {r.draft_run_id:>12} "
                     f"{f'({r.draft_n_layers},{r.draft_d_model})':>8} {r.mode:>7} {r.k:>2} {r.acceptance_rate:>6.3f} "
                     f"{r.tokens_per_target_step:>8.2f} {r.cost_ratio:>5.2f} {r.speedup_measured:>6.2f}x "
                     f"{r.speedup_predicted:>6.2f}x {'' if r.greedy_exact is None else str(r.greedy_exact):>5}"
                     + ("  <- best k" if r.best_k else ""))
    return "\n".join(lines)
