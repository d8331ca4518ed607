"""Topology: generators, mixing matrices, colourings and the validation of topology files."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from p2p.algorithms import ALGORITHMS, FlatParams, build_algorithm
from p2p.config import AlgorithmConfig, ConfigError, TopologyConfig
from p2p.topology import Topology, build_topology, generate, load_topology, main

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = [("ring", 8), ("torus", 16), ("complete", 5), ("star", 6), ("exponential", 8), ("random_regular", 10)]


def degrees(t: Topology) -> list[int]:
    return [t.degree(i) for i in range(t.n)]


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "topo.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# --- generators ---------------------------------------------------------------------------------------------------


def test_generator_degrees():
    assert degrees(generate("ring", 8)) == [2] * 8
    assert generate("ring", 8).neighbors(0) == [1, 7]
    assert generate("ring", 2).edges == ((0, 1),)
    assert generate("ring", 1).edges == ()
    assert degrees(generate("torus", 16)) == [4] * 16
    assert len(generate("torus", 16).edges) == 32
    assert degrees(generate("complete", 5)) == [4] * 5
    assert degrees(generate("star", 6)) == [5, 1, 1, 1, 1, 1]
    assert generate("star", 6).neighbors(3) == [0]
    # exponential 8: i +- 1, 2, 4 mod 8 -> offsets {1, 2, 4, 6, 7}
    assert degrees(generate("exponential", 8)) == [5] * 8
    assert generate("exponential", 8).neighbors(0) == [1, 2, 4, 6, 7]
    rr = generate("random_regular", 10, degree=3, seed=1)
    assert degrees(rr) == [3] * 10 and rr.is_regular
    assert not generate("star", 4).is_regular


def test_torus_shapes():
    # 2 x 4 torus: the 2-wide dimension must not duplicate edges, so every node has degree 3
    t = generate("torus", 8)
    assert degrees(t) == [3] * 8 and len(t.edges) == 12
    assert t.neighbors(0) == [1, 3, 4]
    # a prime n gives a 1 x n torus, i.e. a ring
    assert generate("torus", 7).edges == generate("ring", 7).edges
    assert generate("torus", 12).source == "torus(n=12, 3x4)"


@pytest.mark.parametrize("name,n", GRAPHS)
def test_edges_normalised(name, n):
    t = generate(name, n)
    assert all(i < j for i, j in t.edges)
    assert list(t.edges) == sorted(set(t.edges))
    assert t == generate(name, n)  # deterministic


def test_generator_errors():
    with pytest.raises(ConfigError, match="unknown topology 'hypercube'"):
        generate("hypercube", 8)
    with pytest.raises(ConfigError, match="--topology.n: .*at least 1 node, got 0"):
        generate("ring", 0)
    with pytest.raises(ConfigError, match="n \\* degree even"):
        generate("random_regular", 5, degree=3)
    with pytest.raises(ConfigError, match="1 <= degree < n"):
        generate("random_regular", 4, degree=4)


# --- mixing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,n", GRAPHS)
def test_metropolis_doubly_stochastic(name, n):
    W = generate(name, n).mixing_matrix("metropolis")
    assert W.shape == (n, n)
    np.testing.assert_allclose(W, W.T)
    np.testing.assert_allclose(W.sum(axis=1), np.ones(n))
    assert W.min() >= 0


def test_metropolis_star_values():
    W = generate("star", 4).mixing_matrix("metropolis")  # centre degree 3: every edge 1/4
    np.testing.assert_allclose(W[0], [0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(W[1], [0.25, 0.75, 0, 0])


def test_uniform():
    W = generate("ring", 6).mixing_matrix("uniform")
    np.testing.assert_allclose(W.sum(axis=0), np.ones(6))
    np.testing.assert_allclose(W.sum(axis=1), np.ones(6))
    np.testing.assert_allclose(W[0, [0, 1, 5]], [1 / 3] * 3)
    S = generate("star", 4).mixing_matrix("uniform")  # rows sum to 1, columns do not: irregular
    np.testing.assert_allclose(S.sum(axis=1), np.ones(4))
    assert S.sum(axis=0)[0] == pytest.approx(0.25 + 3 * 0.5)


def test_spectral_gap_ring4():
    t = generate("ring", 4)
    W = t.mixing_matrix("metropolis")
    np.testing.assert_allclose(W, np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]]) / 3)
    assert t.spectral_gap(W) == pytest.approx(2 / 3)  # eigenvalues 1, 1/3, 1/3, -1/3
    assert t.spectral_gap(generate("complete", 5).mixing_matrix("metropolis")) == pytest.approx(1.0)


def test_file_mixing(tmp_path):
    path = write(tmp_path, {"n": 3, "edges": [[0, 1], [1, 2]], "weights": [[0, 1, 0.5], [2, 1, 0.25]]})
    W = load_topology(path).mixing_matrix("file")
    np.testing.assert_allclose(W, [[0.5, 0.5, 0], [0.5, 0.25, 0.25], [0, 0.25, 0.75]])
    with pytest.raises(ConfigError, match="has no per-edge weights; use --algorithm.mixing metropolis"):
        generate("ring", 4).mixing_matrix("file")


def test_summary():
    s = generate("ring", 4).summary("metropolis")
    assert s == "topology ring(n=4): 4 nodes, 4 edges, degree 2..2, spectral gap 0.6667 (metropolis mixing)"


# --- time-varying graphs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_one_peer_hypercube_rounds_are_perfect_matchings(n):
    t = generate("one_peer_hypercube", n)
    assert len(t.schedule) == n.bit_length() - 1  # log2 n rounds
    for k, graph in enumerate(t.schedule):
        assert sorted(v for e in graph for v in e) == list(range(n))  # every node exactly once
        assert all(j == i ^ 2**k for i, j in graph)
    assert t.edges == tuple(sorted({e for g in t.schedule for e in g}))
    assert degrees(t) == [n.bit_length() - 1] * n  # the union is the hypercube
    assert [t.active(r) for r in range(5)] == [t.schedule[r % len(t.schedule)] for r in range(5)]


@pytest.mark.parametrize("n", range(2, 18))
def test_exponential_schedule_at_most_two_peers(n):
    t = generate("exponential_schedule", n)  # the union is connected, or generate would have refused it
    assert len(t.schedule) == math.ceil(math.log2(n))
    for graph in t.schedule:
        assert max(np.bincount(np.ravel(graph), minlength=n)) <= 2
    assert t.edges == generate("exponential", n).edges  # offsets +-2^k, k < ceil(log2 n)


def test_time_varying_generator_errors():
    with pytest.raises(ConfigError, match="^--topology.n: one_peer_hypercube needs a power of two >= 2 nodes, got 6$"):
        generate("one_peer_hypercube", 6)
    with pytest.raises(ConfigError, match="one_peer_hypercube needs a power of two >= 2 nodes, got 1"):
        generate("one_peer_hypercube", 1)
    with pytest.raises(ConfigError, match="^--topology.n: exponential_schedule needs at least 2 nodes, got 1$"):
        generate("exponential_schedule", 1)


def test_one_peer_hypercube_averages_exactly_in_log2_n_rounds():
    """Pairwise averaging, W_r = (I + P_r)/2, the Metropolis matrix of a perfect matching: any 3 consecutive
    rounds on 8 nodes average the network exactly."""
    t = generate("one_peer_hypercube", 8)
    for graph in t.schedule:
        W = t.mixing_matrix("metropolis", graph)
        P = np.zeros((8, 8))  # the matching's permutation
        for i, j in graph:
            P[i, j] = P[j, i] = 1
        np.testing.assert_allclose(W, (np.eye(8) + P) / 2, atol=0)
    x = np.random.default_rng(0).normal(size=(8, 5))
    for start in range(3):
        y = x.copy()
        for r in range(start, start + 3):
            y = t.mixing_matrix("metropolis", t.active(r)) @ y
        np.testing.assert_allclose(y, np.tile(x.mean(axis=0), (8, 1)), atol=1e-12, rtol=0)
    np.testing.assert_allclose(t.period_matrix(), np.full((8, 8), 1 / 8), atol=1e-12, rtol=0)
    assert t.spectral_gap(t.period_matrix()) == pytest.approx(1.0, abs=1e-12)


def test_round_mixing_is_doubly_stochastic_on_its_edges():
    t = generate("exponential_schedule", 6)
    for graph in t.schedule:
        W = t.mixing_matrix("metropolis", graph)
        np.testing.assert_allclose(W.sum(axis=0), np.ones(6))
        np.testing.assert_allclose(W, W.T)
        assert {(i, j) for i, j in zip(*np.nonzero(W)) if i < j} == set(graph)
    static = generate("ring", 5)
    assert static.active(7) == static.edges and static.schedule is None
    np.testing.assert_array_equal(static.period_matrix(), static.mixing_matrix("metropolis"))


def test_file_weights_of_one_round(tmp_path):
    path = write(tmp_path, {"n": 3, "schedule": [{"edges": [[0, 1]]}, {"edges": [[1, 2], [0, 1]]}],
                            "weights": [[0, 1, 0.5], [1, 2, 0.25]]})
    t = load_topology(path)
    assert t.edges == ((0, 1), (1, 2)) and t.schedule == (((0, 1),), ((0, 1), (1, 2)))  # edges: the union
    np.testing.assert_allclose(t.mixing_matrix("file", t.active(0)), [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]])
    np.testing.assert_allclose(t.mixing_matrix("file", t.active(1)), t.mixing_matrix("file"))


def test_slot_edges_follow_the_lower_ranked_end():
    t = load_topology(ROOT / "topologies/seed_n3_ring.json")  # round 10, slots (0,1): 4, (0,2): 0, (1,2): 5
    assert [t.slot_edges(s) for s in (0, 4, 5, 1, 10, 14)] == [((0, 2),), ((0, 1),), ((1, 2),), (), ((0, 2),),
                                                                ((0, 1),)]
    assert sorted(e for s in range(10) for e in t.slot_edges(s)) == list(t.edges)  # once per round each
    assert t.active(3) == t.edges
    with pytest.raises(ValueError, match="has no slots"):
        generate("ring", 4).slot_edges(0)


def test_schedule_summary_save_and_cli(tmp_path):
    t = generate("one_peer_hypercube", 8)
    assert t.summary("metropolis") == (
        "topology one_peer_hypercube(n=8): 8 nodes, 12 edges, degree 3..3 in the union; schedule of 3 rounds, "
        "degree 1..1 per round, gap of the period product 1.0000 (metropolis mixing per round)")
    t.save(tmp_path / "h.json")
    again = load_topology(tmp_path / "h.json")
    assert (again.n, again.edges, again.schedule) == (t.n, t.edges, t.schedule)
    assert json.loads((tmp_path / "h.json").read_text())["schedule"][0] == {"edges": [[0, 1], [2, 3], [4, 5], [6, 7]]}
    main(["exponential_schedule", "6", "-o", str(tmp_path / "e.json")])
    e, loaded = generate("exponential_schedule", 6), load_topology(tmp_path / "e.json")
    assert (loaded.n, loaded.edges, loaded.schedule) == (e.n, e.edges, e.schedule)
    # without "edges" the union is the graph
    data = {"n": 4, "schedule": [{"edges": [[0, 1], [2, 3]]}, {"edges": [[1, 2]]}]}
    assert load_topology(write(tmp_path, data)).edges == ((0, 1), (1, 2), (2, 3))


def test_schedules_reach_the_rules_that_use_them(tmp_path):
    """build_topology passes a schedule on; dsgd, qgm, gt, ed and the primal-dual rules use it, gossip, cadmm and
    choco refuse it."""
    t = build_topology(TopologyConfig(name="one_peer_hypercube"), 8)
    assert [t.active_neighbors(5, r) for r in range(4)] == [[4], [7], [1], [4]]  # 5 XOR 1, 2, 4, 1
    assert t.neighbors(5) == [1, 4, 7]
    assert generate("ring", 5).active_neighbors(0, 3) == [1, 4]  # static: every neighbour every round
    main(["one_peer_hypercube", "16", "-o", str(tmp_path / "h16.json")])
    assert load_topology(tmp_path / "h16.json").schedule == generate("one_peer_hypercube", 16).schedule
    model = torch.nn.Linear(2, 2)
    for name in ALGORITHMS:
        cfg = AlgorithmConfig(name=name, interval=4 if name.endswith("_isvr") else 1)
        build = lambda: build_algorithm(FlatParams(model), cfg, t, 5)  # noqa: E731
        if name in ("gossip", "cadmm", "choco"):
            with pytest.raises(ConfigError, match=f"^{name} .*one_peer_hypercube\\(n=8\\).*; use "):
                build()
        else:
            build()


# --- signs and matchings ------------------------------------------------------------------------------------------


def test_edge_sign_antisymmetric():
    t = generate("complete", 4)
    for i, j in t.edges:
        assert t.edge_sign(i, j) == 1 and t.edge_sign(j, i) == -1


@pytest.mark.parametrize("name,n", GRAPHS + [("ring", 5), ("star", 5)])
def test_matchings_proper_and_covering(name, n):
    t = generate(name, n)
    colours = t.matchings()
    for matching in colours:
        nodes = [v for e in matching for v in e]
        assert len(nodes) == len(set(nodes)), f"a node appears twice in colour {matching}"
    flat = [e for m in colours for e in m]
    assert sorted(flat) == list(t.edges)  # every edge exactly once
    assert len(colours) <= 2 * max(degrees(t)) - 1  # greedy bound
    assert colours == t.matchings()


def test_matchings_values():
    assert generate("ring", 4).matchings() == [[(0, 1), (2, 3)], [(0, 3), (1, 2)]]
    assert generate("ring", 5).matchings() == [[(0, 1), (2, 3)], [(0, 4), (1, 2)], [(3, 4)]]  # odd ring: 3 colours
    assert len(generate("star", 5).matchings()) == 4


# --- files -------------------------------------------------------------------------------------------------------


def test_our_format_merges_duplicates(tmp_path):
    t = load_topology(write(tmp_path, {"n": 3, "edges": [[1, 0], [0, 1], [1, 2]]}))
    assert t.edges == ((0, 1), (1, 2)) and t.weights is None and t.source == str(tmp_path / "topo.json")


def node_list(edges: dict[str, object]) -> dict:
    return {"nodes": [{"name": k, "addr": "localhost", "port": 9997 + r, "edges": v}
                      for r, (k, v) in enumerate(edges.items())]}


def test_node_list_is_complete3(tmp_path):
    seed = node_list({"CASPER": ["BALTHASAR", "MELCHIOR"], "BALTHASAR": ["CASPER", "MELCHIOR"],
                      "MELCHIOR": ["CASPER", "BALTHASAR"]})
    assert load_topology(write(tmp_path, seed)).edges == generate("complete", 3).edges
    as_dict = node_list({"A": {"B": 1}, "B": {"A": 1, "C": 1}, "C": {"B": 1}})
    assert load_topology(write(tmp_path, as_dict)).edges == ((0, 1), (1, 2))


def seed(nodes: dict[str, tuple[int | None, object]]) -> dict:
    """The seed's object shape: {"nodes": {name: {"device", "round", "edges"}}}, round None = absent."""
    return {"nodes": {name: {"device": "cuda", **({} if r is None else {"round": r}), "edges": edges}
                      for name, (r, edges) in nodes.items()}}


