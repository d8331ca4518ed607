"""Faults: a worker killed mid-run, a hung peer, a diverging loss, a resumed run; and the
checkpoint/metrics bookkeeping that makes a resumed run show each epoch once.

The runs are the digits quickstart, shortened, on gloo/CPU, as real processes. Each runs in its own
session and is killed (SIGKILL) when its test ends, whatever happened to it.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from p2p.checkpoint import Checkpointer, Facts, decide
from p2p.comm import free_port
from p2p.config import ConfigError, LogConfig
from p2p.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# 100 steps per epoch (a few seconds on CPU), so a kill can land in the middle of one
QUICK = ["train.py", "--config", "configs/quickstart.toml", "--log.progress", "false", "--log.plots", "false",
         "--data.samples_per_epoch", "3200"]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_", "MASTER_"))},
       "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # a fresh store per restart (see comm.py)


def start(cmd: list[str], out: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session, stdout and stderr to `out`."""
    with out.open("w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env or ENV,
                                start_new_session=True)


def kill_all(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process of each one's session: stopped or hung ones included."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def torchrun(n: int, args: list[str], log: Path, timeout: float = 400) -> tuple[int, float]:
    """Run `torchrun --standalone --nproc_per_node n` to the end; (exit code, seconds)."""
    t0 = time.monotonic()
    proc = start([*TORCHRUN, "--standalone", "--nproc_per_node", str(n), *QUICK, *args], log)
    try:
        return proc.wait(timeout=timeout), time.monotonic() - t0
    finally:
        kill_all([proc])


def launch_ranks(n: int, args: list[str], tmp: Path) -> list[subprocess.Popen]:
    """Start n `python train.py` processes joined through MASTER_ADDR/PORT, as a multi-node launch would."""
    port = str(free_port())
    return [start([sys.executable, *QUICK, *args], tmp / f"rank{r}.log",
                  {**ENV, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r in range(n)]


def wait_for(condition, procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a process ended while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(0.05)


def rows(run: Path, rank: int) -> list[dict]:
    path = run / f"node{rank}.csv"
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def epochs(run: Path, rank: int) -> list[int]:
    return [int(r["epoch"]) for r in rows(run, rank)]


def final_losses(run: Path, n: int) -> list[float]:
    return [float(rows(run, r)[-1][k]) for r in range(n) for k in ("train_loss", "test_loss")]


def worker_pids(agent: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the workers that torchrun's agent started (its children with RANK set)."""
    found = {}
    children = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        try:
            env = dict(kv.split("=", 1) for kv in
                       Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


# --- bookkeeping, in-process ---------------------------------------------------------------------------------------


def _fake_node(value: float):
    model = nn.Linear(2, 2)
    torch.nn.init.constant_(model.weight, value)
    optimizer = SimpleNamespace(state_dict=lambda: {"dual": torch.full((2,), value)}, load_state_dict=lambda s: None)
    loader = SimpleNamespace(sampler=SimpleNamespace(generator=torch.Generator()))
    return SimpleNamespace(model=model, optimizer=optimizer, scheduler=None, loader=loader)


def test_checkpoints_keep_two_and_resume_the_newest_common_epoch(tmp_path):
    """Node 0 wrote epochs 1-4, node 1 died while writing 4: both resume from 3, node 0 with its epoch-3 state."""
    comm = SimpleNamespace(device=torch.device("cpu"), bytes_sent=0)
    ckpts = [Checkpointer(tmp_path, rank, every=1, last=10) for rank in range(2)]
    for rank, last in ((0, 4), (1, 3)):
        for epoch in range(1, last + 1):
            ckpts[rank].maybe_save(_fake_node(epoch), comm, {"epoch": epoch, "step": 7 * epoch, "wall_s": 1.0})
    assert ckpts[0].epochs() == [3, 4] and ckpts[1].epochs() == [2, 3]
    states = [c.readable(comm.device) for c in ckpts]
    epoch = decide([facts(readable=sorted(s)) for s in states], resume=True, out_dir=tmp_path)
    assert epoch == 3
    node = _fake_node(0.0)
    assert ckpts[0].load(3, states[0][3], node, comm) == {"epoch": 3, "step": 21, "wall_s": 1.0}  # its own step
    assert torch.equal(node.model.weight, torch.full((2, 2), 3.0))


def test_an_unreadable_newest_checkpoint_falls_back_to_the_older_one(tmp_path):
    comm = SimpleNamespace(device=torch.device("cpu"), bytes_sent=0)
    ckpt = Checkpointer(tmp_path, 0, every=1, last=10)
    for epoch in (1, 2, 3):
        ckpt.maybe_save(_fake_node(epoch), comm, {"epoch": epoch, "step": epoch, "wall_s": 0.0})
    newest = tmp_path / "node0_epoch3.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a crash or a full disk mid-write, on a copy say
    assert sorted(ckpt.readable(comm.device)) == [2]
    assert decide([facts(readable=[2], saved=[2, 3]), facts(readable=[2, 3])], True, tmp_path) == 2


def test_a_checkpoint_of_another_setting_is_a_config_error(tmp_path):
    comm = SimpleNamespace(device=torch.device("cpu"), bytes_sent=0)
    fixed = {"world size": 4, "--data.batch_size": 32}
    Checkpointer(tmp_path, 0, every=1, last=1, fixed=fixed).maybe_save(
        _fake_node(1.0), comm, {"epoch": 1, "step": 1, "wall_s": 0.0})
    for fixed_now, message in (
            ({**fixed, "--data.batch_size": 16}, r"checkpoint .*node0_epoch1.pt was written with --data.batch_size 32, "
                                                 r"this launch has 16: a resumed run cannot change it; resume with "
                                                 r"the run's own config, .*config.toml"),
            ({**fixed, "world size": 8}, r"was written with world size 4, this launch has 8"),
            (fixed, r"checkpoint .*node0_epoch1.pt does not fit this run \(.*\): resume with the run's own config")):
        ckpt = Checkpointer(tmp_path, 0, every=1, last=1, fixed=fixed_now)
        other = _fake_node(0.0)
        other.model = nn.Linear(3, 3)  # e.g. resumed with another --model.hidden
        with pytest.raises(ConfigError, match=message):
            ckpt.load(1, ckpt.readable(comm.device)[1], other, comm)


def facts(nonempty: bool = True, ours: bool = False, logged: list[int] = (), saved: list[int] | None = None,
          readable: list[int] = ()) -> Facts:
    return Facts(nonempty, ours, "agent", list(logged), list(readable) if saved is None else saved, list(readable))


EMPTY = facts(nonempty=False)
RESULTS = facts(logged=[1, 2, 3])  # e.g. train.checkpoint_every = 0


@pytest.mark.parametrize("nodes,resume,expected", [
    ([EMPTY, EMPTY], False, None),  # a new run
    ([EMPTY, EMPTY], True, None),  # --run.resume on nothing: start
    ([facts(), facts()], True, None),  # only config.toml and the like: no results
    ([facts(readable=[2, 3]), facts(readable=[3, 4])], True, 3),
    ([facts(ours=True, readable=[2]), facts(ours=True, readable=[2])], False, 2),  # a torchrun restart
    ([facts(ours=True, logged=[1]), facts(ours=True)], False, None),  # our own attempt died before a checkpoint
    ([facts(ours=True, logged=[1]), facts(ours=True)], True, None),
    ([RESULTS, RESULTS], False, "already exists"),
    ([facts(), EMPTY], False, "already exists"),
    ([facts(ours=True, readable=[2]), facts(readable=[2])], False, "already exists"),  # not every agent is ours
    ([RESULTS, RESULTS], True, r"holds results but no checkpoint that every node can resume from \(nodes 0-1: "
                               r"logged 1-3, checkpoints none\): nothing was changed"),
    ([facts(logged=[1, 2], readable=[2]), facts(logged=[1, 2], saved=[2])], True,
     r"\(node 0: logged 1-2, checkpoints 2; node 1: logged 1-2, checkpoints none, unreadable 2\)"),
])
def test_a_launch_continues_a_run_or_starts_where_there_are_no_results(nodes, resume, expected, tmp_path):
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            decide(nodes, resume, tmp_path)
    else:
        assert decide(nodes, resume, tmp_path) == expected


def test_checkpoint_every_and_the_last_epoch(tmp_path):
    comm = SimpleNamespace(device=torch.device("cpu"), bytes_sent=0)
    ckpt = Checkpointer(tmp_path, 0, every=2, last=5)
    for epoch in range(1, 6):
        ckpt.maybe_save(_fake_node(epoch), comm, {"epoch": epoch, "step": epoch, "wall_s": 0.0})
    assert ckpt.epochs() == [4, 5]
    assert not list(tmp_path.glob("*.tmp"))


def test_resumed_metrics_drop_the_rows_after_the_checkpoint(tmp_path):
    """A run logged epochs 1-3 but checkpointed only 2: after resuming, CSV and TensorBoard hold 1-4 once."""
    for resume_epoch, epochs_logged in ((None, (1, 2, 3)), (2, (3, 4))):
        metrics = Metrics(tmp_path, 0, LogConfig(), resume_epoch=resume_epoch)
        for epoch in epochs_logged:
            metrics.log({"epoch": epoch, "train_loss": 10.0 * epoch + (resume_epoch or 0)})
        metrics.close()
    assert epochs(tmp_path, 0) == [1, 2, 3, 4]
    assert [float(r["train_loss"]) for r in rows(tmp_path, 0)] == [10, 20, 32, 42]
    acc = EventAccumulator(str(tmp_path / "tb" / "node0"))
    acc.Reload()
    assert [(p.step, p.value) for p in acc.Scalars("loss/train")] == [(1, 10), (2, 20), (3, 32), (4, 42)]


# --- real processes -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 4-node, 4-epoch run: what a killed or resumed run must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    rc, seconds = torchrun(4, ["--run.dir", str(run), "--train.epochs", "4"], run.parent / "log.txt")
    assert rc == 0, (run.parent / "log.txt").read_text()[-3000:]
    run.joinpath("seconds").write_text(str(seconds))
    return run


@pytest.mark.timeout(600)
def test_killed_worker_restarts_and_matches_uninterrupted(reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    t0 = time.monotonic()
    agent = start([*TORCHRUN, "--standalone", "--nproc_per_node", "4", "--max-restarts", "1", *QUICK,
                   "--run.dir", str(run), "--train.epochs", "4"], log)
    try:
        # every node has checkpointed epoch 1, and no node has finished epoch 2: kill rank 1 in the middle
        wait_for(lambda: all((run / "ckpt" / f"node{r}_epoch1.pt").exists() for r in range(4)), [agent], 300,
                 "epoch 1 checkpoints")
        epoch_s = float(rows(run, 0)[0]["wall_s"])
        time.sleep(min(epoch_s / 2, 2.0))
        pid = worker_pids(agent)[1]
        assert all(2 not in epochs(run, r) for r in range(4)), "epoch 2 ended before the kill: lengthen the epochs"
        os.kill(pid, signal.SIGKILL)
        rc = agent.wait(timeout=400)
        seconds = time.monotonic() - t0
    finally:
        kill_all([agent])
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "resumed from epoch 1" in text
    for r in range(4):
        assert epochs(run, r) == [1, 2, 3, 4], (r, epochs(run, r))
    diff = max(abs(a - b) for a, b in zip(final_losses(run, 4), final_losses(reference, 4)))
    assert diff <= 1e-5
    lost = seconds - float(reference.joinpath("seconds").read_text())
    print(f"\nkill test: {seconds:.1f}s with the kill vs {seconds - lost:.1f}s uninterrupted "
          f"({lost:.1f}s lost to the restart); final loss max |diff| {diff:.2e}")


@pytest.mark.timeout(600)
def test_resume_continues_each_epoch_once(reference, tmp_path):
    """2 epochs, node 2's newest checkpoint truncated, then `--run.resume --train.epochs 4`: every node resumes
    from epoch 1, the newest that all can read. Node 1 straggles (sleep_factor) in both launches."""
    run = tmp_path / "run"
    slow = ["--run.dir", str(run), "--train.sleep_factor", "1", "--train.slow_ranks", "1"]
    assert torchrun(4, [*slow, "--train.epochs", "2"], tmp_path / "log1.txt")[0] == 0
    newest = run / "ckpt" / "node2_epoch2.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    rc, _ = torchrun(4, [*slow, "--train.epochs", "4", "--run.resume"], tmp_path / "log2.txt")
    text = (tmp_path / "log2.txt").read_text()
    assert rc == 0, text[-3000:]
    assert re.search(r"checkpoint .*node2_epoch2.pt cannot be read \(.+\): not resuming from it", text), text[-3000:]
    assert "resumed from epoch 1 (step 100)" in text
    for r in range(4):
        assert epochs(run, r) == [1, 2, 3, 4], (r, epochs(run, r))
        slept = [float(row["sleep_s"]) for row in rows(run, r)]
        assert all(s > 0 for s in slept) if r == 1 else all(s == 0 for s in slept), (r, slept)
    wall = [float(row["wall_s"]) for row in rows(run, 0)]
    assert wall == sorted(wall)  # wall_s continues from the checkpoint
    assert final_losses(run, 4) == pytest.approx(final_losses(reference, 4), abs=1e-5)


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file but `.lock`, which names the last launch that claimed the directory (checkpoint.RunLock)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["resume", "restart"])
def test_no_launch_overwrites_results(how, tmp_path):
    """Results without a checkpoint (train.checkpoint_every = 0) survive `--run.resume`, and a torchrun restart
    after an attempt that refused the directory refuses it again instead of training over it."""
    run = tmp_path / "run"
    run.mkdir()
    for r in range(2):
        (run / f"node{r}.csv").write_text("epoch,train_loss\n1,0.9\n2,0.8\n3,0.7\n")
    before = snapshot(run)
    restarts = ["--max-restarts", "1"] if how == "restart" else []
    resume = ["--run.resume"] if how == "resume" else []
    proc = start([*TORCHRUN, "--standalone", "--nproc_per_node", "2", *restarts, *QUICK, "--run.dir", str(run),
                  "--topology.path=", *resume], tmp_path / "log.txt")
    try:
        rc = proc.wait(timeout=240)
    finally:
        kill_all([proc])
    text = (tmp_path / "log.txt").read_text()
    # the ranks share one log file, so two lines can run together ("...NAMEerror: ..."): split on the messages
    errors = re.findall(r"error: .*?--run\.name NAME", text)
    assert rc != 0 and not re.search(r'File ".*(p2p/|train\.py)', text), text[-3000:]  # torchrun's traceback only
    assert re.search(r"exitcode\s*: 2 ", text), text[-3000:]  # the workers' code, as torchrun reports it
    # (torchrun ends a worker's peers as soon as it exits, so a peer may not get to print its line)
    if how == "resume":
        assert set(errors) == {f"error: run directory {run} holds results but no checkpoint that every node can "
                               f"resume from (nodes 0-1: logged 1-3, checkpoints none): nothing was changed; start a "
                               f"new run with --run.name NAME"}, errors
    else:
        assert set(errors) == {f"error: run directory {run} already exists: continue it with --run.resume or start "
                               f"a new run with --run.name NAME"}, errors
        assert len(re.findall(r"failed \(exitcode: 2\)", text)) == 2, text[-3000:]  # attempt 0, and its restart
    assert snapshot(run) == before


@pytest.mark.timeout(300)
def test_hung_peer_stops_the_others_naming_it(tmp_path):
    """Node 2 of the ring 0-1-2-3 is stopped (SIGSTOP): the others exit 1 within timeout_s + 30 s."""
    timeout_s = 20
    run = tmp_path / "run"
    procs = launch_ranks(4, ["--run.dir", str(run), "--train.epochs", "1000", "--comm.timeout_s", str(timeout_s)],
                         tmp_path)
    try:
        wait_for(lambda: epochs(run, 0), procs, 240, "first epoch")
        os.kill(procs[2].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        for r in (0, 1, 3):
            rc = procs[r].wait(timeout=max(timeout_s + 30 - (time.monotonic() - stopped), 0.1))
            assert rc == 1, (r, rc)
        took = time.monotonic() - stopped
    finally:
        kill_all(procs)
    errors = {r: [ln for ln in (tmp_path / f"rank{r}.log").read_text().splitlines() if ln.startswith("error:")]
              for r in (0, 1, 3)}
    assert all(len(e) == 1 for e in errors.values()), errors
    for r in (1, 3):  # the neighbours of node 2 name it
        assert re.match(rf"error: node {r}: (send to|receive from) neighbour 2 failed \(timeout 20s\)",
                        errors[r][0]), errors
    assert re.match(r"error: node 0: .*neighbour [13]", errors[0][0]), errors  # its neighbours left
    print(f"\nhang test: the other nodes exited {took:.1f}s after the SIGSTOP (timeout_s {timeout_s})")


@pytest.mark.timeout(300)
def test_diverging_loss_stops_every_node(tmp_path):
    run = tmp_path / "run"
    procs = launch_ranks(2, ["--run.dir", str(run), "--train.epochs", "3", "--topology.path=",
                             "--algorithm.lr", "1e6"], tmp_path)
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        kill_all(procs)
    assert codes == [1, 1]
    for r in range(2):
        text = (tmp_path / f"rank{r}.log").read_text()
        assert re.search(r"^error: non-finite training loss on node\(s\) \[[0-9, ]+\] in epoch 1: lower "
                         r"--algorithm.lr", text, re.M), text[-2000:]
        assert "Traceback" not in text
        assert epochs(run, r) == []
    assert not list((run / "ckpt").glob("*epoch1*"))  # the bad epoch is never checkpointed
