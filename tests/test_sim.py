"""The simulator (`--sim.nodes`) against real runs: every rule, sync and overlap, gives the per-node losses of
4 real gloo processes running the trainer's own loop; a torchrun job and `python train.py --sim.nodes 4` write
the same CSVs; a simulated run resumes exactly; what cannot be simulated is a one-line error."""

import math
import re
import sys

import pytest
import torch

import train
from distributed import csv_rows, launch, run_ranks
from p2p import sim
from p2p.checkpoint import Checkpointer
from p2p.config import Config, load_config
from p2p.data import load_splits, partition
from p2p.loop import network
from p2p.trainer import build_node, train_loop

pytestmark = pytest.mark.timeout(400)
N = 4
RTOL = 1e-5  # reached: ~1e-7 (batched kernels sum in another order than one model's)
COMPARED = ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc", "avg_test_loss")

# every rule in sync; the rules that allow it in overlap too (config.SYNC_ONLY)
ALGORITHMS = ["local", "allreduce", "dsgd", "gossip", "pdmm", "admm", "pdmm_isvr", "admm_isvr", "cadmm", "choco",
              "gt", "ed", "qgm", "diloco"]
OVERLAP = ["dsgd", "gossip", "pdmm", "admm", "pdmm_isvr", "admm_isvr", "qgm"]
# (rule, mode, model, batch size, topology); batch 0 = full batch: shards of different sizes, one call per node;
# one_peer_hypercube: a time-varying graph (each round one peer)
CASES = [(a, "sync", m, 32, "ring") for a in ALGORITHMS for m in ("logistic", "mlp")] + \
        [(a, "overlap", m, 32, "ring") for a in OVERLAP for m in ("logistic", "mlp")] + \
        [("dsgd", "sync", "mlp", 0, "ring"), ("pdmm", "sync", "logistic", 0, "ring")] + \
        [("dsgd", "overlap", "mlp", 32, "one_peer_hypercube"), ("admm", "sync", "mlp", 32, "one_peer_hypercube")] + \
        [("gt", "sync", "mlp", 32, "one_peer_hypercube"), ("ed", "sync", "mlp", 32, "one_peer_hypercube")] + \
        [("dsgd_adam", "sync", "mlp", 32, "ring"), ("diloco_all_adamw", "sync", "mlp", 32, "ring"),
         ("diloco_all_adamw", "overlap", "mlp", 32, "ring")]


def _config(name: str, mode: str, model: str, batch: int, topology: str, out: str) -> Config:
    """2 epochs of non-IID digits on 4 nodes, momentum 0.9, no TensorBoard (speed)."""
    extra = ["--algorithm.compressor", "topk", "--algorithm.consensus_lr", "0.2"] if name == "choco" else []
    momentum = "0.9"
    if name == "dsgd_adam":  # Adam as dsgd's local step: its betas replace SGD's momentum
        name, momentum, extra = "dsgd", "0", ["--algorithm.optimizer", "adam"]
    if name == "diloco_all_adamw":  # DiLoCo itself: AdamW, K = 4, the average of all nodes
        name, momentum, extra = "diloco", "0", ["--algorithm.optimizer", "adamw", "--algorithm.lr", "0.003",
                                                "--algorithm.interval", "4", "--algorithm.outer_average", "all"]
    return load_config(["--data.partition", "dirichlet", "--data.batch_size", str(batch), "--topology.name",
                        topology, "--model.name", model,
                        "--algorithm.name", name, "--algorithm.lr", "0.05", "--algorithm.momentum", momentum,
                        "--comm.mode", mode, "--train.epochs", "2", "--train.checkpoint_every", "0",
                        "--log.tensorboard", "false", "--log.plots", "false", "--log.progress", "false",
                        "--run.dir", out, *extra])


def _real(comm, cfgs: list[Config]) -> None:
    """The trainer's loop on this rank for each config in turn, in one process group (what torchrun runs)."""
    for cfg in cfgs:
        comm.bytes_sent, comm.comm_s = 0, 0.0
        topology = network(cfg, comm.world_size)
        splits = load_splits(cfg.data)
        shards = partition(splits.train_labels, comm.world_size, cfg.data)
        torch.manual_seed(cfg.run.seed + comm.rank)
        node = build_node(cfg, comm, topology, splits, shards[comm.rank])
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        train_loop(cfg, comm.env, comm, node, Checkpointer(cfg.out_dir / "ckpt", comm.rank, 0, 2), None)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """Every case run for real once, on 4 spawned gloo processes; {case: run dir}."""
    root = tmp_path_factory.mktemp("real")
    dirs = {case: root / "_".join(map(str, case)) for case in CASES}
    run_ranks(_real, N, [_config(*case, str(d)) for case, d in dirs.items()], timeout=380)
    return dirs


