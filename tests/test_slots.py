"""The seed's per-edge slots (node_list.json) schedule the exchanges of `async` mode, on real gloo processes.

topologies/seed_n3_ring.json (round 10) lists, per node, the slot at which it exchanges with each neighbour;
edge (i, j), i < j, exchanges after the local steps t with t mod 10 = the slot node i listed for j:
edge (0, 1) at 4, (0, 2) at 0, (1, 2) at 5.

- The trainer (digits, logistic model, dsgd, async, 2 epochs, then a third resumed from the checkpoint)
  runs to the end on every node; each edge posts its exchange at exactly its slot, once per round, and
  completes one exchange per round on both ends.
- admm, pdmm and pdmm_isvr with slots in async (K = 10, S = 2, random per-step delays) still reach the
  centralized optimum of test_exactness's convex problem (3 of its shards).
- Where the slots are not used (sync, K other than the file's round, gossip), the reason is given.
"""

import random
import time
from types import SimpleNamespace

import pytest

from distributed import run_ranks
from p2p.algorithms import build_algorithm
from p2p.config import AlgorithmConfig, load_config
from p2p.topology import load_topology
from p2p.transport import Transport
from test_exactness import ETA, L2, LR, _gradient, _model, _optimality, _shard

pytestmark = pytest.mark.timeout(300)

SEED_RING = "topologies/seed_n3_ring.json"
SLOT = {0: {1: 4, 2: 0}, 1: {0: 4, 2: 5}, 2: {0: 0, 1: 5}}  # node: {neighbour: step of the round}, from the file
K, S = 10, 2
TRAIN = ["--config", "configs/quickstart.toml", "--topology.path", SEED_RING, "--comm.mode", "async",
         "--comm.max_staleness", str(S), "--model.name", "logistic", "--train.epochs", "2",
         "--data.samples_per_epoch", "3200", "--log.progress", "false", "--log.plots", "false",
         "--log.tensorboard", "false"]
ROUNDS_PER_EPOCH = 3200 // 32 // K


def _train(comm, run_dir: str, *args: str) -> dict:
    """What trainer.run does on one node (start, or resume with --run.resume), in run_ranks' process group."""
    from p2p import checkpoint
    from p2p.data import load_splits, partition
    from p2p.topology import build_topology
    from p2p.optimizer import resolve_interval
    from p2p.trainer import build_node, train_loop

    cfg = load_config([*TRAIN, "--run.dir", run_dir, *args])
    topology = build_topology(cfg.topology, comm.world_size)
    resolve_interval(cfg.algorithm, topology)  # K = the file's round
    splits = load_splits(cfg.data)
    shards = partition(splits.train_labels, comm.world_size, cfg.data)
    node = build_node(cfg, comm, topology, splits, shards[comm.rank])
    ckpt = checkpoint.Checkpointer(cfg.out_dir / "ckpt", comm.rank, cfg.train.checkpoint_every, cfg.train.epochs,
                                   checkpoint.fixed_fields(cfg, comm.world_size))
    progress = checkpoint.begin(cfg.out_dir, cfg.run.resume, node, comm, ckpt)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    train_loop(cfg, comm.env, comm, node, ckpt, progress)
    comm.barrier()
    t = node.transport
    return {"K": cfg.algorithm.interval, "slots": t.slots, "completed": dict(t.completed),
            "posted_at": {j: dict(c) for j, c in t.posted_at.items()}}


def _check(runs: list[dict], rounds: int) -> None:
    for i, r in enumerate(runs):
        assert r["K"] == K and r["slots"] == SLOT[i]
        for j, slot in SLOT[i].items():
            assert r["posted_at"][j] == {slot: rounds}, (i, j, r["posted_at"])  # at its slot, once per round
            assert r["completed"][j] == runs[j]["completed"][i] == rounds  # both ends, every exchange


