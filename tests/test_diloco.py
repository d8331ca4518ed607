"""diloco on real gloo processes: its first rounds equal a replay of ALGORITHMS.md's equations (gossip on a static
and a time-varying graph, and the average of all nodes); with `all` the anchors stay identical; with η = 1, μ = 0
it is dsgd with K local steps (the same local optimizer); bytes are d_i·|w| (gossip) or (n − 1)·|w| (all).

The problem is test_exactness.py's: logistic regression in float64, non-IID shards, full-batch gradients.
"""

import pytest
import torch

from distributed import optimizer, run_ranks
from p2p.config import AlgorithmConfig
from p2p.topology import Topology
from test_exactness import L2, RING, SCHEDULED, N, _gradient, _gradient_at, _model, _shard

pytestmark = pytest.mark.timeout(120)

K, STEPS = 3, 9  # three rounds replayed
COMPLETE = Topology(N, tuple((i, j) for i in range(N) for j in range(i + 1, N)), source="complete(5)")
TOPOLOGIES = {"ring": RING, "scheduled": SCHEDULED, "complete": COMPLETE}
SGD = dict(lr=0.5, momentum=0.5, nesterov=True)  # a local step with state: torch SGD's Nesterov momentum
ADAMW = dict(optimizer="adamw", lr=0.05, weight_decay=0.01)
CASES = {  # label: (topology, AlgorithmConfig fields besides interval K)
    "gossip": ("ring", dict(name="diloco", **SGD)),
    "gossip_scheduled": ("scheduled", dict(name="diloco", **SGD)),
    "all": ("ring", dict(name="diloco", outer_average="all", **SGD)),
    "all_adamw": ("ring", dict(name="diloco", outer_average="all", **ADAMW)),
    # η = 1, μ = 0 against dsgd; `all` is dsgd with W = J/n, the Metropolis weights of the complete graph
    "plain_gossip": ("ring", dict(name="diloco", outer_lr=1.0, outer_momentum=0.0, **ADAMW)),
    "dsgd": ("ring", dict(name="dsgd", **ADAMW)),
    "plain_all": ("ring", dict(name="diloco", outer_average="all", outer_lr=1.0, outer_momentum=0.0, **ADAMW)),
    "dsgd_complete": ("complete", dict(name="dsgd", **ADAMW)),
    # overlap (`all` only): round r's average applied at the end of round r + 1
    "all_overlap": ("ring", dict(name="diloco", outer_average="all", **SGD)),
}
MODE = {"all_overlap": "overlap"}


def _run(comm, label: str, topology: Topology, fields: dict, x, y) -> dict:
    model, flat = _model()
    opt = optimizer(flat, AlgorithmConfig(interval=K, l2_lambda=L2, **fields), topology, comm,
                    mode=MODE.get(label, "sync"))
    bytes_before, w = comm.bytes_sent, [flat.w.clone()]
    for _ in range(STEPS):
        _gradient(model, flat, x, y)
        opt.step()
        w.append(flat.w.clone())
    theta = getattr(opt.rule, "theta", flat.w)
    return {"w": torch.stack(w), "theta": theta.clone(), "bytes": comm.bytes_sent - bytes_before, "P": flat.w.numel()}


def _wrapped(comm, x, y) -> torch.Tensor:
    """all_adamw with the user's own torch.optim.AdamW as the local step (DecentralizedOptimizer(optimizer=...))."""
    from p2p.network import Network
    from p2p.optimizer import DecentralizedOptimizer

    model, flat = _model()
    inner = torch.optim.AdamW(flat.params, lr=ADAMW["lr"], weight_decay=ADAMW["weight_decay"])
    opt = DecentralizedOptimizer(flat, Network(comm, RING), "diloco", optimizer=inner, interval=K,
                                 outer_average="all")
    for _ in range(STEPS):
        _gradient(model, flat, x, y)
        opt.step()
    return flat.w.clone()


def _all(comm) -> dict:
    x, y = _shard(comm.rank)
    out = {label: _run(comm, label, TOPOLOGIES[topo], fields, x, y) for label, (topo, fields) in CASES.items()}
    out["wrapped"] = _wrapped(comm, x, y)
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(_all, N, timeout=110)


