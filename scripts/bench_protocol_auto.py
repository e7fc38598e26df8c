"""Benchmark: does ``protocol=auto`` extrapolate better than ``protocol=default`` to models larger than any it saw?

On every published sweep in ../shared/reference where a fit-on-smaller / score-on-larger split makes sense, both
protocols fit the smaller models (``source.fit_rows``) through the real ``scaling-fit`` run and are scored on the
larger ones (``source.heldout_rows``): held-out mean and max relative error, auto's chosen candidate, how often that
choice changes under a bootstrap of its validation rows, and the ratio auto / default. The target: auto's held-out
mean relative error never worse than default's by more than 20% on any fit, and better on average (the geometric
mean of the ratios below 1, and the error averaged over the fits lower). Each row is one law on one sweep;
bootstrap.n=0 and plots=false keep it quick (about a minute on 2 cores). Overrides after the options go to the
protocol=auto run, to compare its settings.

Sweeps (the row selection each needs is made here, with pandas, on a copy of the file; the split is a column
``bench_split``, 0 for the smaller models fitted and 1 for the larger held out, cut at ``cut`` in the source's N):
- Epoch AI's reconstruction of Chinchilla (the 240 points below loss 3.44, as tests/test_fit_published.py fits them)
- Bian et al. 2025 (every shape and budget; both laws, R = d_model / n_layers)
- (Mis)fitting, Li et al. 2025 (each (N, D)'s best peak learning rate: the lowest final loss)
- Porian et al. 2024 (isoFLOP points, tuned hyperparameters, short warmup, standard count, validation loss; RefinedWeb
  and OpenWebText2)
- OLMo ladder 2024 (C4 loss; the 7B and 13B production runs held out with the 3B ladder models)
- Gadre et al. 2024 (C4 validation loss, one sweep per training set)
- Marin 2026-03 isoFLOP points (one sweep per training set)
- Llama 3's isoFLOP points (digitised from the paper's figure; the raw loss)
Left out: the isoflops/ copies of Epoch's and (Mis)fitting's data (fitted above).

    .venv/bin/python scripts/bench_protocol_auto.py        # data: $SCALING_SHARED or ../shared next to the repo
    .venv/bin/python scripts/bench_protocol_auto.py --only gadre --show protocol.validation.folds=1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Callable

import pandas as pd

from scaling_lab.conf import compose
from scaling_lab.fit.fitting.cli import run

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SCALING_SHARED", ROOT.parent / "shared")) / "reference"
TOLERANCE = 1.2     # auto may be at most 20% worse than default on any sweep


@dataclass
class Sweep:
    name: str
    path: str                     # under ../shared/reference
    size: str                     # the file's N column (the source's own convention), to split on
    cut: float                    # fit N < cut, hold out N >= cut
    columns: list[str]            # scaling-fit overrides naming the columns
    laws: str = "law=chinchilla"
    select: Callable[[pd.DataFrame], pd.DataFrame] = lambda f: f
    extra: list[str] = field(default_factory=list)


def best_lr(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.loc[frame.groupby(["N", "D"])["loss"].idxmin()]


def porian(dataset: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda f: f[(f.dataset == dataset) & (f.hparams == "tuned") & (f.warmup == "short")
                       & (f.param_count == "standard") & (f.loss_split == "val")]


def gadre(dataset: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda f: f[(f.dataset == dataset) & f.val_data.str.contains("/c4_val/")]


def marin(dataset: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda f: f[f.dataset == dataset]


GADRE = ["source.columns.N=params", "source.columns.D=tokens", "source.n_convention=total",
         "source.n_columns.total=params", "source.n_columns.non_embedding=params_no_embed"]
PORIAN = ["source.columns.N=n", "source.columns.D=t"]
ISOFLOPS = ["source.columns.N=params", "source.columns.D=tokens"]
SWEEPS = [
    Sweep("epoch2024", "epoch2024/svg_extracted_data.csv", "Model Size", 2.5e9,
          ["source.columns.N=Model Size", "source.columns.D=null", "source.columns.C=Training FLOP",
           "source.n_convention=total"], select=lambda f: f[f.loss < 3.44]),
    Sweep("bian2025", "bian2025/losses.csv", "N_params", 3e8,
          ["source.columns.N=N_params", "source.columns.D=D_tokens", "source.columns.R=aspect_ratio_R",
           "source.columns.group=size_class", "source.n_convention=total"],
          laws="law=[chinchilla,inference_efficient]"),
    Sweep("misfitting", "li2025_misfitting/last_checkpoint.csv", "N", 3.5e8,
          ["source.columns.N=N", "source.columns.D=D", "source.n_convention=total", "source.n_columns.total=N",
           "source.n_columns.non_embedding=N_no_emb"], select=best_lr),
    Sweep("porian rw", "porian2024/porian_isoflop_points.csv", "n", 3e8, PORIAN, select=porian("rw")),
    Sweep("porian owt2", "porian2024/porian_isoflop_points.csv", "n", 3e8, PORIAN, select=porian("owt2")),
    Sweep("olmo ladder", "olmo_ladder2024/final_losses.csv", "n_nonembed_params", 2e9,
          ["source.columns.N=n_nonembed_params", "source.columns.D=tokens", "source.columns.loss=c4_loss",
           "source.n_convention=non_embedding"]),
    Sweep("gadre c4", "gadre2024/model_losses.csv", "params", 1e9, GADRE, select=gadre("c4_original")),
    Sweep("gadre rpj", "gadre2024/model_losses.csv", "params", 1e9, GADRE, select=gadre("rpj")),
    Sweep("gadre rw", "gadre2024/model_losses.csv", "params", 1e9, GADRE, select=gadre("rw_original")),
    Sweep("marin comma", "isoflops/marin_202603.csv", "params", 2.5e9, ISOFLOPS, select=marin("comma")),
    Sweep("marin dclm", "isoflops/marin_202603.csv", "params", 2.5e9, ISOFLOPS, select=marin("dclm")),
    Sweep("marin nemotron", "isoflops/marin_202603.csv", "params", 2.5e9, ISOFLOPS, select=marin("nemotron")),
    Sweep("llama 3", "isoflops/llama_3.csv", "params", 3e9, ISOFLOPS, select=lambda f: f[f.condition == "raw_loss"]),
]


def fit(sweep: Sweep, csv: Path, out: Path, protocol: str, overrides=(), show=False) -> dict:
    cfg = compose("fit", ["source=csv", f"source.path={csv}", *sweep.columns, sweep.laws, f"protocol={protocol}",
                          'source.fit_rows="bench_split == 0"', 'source.heldout_rows="bench_split == 1"',
                          "bootstrap.n=0", "plots=false", "logger=none", f"out={out / protocol}", *sweep.extra,
                          *overrides])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        doc = run(cfg)
    if show:
        text = printed.getvalue()
        print(text[text.index("== protocol choice"):text.index("\n== ", text.index("== protocol choice"))],
              file=sys.stderr)
    return doc


def short(choice: dict) -> str:
    """auto's choice in a few characters: the objective, the ties and the N convention where not the default's."""
    text = {"huber_log": "huber", "least_squares": "lsq"}.get(choice["objective"], choice["objective"])
    if choice["ties"] != "none":
        text += f", {choice['ties'].replace(' ', '')}"
    if choice["n_convention"] != choice["default"].rsplit(" N ", 1)[1]:
        text += f", N {choice['n_convention']}"
    return text + (" (default)" if choice["candidate"] == choice["default"] else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run only the sweeps whose name contains this")
    parser.add_argument("--show", action="store_true", help="print auto's protocol-choice tables (to stderr)")
    parser.add_argument("auto", nargs="*", help="overrides for the protocol=auto run, e.g. "
                        "protocol.validation.protocol_rule=best")
    args = parser.parse_args()
    print(f"{'sweep':<15}{'law':<20}{'fit/held':>9}  {'default mean':>12}{'max':>8}  {'auto mean':>10}{'max':>8}  "
          f"{'auto chose':<34}{'changes':>8}  {'auto/default mean':>17}{'max':>7}")
    ratios, errors, moved, t0 = [], [], 0, time.perf_counter()
    with TemporaryDirectory() as tmp:
        for sweep in [s for s in SWEEPS if args.only in s.name]:
            frame = sweep.select(pd.read_csv(REFERENCE / sweep.path))
            frame = frame.assign(bench_split=(frame[sweep.size] >= sweep.cut).astype(int))
            csv = Path(tmp) / f"{sweep.name.replace(' ', '_')}.csv"
            frame.to_csv(csv, index=False)
            default = fit(sweep, csv, Path(tmp), "default")
            auto = fit(sweep, csv, Path(tmp), "auto", args.auto, args.show)
            rows = default["provenance"]["rows"]
            for law, entry in default["laws"].items():
                d, a = entry["metrics"], auto["laws"][law]["metrics"]
                choice = auto["protocol_selection"]["chosen"][law]
                ratio = a["mean_rel_err_heldout"] / d["mean_rel_err_heldout"]
                ratios.append(ratio)
                moved += choice["candidate"] != choice["default"]
                errors.append((d["mean_rel_err_heldout"], a["mean_rel_err_heldout"]))
                print(f"{sweep.name:<15}{law:<20}{rows['fit']:>4}/{rows['heldout']:<4}  "
                      f"{d['mean_rel_err_heldout']:>12.4f}{d['max_rel_err_heldout']:>8.4f}  "
                      f"{a['mean_rel_err_heldout']:>10.4f}{a['max_rel_err_heldout']:>8.4f}  {short(choice):<34}"
                      f"{choice['stability']['changed_frac']:>8.0%}  {ratio:>17.3f}"
                      f"{a['max_rel_err_heldout'] / d['max_rel_err_heldout']:>7.3f}", flush=True)
    worst, geo = max(ratios), math.exp(sum(map(math.log, ratios)) / len(ratios))
    mean_d, mean_a = (sum(e[i] for e in errors) / len(errors) for i in (0, 1))
    print(f"\nmean/max: held-out mean and max relative error; changes: how often auto's choice changes when its "
          f"validation rows are resampled ({auto['protocol_selection']['rule']['resamples']} times)")
    print(f"auto / default, held-out mean relative error, {len(ratios)} fits: worst {worst:.3f}, geometric mean "
          f"{geo:.3f}; averaged over the fits: default {mean_d:.4f}, auto {mean_a:.4f}; auto chose another candidate "
          f"than the default in {moved}")
    held = worst <= TOLERANCE and geo < 1 and mean_a < mean_d
    print(f"target (auto never worse than default by more than {TOLERANCE - 1:.0%}, better on average): "
          + ("met" if held else "NOT met"))
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
