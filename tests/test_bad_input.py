"""Every user mistake ends as one line `error: ...`, exit code 2, nothing written or overwritten.

Most cases call train.main in-process (the same code path as the command, minus the interpreter);
two run `python train.py` to prove the exit code and the missing traceback end to end (test_e2e
does the same for an existing run directory), and the world-size cases run 2 real ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p.comm import free_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config", "configs/quickstart.toml", "--train.epochs", "1", "--log.progress", "false"]
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_", "MASTER_"))},
       "OMP_NUM_THREADS": "1"}

_spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes()) for p in path.rglob("*") if p.is_file()}


@pytest.fixture
def existing(tmp_path) -> Path:
    """A run directory from an earlier run, which no failed launch may touch."""
    run = tmp_path / "old_run"
    (run / "ckpt").mkdir(parents=True)
    (run / "config.toml").write_text("[run]\nname = \"old\"\n")
    (run / "node0.csv").write_text("epoch,train_loss\n1,0.5\n")
    (run / "ckpt" / "node0_epoch1.pt").write_bytes(b"not really a checkpoint")
    return run


def topo(tmp_path: Path, data: object) -> str:
    path = tmp_path / "topo.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def node_list(edges: dict[str, list[str]]) -> dict:
    return {"nodes": [{"name": name, "edges": peers} for name, peers in edges.items()]}


# (id, world size, extra args (a function of tmp_path), the message, as a regex)
CASES = [
    ("unknown_key", 1, lambda t: ["--algorithm.lrr", "0.1"],
     r"unknown config key 'algorithm.lrr' in the command line \(did you mean 'lr'\?\)"),
    ("unknown_section", 1, lambda t: ["--algo.lr", "0.1"],
     r"unknown config section 'algo' in the command line \(did you mean 'algorithm'\?\)"),
    ("wrong_type", 1, lambda t: ["--train.epochs", "ten"], r"--train.epochs: expected int, got 'ten'"),
    ("unknown_algorithm", 1, lambda t: ["--algorithm.name", "dsgdd"],
     r"--algorithm.name: unknown value 'dsgdd' \(did you mean 'dsgd'\?\); choose one of local, "),
    ("unknown_model", 1, lambda t: ["--model.name", "cnnn"],
     r"--model.name: unknown value 'cnnn' \(did you mean 'cnn'"),
    ("unknown_dataset", 1, lambda t: ["--data.name", "cifar100"], r"--data.name: unknown value 'cifar100'"),
    ("unknown_partition", 1, lambda t: ["--data.partition", "noniid"], r"--data.partition: unknown value 'noniid'"),
    ("unknown_scheduler", 1, lambda t: ["--train.scheduler", "cosine"], r"--train.scheduler: unknown value 'cosine'"),
    ("lr_zero", 1, lambda t: ["--algorithm.lr", "0"], r"--algorithm.lr must be > 0"),
    ("lr_negative", 1, lambda t: ["--algorithm.lr", "-0.1"], r"--algorithm.lr must be > 0"),
    ("batch_size", 1, lambda t: ["--data.batch_size", "-1"], r"--data.batch_size must be >= 1, or 0 for full batch"),
    ("batch_larger_than_a_shard", 2, lambda t: ["--topology.path=", "--data.batch_size", "5000"],
     r"--data.batch_size 5000 is larger than node \d's shard of \d+ samples: lower it, or use --data.batch_size 0"),
    ("full_batch_with_samples_per_epoch", 1, lambda t: ["--data.batch_size", "0", "--data.samples_per_epoch", "64"],
     r"--data.samples_per_epoch must be 0 with --data.batch_size 0"),
    ("weight_decay", 1, lambda t: ["--algorithm.weight_decay", "-1"], r"--algorithm.weight_decay must be >= 0"),
    ("epochs", 1, lambda t: ["--train.epochs", "0"], r"--train.epochs must be >= 1"),
    ("interval", 1, lambda t: ["--algorithm.interval", "-1"],
     r"--algorithm.interval \(K\) must be >= 1, or 0 for the topology file's round"),
    ("piw_value", 1, lambda t: ["--algorithm.piw", "3"],
     r"--algorithm.piw: unknown value 3.0; choose one of 0.5, 1.0, 2.0"),
    ("piw_interval", 4, lambda t: ["--algorithm.name", "pdmm_isvr", "--algorithm.piw", "2",
                                   "--algorithm.interval", "1"],
     r"--algorithm.piw 2 with --algorithm.interval 1 gives a negative ISVR penalty"),
    # K = 0 (auto) resolves to the seed file's round 10, which cadmm rejects, still before any wait
    ("cadmm_auto_interval", 3, lambda t: ["--algorithm.name", "cadmm", "--topology.path",
                                          "topologies/seed_n3_ring.json"],
     r"cadmm needs --algorithm.interval 1 \(got 10\)"),
    ("dirichlet_alpha", 1, lambda t: ["--data.alpha", "0"], r"--data.alpha \(Dirichlet concentration\) must be > 0"),
    ("classes_per_node", 1, lambda t: ["--data.partition", "classes", "--data.classes_per_node", "11"],
     r"--data.classes_per_node 11 exceeds the 10 classes of the dataset"),
    ("node_without_samples", 16, lambda t: ["--topology.path=", "--data.alpha", "0.01"],
     r"dirichlet partition with alpha=0.01 leaves node \d+ with no samples: raise --data.alpha"),
    ("topology_missing", 3, lambda t: ["--topology.path", str(t / "nope.json")],
     r"topology file .*nope.json not found"),
    ("topology_not_json", 3, lambda t: ["--topology.path", topo(t, "{not json")], r"topo.json is not valid JSON"),
    ("topology_not_connected", 4, lambda t: ["--topology.path", topo(t, {"n": 4, "edges": [[0, 1], [2, 3]]})],
     r"is not connected: nodes \[2, 3\] cannot reach node 0"),
    ("topology_self_loop", 3, lambda t: ["--topology.path", topo(t, {"n": 3, "edges": [[0, 1], [1, 1], [1, 2]]})],
     r"self-loop \[1, 1\] on node 1"),
    ("topology_asymmetric", 3,
     lambda t: ["--topology.path", topo(t, node_list({"A": ["B"], "B": ["A", "C"], "C": []}))],
     r"edges are not symmetric: B lists C but C does not list B"),
    ("topology_bad_weights", 3, lambda t: ["--topology.path", topo(t, {"n": 3, "edges": [[0, 1], [1, 2]],
                                                                          "weights": [[0, 1, -0.1], [1, 2, 0.2]]})],
     r"weight \[0, 1, -0.1\] is negative"),
    ("node_list_round_conflict", 2, lambda t: ["--topology.path", topo(t, {"nodes": {
        "a": {"round": 10, "edges": {"b": 0}}, "b": {"round": 8, "edges": {"a": 1}}}})],
     r'topo.json: nodes disagree on "round": a has 10, b has 8'),
    ("node_list_unknown_neighbour", 2,
     lambda t: ["--topology.path", topo(t, node_list({"A": ["B"], "B": ["A", "DAVE"]}))],
     r"node B lists unknown neighbour 'DAVE'"),
    ("mixing_file_without_weights", 4, lambda t: ["--algorithm.mixing", "file"], r"ring4.json has no per-edge weights"),
    ("dataset_missing", 1, lambda t: ["--data.name", "cifar10", "--data.root", str(t / "data")],
     r"CIFAR-10 not found under .*data/: put cifar-10-batches-py there or pass --data.download true"),
    ("cuda_absent", 1, lambda t: ["--run.device", "cuda"],
     r"--run.device cuda was asked for but CUDA is not available: use --run.device cpu"),
]


@pytest.mark.parametrize("world,extra,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(world, extra, message, existing, tmp_path, monkeypatch, capsys):
    if "cuda" in message:
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    for key in [k for k in os.environ if k.startswith("TORCHELASTIC_")]:
        monkeypatch.delenv(key)
    # rank 0 of `world` ranks: validation never reaches the process group, so no peer is needed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens there: joining a group would fail loudly
    before = snapshot(existing)
    code = train.main([*QUICK, "--run.dir", str(existing), *extra(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(message, err), err
    assert snapshot(existing) == before


def test_restarts_need_a_fresh_store(existing, monkeypatch, capsys):
    """torchrun --max-restarts with the store it shares by default: restarted workers could not reconnect."""
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    before = snapshot(existing)
    assert train.main([*QUICK, "--run.dir", str(existing)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: torchrun --max-restarts needs a fresh rendezvous store per attempt: launch with "
                           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --standalone or --rdzv-backend c10d")
    assert snapshot(existing) == before


# --- end to end: the real command --------------------------------------------------------------------------------


@pytest.mark.parametrize("extra,message", [
    (["--trian.epochs", "3"], r"error: unknown config section 'trian' in the command line \(did you mean 'train'\?\)"),
    (["--data.name", "cifar10", "--data.root", "{tmp}/data"],
     r"error: CIFAR-10 not found under .*/data/: put cifar-10-batches-py there or pass --data.download true"),
], ids=["unknown_key", "dataset_missing"])
def test_command_exits_2_with_one_line(extra, message, existing, tmp_path):
    before = snapshot(existing)
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    proc = subprocess.run([sys.executable, "train.py", *QUICK, "--run.dir", str(existing), *extra], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(message, lines[0]), proc.stderr
    assert proc.stdout == ""
    assert snapshot(existing) == before


@pytest.mark.timeout(400)
@pytest.mark.parametrize("extra,message", [
    ([], r"error: topology .*ring4.json has 4 nodes but the world size is 2: launch with --nproc_per_node 4 "
         r"\(simulated: --sim.nodes 4\) or pick another topology"),
    (["--comm.backend", "nccl"], r"error: --comm.backend nccl needs GPUs: use --comm.backend gloo on CPU"),
    (["--topology.name", "ring", "--data.batch_size", "5000"],  # every rank checks every node's shard
     r"error: --data.batch_size 5000 is larger than node \d's shard of \d+ samples: lower it, or use "
     r"--data.batch_size 0 \(full batch: the whole shard every step\)"),
], ids=["topology_size", "nccl_without_gpus", "batch_larger_than_a_shard"])
def test_every_rank_rejects_alone(extra, message, tmp_path):
    """2 ranks launched without an agent, as on 2 machines: each must exit 2 by itself, none may wait
    for the other (comm.timeout_s is 600 s); under torchrun the agent would end a waiting rank and hide it."""
    cmd = [sys.executable, "train.py", *QUICK, "--run.dir", str(tmp_path / "run"), "--comm.timeout_s", "600", *extra]
    port, start = str(free_port()), time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], outs
    assert all(re.fullmatch(message, err.strip()) for _, err in outs), outs
    assert time.monotonic() - start < 300
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(400)
def test_torchrun_reports_a_bad_topology_quickly(tmp_path):
    """The same under torchrun: the job fails with the line, long before comm.timeout_s (600 s)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", *QUICK, "--run.dir", str(tmp_path / "run"), "--comm.timeout_s", "600"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=350)
    assert proc.returncode != 0
    assert "error: topology topologies/ring4.json has 4 nodes but the world size is 2" in proc.stderr
    assert time.monotonic() - start < 300
    assert not (tmp_path / "run").exists()


def test_help_lists_every_section_and_exits_0(capsys):
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "torchrun --standalone" in out
    for section in ("[run]", "[data]", "[model]", "[topology]", "[algorithm]", "[train]", "[comm]", "[log]"):
        assert section in out
    assert 'name = "dsgd"' in out  # the defaults, as TOML
