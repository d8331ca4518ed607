"""Short real runs of input variants: the seed's topology file setting K."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from p2p.config import load_config
from p2p.topology import load_topology

pytestmark = pytest.mark.timeout(200)

ROOT = Path(__file__).resolve().parents[1]
LOGISTIC_BYTES = (64 * 10 + 10) * 4  # |w| of the logistic model on 8x8 digits, float32


def _torchrun(nodes: int, args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    """torchrun train.py from the repository root; on timeout kill its whole process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nodes),
           "train.py", "--log.progress", "false", "--log.plots", "false", *args]
    with subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"torchrun did not finish in {timeout}s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _rows(path: Path) -> list[dict[str, float | None]]:
    with path.open() as f:
        return [{k: float(v) if v != "" else None for k, v in row.items()} for row in csv.DictReader(f)]


def test_the_seeds_3_node_file_sets_K(tmp_path):
    """seed_n3_ring.json has round 10: K = 10 unless the config says otherwise, recorded in config.toml."""
    run_dir = tmp_path / "seed3"
    done = _torchrun(3, ["--topology.path", "topologies/seed_n3_ring.json", "--model.name", "logistic",
                         "--data.samples_per_epoch", "320", "--data.batch_size", "32", "--train.epochs", "2",
                         "--log.tensorboard", "false", "--run.dir", str(run_dir)])
    assert load_config(["--config", str(run_dir / "config.toml")]).algorithm.interval == 10
    saved = load_topology(run_dir / "topology.json")
    seed = load_topology(ROOT / "topologies" / "seed_n3_ring.json")
    assert (saved.edges, saved.round, saved.slots) == (seed.edges, 10, seed.slots)
    assert 'its "device" entries are ignored' in done.stderr and "K = 10" in done.stderr
    for rank in range(3):
        # 10 steps per epoch, one exchange with both neighbours every 10th step
        rows = _rows(run_dir / f"node{rank}.csv")
        assert [r["bytes_sent"] for r in rows] == [2 * LOGISTIC_BYTES, 4 * LOGISTIC_BYTES]