def _assert_same_rows(real_dir, sim_dir, rtol: float = RTOL) -> None:
    for k in range(N):
        real, simulated = csv_rows(real_dir / f"node{k}.csv"), csv_rows(sim_dir / f"node{k}.csv")
        assert len(real) == len(simulated) == 2
        for a, b in zip(real, simulated):
            assert a["bytes_sent"] == b["bytes_sent"] and a["exchanges"] == b["exchanges"], (k, a["epoch"])
            assert a["staleness_mean"] == b["staleness_mean"]
            for key in COMPARED:
                assert math.isclose(a[key], b[key], rel_tol=rtol), (k, a["epoch"], key, a[key], b[key])
            assert math.isclose(a["consensus_dist"], b["consensus_dist"], rel_tol=1e-4, abs_tol=1e-9), (k, a["epoch"])


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_simulation_matches_real_processes(case, real_runs, tmp_path, monkeypatch):
    if case[3] == 0:
        monkeypatch.setattr(sim, "EVAL_SAMPLES", 1)  # and evaluate one node per call
    cfg = _config(*case, str(tmp_path / "sim"))
    cfg.sim.nodes = N
    sim.run(cfg)
    _assert_same_rows(real_runs[case], tmp_path / "sim")
    rows = csv_rows(tmp_path / "sim" / "node0.csv")
    assert rows[1]["train_loss"] < rows[0]["train_loss"] or case[0] == "local"  # and it learns


def _torchrun(args: list[str], nodes: int = N):
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nodes),
                   "train.py", *args], timeout=200)


def test_torchrun_job_and_simulation_write_the_same_run(tmp_path):
    """The quickstart (CNN, dirichlet, momentum) for 2 epochs: the same CSVs, and the same run directory."""
    args = ["--config", "configs/quickstart.toml", "--train.epochs", "2", "--log.progress", "false"]
    real = _torchrun([*args, "--run.dir", str(tmp_path / "real")])
    assert real.returncode == 0, real.stderr[-3000:]
    done = launch([sys.executable, "train.py", *args, "--sim.nodes", "4", "--run.dir", str(tmp_path / "sim")], 200)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_rows(tmp_path / "real", tmp_path / "sim")
    listing = sorted(p.relative_to(tmp_path / "real").parts[0] + "/" * p.is_dir()
                     for p in (tmp_path / "real").iterdir())
    assert listing == sorted(p.relative_to(tmp_path / "sim").parts[0] + "/" * p.is_dir()
                             for p in (tmp_path / "sim").iterdir())
    assert sorted(p.name for p in (tmp_path / "sim" / "tb").iterdir()) == ["global", "node0", "node1", "node2", "node3"]
    assert sorted(p.name for p in (tmp_path / "sim" / "ckpt").iterdir()) == sorted(
        p.name for p in (tmp_path / "real" / "ckpt").iterdir())
    assert "[sim]\nnodes = 4" in (tmp_path / "sim" / "config.toml").read_text()


@pytest.mark.parametrize("setting", [["--algorithm.name", "admm", "--comm.mode", "overlap"],
                                     ["--comm.mode", "async", "--train.step_delay", "0.02"],
                                     ["--algorithm.name", "diloco", "--algorithm.interval", "7"],
                                     ["--algorithm.name", "diloco", "--algorithm.interval", "7",
                                      "--algorithm.outer_average", "all", "--comm.mode", "overlap"]],
                         ids=["admm-overlap", "async", "diloco", "diloco-overlap"])
def test_simulated_run_resumes_exactly(setting, tmp_path):
    """admm in overlap (duals, momentum, a message waiting in every checkpoint), dsgd in async with random delays
    (virtual clocks), diloco (anchor, outer momentum; K = 7 ends epochs mid-round): 3 epochs straight, or 2 and
    then --run.resume to 3, end on the same numbers."""
    base = ["--data.partition", "dirichlet", "--topology.name", "ring", "--model.name", "mlp",
            "--algorithm.momentum", "0.9", "--sim.nodes", "4", *setting,
            "--log.progress", "false", "--log.tensorboard", "false", "--log.plots", "false"]
    sim.run(load_config([*base, "--train.epochs", "3", "--run.dir", str(tmp_path / "straight")]))
    sim.run(load_config([*base, "--train.epochs", "2", "--run.dir", str(tmp_path / "resumed")]))
    sim.run(load_config([*base, "--train.epochs", "3", "--run.dir", str(tmp_path / "resumed"), "--run.resume", "true"]))
    for k in range(N):
        straight, resumed = csv_rows(tmp_path / "straight" / f"node{k}.csv"), csv_rows(tmp_path / "resumed" / f"node{k}.csv")
        assert [r["epoch"] for r in resumed] == [1, 2, 3]
        for key in ("train_loss", "test_loss", "consensus_dist", "bytes_sent", "exchanges", "staleness_mean",
                    "wait_s", "sim_s"):
            assert straight[-1][key] == resumed[-1][key], (k, key)


