"""The quickstart, shortened, launched exactly as a user would: torchrun, 4 nodes, gloo on CPU."""

import re
import sys
from pathlib import Path

import pytest

from distributed import csv_rows, launch
from p2p.config import load_config

pytestmark = pytest.mark.timeout(420)

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, NODES = 3, 4
HEADER = "epoch,train_loss,val_loss,test_loss,train_acc,val_acc,test_acc"


def test_quickstart_under_torchrun(tmp_path):
    run_dir = tmp_path / "qs"
    proc = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NODES),
                    "train.py", "--config", "configs/quickstart.toml", "--train.epochs", str(EPOCHS),
                    "--run.dir", str(run_dir), "--log.progress", "false"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # one CSV per node, the seed's columns first, one row per epoch
    assert sorted(p.name for p in run_dir.glob("node*.csv")) == [f"node{i}.csv" for i in range(NODES)]
    for i in range(NODES):
        path = run_dir / f"node{i}.csv"
        header = path.read_text().splitlines()[0]
        assert header.startswith(HEADER), header
        for column in ("consensus_dist", "avg_test_acc", "lr", "bytes_sent", "compute_s", "comm_s"):
            assert column in header.split(","), column
        rows = csv_rows(path)
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert rows[-1]["train_loss"] < rows[0]["train_loss"], (i, [r["train_loss"] for r in rows])
        sent = [r["bytes_sent"] for r in rows]
        assert 0 < sent[0] < sent[1] < sent[2], (i, sent)
        assert all(r["lr"] == 0.1 for r in rows)
        assert all(0 <= r["test_acc"] <= 1 and r["consensus_dist"] >= 0 for r in rows)

    # TensorBoard: one directory per node plus the network-wide one
    for sub in [f"node{i}" for i in range(NODES)] + ["global"]:
        assert list((run_dir / "tb" / sub).glob("events.out.tfevents.*")), sub
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb" / "node0"))
    acc.Reload()
    assert "loss/train" in acc.Tags()["scalars"]
    points = acc.Scalars("loss/train")
    assert [p.step for p in points] == [1, 2, 3]
    csv_loss = [r["train_loss"] for r in csv_rows(run_dir / "node0.csv")]
    assert [p.value for p in points] == pytest.approx(csv_loss, rel=1e-6)
    acc = EventAccumulator(str(run_dir / "tb" / "global"))
    acc.Reload()
    assert len(acc.Scalars("consensus/distance")) == EPOCHS

    # the run is self-describing: its resolved config, its graph, its curves
    cfg = load_config(["--config", str(run_dir / "config.toml")])
    assert cfg.train.epochs == EPOCHS and cfg.algorithm.name == "dsgd" and cfg.model.name == "cnn"
    assert cfg.run.dir == str(run_dir) and cfg.log.progress is False
    assert (run_dir / "topology.json").is_file() and (run_dir / "curves.png").stat().st_size > 0

    # a second launch into the same directory refuses, in one line, and touches nothing (but `.lock`, "[!.]*",
    # which then names it as the last launch that claimed the directory)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("[!.]*") if p.is_file()}
    proc = launch([sys.executable, "train.py", "--config", "configs/quickstart.toml", "--train.epochs", "1",
                    "--run.dir", str(run_dir), "--log.progress", "false"], timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: run directory") and "already exists" in lines[0], proc.stderr
    assert "--run.resume" in lines[0]
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("[!.]*") if p.is_file()}
    assert after == before


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_fashion_mnist_from_the_debian_copy_learns(tmp_path):
    """Real data end to end: pdmm on a non-IID Fashion-MNIST split, read from the system copy."""
    out = tmp_path / "fm"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--data.name", "fashionmnist", "--data.root", str(tmp_path / "data"), "--data.partition", "dirichlet",
           "--data.samples_per_epoch", "3200", "--model.name", "mlp", "--algorithm.name", "pdmm",
           "--algorithm.lr", "0.1", "--algorithm.eta", "0.05", "--train.epochs", "2", "--run.dir", str(out),
           "--log.progress", "false", "--log.plots", "false"]
    done = launch(cmd, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        rows = csv_rows(out / f"node{rank}.csv")
        assert rows[1]["train_loss"] < rows[0]["train_loss"]
        assert rows[1]["test_acc"] > 0.6  # 10 classes: chance is 0.1
    assert rows[1]["avg_test_acc"] > 0.6


def test_quickstart_on_a_time_varying_graph(tmp_path):
    """dsgd on one_peer_hypercube (2 rounds on 4 nodes): it learns, and each exchange is one message per node."""
    run_dir = tmp_path / "hc"
    proc = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NODES),
                    "train.py", "--config", "configs/quickstart.toml", "--topology.name", "one_peer_hypercube",
                    "--algorithm.name", "dsgd", "--train.epochs", "2", "--run.dir", str(run_dir),
                    "--log.progress", "false", "--log.plots", "false"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("topology one_peer_hypercube(n=4): 4 nodes, 4 edges, degree 2..2 in the union; schedule of 2 rounds, "
            "degree 1..1 per round, gap of the period product 1.0000 (metropolis mixing per round)") in proc.stderr
    P = int(re.search(r"K = 1, (\d+) parameters", proc.stderr).group(1))
    for i in range(NODES):
        rows = csv_rows(run_dir / f"node{i}.csv")
        assert rows[1]["train_loss"] < rows[0]["train_loss"], (i, rows)
        rounds = [r["exchanges"] for r in rows]  # K = 1: one round per step, one partner per round
        assert rounds[0] == rounds[1] > 0
        assert [r["bytes_sent"] for r in rows] == [rounds[0] * P * 4, 2 * rounds[0] * P * 4]  # float32


@pytest.mark.parametrize("args", [["gt"], ["ed"], ["qgm"],
                                  ["dsgd", "--algorithm.optimizer", "adamw", "--algorithm.lr", "0.01",
                                   "--algorithm.momentum", "0"]], ids=["gt", "ed", "qgm", "dsgd_adamw"])
def test_the_heterogeneity_rules_learn_under_torchrun(tmp_path, args):
    """gt, ed, qgm and Adam(W) as dsgd's local step, on the quickstart CNN (10 epochs), as 4 torchrun processes.
    Simulated, the same runs reach avg-model acc 0.93, 0.94, 0.84, 0.95."""
    run_dir = tmp_path / "run"
    proc = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NODES),
                   "train.py", "--config", "configs/quickstart.toml", "--algorithm.name", *args, "--train.epochs", "10",
                   "--log.tensorboard", "false", "--log.plots", "false", "--run.dir", str(run_dir),
                   "--log.progress", "false"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [csv_rows(run_dir / f"node{i}.csv") for i in range(NODES)]
    assert all(r[-1]["train_loss"] < 0.6 * r[0]["train_loss"] for r in rows), [r[-1]["train_loss"] for r in rows]
    assert rows[0][-1]["avg_test_acc"] >= 0.75, rows[0][-1]