def _replay(topology: Topology, fields: dict, late: int = 0) -> torch.Tensor:
    """(STEPS + 1, n, P) from the equations in diloco's docstring, with torch SGD's Nesterov momentum as the local
    step; `late` rounds between sending and applying (0: sync, ALGORITHMS.md's diloco; 1: overlap)."""
    cfg = AlgorithmConfig(interval=K, **fields)
    n, lr, beta = topology.n, cfg.lr, cfg.momentum
    nodes = [(*_model(), *_shard(i)) for i in range(n)]
    W = torch.stack([flat.w.clone() for _, flat, _, _ in nodes])  # (n, P)
    theta, b, m = W.clone(), torch.zeros_like(W), torch.zeros_like(W)
    start, sent, out = W.clone(), [], [W.clone()]  # sent: (δ(r), m(r), W of round r) not yet applied
    for t in range(STEPS):
        g = torch.stack([_gradient_at(node, W[i]) for i, node in enumerate(nodes)])
        m = g.clone() if t == 0 else beta * m + g
        W = W - lr * (g + beta * m)
        if (t + 1) % K == 0:
            mix = (torch.full((n, n), 1 / n, dtype=W.dtype) if cfg.outer_average == "all" else
                   torch.from_numpy(topology.mixing_matrix("metropolis", topology.active((t + 1) // K - 1))))
            sent.append((W - start, theta + W - start, mix))  # δ_i(r), m_i(r) = θ_i + δ_i(r)
            if len(sent) > late:
                d_q, m_q, mix_q = sent.pop(0)
                delta = m_q - d_q - mix_q @ m_q  # Δ_i = m_i − δ_i − m̄_i (sync: θ_i − w̄_i)
                b = cfg.outer_momentum * b + delta
                theta = theta - cfg.outer_lr * (delta + cfg.outer_momentum * b)
                W = theta + sum(d for d, _, _ in sent)  # plus the rounds still travelling
            start = W.clone()
        out.append(W.clone())
    return torch.stack(out)


@pytest.mark.parametrize("label", ["gossip", "gossip_scheduled", "all", "all_overlap"])
def test_first_rounds_follow_the_equations(runs, label):
    got = torch.stack([node[label]["w"] for node in runs], dim=1)  # (STEPS + 1, n, P)
    topo, fields = CASES[label]
    want = _replay(TOPOLOGIES[topo], fields, late=int(MODE.get(label) == "overlap"))
    first = K * (1 + int(MODE.get(label) == "overlap"))  # the first round's end that applies an average
    assert (got[first] - got[first - 1]).abs().max().item() > 1e-3  # the outer step moves the weights
    err = (got - want).abs().amax(dim=(1, 2))
    assert err.max().item() < 1e-12, (label, err.tolist())


@pytest.mark.parametrize("label", ["all", "all_adamw", "all_overlap"])
def test_with_the_average_of_all_nodes_the_anchors_stay_identical(runs, label):
    theta = torch.stack([node[label]["theta"] for node in runs])
    assert (theta - theta[0]).abs().max().item() < 1e-12
    if label != "all_overlap":  # there w_i keeps its own last round on top of θ_i
        w = torch.stack([node[label]["w"][K::K] for node in runs])  # w_i ← θ_i at every round's end
        assert (w - w[0]).abs().max().item() < 1e-12
    assert (theta - runs[0][label]["w"][0]).abs().max().item() > 1e-3  # and they moved


@pytest.mark.parametrize("label, dsgd", [("plain_gossip", "dsgd"), ("plain_all", "dsgd_complete")])
def test_outer_lr_1_without_momentum_is_dsgd(runs, label, dsgd):
    for node in runs:
        assert (node[label]["w"] - node[dsgd]["w"]).abs().max().item() < 1e-6


def test_a_wrapped_torch_adamw_is_the_builtin_one(runs):
    for node in runs:
        assert torch.equal(node["wrapped"], node["all_adamw"]["w"][-1])


def test_bytes_per_round(runs):
    """gossip: w_i to each of round r's peers (dsgd's bytes); all: to every other node."""
    for rank, node in enumerate(runs):
        size, rounds = node["gossip"]["P"] * 8, STEPS // K
        assert node["gossip"]["bytes"] == rounds * RING.degree(rank) * size
        assert node["gossip_scheduled"]["bytes"] == sum(len(SCHEDULED.active_neighbors(rank, r))
                                                        for r in range(rounds)) * size
        assert node["all"]["bytes"] == rounds * (N - 1) * size
