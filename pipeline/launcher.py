"""hydra/launcher=submitit_slurm: a watch on the sweep's SLURM jobs while scaling-train waits for them.

The plugin's SlurmLauncher blocks in submitit's ``job.results()``, which waits as long as a job is PENDING, whatever
the reason: a job that asks for more than the partition's nodes have (8 CPUs on a 4-core node) waits forever, and
scaling-train says nothing. ``WatchSlurmJobs``, a Hydra callback, asks SLURM (``squeue``) every few seconds why the
sweep's pending jobs wait. A reason that no amount of waiting clears ends the sweep: one line saying what to change,
the sweep's jobs cancelled, exit 2. A busy cluster (Resources, Priority, ...) is said once, and waited on.

A callback rather than a subclass of the plugin's launcher: Hydra instantiates only launchers defined in the
``hydra_plugins`` namespace package ("Invalid plugin ...: not the hydra_plugins package"), which this project's
packages are not.
"""

from __future__ import annotations

import _thread
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from scaling_lab.conf import fail

POLL_S = 5
# a reason must be seen twice in a row (one poll apart): a job's reason is only settled by a scheduling pass
SEEN_TWICE = 2
WAITING_SAID_AFTER_S = 60  # a busy cluster is normal; said once, after this long, so a silent sweep is explained
# how the watching thread ends the sweep: the launching thread (asleep in submitit's wait) runs this signal's
# handler, which exits 2 there, so Hydra and Python wind down as after any other error
END_SIGNAL = signal.SIGUSR1

# Pending reasons that waiting never clears: the job asks for what its partition, account or QOS cannot give (or a
# dependency that can no longer be met). Not here: ReqNodeNotAvail and PartitionDown/Inactive (nodes down, drained
# or reserved for maintenance, partitions an administrator stopped come back), JobHeld* (released by hand).
NEVER = {
    "PartitionConfig": "it asks for {cpus} CPUs, {memory} of memory, {nodes} node(s) and gres {gres}, more than a "
                       "node of partition {partition} has: lower hydra.launcher.cpus_per_task, mem_gb, gpus_per_node "
                       "or nodes, or choose another hydra.launcher.partition",
    "PartitionNodeLimit": "it asks for more nodes than partition {partition} allows: lower hydra.launcher.nodes or "
                          "choose another hydra.launcher.partition",
    "PartitionTimeLimit": "its time limit is above partition {partition}'s: lower hydra.launcher.timeout_min or "
                          "choose another hydra.launcher.partition",
    "BadConstraints": "no node of partition {partition} has the features it asks for: check "
                      "hydra.launcher.constraint",
    "InvalidAccount": "its account is not valid on partition {partition}: check hydra.launcher.account",
    "InvalidQOS": "its QOS is not valid: check hydra.launcher.qos",
    "DependencyNeverSatisfied": "a job it depends on failed",
}
# ...and the per-job limits of an association or a QOS (QOSMaxCpuPerJobLimit, AssocMaxWallDurationPerJobLimit...)
PER_JOB_LIMIT = "its {reason} is lower than what it asks for: ask for less, or use another hydra.launcher.qos/account"


class WatchSlurmJobs(Callback):
    """Under hydra/launcher=submitit_slurm, a thread that watches the sweep's pending jobs until the sweep ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = config.hydra.launcher
        if not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a signal handler can only be set there (a multirun started from a thread is not watched)
        self.failure = ""
        self.done = threading.Event()
        self.previous = signal.signal(END_SIGNAL, self._end)
        watch = JobWatch(submitit_folder(launcher.submitit_folder))
        # a daemon: its poll never holds the process up once the sweep is over
        threading.Thread(target=self._watch, args=(watch,), name="slurm-watch", daemon=True).start()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if hasattr(self, "done"):
            self.done.set()
            signal.signal(END_SIGNAL, self.previous)

    def __getstate__(self) -> dict:
        return {}  # submitit pickles Hydra's callbacks with each job; the watch stays in the launching process

    def _watch(self, watch: "JobWatch") -> None:
        while not self.done.wait(POLL_S):
            self.failure = watch.check()
            if self.failure:
                _thread.interrupt_main(END_SIGNAL)
                return

    def _end(self, signum, frame) -> None:
        if self.failure:  # only ours: a SIGUSR1 from outside is ignored while the sweep waits
            fail("scaling-train", self.failure)


def submitit_folder(folder: str) -> Path:
    """The folder holding this launch's job folders: ``folder`` up to its first part with a ``%`` (``%j``)."""
    path = Path(folder).expanduser()
    while "%" in str(path):
        path = path.parent
    return path


class JobWatch:
    """The pending jobs of one launch, found from the files submitit writes for each (``<job id>_submitted.pkl``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.seen: dict[str, tuple[str, int]] = {}  # job id -> (its pending reason, polls in a row with it)
        self.since = time.time()
        self.said_waiting = False

    def job_ids(self) -> list[str]:
        return sorted(p.name[: -len("_submitted.pkl")] for p in self.folder.rglob("*_submitted.pkl"))

    def check(self) -> str:
        """One poll: why a job cannot start (its jobs then cancelled), or ""; says once why a sweep waits long."""
        ids = self.job_ids()
        pending = squeue(ids)
        for job, (reason, fields) in pending.items():
            count = self.seen[job][1] + 1 if self.seen.get(job, ("",))[0] == reason else 1
            self.seen[job] = (reason, count)
            why = never_starts(reason, fields)
            if why and count >= SEEN_TWICE:
                return f"job {job} cannot start: {reason} ({why}); {cancel(ids)}"
        if pending and not self.said_waiting and time.time() - self.since > WAITING_SAID_AFTER_S:
            job, (reason, fields) = next(iter(pending.items()))
            print(f"scaling-train: {len(pending)} job(s) waiting in SLURM's queue, e.g. job {job}: {reason} "
                  f"(partition {fields['partition']}); the sweep goes on when they start", file=sys.stderr, flush=True)
            self.said_waiting = True
        return ""


FIELDS = ("job", "state", "reason", "partition", "cpus", "memory", "nodes", "gres")


def squeue(ids: list[str]) -> dict[str, tuple[str, dict]]:
    """The pending ones among ``ids``: job id -> (SLURM's reason, its squeue fields). A failing squeue (a
    slurmctld restarting, ids it forgot) reads as nothing pending: the sweep only ends on what SLURM said."""
    if not ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(ids),
                              "-o", "%i|%T|%r|%P|%C|%m|%D|%b"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    rows = [dict(zip(FIELDS, line.split("|"))) for line in out.stdout.splitlines() if line.count("|") == 7]
    return {row["job"]: (row["reason"], row) for row in rows if row["state"] == "PENDING"}


def never_starts(reason: str, fields: dict) -> str:
    """What to change, for a reason waiting never clears; "" for the others."""
    if reason in NEVER:
        return NEVER[reason].format(**fields)
    if reason.endswith("PerJobLimit") and reason.startswith(("QOS", "Assoc")):
        return PER_JOB_LIMIT.format(reason=reason)
    return ""


def cancel(ids: list[str]) -> str:
    """Cancel the launch's jobs; what was done, for the error line."""
    try:
        out = subprocess.run(["scancel", *ids], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"cancelling its jobs failed ({err}): scancel {' '.join(ids)}"
    if out.returncode != 0:
        return f"cancelling its jobs failed ({out.stderr.strip()}): scancel {' '.join(ids)}"
    return f"the sweep's {len(ids)} job(s) were cancelled"