def test_seed_object_shape_ranks_round_and_slots(tmp_path, caplog):
    # names in file order, not sorted: zed is rank 0; slots are per direction
    data = seed({"zed": (4, {"amy": 3, "bob": 0}), "amy": (4, {"zed": 1, "bob": 2}), "bob": (4, {"amy": 3, "zed": 0})})
    with caplog.at_level(logging.INFO, logger="p2p"):
        t = load_topology(write(tmp_path, data))
    assert t.n == 3 and t.edges == ((0, 1), (0, 2), (1, 2)) and t.round == 4
    assert t.slots == {(0, 1): 3, (0, 2): 0, (1, 0): 1, (1, 2): 2, (2, 1): 3, (2, 0): 0}
    assert 'its "device" entries are ignored' in caplog.text
    assert "ranks in file order: zed = 0, amy = 1, bob = 2" in caplog.text
    # without a round, an object's values are not slots and the list of names works as before
    plain = load_topology(write(tmp_path, {"nodes": {"a": {"edges": {"b": 7}}, "b": {"edges": ["a"]}}}))
    assert plain.edges == ((0, 1),) and plain.round is None and plain.slots is None


def test_the_seeds_3_node_file(tmp_path):
    t = load_topology(ROOT / "topologies/seed_n3_ring.json")
    assert t.edges == generate("ring", 3).edges and t.round == 10
    assert t.slots == {(0, 2): 0, (0, 1): 4, (1, 0): 1, (1, 2): 5, (2, 1): 2, (2, 0): 6}
    t.save(tmp_path / "t.json")  # runs/<name>/topology.json keeps the schedule
    again = load_topology(tmp_path / "t.json")
    assert (again.n, again.edges, again.round, again.slots) == (t.n, t.edges, t.round, t.slots)
    assert json.loads((tmp_path / "t.json").read_text())["slots"][:2] == [[0, 1, 4], [0, 2, 0]]


