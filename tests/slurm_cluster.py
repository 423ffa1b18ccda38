"""A real SLURM cluster on localhost for the launch-path tests (Debian slurmctld/slurmd/munge, no systemd).

:func:`slurm_missing` says whether the packages are installed (it installs nothing); :class:`LocalCluster`
writes a slurm.conf into a temp folder, starts munged, slurmctld and one slurmd per fake node (all on
127.0.0.1, free ports), waits until the nodes are idle, and stops exactly the daemons it started (by their
pid files).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged", "mungekey")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _which(name: str) -> str | None:
    """Path of an executable on PATH or in /usr/sbin, /usr/bin (daemons live in sbin, often off PATH)."""
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def slurm_missing() -> str | None:
    """None when the SLURM and munge binaries are all installed, else the reason (which ones are missing).

    Only detects: ``.ci/run`` installs the Debian packages :data:`PACKAGES` (as root, with apt-get).
    """
    missing = [b for b in BINARIES if not _which(b)]
    if not missing:
        return None
    what = "SLURM and munge are" if len(missing) == len(BINARIES) else f"{', '.join(missing)} (SLURM / munge) are"
    return f"{what} not installed (Debian packages {' '.join(PACKAGES)})"


def free_ports(n: int) -> list[int]:
    """``n`` consecutive free TCP ports (slurmd ports of a node range must be consecutive)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        ok = True
        for port in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free ports")


class LocalCluster:
    """munged + slurmctld + ``nodes`` slurmd daemons in ``root`` (each fake node gets ``cpus`` CPUs)."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int = 2) -> None:
        self.root, self.nodes, self.cpus = Path(root), nodes, cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                    "SLURM_CONF": str(self.conf), "MASTER_ADDR": "127.0.0.1"}
        self.node_names = ["localhost"] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
        self._pidfiles: list[Path] = []

    # -- set-up -------------------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        r = self.root
        ctld_port, *node_ports = free_ports(1 + self.nodes)
        if self.nodes == 1:
            node_line = f"NodeName=localhost NodeAddr=127.0.0.1 Port={node_ports[0]} CPUs={self.cpus} State=UNKNOWN"
        else:
            node_line = (f"NodeName=n[1-{self.nodes}] NodeAddr=127.0.0.1 Port={node_ports[0]}-{node_ports[-1]} "
                         f"CPUs={self.cpus} State=UNKNOWN")
        self.conf.write_text(f"""ClusterName=ibllmtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge.socket
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
{node_line}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def start(self) -> "LocalCluster":
        """Start the daemons and wait (up to 30 s) until every node is idle."""
        r = self.root
        (r / "state").mkdir(parents=True, exist_ok=True)
        for name in self.node_names:
            (r / f"spool-{name}").mkdir(exist_ok=True)
        self._write_conf()
        key = r / "munge.key"
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        subprocess.run([_which("munged"), "--force", f"--key-file={key}", f"--socket={r}/munge.socket",
                        f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log", f"--seed-file={r}/munge.seed"],
                       check=True, capture_output=True)
        self._pidfiles.append(r / "munged.pid")
        subprocess.run([_which("slurmctld"), "-f", str(self.conf)], check=True, env=self.env, capture_output=True)
        self._pidfiles.append(r / "slurmctld.pid")
        for name in self.node_names:
            subprocess.run([_which("slurmd"), "-f", str(self.conf), "-N", name], check=True, env=self.env,
                           capture_output=True)
            self._pidfiles.append(r / f"slurmd-{name}.pid")
        deadline = time.time() + 30
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = [line.split()[-1] for line in out.splitlines() if line.strip()]
            if len(states) == self.nodes and all(s.startswith("idle") for s in states):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not become idle: {out!r}\n{self.logs()}")

    # -- use ----------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return subprocess.run([_which(cmd[0]) or cmd[0], *cmd[1:]], env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout)

    def job_state(self, job_id: str) -> str:
        """``JobState`` of a job (e.g. RUNNING, COMPLETED, PENDING, REQUEUED, FAILED)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, field: str) -> str | None:
        """One ``Field=value`` of ``scontrol show job``."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for token in out.split():
            if token.startswith(field + "="):
                return token.split("=", 1)[1]
        return None

    def wait(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        """Poll until the job reaches one of ``states`` (or fail with the logs)."""
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} stayed {state} (wanted {states})\n{self.logs()}")

    def logs(self) -> str:
        """Tail of the daemon logs (for failure messages)."""
        parts = []
        for log in sorted(self.root.glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    # -- tear-down ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel jobs, then stop the daemons this cluster started (by pid file), newest first."""
        self.run("scancel", "--full", "-u", "root", check=False)
        for pidfile in reversed(self._pidfiles):
            try:
                pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._pidfiles.clear()
