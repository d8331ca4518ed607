"""A run directory belongs to one job at a time, and its workers do not outlive their torchrun agent.

Real processes: a simulated run (one process, quick to start) holds the directory while a torchrun job and
a second simulated run try to resume into it; then it is SIGKILLed and a resume goes through, since the
lock died with it. Every process runs in its own session and is killed when its test ends.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed import launch, run_ranks
from test_faults import QUICK, TORCHRUN, epochs, kill_all, start, wait_for, worker_pids

from p2p.checkpoint import agent_id, claim
from p2p.config import ConfigError

SIM = [sys.executable, *QUICK, "--sim.nodes", "2", "--topology.path="]


@pytest.mark.timeout(240)
def test_a_second_job_is_refused_naming_the_holder_and_the_lock_dies_with_it(tmp_path):
    run = tmp_path / "run"
    holder = start([*SIM, "--run.dir", str(run), "--train.epochs", "1000"], tmp_path / "holder.log")
    try:
        wait_for(lambda: epochs(run, 0), [holder], 120, "the holder's first epoch")
        started_by = (run / "started_by").read_text()
        line = (rf"error: run directory {re.escape(str(run))} is in use by another job \(host "
                rf"{re.escape(socket.gethostname())}, pid {holder.pid}\): wait for it to end or stop it, or start a "
                rf"new run with --run\.name NAME")
        # a torchrun job: every rank that gets to print says the same line, the workers exit 2
        job = launch([*TORCHRUN, "--standalone", "--nproc_per_node", "2", *QUICK, "--topology.path=",
                      "--run.dir", str(run), "--run.resume"], timeout=120)
        errors = re.findall(r"error: .*?--run\.name NAME", job.stderr)
        assert job.returncode != 0 and errors and all(re.fullmatch(line, e) for e in errors), job.stderr[-3000:]
        assert re.search(r"exitcode\s*: 2 ", job.stderr), job.stderr[-3000:]
        # a second simulated run: one line, exit code 2
        sim = launch([*SIM, "--run.dir", str(run), "--run.resume"], timeout=120)
        assert sim.returncode == 2, sim.stderr[-3000:]
        assert re.fullmatch(line + "\n", sim.stderr), sim.stderr[-3000:]
        assert (run / "started_by").read_text() == started_by  # neither of them began anything
        holder_epochs = epochs(run, 0)
        assert holder_epochs == list(range(1, len(holder_epochs) + 1)), holder_epochs  # each epoch once
    finally:
        kill_all([holder])  # SIGKILL: no chance to release anything itself
    common = max(int(re.search(r"epoch(\d+)", p.name).group(1)) for p in (run / "ckpt").glob("node1_epoch*.pt"))
    resumed = launch([*SIM, "--run.dir", str(run), "--run.resume", "--train.epochs", str(common + 1)], timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from epoch {common}" in resumed.stderr
    for rank in range(2):
        assert epochs(run, rank) == list(range(1, common + 2)), (rank, epochs(run, rank))


def _claim_as_hosts(comm, run: str, other_job: int) -> list[str]:
    """Every rank as local rank 0 of a host of its own, all sharing `run` (a network file system): claim it
    while the process `other_job` holds it, then again once that one is killed."""
    comm.env.local_rank = 0
    out = []
    for attempt in range(2):
        try:
            claim(Path(run), agent_id(), comm)
            out.append("ok")
        except ConfigError as e:
            out.append(str(e))
        if attempt == 0 and comm.rank == 0:
            os.kill(other_job, signal.SIGKILL)
        comm.agree("")  # a barrier: the other job is gone before anyone claims again
    return out


HOLD = ("import fcntl, json, sys, time; f = open(sys.argv[1], 'w'); fcntl.lockf(f, fcntl.LOCK_EX); "
        "f.write(json.dumps({'host': 'elsewhere', 'pid': 4242, 'agent': 'another job'})); f.flush(); "
        "print('held', flush=True); time.sleep(100)")


@pytest.mark.timeout(120)
def test_hosts_of_one_job_share_a_directory_and_another_job_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        results = run_ranks(_claim_as_hosts, 2, str(run), other.pid, timeout=100)
    finally:
        other.kill()
        other.wait()
    refused = (f"run directory {run} is in use by another job (host elsewhere, pid 4242): wait for it to end or "
               f"stop it, or start a new run with --run.name NAME")
    assert results == [[refused, "ok"], [refused, "ok"]]  # the second time one host holds it, the other shares it


def _claim(comm, run: str) -> str:
    try:
        claim(Path(run), agent_id(), comm)
        return "ok"
    except ConfigError as e:
        return str(e)


@pytest.mark.timeout(120)
def test_a_run_directory_that_cannot_be_written_stops_every_rank_with_one_line(tmp_path):
    """Only local rank 0 touches the directory; the others must stop with its line, not wait for it."""
    file = tmp_path / "file"
    file.write_text("not a directory")
    assert run_ranks(_claim, 2, str(file), timeout=100) == [
        f"run directory {file} is a file: pass a directory to --run.dir"] * 2
    assert _claim(None, str(file / "run")) == (f"cannot write to run directory {file / 'run'} (Not a directory): pick "
                                               f"another --run.dir or --run.name")


def _gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@pytest.mark.timeout(240)
def test_workers_stop_when_their_torchrun_agent_is_killed(tmp_path):
    run = tmp_path / "run"
    agent = start([*TORCHRUN, "--standalone", "--nproc_per_node", "2", *QUICK, "--topology.path=",
                   "--run.dir", str(run), "--train.epochs", "1000"], tmp_path / "log.txt")
    workers: dict[int, int] = {}
    try:
        wait_for(lambda: epochs(run, 0), [agent], 180, "first epoch")
        workers = worker_pids(agent)
        assert sorted(workers) == [0, 1], workers
        os.kill(agent.pid, signal.SIGKILL)  # the agent alone, not its process group
        killed = time.monotonic()
        while not all(_gone(pid) for pid in workers.values()) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        took = time.monotonic() - killed
        assert all(_gone(pid) for pid in workers.values()), f"workers {workers} still run {took:.1f}s after the agent died"
    finally:
        kill_all([agent])
        for pid in workers.values():  # torchrun starts each worker in a session of its own
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    print(f"\nthe workers were gone {took:.2f}s after their agent was SIGKILLed")
