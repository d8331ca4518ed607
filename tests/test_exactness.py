"""The rules of ALGORITHMS.md are implemented exactly: on a convex problem the primal-dual methods,
cadmm and allreduce reach the centralized optimum; dsgd with a constant step does not.

Problem: multinomial logistic regression (the `logistic` model) in float64 with the L2 term of
`train_step`, f_i(w) = mean CE over node i's shard + (L2/2)||w||², full-batch gradients, constant
step. The data are synthetic and non-IID: every node has its own class mix and its own feature
shift, standardized globally so that a large constant step is stable (a few hundred steps per run).
The optimum is that of F = Σ_i f_i, checked with the gradient ‖Σ_i ∇f_i(w̄)‖ at the node average
w̄ and with consensus, max_i ‖w_i − w̄‖.

Everything runs in one spawn of N processes: every algorithm on a ring and on an irregular graph
(the ring plus two chords at node 0: degrees 4, 2, 3, 3, 2), where an asymmetric penalty would be
biased, and the primal-dual rules and dsgd on a time-varying graph (the ring's edges in two rounds). Each run stops once it meets the tolerance, or after MAX_STEPS (and then fails). The first
steps of every run are also replayed from the equations in this process (to 1e-12), which catches
what a fixed point cannot (e.g. an admm that is really pdmm), and the byte counters are checked.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed import optimizer, run_ranks
from p2p.algorithms import FlatParams, build_algorithm
from p2p.config import AlgorithmConfig, ConfigError
from p2p.topology import Topology

pytestmark = pytest.mark.timeout(180)

N, FEATURES, CLASSES, SAMPLES = 5, 4, 3, 40  # nodes; a shard is SAMPLES points of FEATURES dims
L2, LR, ETA = 0.1, 1.5, 0.5  # ETA = 100x the spec default: c_ij = (η/γ)·v_p/max(d_i, d_j) must not be tiny
TOL, CHECK_EVERY, MAX_STEPS = 1e-6, 50, 2000
RING = Topology(N, ((0, 1), (0, 4), (1, 2), (2, 3), (3, 4)), source="ring(5)")
IRREGULAR = Topology(N, ((0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (2, 3), (3, 4)), source="ring(5)+chords")
TOPOLOGIES = {"ring": RING, "irregular": IRREGULAR}
# a time-varying graph: the ring's edges in 2 rounds, neither of them connected (ALGORITHMS.md, "Time-varying graphs")
SCHEDULED = Topology(N, RING.edges, source="ring(5) in 2 rounds", schedule=(((0, 1), (2, 3)), ((0, 4), (1, 2), (3, 4))))
SCHEDULED_RULES = ["pdmm", "admm", "pdmm_isvr", "admm_isvr"]  # the primal-dual rules; dsgd is replayed
EXACT = {  # label: the AlgorithmConfig fields besides lr, l2_lambda and interval 1
    "pdmm": dict(name="pdmm", eta=ETA),
    "admm": dict(name="admm", eta=ETA),
    "pdmm_isvr": dict(name="pdmm_isvr"),
    "admm_isvr": dict(name="admm_isvr"),
    # K = 4 with piw = 2 (the seed crashed on pdmm with piw = 2); with piw = 1 it needs ~2x the steps
    "pdmm_isvr_K4": dict(name="pdmm_isvr", interval=4, piw=2.0, lr=1.0),
    "admm_isvr_K4": dict(name="admm_isvr", interval=4, piw=2.0, lr=1.0),
    "cadmm": dict(name="cadmm", eta=ETA),
    "allreduce": dict(name="allreduce"),
    # momentum replaces g_i by torch SGD's direction d_i; at a fixed point d_i ∝ g_i, so the optimum
    # stays exact. The same effective step γ/(1 − β) as above.
    **{f"{name}_momentum": dict(name=name, momentum=0.9, lr=LR * 0.1, **extra)
       for name, extra in [("pdmm", dict(eta=ETA)), ("admm", dict(eta=ETA)), ("pdmm_isvr", {}), ("admm_isvr", {}),
                           ("cadmm", dict(eta=ETA))]},
    **{f"{name}_nesterov": dict(name=name, momentum=0.9, nesterov=True, lr=LR * 0.1, **extra)
       for name, extra in [("pdmm", dict(eta=ETA)), ("admm_isvr", {}), ("cadmm", dict(eta=ETA))]},
    # the spec's literal dual initialisation, z = 0 (the default starts at consensus, z_ij = A_ij w_0)
    "pdmm_zero_duals": dict(name="pdmm", eta=ETA, dual_init="zero"),
    "admm_isvr_zero_duals": dict(name="admm_isvr", dual_init="zero"),
    "admm_isvr_K4_momentum": dict(name="admm_isvr", interval=4, piw=2.0, lr=0.1, momentum=0.9, dampening=0.5),
}
DSGD_STEPS = 300  # dsgd sits at its biased fixed point long before this
REPLAY_ONLY = {  # biased on purpose (see ALGORITHMS.md), so only replayed: a different c_g on every node
    "dsgd": dict(name="dsgd"),
    "admm_isvr_gcoef": dict(name="admm_isvr", interval=4, use_gcoef=True, lr=1.0),
}
REPLAY_STEPS = 9  # steps replayed against the equations, two exchanges with K = 4


def _shard(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Node `rank`'s data: mostly class rank mod C, features shifted by rank (the same on every rank)."""
    gen = torch.Generator().manual_seed(0)
    means = 1.5 * torch.randn(CLASSES, FEATURES, generator=gen, dtype=torch.float64)
    shards = []
    for i in range(N):
        mix = torch.full((CLASSES,), 0.1, dtype=torch.float64)
        mix[i % CLASSES] = 1.0
        y = torch.multinomial(mix, SAMPLES, replacement=True, generator=gen)
        x = means[y] + torch.randn(SAMPLES, FEATURES, generator=gen, dtype=torch.float64) + 0.5 * (i - N / 2)
        shards.append((x, y))
    x_all = torch.cat([x for x, _ in shards])
    x, y = shards[rank]
    return (x - x_all.mean(0)) / x_all.std(0), y


