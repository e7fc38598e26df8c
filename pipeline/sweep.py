"""Sweeps as first-class, restartable objects.

A sweep is declared in ``conf/launch/sweep/<name>.yaml`` as Hydra sweeper params and launched with
``scaling-train -m sweep=<name>``. This module expands a sweep's grid exactly as Hydra's basic sweeper does, checks
every point before any job starts (``CheckSweep``, a Hydra callback), and reads each point's state from the results
store (``scaling-sweep-status``). Launching, skipping finished points and resuming interrupted ones happen in
``pipeline.train.run``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from scaling_lab.conf import CONF_DIR
from scaling_lab.fit.io import store
from scaling_lab.pipeline.runspec import ConfigError, duration, plan_run


def grid(params: dict, overrides: list[str]) -> list[list[str]]:
    """The override list of every point: sweeper params, then command-line overrides (which win on a shared key)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in (params or {}).items()] + overrides)
    return BasicSweeper.split_arguments(parsed, None)[0]


def _compose(overrides: list[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (the callback)
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _compose_with_hydra(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@dataclass
class Point:
    overrides: list[str]
    run_id: str | None = None
    error: str | None = None
    n_params: int | None = None  # non-embedding
    tokens: int | None = None
    flops: float | None = None
    shape: str = ""
    state: str = "pending"
    loss: float | None = None
    record: dict | None = None


def plan_points(points: list[list[str]], check_data: bool = True) -> list[Point]:
    """Compose and plan every point; with ``check_data``, also check each token budget against its corpus."""
    from scaling_lab.pipeline.data import DataError, check_budget, prepare_corpus

    corpora: dict[str, object] = {}
    planned = []
    for overrides in points:
        point = Point(overrides=[o for o in overrides if not o.startswith("hydra")])
        try:
            cfg = _compose(overrides)
            spec = plan_run(cfg)
            point.run_id, point.tokens = spec.run_id, spec.tokens
            m = spec.model
            point.n_params = m.non_embedding_params
            point.flops = m.flops_per_token * spec.tokens
            point.shape = f"L{m.n_layers} d{m.d_model} R{m.aspect_ratio:g}"
            if check_data:
                key = repr(sorted(cfg.data.items()))
                if key not in corpora:
                    corpora[key] = prepare_corpus(cfg.data)
                check_budget(corpora[key], spec.tokens, m.seq_len)
        except (ConfigError, DataError, ValueError) as e:
            point.error = str(e)
        planned.append(point)
    return planned


class CheckSweep(Callback):
    """Before a multirun launches anything: every point must compose and plan, and fit its corpus."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        points = grid(config.hydra.sweeper.get("params"), list(config.hydra.overrides.task))
        planned = plan_points(points)
        bad = [p for p in planned if p.error]
        if bad:
            lines = "\n".join(f"  {' '.join(p.overrides)}: {p.error}" for p in bad[:20])
            print(f"error: {len(bad)} of {len(planned)} sweep points are invalid; nothing was launched:\n{lines}",
                  file=sys.stderr)
            sys.exit(2)
        ids = [p.run_id for p in planned]
        if len(set(ids)) != len(ids):
            print("warning: some sweep points resolve to the same run (e.g. two aspect ratios round to one shape); "
                  "each is trained once", file=sys.stderr)


# ----- run state -----------------------------------------------------------------------------------------------

def point_states(cfg_results_dir: str, sweep: str, planned: list[Point]) -> list[Point]:
    import json

    for p in planned:
        if p.error:
            p.state = "invalid"
            continue
        p.record = store.read_record(store.record_path(cfg_results_dir, sweep, p.run_id))
        marker = store.marker_path(cfg_results_dir, sweep, p.run_id)
        if p.record and p.record.get("status") in ("ok", "failed"):
            p.state = "done" if p.record["status"] == "ok" else "failed"
            p.loss = (p.record.get("loss") or {}).get("final")
        elif marker.exists() and store.claim_alive(json.loads(marker.read_text())):
            p.state = "running"
        elif store.checkpoint_path(cfg_results_dir, sweep, p.run_id).exists():
            p.state = "interrupted"
        else:
            p.state = "pending"
    return planned


def status(overrides: list[str]) -> tuple[str, list[Point]]:
    """The sweep's name and every point of its grid with its state."""
    cfg = _compose_with_hydra(overrides)
    points = grid(cfg.hydra.sweeper.get("params"), overrides)
    planned = plan_points(points, check_data=False)
    return cfg.sweep.name, point_states(cfg.results_dir, cfg.sweep.name, planned)


def format_status(name: str, planned: list[Point]) -> str:
    counts = {s: sum(p.state == s for p in planned) for s in ("done", "running", "interrupted", "failed", "pending",
                                                              "invalid")}
    lines = [f"sweep {name}: {len(planned)} points: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)]
    lines.append(f"{'state':<12}{'run_id':<14}{'N':>10}{'D':>12}{'FLOPs':>10}  {'shape':<18}{'loss':>8}")
    for p in sorted(planned, key=lambda p: (p.n_params or 0, p.tokens or 0, p.shape)):
        loss = f"{p.loss:.4f}" if isinstance(p.loss, float) else ""
        if p.error:
            lines.append(f"{'invalid':<12}{'':<14}{' '.join(p.overrides)}: {p.error}")
            continue
        lines.append(f"{p.state:<12}{p.run_id:<14}{p.n_params:>10.3g}{p.tokens:>12.3g}{p.flops:>10.2g}  "
                     f"{p.shape:<18}{loss:>8}")
    done = [p for p in planned if p.state == "done"]
    left = [p for p in planned if p.state in ("pending", "running", "interrupted")]
    flops_done = sum(p.flops for p in done)
    flops_left = sum(p.flops for p in left)
    train_s = sum((p.record.get("timing") or {}).get("train_s") or 0 for p in done)
    line = f"FLOPs done {flops_done:.3g}, left {flops_left:.3g}"
    if train_s and flops_left:
        rate = flops_done / train_s
        line += f"; about {duration(flops_left / rate)} left at the {rate:.3g} FLOP/s the finished runs reached"
    lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """scaling-sweep-status sweep=<name> [results_dir=...] [other overrides the sweep was launched with]"""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(main.__doc__)
        return
    try:
        name, planned = status(args)
    except Exception as e:  # a bad override or a missing sweep file: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(format_status(name, planned))
