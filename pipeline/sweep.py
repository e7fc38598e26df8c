"""Sweeps as first-class, restartable objects.

A sweep is declared in ``conf/launch/sweep/<name>.yaml`` as Hydra sweeper params and launched with
``scaling-train -m sweep=<name>``. This module expands a sweep's grid exactly as Hydra's basic sweeper does, checks
every point before any job starts (``CheckSweep``, a Hydra callback) and saves what was launched
(``<results_dir>/<sweep>/launches/*.json``, every point with its run id, N, D and FLOPs); ``scaling-sweep-status``
reads those and the results store, composing nothing, so it needs no override typed again. Launching, skipping finished points and resuming interrupted ones happen in
``pipeline.train.run``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from scaling_lab.conf import UserError, compose, fail
from scaling_lab.fit.io import store
from scaling_lab.fit.io.files import write_json_atomic
from scaling_lab.pipeline.runspec import ConfigError, duration, outside_cells, plan_run, world_size


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
    ranks: int = 1  # train.devices x train.num_nodes
    nodes: int = 1
    state: str = "pending"
    loss: float | None = None
    record: dict | None = None
    damage: str = ""  # why its record file is damaged
    outside: str = ""  # why it lies outside the grid's cells (sweep.cells), so it is not trained

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
            point.outside = outside_cells(cfg.sweep.cells, spec) or ""
            point.ranks, point.nodes = world_size(cfg.train), int(cfg.train.num_nodes)
            m = spec.model
            if check_data and not point.outside:  # a cell the grid skips needs no corpus
                key = repr(sorted(cfg.data.items()))
                if key not in corpora:  # a prepared cache: only its meta.json is read (the runs verify the rest)
                    corpora[key] = prepare_corpus(cfg.data, verify_tokens=False)
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
        wiring = rank_wiring(config.hydra.launcher, planned)
        if wiring:
            fail("scaling-train", wiring)
        if config.hydra.launcher.get("submitit_folder"):
            try:
                private_folder(config.hydra.launcher.submitit_folder)
            except (UserError, OSError) as err:
                fail("scaling-train", err)
        save_launch(config.results_dir, config.sweep.name, planned, list(config.hydra.overrides.task))
        outside = [p for p in planned if p.outside]
        if outside:
            print(f"{len(outside)} of {len(planned)} sweep points lie outside the grid's cells (sweep.cells) and are "
                  f"not trained; scaling-sweep-status lists them with the reason", file=sys.stderr)
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
        found = {p.run_id: store.run_state_and_record(self.results_dir, self.sweep, p.run_id) for p in planned
                 if not p.outside}
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


def rank_wiring(launcher: DictConfig, planned: list[Point]) -> str:
    """Why the launcher cannot start the points' ranks ("" when it can). Under SLURM each rank is one task, so
    tasks_per_node must be train.devices; elsewhere Lightning starts the other ranks by re-running the command, which
    in a multirun would re-run the whole sweep in every rank."""
    ranked = [p for p in planned if p.ranks > 1]
    if not ranked:
        return ""
    if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
        return (f"{len(ranked)} sweep points run {ranked[0].ranks} ranks (train.devices x train.num_nodes): a DDP sweep "
                "needs hydra/launcher=submitit_slurm, since Lightning starts the other ranks by re-running the "
                "command (here, the whole sweep); outside SLURM run a DDP run on its own, without -m")
    per_node = {p.ranks // max(1, p.nodes) for p in ranked}
    if per_node != {int(launcher.tasks_per_node)} or {p.nodes for p in ranked} != {int(launcher.nodes)}:
        return (f"the points run {sorted(per_node)} ranks per node on {sorted({p.nodes for p in ranked})} node(s) but "
                f"hydra.launcher.tasks_per_node={launcher.tasks_per_node} and nodes={launcher.nodes}: SLURM must start "
                "one task per rank (the submitit_slurm preset follows train.devices; keep it one value per sweep)")
    return ""


def private_folder(folder: str) -> Path:
    """The folder that holds submitit's job folders (``folder`` up to its ``%j`` part), made so that only this user
    can enter it: the folders it creates are 0700, and the holder itself is set to 0700. submitit's pickles (the
    job, its result) are unpickled by the launching process, so nobody else may be able to write or swap them."""
    from scaling_lab.pipeline.launcher import submitit_folder

    holder = submitit_folder(folder)
    for parent in reversed([holder, *holder.parents]):
        if not parent.exists():
            parent.mkdir(mode=0o700, exist_ok=True)
    if holder.stat().st_uid != os.getuid():
        raise UserError(f"hydra.launcher.submitit_folder: {holder} belongs to another user; give a folder of your "
                        "own (SCALING_SUBMITIT_DIR=<dir>)")
    holder.chmod(0o700)
    return holder


# ----- what was launched, and each point's state --------------------------------------------------------------

def launches_dir(results_dir, sweep: str) -> Path:
    return store.sweep_dir(results_dir, sweep) / "launches"


def _entry(p: Point) -> dict:
    return {"run_id": p.run_id, "overrides": p.overrides, "n_params": p.n_params, "tokens": p.tokens,
            "flops": p.flops, "shape": p.shape, **({"outside": p.outside} if p.outside else {})}


def save_launch(results_dir, sweep: str, planned: list[Point], overrides: list[str], name: str | None = None) -> Path:
    """Record a launch (a multirun's grid, or one run) so that status knows its points without composing them."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    name = name or f"multirun-{stamp}-{os.getpid()}"
    return write_json_atomic(launches_dir(results_dir, sweep) / f"{name}.json",
                             {"sweep": sweep, "launched": stamp, "overrides": overrides,
                              "points": [_entry(p) for p in planned if not p.error]})


RUN_ID = re.compile(r"[0-9a-f]{12}")


def _launch_points(path: Path) -> list[Point]:
    """The points of one launch file; a file or entry that is not what ``save_launch`` writes raises ValueError."""
    doc = store.read_json(path)
    entries = doc.get("points") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise ValueError("no list of points")
    points = []
    for e in entries:
        numbers = [e.get(k) for k in ("n_params", "tokens", "flops")] if isinstance(e, dict) else [None]
        if not (isinstance(e, dict) and isinstance(e.get("run_id"), str) and RUN_ID.fullmatch(e["run_id"])
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers)
                and isinstance(e.get("overrides", []), list) and all(isinstance(o, str) for o in e.get("overrides", []))
                and isinstance(e.get("shape", ""), str) and isinstance(e.get("outside", ""), str)):
            raise ValueError(f"a point that is not a launched run: {str(e)[:80]}")
        points.append(Point(overrides=e.get("overrides", []), run_id=e["run_id"], n_params=numbers[0],
                            tokens=numbers[1], flops=numbers[2], shape=e.get("shape", ""),
                            outside=e.get("outside", "")))
    return points


