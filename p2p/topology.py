"""Who are my peers, and with which weights: the graph, its mixing matrices and its edge colouring.

A `Topology` is built once at start-up (from a file or a generator) and checked there (connected,
symmetric, valid weights), so the algorithms can trust it. Node i is rank i. No torch.distributed here.

    python -m p2p.topology ring 8 -o topologies/ring8.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np

from p2p.config import ConfigError, TopologyConfig

GENERATORS = ("ring", "torus", "complete", "star", "exponential", "random_regular")
_TOL = 1e-9
log = logging.getLogger("p2p")


@dataclass(frozen=True)
class Topology:
    n: int  # node count (= world size; node i is rank i)
    edges: tuple[tuple[int, int], ...]  # undirected, each (i, j) with i < j, sorted
    # per-edge W_ij from a file, keys (i, j) with i < j; None for generated graphs
    weights: dict[tuple[int, int], float] | None = field(default=None, hash=False)
    source: str = ""  # file path or generator description, for messages and logs
    # The seed's exchange schedule, from a file: `round` local steps per round (K, unless the config sets
    # algorithm.interval), and per directed edge (i, j) the slot 0..round-1 at which node i starts its
    # exchange with j. Kept for the async mode and time-varying graphs; None when the file has none.
    round: int | None = None
    slots: dict[tuple[int, int], int] | None = field(default=None, hash=False)

    @cached_property
    def _adjacency(self) -> list[list[int]]:
        adj: list[list[int]] = [[] for _ in range(self.n)]
        for i, j in self.edges:
            adj[i].append(j)
            adj[j].append(i)
        return [sorted(a) for a in adj]

    def neighbors(self, i: int) -> list[int]:
        return list(self._adjacency[i])

    def degree(self, i: int) -> int:
        return len(self._adjacency[i])

    @property
    def is_regular(self) -> bool:
        return len({self.degree(i) for i in range(self.n)}) <= 1

    def mixing_matrix(self, kind: str) -> np.ndarray:
        """The (n, n) matrix W of dsgd's combine step w_i <- sum_j W_ij w_j.

        metropolis: W_ij = 1/(1 + max(d_i, d_j)), doubly stochastic on any graph.
        uniform:    W_ij = W_ii = 1/(d_i + 1), the seed's rule; doubly stochastic only on regular graphs.
        file:       the per-edge weights of the topology file; W_ii = 1 - sum_j W_ij.
        """
        W = np.zeros((self.n, self.n))
        d = [self.degree(i) for i in range(self.n)]
        if kind == "metropolis":
            for i, j in self.edges:
                W[i, j] = W[j, i] = 1.0 / (1 + max(d[i], d[j]))
        elif kind == "uniform":
            for i, j in self.edges:
                W[i, j], W[j, i] = 1.0 / (d[i] + 1), 1.0 / (d[j] + 1)
        elif kind == "file":
            if self.weights is None:
                raise ConfigError(f"topology {self.source} has no per-edge weights; use --algorithm.mixing metropolis")
            for (i, j), w in self.weights.items():
                W[i, j] = W[j, i] = w
        else:
            raise ValueError(f"unknown mixing {kind!r}; choose metropolis, uniform or file")
        np.fill_diagonal(W, 1.0 - W.sum(axis=1))
        return W

    def spectral_gap(self, W: np.ndarray) -> float:
        """1 - |lambda_2|, the second largest eigenvalue modulus: how fast gossip with W mixes."""
        moduli = np.sort(np.abs(np.linalg.eigvals(W)))[::-1]
        return float(1.0 - moduli[1]) if len(moduli) > 1 else 1.0

    def edge_sign(self, i: int, j: int) -> int:
        """A_{i|j} = +1 if i < j else -1, so A_{i|j} = -A_{j|i} (primal-dual methods)."""
        if i == j:
            raise ValueError(f"edge_sign({i}, {j}): a node has no edge to itself")
        return 1 if i < j else -1

    def matchings(self) -> list[list[tuple[int, int]]]:
        """A proper edge colouring; list index = colour, each colour a matching.

        Greedy over the sorted edges, each taking the smallest colour free at both endpoints, so every
        rank computes the same colouring without communicating.
        """
        used: list[set[int]] = [set() for _ in range(self.n)]
        colours: list[list[tuple[int, int]]] = []
        for i, j in self.edges:  # already sorted by (min, max)
            c = 0
            while c in used[i] or c in used[j]:
                c += 1
            if c == len(colours):
                colours.append([])
            colours[c].append((i, j))
            used[i].add(c)
            used[j].add(c)
        return colours

    def to_json(self) -> dict:
        data: dict = {"n": self.n, "edges": [list(e) for e in self.edges]}
        if self.weights is not None:
            data["weights"] = [[i, j, w] for (i, j), w in sorted(self.weights.items())]
        if self.round is not None:
            data["round"] = self.round
        if self.slots is not None:
            data["slots"] = [[i, j, s] for (i, j), s in sorted(self.slots.items())]
        return data

    def dumps(self) -> str:
        """Our file format, one edge (weight, slot) per line so diffs stay readable."""
        data = self.to_json()
        parts = [f'  "{key}": {data[key]}' for key in ("n", "round") if key in data]
        for key in ("edges", "weights", "slots"):
            if key in data:
                rows = ",\n".join(f"    {json.dumps(row)}" for row in data[key])
                parts.append(f'  "{key}": [\n{rows}\n  ]' if rows else f'  "{key}": []')
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())

    def summary(self, mixing: str) -> str:
        degrees = [self.degree(i) for i in range(self.n)]
        gap = self.spectral_gap(self.mixing_matrix(mixing))
        rounds = f", round {self.round}" if self.round is not None else ""
        return (f"topology {self.source}: {self.n} nodes, {len(self.edges)} edges, "
                f"degree {min(degrees)}..{max(degrees)}, spectral gap {gap:.4f} ({mixing} mixing){rounds}")


def _make(n: int, edges: list[tuple[int, int]], source: str, weights: dict | None = None,
          round: int | None = None, slots: dict | None = None) -> Topology:
    """Normalise the edges (i < j, sorted, merged) and refuse a disconnected graph."""
    norm = tuple(sorted({(min(i, j), max(i, j)) for i, j in edges}))
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(norm)
    if not nx.is_connected(G):
        cut = sorted(set(range(n)) - nx.node_connected_component(G, 0))
        raise ConfigError(f"topology {source} is not connected: nodes {cut[:10]} cannot reach node 0")
    return Topology(n=n, edges=norm, weights=weights, source=source, round=round, slots=slots)


def _relabel(G: nx.Graph) -> list[tuple[int, int]]:
    """networkx edges as rank pairs, ranks given by the sorted node labels (stable across runs)."""
    rank = {v: r for r, v in enumerate(sorted(G.nodes))}
    return [(rank[u], rank[v]) for u, v in G.edges if u != v]


def generate(name: str, n: int, degree: int = 3, seed: int = 0) -> Topology:
    """One of the named graphs on n nodes (n = 1 gives a single node without edges)."""
    if name not in GENERATORS:
        raise ConfigError(f"--topology.name: unknown topology {name!r}; choose one of {', '.join(GENERATORS)}")
    if not _is_int(n) or n < 1:
        raise ConfigError(f"--topology.n: a {name} topology needs at least 1 node, got {n!r}")
    source = f"{name}(n={n})"
    if name == "ring":
        edges = [(i, (i + 1) % n) for i in range(n) if n > 1]
    elif name == "torus":
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
        source = f"torus(n={n}, {rows}x{n // rows})"
        edges = _relabel(nx.grid_2d_graph(rows, n // rows, periodic=True))
    elif name == "complete":
        edges = _relabel(nx.complete_graph(n))
    elif name == "star":
        edges = [(0, i) for i in range(1, n)]
    elif name == "exponential":
        edges = [(i, (i + 2**k) % n) for i in range(n) for k in range(n.bit_length()) if 2**k < n]
    else:  # random_regular
        source = f"random_regular(n={n}, degree={degree}, seed={seed})"
        if not 1 <= degree < n or n * degree % 2:
            raise ConfigError(f"--topology.degree {degree}: a random regular graph on {n} nodes "
                              f"needs 1 <= degree < n and n * degree even")
        for s in range(seed, seed + 100):  # connected with high probability; retry the rare miss
            G = nx.random_regular_graph(degree, n, seed=s)
            if nx.is_connected(G):
                break
        else:
            raise ConfigError(f"--topology.seed {seed}: no connected {source} in 100 tries; raise --topology.degree")
        edges = _relabel(G)
    return _make(n, edges, source)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _load_ours(data: dict, where: str, source: str) -> Topology:
    """{"n": 4, "edges": [[0, 1], ...], "weights": [[0, 1, 0.33], ...], "round": 8, "slots": [[0, 1, 3], ...]};
    everything but n and edges optional; duplicate edges merge."""
    unknown = set(data) - {"n", "edges", "weights", "round", "slots"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; expected n, edges and optional weights, "
                          f"round, slots")
    n, raw = data.get("n"), data.get("edges")
    if not _is_int(n) or n < 1:
        raise ConfigError(f'{where}: "n" must be a positive integer, got {n!r}')
    if not isinstance(raw, list):
        raise ConfigError(f'{where}: "edges" must be a list of [i, j] pairs')
    edges = []
    for e in raw:
        if not (isinstance(e, list) and len(e) == 2 and all(_is_int(v) for v in e)):
            raise ConfigError(f"{where}: edge {e!r} is not an [i, j] pair of integers")
        i, j = e
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(f"{where}: edge {e} has an endpoint out of range 0..{n - 1}")
        if i == j:
            raise ConfigError(f"{where}: self-loop {e} on node {i}")
        edges.append((min(i, j), max(i, j)))
    weights = _read_weights(data, set(edges), n, where) if "weights" in data else None
    round_, slots = _read_schedule(data, set(edges), where)
    return _make(n, edges, source, weights, round_, slots)


def _read_weights(data: dict, edge_set: set[tuple[int, int]], n: int, where: str) -> dict[tuple[int, int], float]:
    """Our format's "weights": one symmetric W_ij >= 0 per edge, every node's sum <= 1."""
    if not isinstance(data["weights"], list):
        raise ConfigError(f'{where}: "weights" must be a list of [i, j, w] triples')
    weights: dict[tuple[int, int], float] = {}
    for row in data["weights"]:
        if not (isinstance(row, list) and len(row) == 3 and _is_int(row[0]) and _is_int(row[1])
                and isinstance(row[2], (int, float)) and not isinstance(row[2], bool) and math.isfinite(row[2])):
            raise ConfigError(f'{where}: weight {row!r} is not an [i, j, w] triple')
        i, j, w = row
        key = (min(i, j), max(i, j))
        if key not in edge_set:
            raise ConfigError(f"{where}: weight {row} is on ({i}, {j}), which is not an edge")
        if w < 0:
            raise ConfigError(f"{where}: weight {row} is negative")
        if key in weights and weights[key] != w:
            raise ConfigError(f"{where}: weights of ({i}, {j}) are not symmetric: {weights[key]} and {w}")
        weights[key] = float(w)
    missing = sorted(edge_set - set(weights))
    if missing:
        raise ConfigError(f"{where}: edge {list(missing[0])} has no weight ({len(missing)} edges lack one)")
    rows = np.zeros(n)  # off-diagonal row sums; W_ii = 1 - rows[i] must stay >= 0
    for (i, j), w in weights.items():
        rows[[i, j]] += w
    if rows.max() > 1 + _TOL:
        i = int(rows.argmax())
        raise ConfigError(f"{where}: the weights of node {i} sum to {rows[i]:.6g} > 1")
    return weights


def _check_round(round_: object, where: str) -> int:
    if not _is_int(round_) or round_ < 1:
        raise ConfigError(f'{where}: "round" (local steps per round, K) must be a positive integer, got {round_!r}')
    return round_


def _check_slot(slot: object, round_: int, what: str, where: str) -> int:
    if not _is_int(slot) or not 0 <= slot < round_:
        raise ConfigError(f"{where}: {what} is {slot!r}; a slot is an integer in 0..{round_ - 1} (round {round_})")
    return slot


def _read_schedule(data: dict, edge_set: set[tuple[int, int]], where: str) -> tuple[int | None, dict | None]:
    """Our format's optional "round" and "slots" ([i, j, slot] per directed edge, all of them or none)."""
    if "round" not in data:
        if "slots" in data:
            raise ConfigError(f'{where}: "slots" needs "round", the local steps per round')
        return None, None
    round_ = _check_round(data["round"], where)
    if "slots" not in data:
        return round_, None
    if not isinstance(data["slots"], list):
        raise ConfigError(f'{where}: "slots" must be a list of [i, j, slot] triples')
    slots: dict[tuple[int, int], int] = {}
    for row in data["slots"]:
        if not (isinstance(row, list) and len(row) == 3 and _is_int(row[0]) and _is_int(row[1])):
            raise ConfigError(f"{where}: slot {row!r} is not an [i, j, slot] triple")
        i, j, s = row
        if i == j or (min(i, j), max(i, j)) not in edge_set:
            raise ConfigError(f"{where}: slot {row} is on ({i}, {j}), which is not an edge")
        _check_slot(s, round_, f"the slot of node {i} for neighbour {j}", where)
        if slots.get((i, j), s) != s:
            raise ConfigError(f"{where}: node {i} has two slots for neighbour {j}: {slots[i, j]} and {s}")
        slots[i, j] = s
    missing = [(i, j) for a, b in sorted(edge_set) for i, j in ((a, b), (b, a)) if (i, j) not in slots]
    if missing:
        raise ConfigError(f"{where}: node {missing[0][0]} has no slot for neighbour {missing[0][1]} "
                          f"({len(missing)} directed edges lack one)")
    return round_, slots


