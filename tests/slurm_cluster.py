"""A real one-node SLURM cluster for the tests: munged, MariaDB, slurmdbd, slurmctld and slurmd started by hand
(no systemd in a container), with every key, config, state, spool, log, pid and socket file in one folder.

Accounting is real: slurmdbd stores the jobs in a MariaDB whose data lives in the folder, so ``sacct`` (which
submitit polls for job states) answers as on a production cluster. The settings that make requeues take seconds
rather than minutes (``cred_expire=5``, ``sched_interval=2``), and those that work without systemd or cgroups
(``proctrack/linuxproc``, ``task/none``), are from ../shared/notes/cluster.md.

Two partitions share the node: ``cpu`` (the default) and ``urgent``, whose higher priority tier pre-empts ``cpu``
jobs (``preempt/partition_prio``), which SLURM requeues.

Clients (``sbatch``, ``squeue``, ``sacct``, submitit, ``scaling-train``) find the cluster through ``SLURM_CONF``
(``Cluster.env``). By hand::

    python -m tests.slurm_cluster start <dir>     # then: export SLURM_CONF=<dir>/slurm.conf
    python -m tests.slurm_cluster stop <dir>

Debian's packages are installed with apt-get when absent (root only); ``Unavailable`` says why a cluster cannot be
had here, for the tests to skip with.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "sacct", "munged", "slurmdbd", "mariadbd", "mariadb-install-db")
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"  # the daemons live in sbin, not on every user's PATH
CLUSTER_NAME = "scaling-test"
CPU_PARTITION, URGENT_PARTITION = "cpu", "urgent"
START_TIMEOUT_S = 90


class Unavailable(Exception):
    """SLURM cannot be installed or started here; the message says why."""


# ----- installing ---------------------------------------------------------------------------------------------

def install() -> None:
    """Debian's SLURM, munge and MariaDB packages, when a program is missing (apt-get, as root)."""
    missing = [p for p in PROGRAMS if not shutil.which(p, path=SBIN_PATH)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"{', '.join(missing)} not installed, and only root installs them here: "
                          f"apt-get install {' '.join(PACKAGES)}")
    if not shutil.which("apt-get"):
        raise Unavailable(f"{', '.join(missing)} not installed, and there is no apt-get to install them with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        except subprocess.TimeoutExpired:
            raise Unavailable(f"`{' '.join(command)}` took more than 300 s") from None
        if out.returncode != 0:
            raise Unavailable(f"`{' '.join(command)}` failed: {out.stderr.strip()[-500:]}")


# ----- the folder's files -------------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    """``n`` TCP ports nobody listens on now (the daemons bind them a moment later)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_line() -> tuple[str, int]:
    """The node's NodeName line as slurmd detects it (real CPUs, sockets, cores, memory), and its CPU count; a
    node configured with more than it has would be drained."""
    out = subprocess.run([shutil.which("slurmd", path=SBIN_PATH), "-C"], capture_output=True, text=True, timeout=30)
    line = next((x for x in out.stdout.splitlines() if x.startswith("NodeName=")), None)
    if line is None:
        raise Unavailable(f"`slurmd -C` did not describe the node: {out.stderr.strip()[-300:]}")
    cpus = int(next(f for f in line.split() if f.startswith("CPUs=")).split("=")[1])
    return line, cpus


def write_config(folder: Path) -> None:
    """slurm.conf, slurmdbd.conf and a munge key for a one-node cluster whose files all live in ``folder``."""
    for sub in ("state", "spool", "log", "run", "munge", "db"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)  # the key, the database and the sockets: this user's only
    key = folder / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)  # munged refuses a key others can read
    line, _ = node_line()
    node = line.split()[0].split("=")[1]
    ctld_port, slurmd_port, dbd_port = free_ports(3)
    munge = folder / "munge" / "munge.socket"
    (folder / "slurm.conf").write_text(f"""\
ClusterName={CLUSTER_NAME}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again; 5 s works here as 10 s did
AuthInfo=socket={munge},cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/run/slurmctld.pid
SlurmdPidFile={folder}/run/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
# no systemd, no cgroups in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
# the munge socket of the connections to slurmdbd (AuthInfo is for slurmctld's and slurmd's)
AccountingStoragePass={munge}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a scheduling pass every 2 s (default 60): a requeued or pre-empting job starts in seconds
SchedulerParameters=sched_interval=2,bf_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
KillWait=10
ReturnToService=2
MpiDefault=none
{line.split(" UpTime=")[0]} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName={CPU_PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP PriorityTier=1
PartitionName={URGENT_PARTITION} Nodes={node} MaxTime=INFINITE State=UP PriorityTier=2
""")
    dbd = folder / "slurmdbd.conf"
    dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge}