BAD = [
    ("not json {", "is not valid JSON"),
    ([1, 2], 'expected {"n": ..., "edges": \\[...\\]} or {"nodes": ...}'),
    ({"n": 3, "edges": [[0, 1], [1, 2]], "extra": 1}, "unknown field\\(s\\) \\['extra'\\]"),
    ({"n": 0, "edges": []}, '"n" must be a positive integer, got 0'),
    ({"n": 3, "edges": [[0, 1, 2]]}, "edge \\[0, 1, 2\\] is not an \\[i, j\\] pair"),
    ({"n": 4, "edges": [[0, 1], [2, 3]]}, "is not connected: nodes \\[2, 3\\] cannot reach node 0"),
    ({"n": 3, "edges": [[0, 1], [1, 1], [1, 2]]}, "self-loop \\[1, 1\\] on node 1"),
    ({"n": 3, "edges": [[0, 1], [1, 3]]}, "edge \\[1, 3\\] has an endpoint out of range 0..2"),
    ({"n": 3, "edges": [[0, 1], [1, 2]], "weights": [[0, 1, 0.3], [1, 0, 0.4], [1, 2, 0.2]]},
     "weights of \\(1, 0\\) are not symmetric: 0.3 and 0.4"),
    ({"n": 3, "edges": [[0, 1], [1, 2]], "weights": [[0, 1, -0.1], [1, 2, 0.2]]}, "weight \\[0, 1, -0.1\\] is negative"),
    ({"n": 3, "edges": [[0, 1], [1, 2]], "weights": [[0, 1, 0.6], [1, 2, 0.5]]}, "weights of node 1 sum to 1.1 > 1"),
    ({"n": 3, "edges": [[0, 1], [1, 2]], "weights": [[0, 1, 0.5]]}, "edge \\[1, 2\\] has no weight"),
    ({"n": 3, "edges": [[0, 1], [1, 2]], "weights": [[0, 2, 0.5]]}, "weight \\[0, 2, 0.5\\] is on \\(0, 2\\), which is not"),
    (node_list({"A": ["B"], "B": ["A", "C"], "C": []}), "not symmetric: B lists C but C does not list B"),
    (node_list({"A": ["B"], "B": ["A", "DAVE"]}), "node B lists unknown neighbour 'DAVE'"),
    (node_list({"A": ["A", "B"], "B": ["A"]}), "self-loop on node A"),
    (node_list({"A": ["B"], "B": ["A"], "C": []}), "is not connected: nodes \\[2\\] cannot reach node 0"),
    ({"nodes": [{"addr": "localhost"}]},
     '"nodes" must be an object keyed by node name or a non-empty list of objects with a "name" string'),
    ({"nodes": {}}, '"nodes" must be an object keyed by node name or a non-empty list'),
    # the seed's object shape: a round shared by all nodes, one slot in 0..round-1 per edge and end
    (seed({"a": (10, {"b": 0}), "b": (8, {"a": 1})}), 'nodes disagree on "round": a has 10, b has 8'),
    (seed({"a": (10, {"b": 0}), "b": (None, {"a": 1})}), 'nodes disagree on "round": a has 10, b has none'),
    (seed({"a": (0, {"b": 0}), "b": (0, {"a": 1})}), 'node a: "round" \\(local steps per round, K\\) must be a '
                                                      'positive integer, got 0'),
    (seed({"a": (4, {"b": 4}), "b": (4, {"a": 1})}), "node a's slot for b is 4; a slot is an integer in 0..3 "
                                                      "\\(round 4\\)"),
    (seed({"a": (4, {"b": -1}), "b": (4, {"a": 1})}), "node a's slot for b is -1; a slot is an integer in 0..3"),
    (seed({"a": (4, {"b": 1.5}), "b": (4, {"a": 1})}), "node a's slot for b is 1.5; a slot is an integer"),
    (seed({"a": (4, {"b": True}), "b": (4, {"a": 1})}), "node a's slot for b is True; a slot is an integer"),
    (seed({"a": (4, ["b"]), "b": (4, {"a": 1})}), 'node a: with "round", "edges" must map each neighbour to its slot'),
    (seed({"a": (4, {"b": 0}), "b": (4, {}), "c": (4, {})}), "not symmetric: a lists b but b does not list a"),
    ('{"nodes": {"a": {"edges": ["b"]}, "b": {"edges": ["a"]}, "a": {"edges": []}}}', "key 'a' appears twice"),
    ({"nodes": {"a": {"round": 3, "edges": {"b": 0}}, "b": {"round": 3, "edges": {"a": 1}}, "c": {"round": 3}}},
     "is not connected: nodes \\[2\\] cannot reach node 0"),
    # our format's optional schedule
    ({"n": 2, "edges": [[0, 1]], "slots": [[0, 1, 0], [1, 0, 0]]}, '"slots" needs "round"'),
    ({"n": 2, "edges": [[0, 1]], "round": 2.5}, '"round" \\(local steps per round, K\\) must be a positive integer'),
    ({"n": 3, "edges": [[0, 1], [1, 2]], "round": 2, "slots": [[0, 2, 0]]}, "slot \\[0, 2, 0\\] is on \\(0, 2\\), "
                                                                          "which is not an edge"),
    ({"n": 2, "edges": [[0, 1]], "round": 2, "slots": [[0, 1, 2], [1, 0, 0]]},
     "the slot of node 0 for neighbour 1 is 2; a slot is an integer in 0..1"),
    ({"n": 2, "edges": [[0, 1]], "round": 2, "slots": [[0, 1, 0], [0, 1, 1], [1, 0, 0]]},
     "node 0 has two slots for neighbour 1: 0 and 1"),
    ({"n": 2, "edges": [[0, 1]], "round": 2, "slots": [[0, 1, 0]]},
     "node 1 has no slot for neighbour 0 \\(1 directed edges lack one\\)"),
    # our format's time-varying graphs
    ({"n": 4, "schedule": [{"edges": [[0, 1]]}, {"edges": [[2, 3]]}]}, "not connected: nodes \\[2, 3\\] cannot reach"),
    ({"n": 3, "schedule": []}, '"schedule" must be a non-empty list of {"edges": \\[\\[i, j\\], ...\\]} objects'),
    ({"n": 3, "schedule": [[0, 1]]}, '"schedule" must be a non-empty list'),
    ({"n": 3, "schedule": [{"edges": [[0, 1], [1, 2]]}, {"edges": [[0, 3]]}]},
     "schedule round 1: edge \\[0, 3\\] has an endpoint out of range 0..2"),
    ({"n": 3, "schedule": [{"edges": [[0, 1], [2, 2]]}]}, "schedule round 0: self-loop \\[2, 2\\] on node 2"),
    ({"n": 3, "schedule": [{"edges": [[0, 1], [1]]}]}, "schedule round 0: edge \\[1\\] is not an \\[i, j\\] pair"),
    ({"n": 3, "schedule": [{"edges": [[0, 1], [1, 2]], "weight": 1}]},
     'schedule round 0 must be {"edges": \\[\\[i, j\\], ...\\]}, got keys \\[\'edges\', \'weight\'\\]'),
    ({"n": 3, "edges": [[0, 1], [1, 2], [0, 2]], "schedule": [{"edges": [[0, 1]]}, {"edges": [[1, 2]]}]},
     'edge \\[0, 2\\] is not in "schedule"; "edges" must be the union of the rounds'),
    ({"n": 3, "edges": [[0, 1]], "schedule": [{"edges": [[0, 1]]}, {"edges": [[1, 2]]}]},
     'edge \\[1, 2\\] is not in "edges"'),
    ({"n": 2, "round": 2, "slots": [[0, 1, 0], [1, 0, 0]], "schedule": [{"edges": [[0, 1]]}]},
     '"schedule" and "slots" both say when edges are active; keep one'),
]


