"""Run a function on several real processes joined in a gloo group on loopback (no mocks).

Every run has a deadline: a hung collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import csv
import os
import pickle
import queue
import signal
import subprocess
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

import torch
import torch.multiprocessing as mp

from p2p.comm import Comm, free_port, read_env
from p2p.config import CommConfig


def _worker(fn: Callable, rank: int, world_size: int, port: int, results: Any, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    comm = Comm(read_env(), torch.device("cpu"), "gloo", CommConfig(timeout_s=60))
    try:
        comm.start()
        # Plain pickle copies tensors by value: torch's queue would pass a file descriptor that dies
        # with this process, so the parent could fail to read the result of a rank that already exited.
        results.put((rank, True, pickle.dumps(fn(comm, *args))))
    except BaseException:  # report, so the parent fails with the child's traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        comm.stop()


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """`fn(comm, *args)` on `world_size` processes; returns each rank's result, by rank.

    `fn` must be a module-level function; results should be plain Python/numpy/torch CPU values.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish in {timeout}s")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RuntimeError(f"ranks {dead} died without reporting (exit codes "
                                       f"{[procs[r].exitcode for r in dead]})")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]


ROOT = Path(__file__).resolve().parents[1]


def launch(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root; on timeout kill its whole process group (torchrun's workers too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def csv_rows(path: Path) -> list[dict[str, float | None]]:
    """A node's CSV as floats (None for empty cells)."""
    with path.open() as f:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]


def optimizer(flat, cfg, topology, comm, mode: str = "sync"):
    """The library's DecentralizedOptimizer over a test's own FlatParams, with the rule settings of `cfg` (an
    AlgorithmConfig). Its l2_lambda is left to the test, which adds that term to the gradient itself."""
    import dataclasses

    from p2p.network import Network
    from p2p.optimizer import DecentralizedOptimizer

    fields = {**dataclasses.asdict(cfg), "l2_lambda": 0.0}
    return DecentralizedOptimizer(flat, Network(comm, topology), fields.pop("name"), mode=mode, **fields)
