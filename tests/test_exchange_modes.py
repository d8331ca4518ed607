"""The exchange modes (`comm.mode`, ALGORITHMS.md "Exchange modes") on real gloo processes.

- Staleness keeps the exact fixed point: on the convex problem of test_exactness (full batch,
  non-IID logistic regression, a ring and an irregular graph) pdmm, admm, pdmm_isvr and admm_isvr
  (K = 1 and K = 4) reach the centralized optimum in `overlap`, and in `async` with random per-step
  delays and max_staleness 1 and 3; dsgd stays in its usual neighbourhood.
- That needs the transport's build-first order: pdmm's dual rule z_ij ← y_ji (not averaged) diverges
  with one round of staleness when round r's messages are built after applying round r − 1's
  (an in-process test shows both orders; admm converges in either).
- On a time-varying graph (the ring's edges in two rounds) admm keeps the optimum in `overlap` and `async`.
- `async` with one node 10x slower: the others run ahead by at most max_staleness rounds, the slow
  node never waits, every message arrives once, in order, on both ends of every edge.
- train.py under torchrun: two `overlap` runs give the same CSVs; a worker killed mid-epoch in
  `overlap` and `async` is restarted from the last checkpoint (overlap: bit for bit the same run).
"""

import os
import random
import signal
import time

import pytest
import torch

from distributed import run_ranks
from types import SimpleNamespace
from p2p.algorithms import build_algorithm
from p2p.config import AlgorithmConfig, CommConfig, Config, ConfigError, validate
from p2p.transport import Transport
from test_exactness import EXACT, L2, LR, N, SCHEDULED, TOPOLOGIES, _gradient, _model, _optimality, _shard
from test_faults import QUICK, TORCHRUN, epochs, kill_all, rows, start, torchrun, wait_for, worker_pids

pytestmark = pytest.mark.timeout(300)

# The fixed point of every primal-dual rule does not depend on when messages arrive, only the path
# there: so the tolerance stays test_exactness's 1e-6 (‖Σ_i ∇f_i(w̄)‖ and max_i ‖w_i − w̄‖) in every
# mode, with more steps allowed for the slower stale contraction.
TOL, CHECK_EVERY, MAX_STEPS = 1e-6, 50, 4000
RULES = ["pdmm", "admm", "pdmm_isvr", "admm_isvr", "pdmm_isvr_K4", "admm_isvr_K4"]
MODES = {"overlap": ("overlap", 1), "async_S1": ("async", 1), "async_S3": ("async", 3)}
DELAY_S = 0.0005  # mean of the exponential per-step delay in async, on every node
DSGD_STEPS = 300


def _run(comm, topology, fields: dict, mode: str, S: int, x, y, steps: int, stop_at_tol: bool) -> dict:
    model, flat = _model()
    cfg = AlgorithmConfig(**{"lr": LR, "l2_lambda": L2, "interval": 1, **fields})
    algorithm = build_algorithm(flat, cfg, topology, comm.rank)
    transport = Transport(comm, mode, S)
    delays = random.Random(comm.rank)
    trace, staleness_max = [], 0
    for step in range(steps):
        if mode == "async":
            time.sleep(delays.expovariate(1 / DELAY_S))
        _gradient(model, flat, x, y)
        algorithm.update(cfg.lr)
        if (step + 1) % cfg.interval == 0:
            transport.end_round(algorithm)
        if (step + 1) % CHECK_EVERY == 0:
            staleness_max = max(staleness_max, transport.epoch_stats()["staleness_max"])
            trace.append(_optimality(comm, model, flat, x, y))
            if stop_at_tol and max(trace[-1]) <= TOL:  # the same decision on every rank
                break
    transport.drain()  # nothing of this run may still travel when the next one posts
    return {"steps": step + 1, "trace": trace, "staleness_max": staleness_max,
            "completed": dict(transport.completed), "rounds": transport.round}


