"""Who are my peers, and with which weights: the graph, its mixing matrices and its edge colouring.

A `Topology` is built once at start-up (from a file or a generator) and checked there (connected,
symmetric, valid weights), so the algorithms can trust it. Node i is rank i. No torch.distributed here.

    python -m p2p.topology ring 8 -o topologies/ring8.json
"""

from __future__ import annotations

import argparse
import json
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


@dataclass(frozen=True)
class Topology:
    n: int  # node count (= world size; node i is rank i)
    edges: tuple[tuple[int, int], ...]  # undirected, each (i, j) with i < j, sorted
    # per-edge W_ij from a file, keys (i, j) with i < j; None for generated graphs
    weights: dict[tuple[int, int], float] | None = field(default=None, hash=False)
    source: str = ""  # file path or generator description, for messages and logs

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
        return data

    def dumps(self) -> str:
        """Our file format, one edge (or weight) per line so diffs stay readable."""
        data = self.to_json()
        parts = [f'  "n": {self.n}']
        for key in ("edges", "weights"):
            if key in data:
                rows = ",\n".join(f"    {json.dumps(row)}" for row in data[key])
                parts.append(f'  "{key}": [\n{rows}\n  ]' if rows else f'  "{key}": []')
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())

    def summary(self, mixing: str) -> str:
        degrees = [self.degree(i) for i in range(self.n)]
        gap = self.spectral_gap(self.mixing_matrix(mixing))
        return (f"topology {self.source}: {self.n} nodes, {len(self.edges)} edges, "
                f"degree {min(degrees)}..{max(degrees)}, spectral gap {gap:.4f} ({mixing} mixing)")


def _make(n: int, edges: list[tuple[int, int]], source: str, weights: dict | None = None) -> Topology:
    """Normalise the edges (i < j, sorted, merged) and refuse a disconnected graph."""
    norm = tuple(sorted({(min(i, j), max(i, j)) for i, j in edges}))
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(norm)
    if not nx.is_connected(G):
        cut = sorted(set(range(n)) - nx.node_connected_component(G, 0))
        raise ConfigError(f"topology {source} is not connected: nodes {cut[:10]} cannot reach node 0")
    return Topology(n=n, edges=norm, weights=weights, source=source)


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


def _load_ours(data: dict, where: str) -> tuple[int, list[tuple[int, int]], dict | None]:
    """{"n": 4, "edges": [[0, 1], ...], "weights": [[0, 1, 0.33], ...]}; duplicate edges merge."""
    unknown = set(data) - {"n", "edges", "weights"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; expected n, edges and optional weights")
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
    if "weights" not in data:
        return n, edges, None
    if not isinstance(data["weights"], list):
        raise ConfigError(f'{where}: "weights" must be a list of [i, j, w] triples')
    edge_set, weights = set(edges), {}
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
    return n, edges, weights


def _load_node_list(data: dict, where: str) -> tuple[int, list[tuple[int, int]]]:
    """The seed's {"nodes": [{"name", "addr", "port", "edges": [names] or {name: ...}}, ...]}."""
    nodes = data["nodes"]
    if not isinstance(nodes, list) or not nodes or not all(isinstance(v, dict) and isinstance(v.get("name"), str)
                                                            for v in nodes):
        raise ConfigError(f'{where}: "nodes" must be a non-empty list of objects with a "name" string')
    rank = {v["name"]: r for r, v in enumerate(nodes)}
    if len(rank) != len(nodes):
        raise ConfigError(f"{where}: node names are not unique")
    listed: dict[int, set[int]] = {}
    for r, v in enumerate(nodes):
        peers = v.get("edges", [])
        if not isinstance(peers, (list, dict)):
            raise ConfigError(f'{where}: node {v["name"]}: "edges" must be a list of names or an object keyed by name')
        listed[r] = set()
        for name in peers:  # a dict iterates over its keys
            if not isinstance(name, str) or name not in rank:
                raise ConfigError(f"{where}: node {v['name']} lists unknown neighbour {name!r}")
            if rank[name] == r:
                raise ConfigError(f"{where}: self-loop on node {name}")
            listed[r].add(rank[name])
    one_way = [(nodes[r]["name"], nodes[q]["name"]) for r in listed for q in sorted(listed[r]) if r not in listed[q]]
    if one_way:
        a, b = one_way[0]
        raise ConfigError(f"{where}: edges are not symmetric: {a} lists {b} but {b} does not list {a}")
    return len(nodes), [(r, q) for r, peers in listed.items() for q in peers]


def load_topology(path: str | Path) -> Topology:
    """Read our JSON format or the seed's node_list.json; every problem is a one-line ConfigError."""
    where = f"topology file {path}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} not found")
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid JSON: {e}") from None
    if isinstance(data, dict) and "nodes" in data:
        n, edges = _load_node_list(data, where)
        weights = None
    elif isinstance(data, dict) and "edges" in data:
        n, edges, weights = _load_ours(data, where)
    else:
        raise ConfigError(f'{where}: expected {{"n": ..., "edges": [...]}} or {{"nodes": [...]}}')
    return _make(n, edges, str(path), weights)


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