def _model() -> tuple[nn.Module, FlatParams]:
    """The `logistic` model (one Linear layer), from the same seed on every node.

    Built here rather than with p2p.models / p2p.trainer, whose torchvision import costs every
    spawned rank seconds.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Linear(FEATURES, CLASSES).double()
    return model, FlatParams(model)


def _gradient(model, flat: FlatParams, x, y) -> torch.Tensor:
    """g_i = ∇ mean CE + L2·w at the current weights, in flat.g, exactly as trainer.train_step."""
    flat.g.zero_()
    F.cross_entropy(model(x), y).backward()
    return flat.g.add_(flat.w, alpha=L2)


def _optimality(comm, model, flat: FlatParams, x, y) -> tuple[float, float]:
    """(‖Σ_i ∇f_i(w̄)‖, max_i ‖w_i − w̄‖), the same on every rank; evaluation traffic, not counted."""
    w_i = flat.w.clone()
    w_bar = comm.all_reduce_mean_(w_i.clone(), training=False)
    flat.w.copy_(w_bar)
    grad_F = comm.all_reduce_mean_(_gradient(model, flat, x, y).clone(), training=False) * comm.world_size
    flat.w.copy_(w_i)
    spread = max(d for (d,) in comm.all_gather_floats([(w_i - w_bar).norm().item()]))
    return grad_F.norm().item(), spread


def _run(comm, topology: Topology, fields: dict, x, y, steps: int, stop_at_tol: bool) -> dict:
    model, flat = _model()
    cfg = AlgorithmConfig(**{"lr": LR, "l2_lambda": L2, "interval": 1, **fields})
    opt = optimizer(flat, cfg, topology, comm)  # the L2 term is _gradient's
    algorithm = opt.rule
    bytes_before, trace, first_steps = comm.bytes_sent, [], [flat.w.clone()]
    for step in range(steps):
        _gradient(model, flat, x, y)
        opt.step()  # the exchange after every K-th
        if step < REPLAY_STEPS:
            first_steps.append(flat.w.clone())
        if (step + 1) % CHECK_EVERY == 0:
            trace.append(_optimality(comm, model, flat, x, y))
            if stop_at_tol and max(trace[-1]) <= TOL:  # the same decision on every rank
                break
    return {"steps": step + 1, "exchanges": (step + 1) // cfg.interval, "trace": trace, "w": torch.stack(first_steps),
            "bytes": comm.bytes_sent - bytes_before, "degree": topology.degree(comm.rank), "P": flat.w.numel(),
            "diagnostics": algorithm.diagnostics(cfg.lr)}


def _solve_all(comm) -> dict:
    x, y = _shard(comm.rank)
    out = {}
    for topo_name, topology in TOPOLOGIES.items():
        for label, fields in EXACT.items():
            out[topo_name, label] = _run(comm, topology, fields, x, y, MAX_STEPS, stop_at_tol=True)
        for label, fields in REPLAY_ONLY.items():
            steps = DSGD_STEPS if label == "dsgd" else REPLAY_STEPS
            out[topo_name, label] = _run(comm, topology, fields, x, y, steps, stop_at_tol=False)
    for label in SCHEDULED_RULES:
        out["scheduled", label] = _run(comm, SCHEDULED, EXACT[label], x, y, MAX_STEPS, stop_at_tol=True)
    out["scheduled", "dsgd"] = _run(comm, SCHEDULED, REPLAY_ONLY["dsgd"], x, y, REPLAY_STEPS, stop_at_tol=False)
    return out


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(_solve_all, N, timeout=170)


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("label", EXACT)
def test_reaches_the_centralized_optimum(runs, label, topology):
    r = runs[0][topology, label]
    grad_F, spread = r["trace"][-1]
    assert grad_F <= TOL and spread <= TOL, (label, topology, r["steps"], r["trace"][-3:])


@pytest.mark.parametrize("label", SCHEDULED_RULES)
def test_on_a_time_varying_graph_too(runs, label):
    """Duals on the union's edges, updated only while their edge is active: the optimum is unchanged."""
    r = runs[0]["scheduled", label]
    grad_F, spread = r["trace"][-1]
    assert grad_F <= TOL and spread <= TOL, (label, r["steps"], r["trace"][-3:])


