"""Reading topology files: our JSON format and the seed's node_list.json, every problem a one-line ConfigError.

`read_topology_file` only parses and checks the file's fields; `p2p.topology.load_topology` builds the
`Topology` from them (and checks that the graph is connected).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from p2p.config import ConfigError

_TOL = 1e-9
log = logging.getLogger("p2p")


def is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def size_mismatch(source: str, n: int, world_size: int) -> ConfigError:
    return ConfigError(f"topology {source} has {n} nodes but the world size is {world_size}: launch with "
                       f"--nproc_per_node {n} (simulated: --sim.nodes {n}) or pick another topology")


def _load_ours(data: dict, where: str, source: str, world_size: int | None) -> dict:
    """{"n": 4, "edges": [[0, 1], ...], "weights": [[0, 1, 0.33], ...], "round": 8, "slots": [[0, 1, 3], ...]},
    or a time-varying graph {"n": 4, "schedule": [{"edges": [[0, 1], [2, 3]]}, {"edges": [[0, 2], ...]}, ...]}
    whose union is the graph ("edges", if given too, must be that union). Everything but n and edges (or
    schedule) optional; duplicate edges merge."""
    unknown = set(data) - {"n", "edges", "weights", "round", "slots", "schedule"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; expected n, edges and optional weights, "
                          f"round, slots, schedule")
    n = data.get("n")
    if not is_int(n) or n < 1:
        raise ConfigError(f'{where}: "n" must be a positive integer, got {n!r}')
    if world_size is not None and n != world_size:  # before anything of size n is built
        raise size_mismatch(source, n, world_size)
    schedule = _read_rounds(data["schedule"], n, where) if "schedule" in data else None
    if schedule is not None and "slots" in data:
        raise ConfigError(f'{where}: "schedule" and "slots" both say when edges are active; keep one')
    union = sorted({e for graph in schedule for e in graph}) if schedule is not None else None
    edges = _read_edges(data["edges"], n, where) if "edges" in data else union
    if union is not None and set(edges) != set(union):
        i, j = sorted(set(edges) ^ set(union))[0]
        where_not = '"schedule"' if (i, j) in edges else '"edges"'
        raise ConfigError(f'{where}: edge [{i}, {j}] is not in {where_not}; "edges" must be the union of the rounds')
    weights = _read_weights(data, set(edges), n, where) if "weights" in data else None
    round_, slots = _read_slots(data, set(edges), where)
    return dict(n=n, edges=edges, source=source, weights=weights, round=round_, slots=slots, schedule=schedule)


def _read_edges(raw: object, n: int, where: str) -> list[tuple[int, int]]:
    """A list of [i, j] pairs as (min, max) tuples: in range, no self-loops."""
    if not isinstance(raw, list):
        raise ConfigError(f'{where}: "edges" must be a list of [i, j] pairs')
    edges = []
    for e in raw:
        if not (isinstance(e, list) and len(e) == 2 and all(is_int(v) for v in e)):
            raise ConfigError(f"{where}: edge {e!r} is not an [i, j] pair of integers")
        i, j = e
        if not (0 <= i < n and 0 <= j < n):
            raise ConfigError(f"{where}: edge {e} has an endpoint out of range 0..{n - 1}")
        if i == j:
            raise ConfigError(f"{where}: self-loop {e} on node {i}")
        edges.append((min(i, j), max(i, j)))
    return edges


def _read_rounds(raw: object, n: int, where: str) -> list[list[tuple[int, int]]]:
    """Our format's "schedule": a non-empty list of {"edges": [...]}, round r using graph r mod its length.
    A round's graph may be disconnected or empty; the union must be connected (checked when built)."""
    if not (isinstance(raw, list) and raw and all(isinstance(g, dict) for g in raw)):
        raise ConfigError(f'{where}: "schedule" must be a non-empty list of {{"edges": [[i, j], ...]}} objects')
    rounds = []
    for r, graph in enumerate(raw):
        if set(graph) != {"edges"}:
            raise ConfigError(f'{where}: schedule round {r} must be {{"edges": [[i, j], ...]}}, '
                              f'got keys {sorted(graph)}')
        rounds.append(_read_edges(graph["edges"], n, f"{where}: schedule round {r}"))
    return rounds


def _read_weights(data: dict, edge_set: set[tuple[int, int]], n: int, where: str) -> dict[tuple[int, int], float]:
    """Our format's "weights": one symmetric W_ij >= 0 per edge, every node's sum <= 1."""
    if not isinstance(data["weights"], list):
        raise ConfigError(f'{where}: "weights" must be a list of [i, j, w] triples')
    weights: dict[tuple[int, int], float] = {}
    for row in data["weights"]:
        if not (isinstance(row, list) and len(row) == 3 and is_int(row[0]) and is_int(row[1])
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
    if not is_int(round_) or round_ < 1:
        raise ConfigError(f'{where}: "round" (local steps per round, K) must be a positive integer, got {round_!r}')
    return round_


def _check_slot(slot: object, round_: int, what: str, where: str) -> int:
    if not is_int(slot) or not 0 <= slot < round_:
        raise ConfigError(f"{where}: {what} is {slot!r}; a slot is an integer in 0..{round_ - 1} (round {round_})")
    return slot


def _read_slots(data: dict, edge_set: set[tuple[int, int]], where: str) -> tuple[int | None, dict | None]:
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
        if not (isinstance(row, list) and len(row) == 3 and is_int(row[0]) and is_int(row[1])):
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


def _load_node_list(data: dict, where: str, source: str, world_size: int | None) -> dict:
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
    if world_size is not None and len(named) != world_size:
        raise size_mismatch(source, len(named), world_size)
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
    return dict(n=len(named), edges=edges, source=source, round=round_, slots=slots if round_ is not None else None)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads keeps the last of two equal keys; a node listed twice must be an error, not vanish."""
    keys = [k for k, _ in pairs]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup is not None:
        raise ConfigError(f"key {dup!r} appears twice")
    return dict(pairs)


def read_topology_file(path: str | Path, world_size: int | None = None) -> dict:
    """The checked fields of our JSON format or the seed's node_list.json, as keyword arguments of
    `p2p.topology._make` (n, edges, source and optional weights, round, slots, schedule).

    With `world_size`, a file of another size is refused as soon as its size is read, before anything of
    that size is built: a few bytes can declare 100 000 000 nodes.
    """
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
        return _load_node_list(data, where, str(path), world_size)
    if isinstance(data, dict) and ("edges" in data or "schedule" in data):
        return _load_ours(data, where, str(path), world_size)
    raise ConfigError(f'{where}: expected {{"n": ..., "edges": [...]}} or {{"nodes": ...}}')