@pytest.mark.parametrize("data,message", BAD)
def test_bad_files(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=f"^topology (file )?{path}:? .*{message}") as e:
        load_topology(path)
    assert "\n" not in str(e.value)


def test_weights_within_tolerance(tmp_path):
    path = write(tmp_path, {"n": 2, "edges": [[0, 1]], "weights": [[0, 1, 1 + 1e-12]]})
    assert load_topology(path).weights == {(0, 1): 1 + 1e-12}


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=f"^topology file {tmp_path}/nope.json not found$"):
        load_topology(tmp_path / "nope.json")


def test_build_topology(tmp_path):
    assert build_topology(TopologyConfig(name="ring"), 6).edges == generate("ring", 6).edges
    assert build_topology(TopologyConfig(path=str(ROOT / "topologies/ring4.json")), 4).n == 4
    with pytest.raises(ConfigError, match="ring4.json has 4 nodes but the world size is 8: launch with "
                                          r"--nproc_per_node 4 \(simulated: --sim.nodes 4\) or pick another topology"):
        build_topology(TopologyConfig(path=str(ROOT / "topologies/ring4.json")), 8)
    with pytest.raises(ConfigError, match="^topology torus\\(n=16\\) has 16 nodes but the world size is 4"):
        build_topology(TopologyConfig(name="torus", n=16), 4)