def launched_points(results_dir, sweep: str) -> list[Point]:
    """Every point any launch of ``sweep`` declared (the union over launches, by run id); a launch file that is
    not one is skipped with one warning line naming it."""
    points: dict[str, Point] = {}
    for path in sorted(launches_dir(results_dir, sweep).glob("*.json")):
        try:
            found = _launch_points(path)
        except (OSError, ValueError) as err:
            store.log.warning("skipped the launch file %s: %s", path, err)
            continue
        for point in found:
            points.setdefault(point.run_id, point)
    return list(points.values())


def point_states(results_dir, sweep: str, planned: list[Point]) -> list[Point]:
    """Each point's state from the store, reading the sweep's records once: done, failed, damaged (with why),
    running (a live marker), interrupted (a checkpoint and no live marker), pending; outside (a cell the grid's
    limits skip, with no record)."""
    found, damaged = store.scan_records(results_dir, sweep)
    records = {r["run_id"]: r for r in found}
    for p in planned:
        if p.error:
            p.state = "invalid"
            continue
        p.record = records.get(p.run_id)
        p.damage = damaged.get(store.record_path(results_dir, sweep, p.run_id), "")
        if p.record and p.record.get("status") in ("ok", "failed"):
            p.state = "done" if p.record["status"] == "ok" else "failed"
            p.loss = (p.record.get("loss") or {}).get("final")
        elif p.damage:
            p.state = "damaged"
        elif p.outside:
            p.state = "outside"
        else:  # running (a live claim), interrupted, pending: the one state logic (fit.io.store)
            p.state = store.run_state(results_dir, sweep, p.run_id)
    return planned


