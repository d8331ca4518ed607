"""When one node stops for a local, repeatable reason, the nodes left waiting for it name it and its reason,
instead of advising torchrun --max-restarts, which cannot help (issue 21, item 8). Real torchrun processes."""

from __future__ import annotations

import pytest

from distributed import launch

pytestmark = pytest.mark.timeout(120)


def test_the_waiting_nodes_name_the_node_that_stopped_and_why(tmp_path):
    result = launch(["torchrun", "--standalone", "--nproc_per_node", "2", "train.py", "--config",
                     "configs/quickstart.toml", "--topology.path=", "--model.name", "tests.flaky_model:flaky",
                     "--comm.timeout_s", "30", "--run.dir", str(tmp_path / "run"), "--log.progress", "false"],
                    timeout=100)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: node 0:")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert "node 1 stopped: RuntimeError: boom on this host" in lines[0] and "--max-restarts" not in lines[0]
