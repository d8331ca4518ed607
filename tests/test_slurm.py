"""A real one-machine Slurm cluster (Debian's slurm-wlm: slurmctld, slurmd, munge), started and stopped here:
`launch/slurm.sbatch` runs the quickstart with the CSVs of a torchrun job, and a job preempted mid-epoch
(`scontrol requeue`) resumes, requeued, from the checkpoint its SIGTERM wrote, with every epoch once.

Needs root and the binaries (.ci/run installs them); skipped with the reason otherwise."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from p2p.comm import free_port
from test_faults import ENV, QUICK, TORCHRUN, epochs, kill_all, rows, start, wait_for
from test_signals import _results

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
ARGS = ["--train.epochs", "2"]  # of QUICK: 100 steps per epoch, so a signal can land inside one


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _pid(path: Path, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    raise AssertionError(f"no pid in {path} after {timeout}s")


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF) of a running one-node cluster; its daemons stopped afterwards, whatever
    happened."""
    if os.geteuid() != 0:
        pytest.skip("a Slurm cluster needs root to start slurmd")
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    ctl, node = free_port(), free_port()
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=p2ptest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort={ctl}
SlurmdPort={node}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = {**ENV, "SLURM_CONF": str(conf)}
    started: list[int] = []
    try:
        if subprocess.run([_which("munge"), "-n"], capture_output=True).returncode != 0:  # no munged running
            Path("/run/munge").mkdir(exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True, capture_output=True)
            started.append(_pid(Path("/run/munge/munged.pid")))
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_which(daemon), "-f", str(conf)], check=True, capture_output=True, env=env)
            started.append(_pid(d / f"{daemon}.pid"))
        deadline = time.monotonic() + 30
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                                           env=env).stdout:
            if time.monotonic() > deadline:
                pytest.skip(f"the Slurm node did not come up in 30 s:\n{(d / 'slurmd.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield env
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot start {e.cmd[0]}: {e.stderr.decode(errors='replace')[-500:]}")
    finally:
        subprocess.run(["scancel", "--full", "--partition", "debug"], capture_output=True, env=env)
        for pid in reversed(started):
            _stop(pid)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run under plain torchrun."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    proc = start([*TORCHRUN, "--standalone", "--nproc_per_node", "4", *QUICK, *ARGS, "--run.dir", str(run)],
                 run.parent / "log.txt")
    try:
        assert proc.wait(timeout=300) == 0, (run.parent / "log.txt").read_text()[-3000:]
    finally:
        kill_all([proc])
    return run


def _sbatch(env: dict, run: Path, out: Path, *extra: str) -> str:
    """Submit the quickstart (4 CPU ranks on the one node); its job id."""
    return subprocess.run(["sbatch", "--parsable", "--nodes", "1", "-o", str(out), *extra, "launch/slurm.sbatch",
                           *QUICK[3:], *ARGS, "--run.dir", str(run)],
                          cwd=ROOT, env={**env, "NPROC": "4", "RDZV_PORT": str(free_port())}, check=True,
                          capture_output=True, text=True).stdout.strip().split(";")[0]


def _state(env: dict, job: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=env).stdout
    found = re.search(r"JobState=(\w+)", shown)
    return found.group(1) if found else "GONE"


def _wait_done(env: dict, job: str, timeout: float, requeued: bool = False) -> str:
    """Wait for `job`'s end; a requeued job is started at once (Slurm would wait out a begin-time delay)."""
    deadline = time.monotonic() + timeout
    while (state := _state(env, job)) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"):
        if requeued and state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, env=env)
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], env=env)
            raise AssertionError(f"job {job} still {state} after {timeout}s")
        time.sleep(0.5)
    return state


@pytest.mark.timeout(400)
def test_sbatch_runs_the_quickstart_as_torchrun_does(slurm, reference, tmp_path):
    run, out = tmp_path / "run", tmp_path / "slurm.out"
    job = _sbatch(slurm, run, out)
    assert _wait_done(slurm, job, 300) == "COMPLETED", out.read_text()[-3000:]
    assert _results(run) == _results(reference)


@pytest.mark.timeout(500)
def test_a_preempted_job_is_requeued_and_resumes_from_its_signal_checkpoint(slurm, reference, tmp_path):
    run, out = tmp_path / "run", tmp_path / "slurm.out"
    job = _sbatch(slurm, run, out)
    wait_for(lambda: all(epochs(run, r) == [1] for r in range(4)) or _state(slurm, job) not in ("PENDING", "RUNNING"),
             [], 300, "epoch 1's rows")
    assert _state(slurm, job) == "RUNNING", out.read_text()[-3000:] if out.exists() else "no output"
    time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job], check=True, env=slurm)  # SIGTERM to every task, then pending
    assert _wait_done(slurm, job, 400, requeued=True) == "COMPLETED", out.read_text()[-3000:]
    text = out.read_text()
    stops = re.findall(r"stopped by SIGTERM at epoch 2 step (\d+); continue with --run.resume", text)
    assert len(stops) == 1, text[-3000:]
    assert f"resumed inside epoch 2, after its batch {int(stops[0]) - 100} (step {stops[0]})" in text, text[-3000:]
    assert [epochs(run, r) for r in range(4)] == [[1, 2]] * 4
    assert _results(run) == _results(reference)  # sync: the preempted run equals the uninterrupted one