def status(results_dir, sweep: str) -> list[Point]:
    """Every launched point of ``sweep``, and any run recorded (or any record damaged) outside a launch, with its
    state."""
    if not store.sweep_dir(results_dir, sweep).is_dir():
        raise UserError(f"no sweep {sweep!r} under {results_dir}: launch it with scaling-train -m sweep={sweep} "
                        f"results_dir={results_dir}")
    planned = launched_points(results_dir, sweep)
    known = {p.run_id for p in planned}
    records, damaged = store.scan_records(results_dir, sweep)
    for r in records:  # runs recorded before launches were saved
        if r["run_id"] not in known:
            row = store.flatten(r)
            planned.append(Point(overrides=[], run_id=r["run_id"], n_params=row["params_non_embedding"],
                                 tokens=row["tokens_budget"], flops=row["flops_total"],
                                 shape=f"L{row['n_layers']} d{row['d_model']} R{row['aspect_ratio'] or 0:g}"))
    planned += [Point(overrides=[], run_id=path.stem) for path in damaged if path.stem not in known]
    return point_states(results_dir, sweep, planned)


def _number(x, spec: str) -> str:
    """A number in its column, or '?' where a record has none."""
    width = spec.strip("<>").split(".")[0]
    return format(x, spec) if isinstance(x, (int, float)) else format("?", f">{width}")


def format_status(name: str, planned: list[Point], results_dir) -> str:
    counts = {s: sum(p.state == s for p in planned) for s in (*store.STATES, "outside", "invalid")}
    lines = [f"sweep {name}: {len(planned)} points: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)]
    lines.append(f"{'state':<12}{'run_id':<14}{'N':>10}{'D':>12}{'FLOPs':>10}  {'shape':<18}{'loss':>8}")
    for p in sorted(planned, key=lambda p: (p.n_params or 0, p.tokens or 0, p.shape)):
        loss = f"{p.loss:.4f}" if isinstance(p.loss, float) else ""
        if p.error:
            lines.append(f"{'invalid':<12}{'':<14}{' '.join(p.overrides)}: {p.error}")
            continue
        if p.state == "damaged":
            path = store.record_path(results_dir, name, p.run_id)
            lines.append(f"{'damaged':<12}{p.run_id:<14}{path}: {p.damage or 'unreadable'}")
            continue
        lines.append(f"{p.state:<12}{p.run_id:<14}{_number(p.n_params, '>10.3g')}{_number(p.tokens, '>12.3g')}"
                     f"{_number(p.flops, '>10.2g')}  {p.shape:<18}{loss:>8}" +
                     (f"  {p.outside}" if p.state == "outside" else ""))
    from scaling_lab.fit.io import integrity

    # checkpoints and weights whose checksum fails, and those a run set aside (fit.io.integrity)
    damaged = integrity.damaged_files(store.sweep_dir(results_dir, name))
    lines += [f"damaged file {path}: {why}" for path, why in damaged]
    done = [p for p in planned if p.state == "done"]
    left = [p for p in planned if p.state in ("pending", "running", "interrupted")]
    flops_done = sum(p.flops or 0 for p in done)
    flops_left = sum(p.flops or 0 for p in left)
    train_s = sum((p.record.get("timing") or {}).get("train_s") or 0 for p in done)
    line = f"FLOPs done {flops_done:.3g}, left {flops_left:.3g}"
    if train_s and flops_left:
        rate = flops_done / train_s
        line += f"; about {duration(flops_left / rate)} left at the {rate:.3g} FLOP/s the finished runs reached"
    lines.append(line)
    return "\n".join(lines)


def status_command(cfg: DictConfig) -> None:
    print(format_status(cfg.sweep, status(cfg.results_dir, cfg.sweep), cfg.results_dir))