DbdHost=localhost
DbdPort={dbd_port}
SlurmUser=root
PidFile={folder}/run/slurmdbd.pid
LogFile={folder}/log/slurmdbd.log
StorageType=accounting_storage/mysql
# localhost: MariaDB's unix socket, whose path slurmdbd's client library reads from MYSQL_UNIX_PORT
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it may hold the database password)


# ----- starting and stopping ----------------------------------------------------------------------------------

class Cluster:
    """A cluster started in ``folder``: ``env`` for its clients, ``run`` for a client command, ``cpus`` of the node."""

    def __init__(self, folder: Path, procs: list[subprocess.Popen]):
        self.folder, self.procs = folder, procs
        self.conf = folder / "slurm.conf"
        self.cpus = node_line()[1]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=self.env)

    def stop(self) -> None:
        stop(self.folder)
        for proc in self.procs:
            proc.poll()  # reaped by stop(); this only tells the Popen object


def start(folder: Path) -> Cluster:
    """Install what is missing, write the folder's config, start the daemons and wait until ``sinfo`` shows the
    node idle. On failure, whatever was started is stopped and ``Unavailable`` says which daemon failed and why."""
    if os.geteuid() != 0:
        raise Unavailable("a test cluster runs its daemons as root (SlurmUser=root); run the tests as root")
    install()
    folder = Path(folder).resolve()
    write_config(folder)
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "MYSQL_UNIX_PORT": str(folder / "db.sock")}
    procs: list[subprocess.Popen] = []
    try:
        started = time.time()
        # --force: munged wants its socket's folders open to all users; this folder is root's alone
        procs.append(_daemon(folder, "munged", ["-F", "--force", f"--socket={folder}/munge/munge.socket",
                                                f"--key-file={folder}/munge/munge.key",
                                                f"--pid-file={folder}/run/munged.pid",
                                                f"--log-file={folder}/log/munged.log",
                                                f"--seed-file={folder}/munge/munged.seed"], env))
        _wait(procs[-1], folder, lambda: (folder / "munge" / "munge.socket").exists())
        procs.append(_mariadb(folder, env))
        procs.append(_daemon(folder, "slurmdbd", ["-D"], env))  # slurmdbd.conf: beside $SLURM_CONF
        # the first start creates the accounting tables (several seconds); sacctmgr answers once they are there
        _wait(procs[-1], folder, lambda: _ok(["sacctmgr", "-n", "list", "cluster"], env))
        procs.append(_daemon(folder, "slurmctld", ["-D", "-f", str(folder / "slurm.conf")], env))
        procs.append(_daemon(folder, "slurmd", ["-D", "-f", str(folder / "slurm.conf")], env))
        _wait(procs[-1], folder, lambda: _sinfo_idle(env))
        (folder / "log" / "started.txt").write_text(f"{time.time() - started:.1f} s\n")
    except BaseException:
        stop(folder)
        raise
    return Cluster(folder, procs)


