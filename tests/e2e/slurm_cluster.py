"""A real one-node Slurm cluster on this machine (munge, slurmctld, slurmd, as root), for the e2e tests.

Tasks are bound to their CPUs (task/affinity), as on most clusters: a job step that asks for fewer CPUs than
the job has shows it.

Installs Debian's slurm-wlm and munge with apt-get when they are missing; skips (with the reason)
when that is impossible (not root, no apt-get). The configuration is written here, into a temp folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

CONF = """\
ClusterName=eptest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
KillWait=60
InactiveLimit=0
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> str | None:
    """None when slurm + munge are usable, else the reason they are not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm/munge missing and cannot apt-get install them (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            return f"apt-get install slurm-wlm munge failed: {p.stderr[-500:]}"
    return None


class SlurmCluster:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.host = socket.gethostname().split(".")[0]
        self.conf = workdir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self) -> "SlurmCluster":
        for sub in ("state", "spool", "munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(host=self.host, dir=self.dir, cpus=os.cpu_count() or 2,
                                         ctld_port=_free_port(), d_port=_free_port()))
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
        os.chmod(key, 0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["munged", "--force"], check=True)
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", self.host], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            p = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if p.returncode == 0 and p.stdout.strip() in ("idle", "mix", "alloc"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"slurm did not come up: {self.log_tail()}")

    def log_tail(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            f = self.dir / name
            if f.is_file():
                out.append(f"--- {name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(out)

    def run(self, *cmd: str, cwd: Path | None = None) -> str:
        p = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, cwd=cwd, timeout=60)
        if p.returncode != 0:
            raise RuntimeError(f"{cmd} failed: {p.stderr}")
        return p.stdout

    def job_state(self, job: str) -> str:
        p = subprocess.run(["scontrol", "show", "job", job], env=self.env, capture_output=True, text=True)
        for tok in p.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job: str, field: str) -> str:
        p = subprocess.run(["scontrol", "show", "job", job], env=self.env, capture_output=True, text=True)
        for tok in p.stdout.split():
            if tok.startswith(f"{field}="):
                return tok.split("=", 1)[1]
        return ""

    def wait(self, job: str, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.job_state(job)
            if s in states:
                return s
            time.sleep(1.0)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout}s\n{self.log_tail()}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
