"""``scaling-report``: one Markdown report of a sweep and what the later stages made of it.

It reads what the stages wrote (the sweep's records, ``fit.json`` and its figures, the selection verification,
``plan.json``) and writes ``report.md`` beside them; a section whose input is missing says which command makes it.
Nothing here computes a result: every number is copied from a stage's output file.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import DictConfig

from scaling_lab.conf import UserError, command
from scaling_lab.fit.io.store import iter_records, load_table


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, (int, float)):
        if isinstance(x, int) or (abs(x) >= 1e5 or (abs(x) < 1e-3 and x != 0)):
            return f"{x:.{digits - 1}g}" if isinstance(x, float) else f"{x:,}"
        return f"{x:.{digits}g}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _load(path) -> dict | None:
    path = Path(path) if path else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def sweep_section(results_dir: str, sweep: str) -> str:
    table = load_table(results_dir, sweep)
    if table.empty:
        return f"## Sweep `{sweep}`\n\nNo records under `{results_dir}/{sweep}/`: run `scaling-train -m sweep={sweep}`.\n"
    ok = table[table.status == "ok"]
    failed = table[table.status != "ok"]
    head = (f"## Sweep `{sweep}`\n\n{len(table)} runs: {len(ok)} ok, {len(failed)} failed. "
            f"Corpus `{_fmt(ok.corpus.iloc[0] if len(ok) else None)}` (hash {str(ok.corpus_hash.iloc[0])[:12] if len(ok) else '–'}), "
            f"tokenizer `{_fmt(ok.tokenizer.iloc[0] if len(ok) else None)}`. Training time summed over runs: "
            f"{_fmt(float(ok.train_s.sum()) / 60, 3)} min. Loss is held-out nats per token; latency is measured on "
            f"the trained model ({_fmt(ok.latency_device.iloc[0] if len(ok) else None)}, "
            f"{_fmt(ok.latency_threads.iloc[0] if len(ok) else None)} thread(s)).\n\n")
    rows = [[r.params_non_embedding, r.tokens_seen, r.n_layers, r.d_model, r.aspect_ratio, r.loss, r.loss_bpb,
             r.prefill_ms, r.decode_ms_per_token, r.tokens_per_s] for r in ok.itertuples()]
    body = _table(["N (non-emb.)", "D", "L", "d", "R", "loss", "bits/byte", "prefill ms", "decode ms/tok",
                   "train tok/s"], rows)
    if len(failed):
        body += "\n\nFailed runs:\n\n" + _table(["run", "N", "D", "error"], [
            [r.run_id, r.params_non_embedding, r.tokens_budget, (r.error or "")[:120]] for r in failed.itertuples()])
    return head + body + "\n"


def fit_section(fit_dir: Path, report_dir: Path, path: Path | None = None) -> str:
    from scaling_lab.fit.io.fitfile import read_fit_json

    path = path or fit_dir / "fit.json"
    doc = read_fit_json(path) if path.is_file() else None  # its laws parsed and checked, as every reader does
    if doc is None:
        return f"## Fit\n\nNo `{fit_dir}/fit.json`: run `scaling-fit`.\n"
    prov = doc.get("provenance", {})
    rows = prov.get("rows", {})
    out = [f"## Fit\n\nProtocol `{prov.get('protocol')}`, N convention `{prov.get('n_convention')}`, "
           f"{rows.get('fit')} fit rows, {rows.get('heldout')} held-out rows "
           f"({rows.get('excluded_failed', 0)} failed runs excluded). From `{fit_dir}/fit.json`.\n"]
    metric_rows = []
    for name, law in doc["laws"].items():
        ci = law.get("ci95", {})
        params = ", ".join(f"{k} = {_fmt(v)}" + (f" [{_fmt(ci[k][0], 3)}, {_fmt(ci[k][1], 3)}]" if k in ci else "")
                           for k, v in law["params"].items())
        flagged = law.get("not_identified") or []
        out.append(f"- **{name}**: `{law['formula']}`; {params}"
                   + (f"; not identified by these data: {', '.join(flagged)}" if flagged else ""))
        m = law.get("metrics", {})
        spearman = m.get("spearman") or {}
        rho = [v for v in spearman.values() if v is not None]
        metric_rows.append([name, m.get("mse"), m.get("r2"), m.get("mse_heldout"), m.get("r2_heldout"),
                            m.get("max_rel_err_heldout"), sum(rho) / len(rho) if rho else None, len(rho)])
    out.append("\n" + _table(["law", "MSE", "R²", "MSE held-out", "R² held-out", "max rel. err held-out",
                              "mean Spearman", "groups"], metric_rows))
    figures = sorted(p.name for p in fit_dir.glob("*.png"))
    if figures:
        out.append("\n" + "\n".join(f"![{f}]({os.path.relpath(fit_dir / f, report_dir)})" for f in figures))
    return "\n".join(out) + "\n"


def verify_section(path: Path) -> str:
    doc = _load(path)
    if doc is None:
        return f"## Selection, verified\n\nNo `{path}`: run `scaling-verify`.\n"
    rows = [[label, m["n_layers"], m["d_model"], m["R"], m["N"], m["loss_predicted"], m["loss_measured"],
             m["latency_predicted_ms"], m["latency_remeasured_ms"]] for label, m in doc["models"].items()]
    c = doc["claim"]
    verdict = ("The selection is the conventional shape at this size: no Morph claim to check." if c["same_shape"] else
               f"Morph vs conventional: {c['speedup_measured']:.2f}x faster measured ({c['speedup_predicted']:.2f}x "
               f"predicted), loss x{c['loss_ratio_measured']:.4f} measured (x{c['loss_ratio_predicted']:.4f} "
               f"predicted). The Morph claim (faster at nearly equal loss, tolerance {doc['loss_tolerance']:g}) "
               f"**{'held' if c['held'] else 'did not hold'}**.")
    return (f"## Selection, verified\n\nAt N = {_fmt(doc['target_N'])} ({doc['n_convention']}), D = "
            f"{_fmt(doc['tokens'])} tokens, both shapes trained for real. {verdict}\n\n"
            + _table(["model", "L", "d", "R", "N", "predicted loss", "measured loss", "predicted decode ms/tok",
                      "measured decode ms/tok"], rows) + f"\n\nFrom `{path}`.\n")


def plan_section(path: Path, report_dir: Path) -> str:
    doc = _load(path)
    if doc is None:
        return f"## Plan\n\nNo `{path}`: run `scaling-plan`.\n"
    keys = ["N", "D", "train_flops", "inference_flops", "total_flops", "total_cost"]
    rows = [[name] + [doc[name].get(k) for k in keys] for name in ("chinchilla", "optimal") if name in doc]
    ratios = doc.get("ratios") or {}
    text = _table(["model"] + keys, rows)
    if ratios:
        text += "\n\nOptimal / Chinchilla-style: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ratios.items())
    figure = path.parent / "plan.png"
    if figure.exists():
        text += f"\n\n![plan]({os.path.relpath(figure, report_dir)})"
    return f"## Plan\n\n{text}\n\nFrom `{path}`.\n"


def write_report(cfg: DictConfig) -> Path:
    out = Path(cfg.out)
    if not any(True for _ in iter_records(cfg.results_dir, cfg.sweep)):
        raise UserError(f"sweep {cfg.sweep!r} has no records under {cfg.results_dir}/{cfg.sweep}: run scaling-train "
                        f"-m sweep={cfg.sweep} results_dir={cfg.results_dir} first")
    parts = [f"# Scaling report: sweep `{cfg.sweep}`\n\nWritten {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by "
             "`scaling-report`; every number below is copied from the files each stage wrote.\n",
             sweep_section(cfg.results_dir, cfg.sweep), fit_section(Path(cfg.constants).parent, out.parent,
                                                                        Path(cfg.constants)),
             verify_section(Path(cfg.verify)), plan_section(Path(cfg.plan), out.parent)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("\n".join(parts))
    os.replace(tmp, out)
    return out


def _report(cfg: DictConfig) -> None:
    print(f"report: {write_report(cfg)}")


main = command("scaling-report", "report", _report, errors=(OSError, KeyError))


if __name__ == "__main__":
    main()