@pytest.mark.parametrize("extra,message", [
    (["--train.sleep_factor", "1"], "error: --train.sleep_factor sleeps real processes between epochs"),
    (["--sim.latency_s", "-1"], "error: --sim.latency_s must be >= 0"),
    (["--topology.path", "topologies/ring8.json"], r"error: topology .*ring8.json has 8 nodes but the world size is 4"),
    (["--sim.nodes", "-1"], "error: --sim.nodes must be >= 0"),
])
def test_what_cannot_be_simulated_is_one_line(extra, message, tmp_path, capsys):
    code = train.main(["--sim.nodes", "4", "--log.progress", "false", "--run.dir", str(tmp_path / "r"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert re.match(message, err), err
    assert not (tmp_path / "r").exists()


def test_simulation_under_torchrun_is_one_line(tmp_path):
    done = _torchrun(["--sim.nodes", "4", "--run.dir", str(tmp_path / "r"), "--log.progress", "false"], nodes=2)
    assert done.returncode != 0
    assert "error: --sim.nodes runs the whole network in one process: start it with python train.py" in done.stderr
    assert 'p2p/' not in done.stderr and 'train.py", line' not in done.stderr  # torchrun's own traceback only
    assert not (tmp_path / "r").exists()


def test_out_of_gpu_memory_is_one_line(monkeypatch, tmp_path, capsys):
    """Too many simulated nodes for one GPU: one line naming what to lower, exit 1, no traceback."""
    def too_big(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                     "139.81 GiB\nof which ...")

    monkeypatch.setattr(sim, "run", too_big)
    assert train.main(["--sim.nodes", "256", "--run.dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err == ("error: out of GPU memory (CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                   "capacity of 139.81 GiB): lower --data.batch_size, --sim.nodes or the model\n")



def test_a_run_moves_between_torchrun_and_simulation(tmp_path):
    """Checkpoints have one format: a torchrun run continued in simulation, then under torchrun again, ends where
    an uninterrupted torchrun run does (MLP, quickstart split, 4 epochs)."""
    args = ["--config", "configs/quickstart.toml", "--model.name", "mlp", "--log.progress", "false",
            "--log.plots", "false", "--log.tensorboard", "false"]
    moved, straight = str(tmp_path / "moved"), str(tmp_path / "straight")
    for done in (_torchrun([*args, "--train.epochs", "4", "--run.dir", straight]),
                 _torchrun([*args, "--train.epochs", "2", "--run.dir", moved]),
                 launch([sys.executable, "train.py", *args, "--train.epochs", "3", "--run.dir", moved,
                         "--run.resume", "true", "--sim.nodes", "4"], 200),
                 _torchrun([*args, "--train.epochs", "4", "--run.dir", moved, "--run.resume", "true"])):
        assert done.returncode == 0, done.stderr[-3000:]
    for k in range(N):
        a, b = csv_rows(tmp_path / "straight" / f"node{k}.csv"), csv_rows(tmp_path / "moved" / f"node{k}.csv")
        assert [r["epoch"] for r in b] == [1, 2, 3, 4]
        for key in ("train_loss", "test_loss", "test_acc", "bytes_sent"):
            assert math.isclose(a[-1][key], b[-1][key], rel_tol=RTOL), (k, key, a[-1][key], b[-1][key])


def _sim_rows(tmp_path, name: str, *extra: str) -> list[list[dict]]:
    """A 4-node simulated MLP run of 3 epochs (quickstart split); every node's CSV rows."""
    sim.run(load_config(["--config", "configs/quickstart.toml", "--model.name", "mlp", "--sim.nodes", "4",
                         "--train.epochs", "3", "--run.dir", str(tmp_path / name), "--log.progress", "false",
                         "--log.tensorboard", "false", "--log.plots", "false", *extra]))
    return [csv_rows(tmp_path / name / f"node{k}.csv") for k in range(N)]


def test_async_on_virtual_clocks(tmp_path):
    """async in simulation: with every clock in step it is overlap, bit for bit; with random per-step delays
    (the real run's draws) it keeps the staleness bound and finishes sooner in virtual time than sync, which
    waits for the slowest neighbour every round; a permanent straggler drives its neighbours to the bound."""
    overlap = _sim_rows(tmp_path, "overlap", "--comm.mode", "overlap")
    in_step = _sim_rows(tmp_path, "in_step", "--comm.mode", "async")
    for a, b in zip(overlap, in_step):
        assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
        assert [r["test_loss"] for r in a] == [r["test_loss"] for r in b]
        assert all(r["staleness_mean"] == 1 for r in b[1:])

    jitter = ["--train.step_delay", "0.02"]
    sync = _sim_rows(tmp_path, "sync", "--comm.mode", "sync", *jitter)
    late = _sim_rows(tmp_path, "async", "--comm.mode", "async", "--comm.max_staleness", "2", *jitter)
    assert all(r["staleness_max"] <= 2 for rows in late for r in rows)
    assert max(r["staleness_mean"] for rows in late for r in rows) > 1
    assert late[0][-1]["sim_s"] < 0.9 * sync[0][-1]["sim_s"]
    assert late[0][-1]["wait_s"] < sync[0][-1]["wait_s"]

    slow = _sim_rows(tmp_path, "slow", "--comm.mode", "async", "--train.step_delay", "0.2", "--train.slow_ranks", "0")
    assert all(r["staleness_max"] <= 2 for rows in slow for r in rows)
    assert slow[1][-1]["staleness_max"] == slow[3][-1]["staleness_max"] == 2  # node 0's neighbours on the ring
    assert slow[1][-1]["wait_s"] > slow[0][-1]["wait_s"]  # they wait for it, it never waits
