"""Messages that tell the truth: a run name that would leave runs/ is refused, and a diverged run says whether a
checkpoint exists to go on from. In-process (train.main), simulated nodes."""

from __future__ import annotations

import importlib.util
import re
import signal
import sys
from pathlib import Path

import pytest

from test_faults import QUICK, epochs, kill_all, start, wait_for

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


@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, capsys):
    """Epoch 1's checkpoint is written into /dev/full (through a symlink where its temporary file goes), which
    fails every write with ENOSPC, as a full disk does."""
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    tmp = run / "ckpt" / "node0_epoch1.pt.sha256.tmp"
    tmp.symlink_to("/dev/full")
    sim = [*QUICK[1:], "--sim.nodes", "2", "--topology.path=", "--run.dir", str(run), "--run.resume"]
    assert train.main([*sim, "--train.epochs", "1"]) == 1
    assert capsys.readouterr().err == (
        f"error: cannot write to {run} (No space left on device): free some space or pick another --run.dir\n")
    assert not tmp.is_symlink() and not list((run / "ckpt").glob("node*_epoch1.pt*"))


@pytest.mark.timeout(120)
def test_ctrl_c_of_a_simulated_run_is_one_line_exit_130(tmp_path):
    run = tmp_path / "run"
    proc = start([sys.executable, *QUICK, "--sim.nodes", "2", "--topology.path=", "--run.dir", str(run),
                  "--train.epochs", "1000"], tmp_path / "log.txt")
    try:
        wait_for(lambda: epochs(run, 0), [proc], 100, "first epoch")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        kill_all([proc])
    text = (tmp_path / "log.txt").read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text
    # the graceful stop (tests/test_signals.py): a checkpoint at the step it stopped at, one line
    assert re.fullmatch(r"stopped by SIGINT at epoch \d+ step \d+; continue with --run\.resume", text.splitlines()[-1])
    assert not list((run / "ckpt").glob("*.tmp"))
