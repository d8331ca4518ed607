"""Who are my peers, and with which weights: the graph, its mixing matrices and its edge colouring.

A `Topology` is built once at start-up (from a file or a generator) and checked there (connected,
symmetric, valid weights), so the algorithms can trust it. Node i is rank i. No torch.distributed here.

    python -m p2p.topology ring 8 -o topologies/ring8.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np

from p2p.config import ConfigError, TopologyConfig
from p2p.topology_files import is_int, read_topology_file, size_mismatch

GENERATORS = ("ring", "torus", "complete", "star", "exponential", "random_regular", "one_peer_hypercube",
              "exponential_schedule")
# The most edges a generated graph may have, checked before it is built: `complete` on 100 000 nodes would
# need 5e9 (and every rule keeps state per edge). A connected graph has at least n - 1 edges, so this bounds n too.
MAX_EDGES = 1_000_000


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
    # A time-varying graph: round r exchanges over the edges schedule[r mod len(schedule)] only; `edges` is
    # their union (neighbours and degrees are those of the union). None for a static graph.
    schedule: tuple[tuple[tuple[int, int], ...], ...] | None = None

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

    def active(self, r: int) -> tuple[tuple[int, int], ...]:
        """The edges that exchange in round r: graph r mod len(schedule) of a time-varying graph, else every edge
        (the seed's slots only say at which step of a round an edge starts its exchange: `slot_edges`)."""
        return self.schedule[r % len(self.schedule)] if self.schedule is not None else self.edges

    def active_neighbors(self, i: int, r: int) -> list[int]:
        """Node i's neighbours in round r's graph, sorted (all of them on a static graph)."""
        if self.schedule is None:
            return self.neighbors(i)
        return sorted({a + b - i for a, b in self.active(r) if i in (a, b)})

    def slot_edges(self, step: int) -> tuple[tuple[int, int], ...]:
        """The seed's slots as a schedule of steps: edge (i, j), i < j, is active at the local steps t with
        t mod round = slots[i, j], the slot of its lower-ranked end, so both ends agree on the step."""
        if self.slots is None or self.round is None:
            raise ValueError(f"topology {self.source} has no slots")
        return tuple(e for e in self.edges if self.slots[e] == step % self.round)

    def mixing_matrix(self, kind: str, edges: tuple[tuple[int, int], ...] | None = None) -> np.ndarray:
        """The (n, n) matrix W of dsgd's combine step w_i <- sum_j W_ij w_j.

        metropolis: W_ij = 1/(1 + max(d_i, d_j)), doubly stochastic on any graph.
        uniform:    W_ij = W_ii = 1/(d_i + 1), the seed's rule; doubly stochastic only on regular graphs.
        file:       the per-edge weights of the topology file; W_ii = 1 - sum_j W_ij.

        Args:
            edges: the graph to mix over, default all edges; `active(r)` gives round r's W of a time-varying
                graph, with the degrees d_i of that round's graph (file weights: those of its edges).
        """
        edges = self.edges if edges is None else edges
        W = np.zeros((self.n, self.n))
        d = np.zeros(self.n, dtype=int)
        for i, j in edges:
            d[[i, j]] += 1
        if kind == "metropolis":
            for i, j in edges:
                W[i, j] = W[j, i] = 1.0 / (1 + max(d[i], d[j]))
        elif kind == "uniform":
            for i, j in edges:
                W[i, j], W[j, i] = 1.0 / (d[i] + 1), 1.0 / (d[j] + 1)
        elif kind == "file":
            if self.weights is None:
                raise ConfigError(f"topology {self.source} has no per-edge weights; use --algorithm.mixing metropolis")
            for i, j in edges:
                W[i, j] = W[j, i] = self.weights[i, j]
        else:
            raise ValueError(f"unknown mixing {kind!r}; choose metropolis, uniform or file")
        np.fill_diagonal(W, 1.0 - W.sum(axis=1))
        return W

    def period_matrix(self, kind: str = "metropolis") -> np.ndarray:
        """W_{R-1} ... W_1 W_0, one period of a time-varying graph's per-round mixing (round 0 first; the
        eigenvalues, hence the spectral gap, do not depend on the starting round). A static graph's W."""
        P = np.eye(self.n)
        for graph in self.schedule if self.schedule is not None else (self.edges,):
            P = self.mixing_matrix(kind, graph) @ P
        return P

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
        if self.schedule is not None:
            data["schedule"] = [{"edges": [list(e) for e in graph]} for graph in self.schedule]
        return data

    def dumps(self) -> str:
        """Our file format, one edge (weight, slot, schedule round) per line so diffs stay readable."""
        data = self.to_json()
        parts = [f'  "{key}": {data[key]}' for key in ("n", "round") if key in data]
        for key in ("edges", "weights", "slots", "schedule"):
            if key in data:
                rows = ",\n".join(f"    {json.dumps(row)}" for row in data[key])
                parts.append(f'  "{key}": [\n{rows}\n  ]' if rows else f'  "{key}": []')
        return "{\n" + ",\n".join(parts) + "\n}\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.dumps())

    def fingerprint(self) -> str:
        """One line naming the graph by a hash of `dumps()`, for comparing ranks: two hosts whose files share a
        path but not the content differ, and two files that spell the same graph differently do not."""
        digest = hashlib.sha256(self.dumps().encode()).hexdigest()[:12]
        return f"topology graph = {self.n} nodes, {len(self.edges)} edges, sha256 {digest}"

    def summary(self, mixing: str) -> str:
        """One log line; for a time-varying graph the per-round degrees and the gap of one period's product of
        per-round Metropolis matrices (what dsgd mixes with), as the union's own gap says little."""
        degrees = [self.degree(i) for i in range(self.n)]
        rounds = f", round {self.round}" if self.round is not None else ""
        head = f"topology {self.source}: {self.n} nodes, {len(self.edges)} edges, degree {min(degrees)}..{max(degrees)}"
        if self.schedule is None:
            gap = self.spectral_gap(self.mixing_matrix(mixing))
            return f"{head}, spectral gap {gap:.4f} ({mixing} mixing){rounds}"
        per_round = [np.bincount(np.array(graph, dtype=int).ravel(), minlength=self.n) for graph in self.schedule]
        lo, hi = min(int(d.min()) for d in per_round), max(int(d.max()) for d in per_round)
        gap = self.spectral_gap(self.period_matrix("metropolis"))
        return (f"{head} in the union; schedule of {len(self.schedule)} rounds, degree {lo}..{hi} per round, "
                f"gap of the period product {gap:.4f} (metropolis mixing per round){rounds}")


def _norm(edges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Each edge as (i, j) with i < j, sorted, duplicates merged."""
    return tuple(sorted({(min(i, j), max(i, j)) for i, j in edges}))


def _make(n: int, edges: list[tuple[int, int]], source: str, weights: dict | None = None,
          round: int | None = None, slots: dict | None = None,
          schedule: list[list[tuple[int, int]]] | None = None) -> Topology:
    """Normalise the edges and refuse a disconnected graph (for a schedule: a disconnected union; a single
    round's graph may be disconnected)."""
    norm = _norm(edges)
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from(norm)
    if not nx.is_connected(G):
        cut = sorted(set(range(n)) - nx.node_connected_component(G, 0))
        raise ConfigError(f"topology {source} is not connected: nodes {cut[:10]} cannot reach node 0")
    return Topology(n=n, edges=norm, weights=weights, source=source, round=round, slots=slots,
                    schedule=tuple(_norm(graph) for graph in schedule) if schedule is not None else None)


def _relabel(G: nx.Graph) -> list[tuple[int, int]]:
    """networkx edges as rank pairs, ranks given by the sorted node labels (stable across runs)."""
    rank = {v: r for r, v in enumerate(sorted(G.nodes))}
    return [(rank[u], rank[v]) for u, v in G.edges if u != v]


def generate(name: str, n: int, degree: int = 3, seed: int = 0) -> Topology:
    """One of the named graphs on n nodes (n = 1 gives a single node without edges)."""
    if name not in GENERATORS:
        raise ConfigError(f"--topology.name: unknown topology {name!r}; choose one of {', '.join(GENERATORS)}")
    if not is_int(n) or n < 1:
        raise ConfigError(f"--topology.n: a {name} topology needs at least 1 node, got {n!r}")
    if (edges := _max_edges(name, n, degree)) > MAX_EDGES:
        raise ConfigError(f"a {name} topology on {n} nodes has up to {edges} edges, more than the {MAX_EDGES} p2p "
                          f"builds: pick a sparser --topology.name (ring, torus, exponential) or fewer nodes")
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
    elif name in ("one_peer_hypercube", "exponential_schedule"):
        return _time_varying(name, n)
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



def _max_edges(name: str, n: int, degree: int) -> int:
    """How many edges `generate` may build for this graph at most, computed without building it."""
    log_n = max(1, (n - 1).bit_length())
    return {"complete": n * (n - 1) // 2, "torus": 2 * n, "random_regular": n * max(degree, 0) // 2,
            "exponential": n * log_n, "one_peer_hypercube": n * log_n, "exponential_schedule": n * log_n}.get(name, n)


def _time_varying(name: str, n: int) -> Topology:
    """one_peer_hypercube: round r pairs i with i XOR 2^(r mod log2 n) (n a power of two), so pairwise
    averaging averages the network exactly in log2 n rounds. exponential_schedule: round r links
    i <-> i +- 2^(r mod ceil(log2 n)) mod n, at most two peers per round, any n >= 2."""
    periods = (n - 1).bit_length()  # ceil(log2 n)
    if name == "one_peer_hypercube":
        if n < 2 or n & (n - 1):
            raise ConfigError(f"--topology.n: one_peer_hypercube needs a power of two >= 2 nodes, got {n}")
        rounds = [[(i, i ^ 2**k) for i in range(n)] for k in range(periods)]
    else:
        if n < 2:
            raise ConfigError(f"--topology.n: exponential_schedule needs at least 2 nodes, got {n}")
        rounds = [[(i, (i + 2**k) % n) for i in range(n)] for k in range(periods)]  # i - 2^k: the same pairs
    return _make(n, [e for graph in rounds for e in graph], f"{name}(n={n})", schedule=rounds)


def load_topology(path: str | Path, world_size: int | None = None) -> Topology:
    """Read our JSON format or the seed's node_list.json; every problem is a one-line ConfigError. With
    `world_size`, a file of another size is refused before anything of its size is built."""
    return _make(**read_topology_file(path, world_size))


def build_topology(cfg: TopologyConfig, world_size: int) -> Topology:
    """The run's topology: cfg.path if set, else the generator; its size must match the world, which is checked
    before the graph is built, so that a size typed or written by mistake fails at once, not out of memory."""
    if cfg.path:
        return load_topology(cfg.path, world_size)
    if cfg.n and cfg.n != world_size:
        raise size_mismatch(f"{cfg.name}(n={cfg.n})", cfg.n, world_size)
    return generate(cfg.name, world_size, cfg.degree, cfg.seed)


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
