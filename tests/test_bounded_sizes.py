"""Sizes are checked before anything of that size is built: a tiny topology file declaring 100 000 000 nodes, or
`--sim.nodes 100000 --topology.name complete`, fails in one line, at once, in little memory."""

from __future__ import annotations

import importlib.util
import json
import time
import tracemalloc
from pathlib import Path

import pytest

import p2p.sim  # noqa: F401  (imported by train.main for --sim.nodes: not the test's seconds)
from p2p.config import ConfigError, TopologyConfig, load_config
from p2p.topology import build_topology, generate

ROOT = Path(__file__).resolve().parents[1]
HUGE = 100_000_000
_spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)


def tiny_file(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(data))
    return str(path)


CASES = [  # (id, what to build, the ConfigError, as a regex)
    ("file", lambda t: build_topology(TopologyConfig(path=tiny_file(t, {"n": HUGE, "edges": [[0, 1]]})), 4),
     rf"^topology .*huge.json has {HUGE} nodes but the world size is 4: launch with --nproc_per_node {HUGE}"),
    ("file_with_weights", lambda t: build_topology(TopologyConfig(path=tiny_file(
        t, {"n": HUGE, "edges": [[0, 1]], "weights": [[0, 1, 0.5]]})), 4), rf"has {HUGE} nodes but the world size"),
    ("file_schedule", lambda t: build_topology(TopologyConfig(path=tiny_file(
        t, {"n": HUGE, "schedule": [{"edges": [[0, 1]]}]})), 4), rf"has {HUGE} nodes but the world size"),
    ("generator_n", lambda t: build_topology(TopologyConfig(name="ring", n=HUGE), 4),
     rf"^topology ring\(n={HUGE}\) has {HUGE} nodes but the world size is 4"),
    ("complete_100000", lambda t: build_topology(TopologyConfig(name="complete"), 100_000),
     r"^a complete topology on 100000 nodes has up to 4999950000 edges, more than the 1000000 p2p builds: pick a "
     r"sparser --topology.name \(ring, torus, exponential\) or fewer nodes$"),
    ("ring_huge", lambda t: generate("ring", HUGE), rf"^a ring topology on {HUGE} nodes has up to {HUGE} edges"),
    ("sim_nodes", lambda t: load_config(["--sim.nodes", "100000", "--topology.name", "complete"]),
     r"^--sim.nodes must be <= 4096: one process holds every node$"),
]


@pytest.mark.timeout(5)
@pytest.mark.parametrize("build,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_size_is_checked_before_anything_of_that_size_is_built(build, message, tmp_path):
    tracemalloc.start()  # numpy reports its buffers to tracemalloc too
    try:
        with pytest.raises(ConfigError, match=message):
            build(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes"  # nothing proportional to n (100 000 000 nodes: GBs)


@pytest.mark.timeout(5)
def test_the_largest_simulation_with_a_complete_graph_is_one_line_exit_2(tmp_path, capsys):
    """4096 nodes pass --sim.nodes' bound; their complete graph (8 386 560 edges) does not: refused before the
    graph, the data or the nodes are built."""
    start = time.perf_counter()
    code = train.main(["--sim.nodes", "4096", "--topology.name", "complete", "--run.dir", str(tmp_path / "r")])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and seconds < 2, seconds
    assert err == ("error: a complete topology on 4096 nodes has up to 8386560 edges, more than the 1000000 p2p "
                   "builds: pick a sparser --topology.name (ring, torus, exponential) or fewer nodes\n")
    assert not (tmp_path / "r").exists()
