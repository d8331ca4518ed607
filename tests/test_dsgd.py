"""DSGD on real gloo processes: parity with all-reduce on the complete graph, gossip at the spectral-gap rate,
exact averaging in log2 n rounds on the time-varying one_peer_hypercube.

Float64 throughout, so the parity can be asserted to 1e-12 rather than to float32 noise.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distributed import optimizer, run_ranks
from p2p.algorithms import FlatParams, build_algorithm
from p2p.config import AlgorithmConfig, ModelConfig
from p2p.models import build_model
from p2p.topology import generate
from p2p.transport import Transport

pytestmark = pytest.mark.timeout(240)

IN_SHAPE, CLASSES, BATCH = (1, 8, 8), 10, 16


def _mlp():
    model = build_model(ModelConfig(name="mlp", hidden=16, model_seed=3), IN_SHAPE, CLASSES).double()
    return model, FlatParams(model)


def _gradient(model, flat, x, y):
    flat.g.zero_()
    F.cross_entropy(model(x), y).backward()


def _complete_graph_parity(comm, steps, lr):
    """DSGD (uniform mixing = J/n, K = 1), the allreduce algorithm and w ← mean_i(w − γ g_i), side by side."""
    topo = generate("complete", comm.world_size)
    model, flat = _mlp()
    dsgd = optimizer(flat, AlgorithmConfig(name="dsgd", mixing="uniform", lr=lr), topo, comm)
    model_ar, flat_ar = _mlp()
    allreduce = optimizer(flat_ar, AlgorithmConfig(name="allreduce", lr=lr), topo, comm)
    model_ref, flat_ref = _mlp()
    gen = torch.Generator().manual_seed(100 + comm.rank)  # every rank its own data
    grads, dsgd_bytes, diffs = [], [], []
    for _ in range(steps):
        x = torch.randn(BATCH, *IN_SHAPE, generator=gen, dtype=torch.float64) + comm.rank
        y = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        _gradient(model, flat, x, y)
        grads.append(flat.g.clone())
        before = comm.bytes_sent
        dsgd.step()
        dsgd_bytes.append(comm.bytes_sent - before)
        _gradient(model_ar, flat_ar, x, y)
        allreduce.step()
        _gradient(model_ref, flat_ref, x, y)
        flat_ref.w.sub_(flat_ref.g, alpha=lr)
        comm.all_reduce_mean_(flat_ref.w, training=False)
        diffs.append(((flat.w - flat_ref.w).abs().max().item(), (flat.w - flat_ar.w).abs().max().item()))
    return {"w": flat.w.clone(), "diffs": diffs, "grads": grads, "dsgd_bytes": dsgd_bytes, "P": flat.w.numel()}


def test_dsgd_with_uniform_mixing_on_the_complete_graph_is_allreduce():
    n, steps = 4, 5
    out = run_ranks(_complete_graph_parity, n, steps, 0.5, timeout=180)
    for rank, r in enumerate(out):
        for step, (to_ref, to_allreduce) in enumerate(r["diffs"]):
            assert to_ref < 1e-12 and to_allreduce < 1e-12, (rank, step, to_ref, to_allreduce)
        # models identical across ranks (bitwise would be too strict: each rank sums in its own order)
        assert (r["w"] - out[0]["w"]).abs().max().item() < 1e-12
        # one message of |w| float64s to each of the n - 1 neighbours per exchange
        assert r["dsgd_bytes"] == [(n - 1) * r["P"] * 8] * steps
    # the check has teeth: the ranks' gradients differ, so without the averaging the models would drift apart
    for step in range(steps):
        spread = max((r["grads"][step] - out[0]["grads"][step]).abs().max().item() for r in out)
        assert spread > 1e-3, step
    assert (out[0]["w"] - _mlp()[1].w).abs().max().item() > 1e-3  # and the models did move


def _ring_gossip(comm, rounds):
    """Pure gossip averaging: zero gradients, every step an exchange; interleaved steps without one."""
    topo = generate("ring", comm.world_size)
    model = build_model(ModelConfig(name="logistic"), IN_SHAPE, CLASSES).double()
    flat = FlatParams(model)
    flat.w.copy_(torch.randn(flat.w.shape, generator=torch.Generator().manual_seed(comm.rank), dtype=torch.float64))
    dsgd = build_algorithm(flat, AlgorithmConfig(name="dsgd", mixing="metropolis", lr=0.1), topo, comm.rank)
    transport = Transport(comm)
    flat.g.zero_()
    history, bytes_sent = [flat.w.clone()], []
    for _ in range(rounds):
        before = flat.w.clone()
        dsgd.update(0.1)  # K > 1: a local step alone sends nothing and, with g = 0, changes nothing
        assert torch.equal(flat.w, before)
        dsgd.update(0.1)
        transport.end_round(dsgd)
        history.append(flat.w.clone())
        bytes_sent.append(comm.bytes_sent)
    return {"history": torch.stack(history), "bytes_sent": bytes_sent, "degree": topo.degree(comm.rank)}


def test_gossip_on_a_ring_contracts_at_the_spectral_gap_rate():
    n, rounds = 6, 30
    out = run_ranks(_ring_gossip, n, rounds, timeout=180)
    topo = generate("ring", n)
    W = topo.mixing_matrix("metropolis")
    lam2 = 1.0 - topo.spectral_gap(W)
    assert abs(lam2 - 2 / 3) < 1e-12  # ring of 6, metropolis: W = (I + shifts) / 3, λ₂ = (1 + 2cos(2π/6)) / 3
    X = torch.stack([r["history"] for r in out], dim=1).numpy()  # (rounds + 1, n, P)
    w_bar = X.mean(axis=1, keepdims=True)  # (rounds + 1, 1, P)
    dist = ((X - w_bar) ** 2).sum(axis=2).mean(axis=1)  # (1/n) Σ_i ||w_i − w̄||², per round

    # every round is exactly one multiplication by W
    for t in range(rounds):
        assert np.abs(X[t + 1] - W @ X[t]).max() < 1e-12, t
    # the network average is preserved (W is doubly stochastic)
    assert np.abs(w_bar - w_bar[0]).max() < 1e-10
    # the consensus distance contracts at least as fast as λ₂^(2t), and does contract
    assert dist[0] > 1.0
    for t in range(rounds + 1):
        assert dist[t] <= lam2 ** (2 * t) * dist[0] * (1 + 1e-9) + 1e-20, (t, dist[t], lam2 ** (2 * t) * dist[0])
    assert dist[10] < dist[0] / 100
    assert dist[rounds] < dist[0] * 1e-8
    # ... and not much faster: a random start has a component along λ₂'s eigenvectors
    assert dist[rounds] > lam2 ** (2 * rounds) * dist[0] * 1e-3

    # the byte counter: after R exchanges, R · d_i · |w| · element_size
    P = X.shape[2]
    for r in out:
        assert r["bytes_sent"] == [R * r["degree"] * P * 8 for R in range(1, rounds + 1)]


def _hypercube_averaging(comm, rounds):
    """dsgd with lr 0 from a different w_i on every rank, one exchange per step, on one_peer_hypercube."""
    topo = generate("one_peer_hypercube", comm.world_size)
    model = build_model(ModelConfig(name="logistic"), IN_SHAPE, CLASSES).double()
    flat = FlatParams(model)
    flat.w.copy_(torch.randn(flat.w.shape, generator=torch.Generator().manual_seed(comm.rank), dtype=torch.float64))
    dsgd = build_algorithm(flat, AlgorithmConfig(name="dsgd", lr=0.0), topo, comm.rank)
    transport = Transport(comm)
    flat.g.normal_()  # lr 0: the gradient must not matter
    history, bytes_sent = [flat.w.clone()], []
    for _ in range(rounds):
        dsgd.update(0.0)
        transport.end_round(dsgd)
        history.append(flat.w.clone())
        bytes_sent.append(comm.bytes_sent)
    return {"history": torch.stack(history), "bytes_sent": bytes_sent}


def test_one_peer_hypercube_averages_exactly_in_log2_n_rounds():
    n, rounds = 8, 4
    out = run_ranks(_hypercube_averaging, n, rounds, timeout=180)
    X = torch.stack([r["history"] for r in out], dim=1)  # (rounds + 1, n, P)
    mean = X[0].mean(dim=0)
    spread = [(X[t] - mean).abs().max().item() for t in range(rounds + 1)]
    assert spread[2] > 1e-2, spread  # two rounds average groups of 4 only
    assert spread[3] < 1e-12 and spread[4] < 1e-12, spread  # three rounds: everyone holds the mean, and keeps it
    P = X.shape[2]
    for r in out:  # one message of |w| float64s per node per exchange
        assert r["bytes_sent"] == [R * P * 8 for R in range(1, rounds + 1)]
