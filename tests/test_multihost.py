"""Several hosts for real: torchrun's c10d rendezvous between separate launches."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from p2p.comm import free_port
from p2p.config import TopologyConfig, config_lines, load_config
from p2p.topology import build_topology
from test_faults import QUICK, TORCHRUN, kill_all, start


def test_the_compared_config_holds_the_topology_files_content(tmp_path):
    """Two hosts with a topology file of the same path but other edges must differ; other spellings of one graph not."""
    path = tmp_path / "topo.json"
    lines = []
    for text in ('{"n": 4, "edges": [[0, 1], [1, 2], [2, 3], [0, 3]]}', '{"n": 4, "edges": [[0, 1], [1, 2], [2, 3]]}',
                 '{"edges": [[3, 0], [2, 3], [1, 2], [0, 1]], "n": 4}'):
        path.write_text(text)
        cfg = load_config(["--topology.path", str(path)])
        lines.append(config_lines(cfg, build_topology(cfg.topology, 4)))
    assert lines[0] != lines[1] and lines[0] == lines[2]
    assert [ln for ln in lines[1] if ln not in lines[0]][0].startswith("topology graph = 4 nodes, 3 edges, sha256 ")
    cfg = load_config(["--data.root", "/elsewhere", "--data.workers", "4"])  # host-local fields are not compared
    assert config_lines(cfg, build_topology(TopologyConfig(), 4)) == config_lines(load_config([]), build_topology(
        TopologyConfig(), 4))


@pytest.mark.timeout(240)
def test_hosts_with_different_configs_stop_naming_the_field(tmp_path):
    """Two `torchrun --nnodes 2` launches, as on two hosts, one with another --algorithm.lr: both stop at once."""
    endpoint, run = f"127.0.0.1:{free_port()}", tmp_path / "run"
    procs = [start([*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    endpoint, "--rdzv-id", "mismatch", *QUICK, "--run.dir", str(run), "--topology.path=",
                    "--algorithm.lr", lr], tmp_path / f"host{i}.log")
             for i, lr in enumerate(("0.1", "0.2"))]
    try:
        codes = [p.wait(timeout=200) for p in procs]
    finally:
        kill_all(procs)
    assert all(c != 0 for c in codes), codes
    for i in range(2):
        text = (tmp_path / f"host{i}.log").read_text()
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, text[-3000:]
        m = re.fullmatch(r"error: nodes were launched with different configs: algorithm.lr is (\S+) on node 0 but "
                         r"(\S+) on node 1; launch every host with the same command and files", errors[0])
        assert m and {m[1], m[2]} == {"0.1", "0.2"}, errors
        assert re.search(r"exitcode\s*: 2 ", text), text[-3000:]
    assert not run.exists()  # decided before anything was written