def _load_node_list(data: dict, where: str, source: str) -> Topology:
    """The seed's node list, in either shape; ranks follow the file's order:

        {"nodes": {"node0": {"device": "cuda", "round": 10, "edges": {"node2": 0, "node1": 4}}, ...}}
        {"nodes": [{"name": "CASPER", "addr": "localhost", "port": 9997, "edges": ["BALTHASAR", ...]}, ...]}

    With `round` (local steps per round, the same on every node) each edges value is that edge's slot
    in 0..round-1: the step of the round at which this node starts the exchange. Without it, edges may
    be a list of names (an object's values are then ignored). device, addr and port are ignored:
    the launcher decides where a node runs and how it connects.
    """
    nodes = data["nodes"]
    if isinstance(nodes, dict) and nodes and all(isinstance(v, dict) for v in nodes.values()):
        named = list(nodes.items())
    elif isinstance(nodes, list) and nodes and all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                   for v in nodes):
        named = [(v["name"], v) for v in nodes]
    else:
        raise ConfigError(f'{where}: "nodes" must be an object keyed by node name or a non-empty list of objects '
                          f'with a "name" string')
    rank = {name: r for r, (name, _) in enumerate(named)}
    if len(rank) != len(named):
        raise ConfigError(f"{where}: node names are not unique")
    rounds = [(name, v.get("round")) for name, v in named]
    for name, r in rounds:
        if r is not None:
            _check_round(r, f"{where}: node {name}")
    for name, r in rounds[1:]:
        if r != rounds[0][1]:
            shown = lambda r: "none" if r is None else r  # noqa: E731
            raise ConfigError(f'{where}: nodes disagree on "round": {rounds[0][0]} has {shown(rounds[0][1])}, '
                              f'{name} has {shown(r)}')
    round_ = rounds[0][1]
    listed: dict[int, set[int]] = {}
    slots: dict[tuple[int, int], int] = {}
    for r, (name, v) in enumerate(named):
        peers = v.get("edges", {})  # none: an isolated node, reported as not connected
        if round_ is not None and not isinstance(peers, dict):
            raise ConfigError(f'{where}: node {name}: with "round", "edges" must map each neighbour to its slot')
        if not isinstance(peers, (list, dict)):
            raise ConfigError(f'{where}: node {name}: "edges" must be a list of names or an object keyed by name')
        listed[r] = set()
        for peer in peers:  # a dict iterates over its keys
            if not isinstance(peer, str) or peer not in rank:
                raise ConfigError(f"{where}: node {name} lists unknown neighbour {peer!r}")
            if rank[peer] == r:
                raise ConfigError(f"{where}: self-loop on node {peer}")
            listed[r].add(rank[peer])
            if round_ is not None:
                slots[r, rank[peer]] = _check_slot(peers[peer], round_, f"node {name}'s slot for {peer}", where)
    one_way = [(named[r][0], named[q][0]) for r in listed for q in sorted(listed[r]) if r not in listed[q]]
    if one_way:
        a, b = one_way[0]
        raise ConfigError(f"{where}: edges are not symmetric: {a} lists {b} but {b} does not list {a}")
    if any("device" in v for _, v in named):
        log.info("%s: its \"device\" entries are ignored (--run.device and the launcher decide)", where)
    log.info("%s: ranks in file order: %s", where, ", ".join(f"{name} = {r}" for name, r in rank.items()))
    edges = [(r, q) for r, peers in listed.items() for q in peers]
    return _make(len(named), edges, source, round=round_, slots=slots if round_ is not None else None)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys; a node listed twice must be an error, not vanish."""
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ConfigError(f"key {dup!r} appears twice")
    return dict(pairs)


def load_topology(path: str | Path) -> Topology:
    """Read our JSON format or the seed's node_list.json; every problem is a one-line ConfigError."""
    where = f"topology file {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} not found")
    try:
        data = json.loads(Path(path).read_text(), object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid JSON: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if isinstance(data, dict) and "nodes" in data:
        return _load_node_list(data, where, str(path))
    if isinstance(data, dict) and "edges" in data:
        return _load_ours(data, where, str(path))
    raise ConfigError(f'{where}: expected {{"n": ..., "edges": [...]}} or {{"nodes": ...}}')


def build_topology(cfg: TopologyConfig, world_size: int) -> Topology:
    """The run's topology: cfg.path if set, else the generator; its size must match the world."""
    topo = load_topology(cfg.path) if cfg.path else generate(cfg.name, cfg.n or world_size, cfg.degree, cfg.seed)
    if topo.n != world_size:
        raise ConfigError(f"topology {topo.source} has {topo.n} nodes but the world size is {world_size}: "
                          f"launch with --nproc_per_node {topo.n} or pick another topology")
    return topo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2p.topology", description="Generate a topology file.")
    parser.add_argument("name", choices=GENERATORS)
    parser.add_argument("n", type=int, help="node count")
    parser.add_argument("--degree", type=int, default=3, help="random_regular: degree of every node")
    parser.add_argument("--seed", type=int, default=0, help="random_regular: graph seed")
    parser.add_argument("-o", "--output", help="write here instead of printing the JSON")
    args = parser.parse_args(argv)
    try:
        topo = generate(args.name, args.n, args.degree, args.seed)
    except ConfigError as e:
        parser.error(str(e))
    if args.output:
        topo.save(args.output)
    else:
        sys.stdout.write(topo.dumps())
    print(topo.summary("metropolis"), file=sys.stderr)


if __name__ == "__main__":
    main()
