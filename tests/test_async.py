"""`async` meets nobody during training (issue 14), on real gloo processes.

- The trainer's loop in async makes no collective before its last epoch: 3 epochs make exactly the
  collectives of 1 (the last epoch's: the non-finite check and the network's metrics), while sync makes
  them every epoch. Non-final CSV rows hold the node's own metrics and no network columns.
- A stop spreads through the neighbour exchange: on a path of 5 nodes, node 0 stops after round 5; every
  other node raises NetworkStop naming node 0 within (S + 1) rounds per hop, passes it on, and all return.
- Through train.py under torchrun, a loss that becomes NaN in async stops every node with one line, long
  before the exchange timeout.
- `python -m p2p.evaluate RUN_DIR` computes the network's metrics from the checkpoints: on a simulated
  async run (which evaluates the averaged model every epoch) they equal the CSV's, epoch by epoch.
"""

import sys
import time

import pytest
import torch

from distributed import ROOT, csv_rows, launch, run_ranks
from p2p.checkpoint import Checkpointer
from p2p.config import load_config
from p2p.data import load_splits, partition
from p2p.topology import Topology
from p2p.loop import STOP_CHECK_STEPS, network
from p2p.trainer import build_node, train_loop
from p2p.transport import NetworkStop, Transport
from test_faults import QUICK, TORCHRUN

pytestmark = pytest.mark.timeout(300)
N = 4


def _collectives(comm, mode: str, out: str) -> dict:
    """The collectives the trainer's loop makes in 1 and in 3 epochs (2 for the rows' check), without sync's
    checks for a stop signal (docs/faults.md)."""
    counts = {}
    for epochs in (1, 3):
        cfg = load_config(["--data.partition", "dirichlet", "--model.name", "logistic", "--algorithm.name", "pdmm",
                           "--comm.mode", mode, "--train.epochs", str(epochs), "--train.checkpoint_every", "0",
                           "--log.tensorboard", "false", "--log.plots", "false", "--log.progress", "false",
                           "--run.dir", f"{out}/{mode}{epochs}"])
        topology = network(cfg, comm.world_size)
        splits = load_splits(cfg.data)
        shards = partition(splits.train_labels, comm.world_size, cfg.data)
        node = build_node(cfg, comm, topology, splits, shards[comm.rank])
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        before = comm.collectives
        train_loop(cfg, comm.env, comm, node, Checkpointer(cfg.out_dir / "ckpt", comm.rank, 0, epochs), None)
        counts[epochs] = comm.collectives - before
        if mode != "async":  # and sync's agreement on a signal, one all-gather every STOP_CHECK_STEPS steps
            counts[epochs] -= epochs * len(node.loader) // STOP_CHECK_STEPS
        comm.barrier()  # the next run's exchanges start together
    return counts


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_async_makes_no_collective_before_its_last_epoch(mode, tmp_path):
    counts = run_ranks(_collectives, N, mode, str(tmp_path), timeout=240)
    for c in counts:
        assert c[1] > 0
        if mode == "async":
            assert c[3] == c[1], c  # only the last epoch's
        else:
            assert c[3] == 3 * c[1], c  # every epoch's
    rows = csv_rows(tmp_path / f"{mode}3" / "node2.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows[:-1]:
        assert r["test_acc"] is not None and (r["avg_test_acc"] is None) == (mode == "async"), r
    assert rows[-1]["avg_test_acc"] is not None and rows[-1]["consensus_dist"] is not None


PATH = Topology(5, ((0, 1), (1, 2), (2, 3), (3, 4)))
S, STOP_AFTER, MAX_ROUNDS = 2, 5, 200


class Echo:
    """A rule that sends its rank and learns nothing: only the transport's timing is under test."""

    def __init__(self, rank: int, neighbors: list[int]):
        self.msg, self.neighbors = torch.full((3,), float(rank)), neighbors

    def messages(self) -> dict[int, torch.Tensor]:
        return {j: self.msg for j in self.neighbors}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        for j, m in msgs.items():
            assert m.shape == (3,) and (m == j).all()  # the stop flag never reaches a rule


def _stop_spreads(comm) -> dict:
    rule = Echo(comm.rank, PATH.neighbors(comm.rank))
    transport = Transport(comm, "async", S)
    t0 = time.perf_counter()
    try:
        for r in range(MAX_ROUNDS):
            if comm.rank == 0 and r == STOP_AFTER:
                transport.announce_stop(0)
                return {"round": r, "origin": 0, "s": time.perf_counter() - t0}
            time.sleep(0.002)
            transport.end_round(rule)
    except NetworkStop as e:
        transport.announce_stop(e.origin)
        return {"round": transport.round, "origin": e.origin, "peer": e.peer, "s": time.perf_counter() - t0}
    return {"round": MAX_ROUNDS, "origin": None}


def test_a_stop_spreads_through_the_exchange_within_bounded_rounds():
    runs = run_ranks(_stop_spreads, 5, timeout=120)
    for hops, r in enumerate(runs):
        assert r["origin"] == 0, r
        assert r["round"] <= STOP_AFTER + hops * (S + 1), (hops, r)
        assert r["s"] < 10, r  # nobody waited for a timeout
        if hops:
            assert r["peer"] == hops - 1  # heard it from the node nearer the origin
    print("\nstopped in round:", [r["round"] for r in runs])


@pytest.mark.timeout(200)
def test_a_nan_in_async_stops_every_node_with_one_line(tmp_path):
    started = time.monotonic()
    done = launch([*TORCHRUN, "--standalone", "--nproc_per_node", str(N), *QUICK, "--comm.mode", "async",
                   "--algorithm.lr", "1e20", "--train.epochs", "5", "--comm.timeout_s", "120",
                   "--run.dir", str(tmp_path / "nan")], timeout=180)
    took = time.monotonic() - started
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: non-finite training loss on node")]
    assert len(lines) == N, done.stderr[-3000:]
    assert "p2p/" not in done.stderr  # no worker's traceback (torchrun prints its own for failed workers)
    assert took < 100, took  # stopped through the exchange, not by the 120 s timeout


@pytest.mark.timeout(200)
def test_evaluate_from_checkpoints_equals_the_simulated_csv(tmp_path):
    run = tmp_path / "sim"
    done = launch([sys.executable, "train.py", *QUICK[1:], "--sim.nodes", "4", "--comm.mode", "async",
                   "--algorithm.name", "pdmm_isvr", "--train.epochs", "3", "--train.keep_checkpoints", "0",
                   "--run.dir", str(run)], timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    done = launch([sys.executable, "-m", "p2p.evaluate", str(run)], timeout=100)
    assert done.returncode == 0, done.stderr[-3000:]
    net = csv_rows(run / "network.csv")
    node = csv_rows(run / "node0.csv")
    assert [r["epoch"] for r in net] == [1, 2, 3]
    for a, b in zip(net, node):
        for key in ("consensus_dist", "avg_test_loss", "avg_test_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
    bad = launch([sys.executable, "-m", "p2p.evaluate", str(ROOT / "configs")], timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