def _solve_all(comm) -> dict:
    x, y = _shard(comm.rank)
    out = {}
    for topo_name, topology in TOPOLOGIES.items():
        for mode_name, (mode, S) in MODES.items():
            for rule in RULES:
                out[topo_name, mode_name, rule] = _run(comm, topology, EXACT[rule], mode, S, x, y, MAX_STEPS, True)
            out[topo_name, mode_name, "dsgd"] = _run(comm, topology, dict(name="dsgd"), mode, S, x, y, DSGD_STEPS,
                                                     False)
        out[topo_name, "sync", "dsgd"] = _run(comm, topology, dict(name="dsgd"), "sync", 0, x, y, DSGD_STEPS, False)
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(_solve_all, N, timeout=450)


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.timeout(480)  # the first one runs the `runs` fixture
def test_stale_primal_dual_reaches_the_centralized_optimum(runs, rule, mode, topology):
    result = runs[0][topology, mode, rule]
    grad, spread = result["trace"][-1]
    assert grad <= TOL and spread <= TOL, (result["steps"], result["trace"][-3:])
    S = MODES[mode][1]
    for r in runs:  # the staleness actually seen respects the bound (overlap: exactly one round)
        seen = r[topology, mode, rule]["staleness_max"]
        assert 1 <= seen <= S, seen
    print(f"\n{rule} {mode} {topology}: {result['steps']} steps")


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.timeout(480)  # the first one runs the `runs` fixture
def test_stale_dsgd_stays_in_its_neighbourhood(runs, mode, topology):
    """dsgd's constant-step bias (test_exactness) stays bounded with stale neighbours, of the order of
    sync's: it grows with the staleness, which slows the mixing (and async jitters: at S = 3, 2.5-5x
    sync's over the run), never diverging."""
    trace = [g for g, _ in runs[0][topology, mode, "dsgd"]["trace"]]
    sync = runs[0][topology, "sync", "dsgd"]["trace"][-1][0]
    assert 1e-3 < trace[-1] and max(trace[len(trace) // 2:]) < 10 * sync, (trace, sync)


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.timeout(480)  # the first one runs the `runs` fixture
def test_every_exchange_completes_on_both_ends(runs, topology):
    for mode in MODES:
        for rule in RULES:
            for i, r in enumerate(runs):
                result = r[topology, mode, rule]
                for j, count in result["completed"].items():
                    assert count == result["rounds"] == runs[j][topology, mode, rule]["completed"][i]
                assert result["rounds"] == result["steps"] // EXACT[rule].get("interval", 1)


def _scheduled(comm) -> dict:
    """admm (K = 1 and 4) on the time-varying ring of test_exactness in overlap and async (S = 2); dsgd in overlap."""
    x, y = _shard(comm.rank)
    out = {}
    for mode, S in [("overlap", 1), ("async", 2)]:
        for rule in ["admm", "admm_isvr_K4"]:
            out[mode, rule] = _run(comm, SCHEDULED, EXACT[rule], mode, S, x, y, MAX_STEPS, True)
    out["overlap", "dsgd"] = _run(comm, SCHEDULED, dict(name="dsgd"), "overlap", 1, x, y, DSGD_STEPS, False)
    return out


def test_stale_admm_on_a_time_varying_graph_reaches_the_centralized_optimum():
    """Messages only on round r's edges, duals updated as their messages arrive: staleness and a schedule
    together still keep the optimum, and each edge completes one exchange per round it is active in."""
    runs = run_ranks(_scheduled, N, timeout=290)
    for (mode, rule), result in runs[0].items():
        grad, spread = result["trace"][-1]
        if rule == "dsgd":  # its biased neighbourhood, bounded
            assert 1e-3 < grad < 1 and spread < 1, result["trace"][-3:]
            continue
        assert grad <= TOL and spread <= TOL, (mode, rule, result["steps"], result["trace"][-3:])
        for i, r in enumerate(runs):
            rounds = r[mode, rule]["rounds"]
            for j, count in r[mode, rule]["completed"].items():
                assert count == sum(j in SCHEDULED.active_neighbors(i, e) for e in range(rounds)), (mode, rule, i, j)
                assert count == runs[j][mode, rule]["completed"][i]
            assert 1 <= r[mode, rule]["staleness_max"] <= (1 if mode == "overlap" else 2)
        print(f"\n{rule} {mode} scheduled: {result['steps']} steps")


def _in_memory(fields: dict, lag: int, steps: int, build_first: bool, topology: str = "ring") -> float:
    """N nodes in one process, every exchange applied `lag` rounds late (overlap: 1), with round r's messages
    built before (build-first, the transport's order) or after (receive-first) the late ones are applied;
    returns ‖Σ_i ∇f_i(w̄)‖."""
    nodes = []
    for i in range(N):
        model, flat = _model()
        cfg = AlgorithmConfig(**{"lr": LR, "l2_lambda": L2, "interval": 1, **fields})
        rule = build_algorithm(flat, cfg, TOPOLOGIES[topology], i)
        nodes.append((model, flat, rule, *_shard(i)))
    sent = []  # per round, per node: {j: message}
    for r in range(steps):
        for model, flat, rule, x, y in nodes:
            _gradient(model, flat, x, y)
            rule.update(cfg.lr)
        if build_first:
            sent.append([{j: t.clone() for j, t in rule.messages().items()} for _, _, rule, _, _ in nodes])
        if r >= lag:
            for i, (_, _, rule, _, _) in enumerate(nodes):
                rule.receive({j: sent[r - lag][j][i] for j in sent[r - lag][i]})
        if not build_first:
            sent.append([{j: t.clone() for j, t in rule.messages().items()} for _, _, rule, _, _ in nodes])
    w_bar = torch.stack([flat.w for _, flat, _, _, _ in nodes]).mean(0)
    total = 0
    for model, flat, _, x, y in nodes:
        flat.w.copy_(w_bar)
        total = total + _gradient(model, flat, x, y)
    return total.norm().item()


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("name", ["pdmm", "pdmm_isvr"])
def test_pdmm_dual_rule_needs_build_first_under_staleness(name, topology):
    """Why the transport builds before it applies (ALGORITHMS.md): with one round of staleness pdmm and
    pdmm_isvr blow up when round r's messages are built from duals that round r − 1's messages just
    replaced (y_ij = y_ji(r−1) − 2 A_ij w_i), and reach the optimum when built first; admm's averaged rule
    converges in either order."""
    assert not _in_memory(EXACT[name], lag=1, steps=1000, build_first=False, topology=topology) < 1e3  # nan: diverged
    assert _in_memory(EXACT[name], lag=1, steps=1000, build_first=True, topology=topology) < 1e-6
    admm = EXACT[name.replace("pdmm", "admm")]
    for build_first in (False, True):
        assert _in_memory(admm, lag=1, steps=1000, build_first=build_first, topology=topology) < 1e-6


@pytest.mark.parametrize("name", ["cadmm", "allreduce"])
def test_sync_only_rules_are_a_config_error(name):
    with pytest.raises(ConfigError, match=f"--comm.mode async does not fit --algorithm.name {name}: .*mode sync"):
        validate(Config(algorithm=AlgorithmConfig(name=name), comm=CommConfig(mode="async")))


class Probe:
    """A rule that sends (its rank, its round) and records what arrives: counts exchanges, learns nothing."""

    def __init__(self, rank: int, neighbors: list[int]):
        self.rank, self.neighbors, self.r = rank, neighbors, 0
        self.got: dict[int, list[tuple[int, int]]] = {j: [] for j in neighbors}  # (applied in round, built in round)

    def messages(self) -> dict[int, torch.Tensor]:
        msg = torch.tensor([float(self.rank), float(self.r)])
        self.r += 1
        return {j: msg for j in self.neighbors}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        for j, m in msgs.items():
            assert int(m[0]) == j
            self.got[j].append((self.r - 1, int(m[1])))  # in round r − 1: its messages() came first (build-first)


SLOW_ROUNDS, STEP_S, S_BOUND = 60, 0.004, 2


def _straggler(comm) -> dict:
    """4 nodes on a ring in async; node 0's steps take 10x longer than the others'."""
    n, i = comm.world_size, comm.rank
    rule = Probe(i, sorted({(i - 1) % n, (i + 1) % n}))
    transport = Transport(comm, "async", S_BOUND)
    t0 = time.perf_counter()
    for _ in range(SLOW_ROUNDS):
        time.sleep(STEP_S * (10 if i == 0 else 1))
        transport.end_round(rule)
    stats = transport.epoch_stats()
    transport.drain()  # the end of training: complete what neighbours still post
    comm.barrier()
    return {"got": rule.got, "completed": dict(transport.completed), "applied": dict(transport.applied),
            "wait_s": stats["wait_s"], "staleness_max": stats["staleness_max"], "elapsed": time.perf_counter() - t0}


def test_async_straggler_bounds_the_others_and_loses_nothing():
    runs = run_ranks(_straggler, 4, timeout=120)
    for i, r in enumerate(runs):
        for j, got in r["got"].items():
            built = [b for _, b in got]
            assert built == sorted(set(built)), (i, j, built)  # each message once, in order: none applied twice
            assert all(0 <= applied - b <= S_BOUND for applied, b in got), (i, j, got)  # within the bound
            assert len(got) == r["applied"][j] <= r["completed"][j]
            assert r["completed"][j] == runs[j]["completed"][i] == SLOW_ROUNDS  # both ends: every exchange
    slow, neighbours = runs[0], [runs[1], runs[3]]
    # the slow node never waits for faster ones (its neighbours are always ahead): only loopback latency
    assert slow["wait_s"] < 0.05 * slow["elapsed"], slow
    # its neighbours run ahead exactly as far as the bound allows, then wait for it most of the time
    for r in neighbours:
        assert r["staleness_max"] == S_BOUND, r["staleness_max"]
        assert 0.5 * r["elapsed"] < r["wait_s"] < r["elapsed"], r
    print("\nwait_s by node:", [round(r["wait_s"], 3) for r in runs],
          "elapsed:", [round(r["elapsed"], 2) for r in runs])


# --- train.py under torchrun: determinism, kill and resume ----------------------------------------------------------

TIME_COLUMNS = {"compute_s", "comm_s", "sleep_s", "wall_s", "wait_s"}


def _results(run, n: int = 4) -> list[list[dict]]:
    """Every node's CSV rows without the timing columns."""
    return [[{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows(run, r)] for r in range(n)]


OVERLAP = ["--comm.mode", "overlap", "--algorithm.name", "admm", "--algorithm.eta", "0.05", "--train.epochs", "3"]


@pytest.fixture(scope="module")
def overlap_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("overlap") / "run"
    rc, _ = torchrun(4, [*OVERLAP, "--run.dir", str(run)], run.parent / "log.txt")
    assert rc == 0, (run.parent / "log.txt").read_text()[-3000:]
    return run


@pytest.mark.timeout(400)
def test_overlap_is_deterministic(overlap_reference, tmp_path):
    """Two identical overlap runs: every CSV column but the timings equal, bit for bit (as text)."""
    run = tmp_path / "run"
    assert torchrun(4, [*OVERLAP, "--run.dir", str(run)], tmp_path / "log.txt")[0] == 0
    first, second = _results(overlap_reference), _results(run)
    assert first == second
    assert all(float(row["staleness_mean"]) == float(row["staleness_max"]) == 1 for node in first for row in node)
    assert all(int(row["exchanges"]) == 2 * 100 for node in first for row in node)  # 2 edges x 100 rounds per epoch


def _kill_mid_epoch_2(args: list[str], run, log, saved: int = 1) -> int:
    """torchrun with one restart allowed; rank 1 is SIGKILLed in the middle of epoch saved + 1 (2), once every node
    has checkpointed epoch `saved`. Returns the exit code."""
    agent = start([*TORCHRUN, "--standalone", "--nproc_per_node", "4", "--max-restarts", "1", *QUICK,
                   "--run.dir", str(run), *args], log)
    try:
        wait_for(lambda: all((run / "ckpt" / f"node{r}_epoch{saved}.pt").exists() for r in range(4)), [agent], 300,
                 f"epoch {saved} checkpoints")
        time.sleep(min(float(rows(run, 0)[0]["wall_s"]) / 2, 2.0))
        assert all(saved + 1 not in epochs(run, r) for r in range(4)), "the epoch ended before the kill: lengthen it"
        os.kill(worker_pids(agent)[1], signal.SIGKILL)
        return agent.wait(timeout=300)
    finally:
        kill_all([agent])


@pytest.mark.timeout(500)
def test_overlap_killed_and_resumed_equals_uninterrupted(overlap_reference, tmp_path):
    """Checkpoints hold the drained, not yet applied messages: the restarted run repeats the reference exactly."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    assert _kill_mid_epoch_2(OVERLAP, run, log) == 0, log.read_text()[-3000:]
    assert "resumed from epoch 1" in log.read_text()
    assert _results(run) == _results(overlap_reference)


@pytest.mark.timeout(500)
def test_async_killed_and_resumed_finishes(tmp_path):
    """async (not deterministic): the restarted run ends cleanly, each epoch once, and every node's
    exchanges of an epoch equal its neighbours' (nothing lost or double-counted across the restart)."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    args = ["--comm.mode", "async", "--train.epochs", "3", "--train.step_delay", "0.002", "--train.slow_ranks", "2"]
    assert _kill_mid_epoch_2(args, run, log) == 0, log.read_text()[-3000:]
    assert "resumed from epoch 1" in log.read_text()
    for r in range(4):
        assert epochs(run, r) == [1, 2, 3]
        for row in rows(run, r):
            assert int(row["exchanges"]) == 2 * 100 and 1 <= float(row["staleness_max"]) <= 2, row
        # it trains (one node's accuracy after epoch 1 varies with the async interleaving: 0.46-0.73 seen)
        assert float(rows(run, r)[-1]["test_acc"]) > 0.8


@pytest.mark.timeout(500)
def test_async_between_checkpoints_resumes_with_every_exchange_once(tmp_path):
    """async drains (waits for its neighbours' exchanges) only at checkpoint epochs: with checkpoint_every 2 an
    exchange of epoch 1 may complete in epoch 2, yet the run killed in epoch 3 resumes from epoch 2 and every
    node completes exactly 2 edges x 100 rounds x 4 epochs, equal to its neighbours'."""
    run, log = tmp_path / "run", tmp_path / "log.txt"
    args = ["--comm.mode", "async", "--algorithm.name", "pdmm", "--train.epochs", "4", "--train.checkpoint_every", "2",
            "--train.step_delay", "0.002", "--train.slow_ranks", "2"]
    assert _kill_mid_epoch_2(args, run, log, saved=2) == 0, log.read_text()[-3000:]
    assert "resumed from epoch 2" in log.read_text()
    for r in range(4):
        assert epochs(run, r) == [1, 2, 3, 4]
        assert sum(int(row["exchanges"]) for row in rows(run, r)) == 2 * 100 * 4
        assert float(rows(run, r)[-1]["avg_test_acc"]) > 0.8


@pytest.mark.timeout(300)
def test_gossip_in_async_under_torchrun(tmp_path):
    """gossip exchanges with one partner per round (edges active in turn): each edge's sequence still pairs up.
    ring4 has two matchings and every node is matched in both, so one exchange per round and node."""
    run = tmp_path / "run"
    args = ["--comm.mode", "async", "--algorithm.name", "gossip", "--data.samples_per_epoch", "640",
            "--train.epochs", "2", "--train.step_delay", "0.002", "--run.dir", str(run)]
    rc, _ = torchrun(4, args, tmp_path / "log.txt")
    assert rc == 0, (tmp_path / "log.txt").read_text()[-3000:]
    for r in range(4):
        for row in rows(run, r):
            assert int(row["exchanges"]) == 20 and 1 <= float(row["staleness_max"]) <= 2, row
