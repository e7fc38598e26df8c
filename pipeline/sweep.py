"""Sweeps as first-class, restartable objects.

A sweep is declared in ``conf/launch/sweep/<name>.yaml`` as Hydra sweeper params and launched with
``scaling-train -m sweep=<name>``. This module expands a sweep's grid exactly as Hydra's basic sweeper does, checks
every point before any job starts (``CheckSweep``, a Hydra callback) and saves what was launched
(``<results_dir>/<sweep>/launches/*.json``, every point with its run id, N, D and FLOPs); ``scaling-sweep-status``
reads those and the results store, composing nothing, so it needs no override typed again. Launching, skipping finished points and resuming interrupted ones happen in
``pipeline.train.run``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from scaling_lab.conf import UserError, command, compose
from scaling_lab.fit.io import store
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.pipeline.runspec import ConfigError, duration, plan_run


def grid(params: dict, overrides: list[str]) -> list[list[str]]:
    """The override list of every point: sweeper params, then command-line overrides (which win on a shared key)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in (params or {}).items()] + overrides)
    return BasicSweeper.split_arguments(parsed, None)[0]


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

    def plan(self, spec) -> "Point":
        """Fill in what the run's spec says: run id, N (non-embedding), D, training FLOPs, shape."""
        m = spec.model
        self.run_id, self.tokens, self.n_params = spec.run_id, spec.tokens, m.non_embedding_params
        self.flops = m.flops_per_token * spec.tokens
        self.shape = f"L{m.n_layers} d{m.d_model} R{m.aspect_ratio:g}"
        return self


def plan_points(points: list[list[str]], check_data: bool = True) -> list[Point]:
    """Compose and plan every point; with ``check_data``, also check each token budget against its corpus."""
    from scaling_lab.pipeline.data import DataError, check_budget, prepare_corpus

    corpora: dict[str, object] = {}
    planned = []
    for overrides in points:
        point = Point(overrides=[o for o in overrides if not o.startswith("hydra")])
        try:
            cfg = compose("train", overrides)
            spec = plan_run(cfg)
            point.plan(spec)
            m = spec.model
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
            print(f"scaling-train: error: {len(bad)} of {len(planned)} sweep points are invalid; nothing was launched:\n{lines}",
                  file=sys.stderr)
            sys.exit(2)
        save_launch(config.results_dir, config.sweep.name, planned, list(config.hydra.overrides.task))
        ids = [p.run_id for p in planned]
        if len(set(ids)) != len(ids):
            print("warning: some sweep points resolve to the same run (e.g. two aspect ratios round to one shape); "
                  "each is trained once", file=sys.stderr)
        self.planned, self.results_dir, self.sweep = planned, config.results_dir, config.sweep.name

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """A summary of the sweep's states; a sweep with failed or damaged runs exits 1."""
        planned = getattr(self, "planned", None)
        if not planned:
            return
        found = {p.run_id: store.run_state_and_record(self.results_dir, self.sweep, p.run_id) for p in planned}
        states = {run_id: state for run_id, (state, _) in found.items()}
        counts = {s: list(states.values()).count(s) for s in store.STATES}
        line = f"sweep {self.sweep}: {len(states)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        resumed = []  # runs that a pre-emption, a time limit (a submitit requeue) or a kill interrupted on the way
        for run_id, (state, record) in found.items():
            if state != "done":
                continue
            stops = [a.get("ended", "") for a in record.get("attempts", []) if a.get("ended") != "ok"]
            if stops:
                resumed.append(f"{run_id} ({', '.join(stops)})")
        if resumed:
            line += (f"; {len(resumed)} finished after resuming from an interruption: " + "; ".join(resumed[:5]) +
                     (" ..." if len(resumed) > 5 else ""))
        bad = [r for r, s in states.items() if s in ("failed", "damaged")]
        if not bad:
            print(line, file=sys.stderr, flush=True)
            return
        details = []
        for run_id in bad[:20]:
            record = found[run_id][1] or {}
            details.append(f"  {states[run_id]} {run_id}: {record.get('error') or 'record unreadable'}")
        print(f"error: {line}\n" + "\n".join(details), file=sys.stderr, flush=True)
        sys.exit(1)


