"""Pairwise gossip on real gloo processes: each exchange is exactly one matching averaging in pairs.

A ring of 5, so that every matching of the colouring leaves some node unmatched (a ring of 4 or 6
splits into two perfect matchings and would never test the unmatched case). Zero gradients, so the
local SGD step is the identity and only the exchange moves the weights; float64, starts differ.
"""

import pytest
import torch

from distributed import optimizer, run_ranks
from p2p.algorithms import FlatParams, build_algorithm
from p2p.config import AlgorithmConfig
from p2p.topology import generate

pytestmark = pytest.mark.timeout(120)

N = 5  # ranks
RING = generate("ring", N)
CYCLIC_ROUNDS, RANDOM_ROUNDS = 2 * len(RING.matchings()), 12


def _flat(rank: int) -> FlatParams:
    """A tiny float64 model whose weights differ on every rank."""
    model = torch.nn.Linear(3, 2).double()
    flat = FlatParams(model)
    flat.w.copy_(torch.randn(flat.w.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rank)))
    return flat


def _gossip(comm, schedule: str, rounds: int) -> list[dict]:
    flat = _flat(comm.rank)
    opt = optimizer(flat, AlgorithmConfig(name="gossip", schedule=schedule, lr=0.1), RING, comm)
    gossip = opt.rule
    flat.g.zero_()
    history = []
    for r in range(rounds):
        before, bytes_before = flat.w.clone(), comm.bytes_sent
        partner = gossip.partner(r)  # this node's own view of the active matching
        opt.step()
        history.append({"before": before, "after": flat.w.clone(), "partner": partner,
                        "bytes": comm.bytes_sent - bytes_before})
    return history


def _both_schedules(comm) -> dict:
    return {"cyclic": _gossip(comm, "cyclic", CYCLIC_ROUNDS), "random": _gossip(comm, "random", RANDOM_ROUNDS)}


@pytest.fixture(scope="module")
def runs() -> dict[str, list[list[dict]]]:
    out = run_ranks(_both_schedules, N, timeout=110)
    return {s: [rank[s] for rank in out] for s in ("cyclic", "random")}  # [schedule][rank][round]


def _check_round(nodes: list[dict], matching: list[tuple[int, int]]) -> None:
    """Matched pairs hold the same average, unmatched nodes are unchanged, bytes |w|·8 or 0."""
    size = nodes[0]["before"].numel() * 8  # float64
    matched = {i for pair in matching for i in pair}
    for i, j in matching:
        average = (nodes[i]["before"] + nodes[j]["before"]) * 0.5
        assert torch.equal(nodes[i]["after"], nodes[j]["after"]), (i, j)
        assert torch.allclose(nodes[i]["after"], average, rtol=0, atol=1e-15), (i, j)
        assert nodes[i]["bytes"] == nodes[j]["bytes"] == size, (i, j)
    for k in set(range(N)) - matched:
        assert torch.equal(nodes[k]["after"], nodes[k]["before"]), k
        assert nodes[k]["bytes"] == 0, k
    mean_before = torch.stack([n["before"] for n in nodes]).mean(0)
    mean_after = torch.stack([n["after"] for n in nodes]).mean(0)
    assert (mean_after - mean_before).abs().max().item() <= 1e-12


def test_cyclic_schedule_averages_one_matching_per_exchange(runs):
    matchings = RING.matchings()
    assert len(matchings) == 3 and all(len(m) < N / 2 for m in matchings)  # odd ring: someone always waits
    assert torch.stack([r[0]["before"] for r in runs["cyclic"]]).std(0).min().item() > 1e-3  # starts differ
    for r in range(CYCLIC_ROUNDS):
        nodes = [rank[r] for rank in runs["cyclic"]]
        _check_round(nodes, matchings[r % len(matchings)])
    # and gossip does mix: after the rounds every node moved
    for rank, history in enumerate(runs["cyclic"]):
        assert not torch.equal(history[-1]["after"], history[0]["before"]), rank


def test_random_schedule_agrees_across_nodes(runs):
    matchings = RING.matchings()
    colours = []
    for r in range(RANDOM_ROUNDS):
        nodes = [rank[r] for rank in runs["random"]]
        partner = [n["partner"] for n in nodes]
        for i, j in enumerate(partner):  # i's partner j has partner i
            assert j is None or partner[j] == i, (r, partner)
        pairs = sorted((i, j) for i, j in enumerate(partner) if j is not None and i < j)
        assert pairs in matchings, (r, pairs)  # exactly one whole colour of the shared colouring
        colours.append(matchings.index(pairs))
        _check_round(nodes, pairs)
    assert len(set(colours)) > 1 and colours != [r % len(matchings) for r in range(RANDOM_ROUNDS)], colours