def _daemon(folder: Path, program: str, args: list[str], env: dict) -> subprocess.Popen:
    """Start ``program`` in the foreground of a process of its own; its pid is added to ``folder/run/pids``."""
    log = open(folder / "log" / f"{program}.out", "ab")
    proc = subprocess.Popen([shutil.which(program, path=SBIN_PATH), *args], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()
    with open(folder / "run" / "pids", "a") as f:
        f.write(f"{program} {proc.pid}\n")
    return proc


def _mariadb(folder: Path, env: dict) -> subprocess.Popen:
    """A MariaDB server for slurmdbd: data in the folder, reachable only through its unix socket, tuned for speed
    over durability (a test's database)."""
    data = folder / "db"
    if not (data / "mysql").exists():
        out = subprocess.run([shutil.which("mariadb-install-db", path=SBIN_PATH), "--no-defaults",
                              f"--datadir={data}", "--user=root", "--skip-test-db"],
                             capture_output=True, text=True, timeout=120, env=env)
        if out.returncode != 0:
            raise Unavailable(f"mariadb-install-db failed: {(out.stdout + out.stderr).strip()[-500:]}")
    proc = _daemon(folder, "mariadbd", ["--no-defaults", f"--datadir={data}", "--user=root", "--skip-networking",
                                        f"--socket={folder}/db.sock", f"--pid-file={folder}/run/mariadbd.pid",
                                        f"--log-error={folder}/log/mariadbd.log", "--innodb-buffer-pool-size=32M",
                                        "--innodb-flush-log-at-trx-commit=0"], env)
    _wait(proc, folder, lambda: _ok(["mariadb", "--no-defaults", "-S", f"{folder}/db.sock", "-u", "root",
                                     "-e", "select 1"], env))
    return proc


def _ok(command: list[str], env: dict) -> bool:
    try:
        return subprocess.run(command, capture_output=True, timeout=10, env=env).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _sinfo_idle(env: dict) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10, env=env)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and set(out.stdout.split()) == {"idle"}


def _wait(proc: subprocess.Popen, folder: Path, ready, timeout: float = START_TIMEOUT_S) -> None:
    """Until ``ready()``; a daemon that exits or a timeout raises ``Unavailable`` with the end of its log."""
    program = Path(proc.args[0]).name
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            logs = sorted((folder / "log").glob(f"{program}*"), key=lambda p: p.stat().st_size)
            tail = logs[-1].read_text(errors="replace")[-1500:] if logs else ""
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not ready after {timeout} s"
            raise Unavailable(f"{program} {why}; its log ({folder / 'log'}):\n{tail}")
        time.sleep(0.2)


def stop(folder: Path, timeout: float = 15) -> None:
    """Cancel the cluster's jobs, then stop the daemons started in ``folder`` (newest first) by their pids: SIGTERM,
    SIGKILL after ``timeout``. A pid whose environment does not name the folder's slurm.conf (reused by now) is
    left alone.
    Nothing is removed."""
    folder = Path(folder).resolve()
    pids_file = folder / "run" / "pids"
    if not pids_file.exists():
        return
    started = [line.split() for line in pids_file.read_text().splitlines() if line.strip()]
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    if any(name == "slurmctld" and _ours(int(pid), folder) for name, pid in started):
        # jobs run under slurmstepd, outside the daemons' process groups: cancel them while slurmd still can
        jobs = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True, timeout=30, env=env)
        if jobs.stdout.split():
            subprocess.run(["scancel", "--full", *jobs.stdout.split()], capture_output=True, timeout=30, env=env)
            deadline = time.time() + timeout
            while time.time() < deadline and subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True,
                                                            text=True, timeout=30, env=env).stdout.strip():
                time.sleep(0.5)
    for name, pid in reversed(started):
        pid = int(pid)
        if not _ours(pid, folder):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _ours(pid, folder) and time.time() < deadline:
            time.sleep(0.1)
        if _ours(pid, folder):
            os.kill(pid, signal.SIGKILL)
            while _ours(pid, folder):
                time.sleep(0.1)
    pids_file.unlink()


def _ours(pid: int, folder: Path) -> bool:
    """Whether ``pid`` is still a live daemon of this folder (a child that ended is reaped here)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: started by `python -m tests.slurm_cluster start`
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    return state != "Z" and f"SLURM_CONF={folder}/slurm.conf".encode() in environ


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster start|stop <folder>", file=sys.stderr)
        return 2
    folder = Path(argv[1])
    if argv[0] == "stop":
        stop(folder)
        return 0
    try:
        cluster = start(folder)
    except Unavailable as err:
        print(f"slurm_cluster: {err}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
