"""Messages that tell the truth: a run name that would leave runs/ is refused, and a diverged run says whether a
checkpoint exists to go on from. In-process (train.main), simulated nodes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from test_faults import QUICK, epochs

from p2p.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

NAME = ("--run.name must be a plain name, not empty, '.' or '..' and without '/': outputs go to runs/<name> "
        "(--run.dir PATH puts them anywhere)")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", ["..", ".", "", " ", "../elsewhere", "a/b", "/tmp/x", "a\0b"])
def test_a_run_name_outside_runs_is_refused(name):
    with pytest.raises(ConfigError) as e:
        load_config(["--run.name", name])
    assert str(e.value) == NAME


@pytest.mark.timeout(10)
def test_a_plain_run_name_is_a_directory_under_runs():
    assert load_config(["--run.name", "..a.."]).out_dir == Path("runs/..a..")


@pytest.mark.timeout(10)
def test_a_run_name_outside_runs_is_one_line_exit_2(capsys):
    assert train.main(["--run.name", ".."]) == 2
    assert capsys.readouterr().err == f"error: {NAME}\n"


@pytest.mark.timeout(120)
def test_a_diverged_run_says_whether_a_checkpoint_is_kept(tmp_path, capsys):
    """Diverging in epoch 1 leaves no checkpoint; diverging after resuming with a huge learning rate leaves epoch
    1's, and the advice (lower the rate, --run.resume) then continues the run."""
    run = tmp_path / "run"
    sim = [*QUICK[1:], "--sim.nodes", "2", "--topology.path=", "--run.dir", str(run)]
    assert train.main([*sim, "--train.epochs", "2", "--algorithm.lr", "1e6"]) == 1
    assert capsys.readouterr().err == (
        "error: non-finite training loss on node(s) [0, 1] in epoch 1: lower --algorithm.lr and start a new run (no "
        "checkpoint was written before epoch 1)\n")

    other = tmp_path / "other"
    sim = [*QUICK[1:], "--sim.nodes", "2", "--topology.path=", "--run.dir", str(other)]
    assert train.main([*sim, "--train.epochs", "1"]) == 0
    assert train.main([*sim, "--train.epochs", "2", "--run.resume", "--algorithm.lr", "1e6"]) == 1
    assert capsys.readouterr().err.endswith(
        f"error: non-finite training loss on node(s) [0, 1] in epoch 2: lower --algorithm.lr and continue with "
        f"--run.resume (the checkpoints up to epoch 1 are kept in {other / 'ckpt'})\n")
    assert train.main([*sim, "--train.epochs", "2", "--run.resume"]) == 0
    assert epochs(other, 0) == epochs(other, 1) == [1, 2]