# --- shipped files and CLI ----------------------------------------------------------------------------------------


def test_every_shipped_file_loads():
    files = sorted((ROOT / "topologies").glob("*.json"))
    assert len(files) >= 8
    for path in files:
        t = load_topology(path)
        assert t.n >= 3 and len(t.edges) >= t.n - 1, path


@pytest.mark.parametrize("name,offsets", [("seed_n8_ring_round8", (1,)), ("seed_n8_doublering_round8", (1, 2))])
def test_the_seeds_8_node_files(name, offsets):
    t = load_topology(ROOT / "topologies" / f"{name}.json")
    assert t.n == 8 and t.round == 8
    assert t.edges == tuple(sorted({tuple(sorted((i, (i + o) % 8))) for i in range(8) for o in offsets}))
    assert degrees(t) == [2 * len(offsets)] * 8
    for i in range(8):  # one slot per neighbour, all different within a node
        mine = [s for (a, _), s in t.slots.items() if a == i]
        assert len(mine) == t.degree(i) and len(set(mine)) == len(mine) and all(0 <= s < 8 for s in mine)


def test_shipped_files():
    files = ROOT / "topologies"
    assert load_topology(files / "ring4.json").edges == generate("ring", 4).edges
    assert load_topology(files / "ring8.json").edges == generate("ring", 8).edges
    torus = load_topology(files / "torus16.json")
    assert torus.n == 16 and torus.is_regular and torus.degree(0) == 4
    complete3 = load_topology(files / "complete3.json")
    assert complete3.edges == ((0, 1), (0, 2), (1, 2))
    assert load_topology(files / "node_list_example.json").edges == complete3.edges


def test_cli_roundtrip(tmp_path):
    out = tmp_path / "rr.json"
    cmd = [sys.executable, "-m", "p2p.topology", "random_regular", "12", "--degree", "4", "--seed", "3", "-o", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "12 nodes, 24 edges, degree 4..4" in proc.stderr
    loaded = load_topology(out)
    assert loaded.edges == generate("random_regular", 12, degree=4, seed=3).edges
    assert json.loads(out.read_text()) == loaded.to_json()

    printed = subprocess.run([sys.executable, "-m", "p2p.topology", "ring", "5"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert json.loads(printed) == {"n": 5, "edges": [[0, 1], [0, 4], [1, 2], [2, 3], [3, 4]]}


def test_save_with_weights_roundtrip(tmp_path):
    t = Topology(n=2, edges=((0, 1),), weights={(0, 1): 0.5}, source="x")
    t.save(tmp_path / "w.json")
    loaded = load_topology(tmp_path / "w.json")
    assert loaded.weights == {(0, 1): 0.5} and loaded.edges == t.edges