@pytest.mark.timeout(400)
def test_trainer_exchanges_each_edge_at_its_slot_and_resumes(tmp_path):
    """2 epochs, then a third resumed from the checkpoint (its ready messages applied at their edges' slots)."""
    from test_faults import rows

    run = tmp_path / "run"
    _check(run_ranks(_train, 3, str(run), timeout=180), 2 * ROUNDS_PER_EPOCH)
    _check(run_ranks(_train, 3, str(run), "--train.epochs", "3", "--run.resume", "true", timeout=180),
           ROUNDS_PER_EPOCH)
    for i in range(3):
        csv = rows(run, i)
        assert [int(row["epoch"]) for row in csv] == [1, 2, 3]
        for row in csv:
            assert int(row["exchanges"]) == 2 * ROUNDS_PER_EPOCH and 1 <= float(row["staleness_max"]) <= S, row
        assert float(csv[-1]["avg_test_acc"]) > 0.8, csv[-1]


TOL, CHECK_EVERY, MAX_STEPS, DELAY_S = 1e-6, 50, 8000, 0.0005  # pdmm_isvr: 3300 steps, once 4000+


SLOT_RULES = {"admm": dict(name="admm", eta=ETA), "pdmm": dict(name="pdmm", eta=ETA), "pdmm_isvr": dict(name="pdmm_isvr")}


def _slots_run(comm, rule: str) -> dict:
    topology = load_topology(SEED_RING)
    x, y = _shard(comm.rank)
    model, flat = _model()
    cfg = AlgorithmConfig(**{"lr": LR, "l2_lambda": L2, "interval": K, **SLOT_RULES[rule]})
    algorithm = build_algorithm(flat, cfg, topology, comm.rank)
    transport = Transport(comm, "async", S, K, SLOT[comm.rank])
    delays = random.Random(comm.rank)
    trace, staleness_max = [], 0
    for step in range(MAX_STEPS):
        time.sleep(delays.expovariate(1 / DELAY_S))
        _gradient(model, flat, x, y)
        algorithm.update(cfg.lr)
        transport.after_step(algorithm, step)
        if (step + 1) % CHECK_EVERY == 0:
            staleness_max = max(staleness_max, transport.epoch_stats()["staleness_max"])
            trace.append(_optimality(comm, model, flat, x, y))
            if max(trace[-1]) <= TOL:  # the same decision on every rank
                break
    transport.drain()
    return {"steps": step + 1, "trace": trace, "staleness_max": staleness_max, "completed": dict(transport.completed),
            "posted_at": {j: dict(c) for j, c in transport.posted_at.items()}}


@pytest.mark.parametrize("rule", SLOT_RULES)
def test_primal_dual_with_slots_in_async_reaches_the_optimum(rule):
    runs = run_ranks(_slots_run, 3, rule, timeout=280)
    result = runs[0]
    grad, spread = result["trace"][-1]
    assert grad <= TOL and spread <= TOL, (result["steps"], result["trace"][-3:])
    rounds = result["steps"] // K
    for i, r in enumerate(runs):
        assert 1 <= r["staleness_max"] <= S, r["staleness_max"]
        for j, slot in SLOT[i].items():
            assert r["posted_at"][j] == {slot: rounds}
            assert r["completed"][j] == runs[j]["completed"][i] == rounds
    print(f"\n{rule} async with slots: {result['steps']} steps")


@pytest.mark.parametrize("args, used, why", [
    ([], True, "each edge exchanges once per round"),
    (["--comm.mode", "sync"], False, "--comm.mode sync exchanges every edge at a round's end"),
    (["--algorithm.interval", "5"], False, "K = 5 is not the file's round 10"),
    (["--algorithm.name", "gossip"], False, "gossip picks its own partners each round"),
])
def test_slots_are_used_only_in_async_with_the_files_round(args, used, why):
    from p2p.optimizer import edge_slots, resolve_interval

    cfg = load_config([*TRAIN, *args])
    topology = load_topology(SEED_RING)
    resolve_interval(cfg.algorithm, topology)
    algorithm = build_algorithm(_model()[1], cfg.algorithm, topology, 1)
    slots, line = edge_slots(cfg.algorithm, cfg.comm.mode, topology, algorithm)
    assert (slots == SLOT[1]) if used else slots is None
    assert why in line
