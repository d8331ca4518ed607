"""A resume may change only where and how a run runs and logs, how long, and the learning rate (checkpoint.MAY_CHANGE;
each epoch's row records its γ): any field
that decides what the earlier epochs' rows mean, the graph included, is refused with one line naming it, before
anything is written; fewer epochs than are done is refused too. In-process (train.main), simulated nodes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from distributed import csv_rows

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

pytestmark = pytest.mark.timeout(120)
RUN = ["--config", str(ROOT / "configs/quickstart.toml"), "--sim.nodes", "4", "--data.samples_per_epoch", "64",
       "--log.progress", "false", "--log.plots", "false", "--log.tensorboard", "false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    assert train.main([*RUN, "--run.dir", str(out), "--train.epochs", "2"]) == 0
    return out


@pytest.mark.parametrize("change,field", [
    (["--algorithm.momentum", "0.5"], "--algorithm.momentum 0.9, this launch has 0.5"),
    (["--topology.name", "complete"], "topology 4 nodes, 4 edges, sha256"),
    (["--comm.mode", "overlap"], "--comm.mode sync, this launch has overlap"),
    (["--run.seed", "3"], "--run.seed 0, this launch has 3"),
    (["--model.hidden", "64"], "--model.hidden 128, this launch has 64"),
    (["--train.epochs", "1"], "has 2 epochs done, this launch asks for --train.epochs 1: resume with --train.epochs 2"),
])
def test_a_resume_that_changes_the_record_is_refused(run_dir, capsys, change, field):
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    code = train.main([*RUN, "--run.dir", str(run_dir), "--run.resume", "--train.epochs", "3", *change])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0], err
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # config.toml, topology.json and the CSVs are the earlier epochs' record, untouched


def test_a_resume_may_run_longer_log_differently_and_lower_the_rate(run_dir):
    """--algorithm.lr may change (after a divergence, the usual way on): each epoch's row records its γ."""
    assert train.main([*RUN, "--run.dir", str(run_dir), "--run.resume", "--train.epochs", "3",
                       "--comm.timeout_s", "60", "--log.level", "warning", "--algorithm.lr", "0.02"]) == 0
    for k in range(4):
        rows = csv_rows(run_dir / f"node{k}.csv")
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert [r["lr"] for r in rows] == [0.1, 0.1, 0.02]
    assert re.search(r"^epochs = 3$", (run_dir / "config.toml").read_text(), re.M)