@pytest.mark.parametrize("label", [k for k, v in EXACT.items() if v["name"] in ("pdmm", "admm", "pdmm_isvr", "admm_isvr")])
def test_at_the_fixed_point_the_duals_cancel_the_gradient_step(runs, label):
    """penalty_ratio = ‖Σ_j k_ij (A z_ij − w_i)‖ / ‖γ c_g d_i‖ is 1 at a fixed point of the primal step
    (nesterov's d_i = g_i + β m_i is not the buffer the diagnostic reads, so its ratio is not 1)."""
    for node in runs:
        d = node["irregular", label]["diagnostics"]
        assert d["dual_norm"] > 0
        if "nesterov" not in label:
            assert d["penalty_ratio"] == pytest.approx(1, abs=1e-4), (label, d)


def _gradient_at(node: tuple, w: torch.Tensor) -> torch.Tensor:
    model, flat, x, y = node
    flat.w.copy_(w)
    return _gradient(model, flat, x, y).clone()


def _replay(fields: dict, topology: Topology) -> torch.Tensor:
    """The first REPLAY_STEPS of every node, (steps + 1, n, P), straight from the equations of ALGORITHMS.md."""
    cfg = AlgorithmConfig(**{"lr": LR, "l2_lambda": L2, "interval": 1, **fields})
    name, lr, K, piw, n = cfg.name, cfg.lr, cfg.interval, cfg.piw, topology.n
    nodes = [(*_model(), *_shard(i)) for i in range(n)]
    W = torch.stack([flat.w.clone() for _, flat, _, _ in nodes])  # (n, P)
    N_ = [topology.neighbors(i) for i in range(n)]
    A = lambda i, j: 1.0 if i < j else -1.0  # noqa: E731
    d = lambda i, j: max(len(N_[i]), len(N_[j]))  # noqa: E731
    v = torch.tensor([FEATURES ** 0.5] * (CLASSES * FEATURES) + [CLASSES ** 0.5] * CLASSES, dtype=torch.float64)
    if name.endswith("_isvr"):
        c = lambda i, j: piw / (lr * (K * d(i, j) + K - piw * d(i, j)))  # noqa: E731  η_ij
    else:
        c = lambda i, j: cfg.eta / lr * v / d(i, j)  # noqa: E731  (η/γ) v_p / max(d_i, d_j)
    c_g = [1 - lr * sum(c(i, j) for j in N_[i]) * (K / piw - 1) if cfg.use_gcoef else 1.0 for i in range(n)]
    z = {(i, j): A(i, j) * W[i] if cfg.dual_init == "consensus" else torch.zeros_like(W[0])
         for i in range(n) for j in N_[i]}  # z_{i|j}
    w_j = {(i, j): W[j].clone() for i in range(n) for j in N_[i]}  # cadmm: the last received w_j
    alpha = torch.zeros_like(W)
    beta, m = cfg.momentum, torch.zeros_like(W)  # torch SGD's momentum buffers, one row per node
    out = [W.clone()]
    for t in range(REPLAY_STEPS):
        g = torch.stack([_gradient_at(node, W[i]) for i, node in enumerate(nodes)])  # (n, P)
        if name == "allreduce":
            g = g.mean(0, keepdim=True).expand_as(g)
        if beta:  # ALGORITHMS.md, "Momentum for every rule": g_i is replaced by the direction d_i
            m = g.clone() if t == 0 else beta * m + (1 - cfg.dampening) * g
            g = g + beta * m if cfg.nesterov else m
        exchange = (t + 1) % K == 0
        active = topology.active((t + 1) // K - 1)  # the graph of this exchange (every edge on a static graph)
        if name == "allreduce":
            W = W - lr * g
        elif name == "dsgd":
            W = W - lr * g
            W = torch.from_numpy(topology.mixing_matrix("metropolis", active)) @ W if exchange else W
        elif name == "cadmm":
            W = torch.stack([(W[i] / lr - g[i] - alpha[i] + sum(c(i, j) * (W[i] + w_j[i, j]) for j in N_[i]))
                             / (1 / lr + 2 * sum(c(i, j) for j in N_[i])) for i in range(n)])
            if exchange:
                w_j = {(i, j): W[j].clone() for (i, j) in w_j}
                alpha = alpha + torch.stack([sum(c(i, j) * (W[i] - W[j]) for j in N_[i]) for i in range(n)])
        else:
            W = torch.stack([(W[i] / lr - c_g[i] * g[i] + sum(c(i, j) * A(i, j) * z[i, j] for j in N_[i]))
                             / (1 / lr + sum(c(i, j) for j in N_[i])) for i in range(n)])
            if exchange:
                y_ = {(i, j): z[i, j] - 2 * A(i, j) * W[i] for (i, j) in z}
                z = {(i, j): z[i, j] if (min(i, j), max(i, j)) not in active else y_[j, i] if name.startswith("pdmm")
                     else 0.5 * z[i, j] + 0.5 * y_[j, i] for (i, j) in z}
        out.append(W.clone())
    return torch.stack(out)


@pytest.mark.parametrize("topology, label", [(t, label) for t in TOPOLOGIES for label in [*EXACT, *REPLAY_ONLY]]
                         + [("scheduled", label) for label in [*SCHEDULED_RULES, "dsgd"]])
def test_first_steps_follow_the_equations(runs, label, topology):
    """Every node's weights after each of the first steps equal a replay of ALGORITHMS.md's rules."""
    fields = {**EXACT, **REPLAY_ONLY}[label]
    got = torch.stack([node[topology, label]["w"] for node in runs], dim=1)  # (steps + 1, n, P)
    want = _replay(fields, {**TOPOLOGIES, "scheduled": SCHEDULED}[topology])
    assert (got[1] - got[0]).abs().max().item() > 1e-3  # the steps do move the weights
    err = (got - want).abs().amax(dim=(1, 2))
    assert err.max().item() < 1e-12, (label, topology, err.tolist())


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_dsgd_with_a_constant_step_stays_off_the_optimum(runs, topology):
    trace = runs[0][topology, "dsgd"]["trace"]
    (half_grad, _), (grad_F, spread) = trace[len(trace) // 2 - 1], trace[-1]
    assert grad_F > 1e-3 and spread > 1e-3, trace[-1]
    # ... at its fixed point, not on the way to the optimum: the bias no longer shrinks
    assert abs(grad_F - half_grad) < 1e-3 * grad_F, (half_grad, grad_F)


@pytest.mark.parametrize("topology", [*TOPOLOGIES, "scheduled"])
def test_bytes_per_exchange(runs, topology):
    """dsgd, cadmm, primal-dual: d_i·|w|·8 per exchange, d_i the degree in exchange r's graph;
    allreduce: 2(n−1)/n·|w|·8 per step."""
    graph = {**TOPOLOGIES, "scheduled": SCHEDULED}[topology]
    for rank, node in enumerate(runs):
        for label, r in node.items():
            if label[0] != topology:
                continue
            size = r["P"] * 8  # float64
            if label[1] == "allreduce":
                assert r["bytes"] == r["steps"] * (2 * (N - 1) * size // N), (rank, label)
            else:
                sent = sum(len(graph.active_neighbors(rank, e)) for e in range(r["exchanges"]))
                assert r["exchanges"] > 0 and r["bytes"] == sent * size, (rank, label)


# --- configuration checks of the primal-dual rules (in-process: the constructor only reads comm.rank) --------------


def _build(name: str, topology: Topology, rank: int = 0, **fields):
    _, flat = _model()
    return build_algorithm(flat, AlgorithmConfig(name=name, **fields), topology, rank)


@pytest.mark.parametrize("name", ["pdmm_isvr", "admm_isvr"])
def test_isvr_with_piw_2_and_interval_1_is_a_config_error(name):
    # K d + K − piw d = 1 − d < 0 on every degree: the penalty would be negative
    with pytest.raises(ConfigError, match="--algorithm.piw"):
        _build(name, RING, piw=2.0, interval=1)
    _build(name, RING, piw=2.0, interval=2)  # K ≥ 2 makes it positive again


def test_cadmm_needs_interval_1():
    with pytest.raises(ConfigError, match="cadmm needs --algorithm.interval 1"):
        _build("cadmm", RING, interval=4)
    _build("cadmm", RING, interval=1)


def test_isvr_with_interval_1_warns_and_auto_interval_is_4(caplog):
    from p2p.optimizer import resolve_interval
    with caplog.at_level(logging.WARNING, logger="p2p.algorithms.primal_dual"):
        _build("pdmm_isvr", RING, interval=4)
        assert not caplog.records
        _build("pdmm_isvr", RING, interval=1)
    assert any("interval 1" in r.getMessage() and "1/3.0" in r.getMessage() for r in caplog.records)
    for name, K in [("pdmm_isvr", 4), ("admm_isvr", 4), ("pdmm", 1), ("dsgd", 1)]:
        cfg = AlgorithmConfig(name=name, interval=0)
        resolve_interval(cfg, RING)
        assert cfg.interval == K, name


def test_gcoef_on_an_irregular_graph_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="p2p.algorithms.primal_dual"):
        _build("pdmm_isvr", RING, use_gcoef=True, interval=4)
        assert not caplog.records  # regular: c_g is the same on every node
        pd = _build("pdmm_isvr", IRREGULAR, use_gcoef=True, interval=4)
    assert any("use_gcoef" in r.getMessage() for r in caplog.records)
    # c_g = 1 − γ(Σ_j η_ij)(K/piw − 1), with γ η_ij = piw / (K d + K − piw d), d = max(d_0, d_j) = 4 at the hub
    assert pd.c_g == pytest.approx(1 - 4 * (1 / (4 * 4 + 4 - 4)) * (4 - 1))