# ----- what was launched, and each point's state --------------------------------------------------------------

def launches_dir(results_dir, sweep: str) -> Path:
    return store.sweep_dir(results_dir, sweep) / "launches"


def _entry(p: Point) -> dict:
    return {"run_id": p.run_id, "overrides": p.overrides, "n_params": p.n_params, "tokens": p.tokens,
            "flops": p.flops, "shape": p.shape}


def save_launch(results_dir, sweep: str, planned: list[Point], overrides: list[str], name: str | None = None) -> Path:
    """Record a launch (a multirun's grid, or one run) so that status knows its points without composing them."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    name = name or f"multirun-{stamp}-{os.getpid()}"
    return write_json_atomic(launches_dir(results_dir, sweep) / f"{name}.json",
                             {"sweep": sweep, "launched": stamp, "overrides": overrides,
                              "points": [_entry(p) for p in planned if not p.error]})


def launched_points(results_dir, sweep: str) -> list[Point]:
    """Every point any launch of ``sweep`` declared (the union over launches, by run id)."""
    points: dict[str, Point] = {}
    for path in sorted(launches_dir(results_dir, sweep).glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for e in doc.get("points", []):
            points.setdefault(e["run_id"], Point(overrides=e.get("overrides", []), run_id=e["run_id"],
                                                 n_params=e.get("n_params"), tokens=e.get("tokens"),
                                                 flops=e.get("flops"), shape=e.get("shape", "")))
    return list(points.values())


def point_states(results_dir, sweep: str, planned: list[Point]) -> list[Point]:
    """Each point's state from the store, reading each sweep folder once: done, failed, running (a live marker),
    interrupted (a checkpoint and no live marker), pending."""
    records = {r["run_id"]: r for r in store.iter_records(results_dir, sweep)}
    for p in planned:
        if p.error:
            p.state = "invalid"
            continue
        p.record = records.get(p.run_id)
        if p.record and p.record.get("status") in ("ok", "failed"):
            p.state = "done" if p.record["status"] == "ok" else "failed"
            p.loss = (p.record.get("loss") or {}).get("final")
        else:  # damaged, running (a live claim), interrupted, pending: the one state logic (fit.io.store)
            p.state = store.run_state(results_dir, sweep, p.run_id)
    return planned


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def status(results_dir, sweep: str) -> list[Point]:
    """Every launched point of ``sweep`` (and any run recorded outside a launch) with its state."""
    if not store.sweep_dir(results_dir, sweep).is_dir():
        raise UserError(f"no sweep {sweep!r} under {results_dir}: launch it with scaling-train -m sweep={sweep} "
                        f"results_dir={results_dir}")
    planned = launched_points(results_dir, sweep)
    known = {p.run_id for p in planned}
    for r in store.iter_records(results_dir, sweep):  # runs recorded before launches were saved
        if r["run_id"] not in known:
            shape = r.get("shape") or {}
            planned.append(Point(overrides=[], run_id=r["run_id"], n_params=(r.get("params") or {}).get("non_embedding"),
                                 tokens=(r.get("tokens") or {}).get("budget"), flops=(r.get("flops") or {}).get("total"),
                                 shape=f"L{shape.get('n_layers')} d{shape.get('d_model')} R{shape.get('aspect_ratio', 0):g}"))
    return point_states(results_dir, sweep, planned)


def format_status(name: str, planned: list[Point]) -> str:
    counts = {s: sum(p.state == s for p in planned) for s in (*store.STATES, "invalid")}
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


def _status_command(cfg: DictConfig) -> None:
    print(format_status(cfg.sweep, status(cfg.results_dir, cfg.sweep)))


main = command("scaling-sweep-status", "status", _status_command)


if __name__ == "__main__":
    main()
