"""Every checkpoint carries a SHA-256 and is loaded only when it matches: a changed file is skipped like an
unreadable one, rotation never deletes the last verified checkpoint, and no message suggests weights_only=False.

In-process for the bookkeeping; one simulated run (a real process) corrupts a checkpoint and resumes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import sys
from types import SimpleNamespace

import pytest
import torch

from distributed import csv_rows, launch
from test_faults import QUICK, _fake_node

from p2p import checkpoint
from p2p.checkpoint import Checkpointer, checksum_path, read_checkpoint

CPU = SimpleNamespace(device=torch.device("cpu"), bytes_sent=0)


def save(ckpt: Checkpointer, epochs: range) -> None:
    for epoch in epochs:
        ckpt.maybe_save(_fake_node(epoch), CPU, {"epoch": epoch, "step": epoch, "wall_s": 0.0})


def flip(path, count: int = 300) -> None:
    """Invert `count` bytes in the middle of `path`: the size stays, torch.load alone would not notice."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + count] = bytes(b ^ 0xFF for b in data[mid:mid + count])
    path.write_bytes(bytes(data))


@pytest.mark.timeout(30)
def test_a_changed_checkpoint_is_skipped_naming_the_file(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, 0, every=1, last=10)
    save(ckpt, range(1, 4))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "node0_epoch2.pt", "node0_epoch2.pt.sha256", "node0_epoch3.pt", "node0_epoch3.pt.sha256"]
    newest = tmp_path / "node0_epoch3.pt"
    # `sha256sum -c` reads the checksum file
    assert checksum_path(newest).read_text() == f"{hashlib.sha256(newest.read_bytes()).hexdigest()}  node0_epoch3.pt\n"
    flip(newest)
    with caplog.at_level(logging.WARNING, logger="p2p"):
        states = ckpt.readable(torch.device("cpu"))
    assert sorted(states) == [2]
    assert torch.equal(states[2]["model"]["weight"], torch.full((2, 2), 2.0))
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {newest} cannot be read (its SHA-256 differs from node0_epoch3.pt.sha256: the file changed after "
        f"it was written): not resuming from it"]


@pytest.mark.timeout(30)
def test_rotation_never_deletes_the_last_verified_checkpoint(tmp_path, monkeypatch, caplog):
    """Epoch 3 reads back other than written (a failing disk, say): epochs 1 and 2 stay until 4 verifies."""
    ckpt = Checkpointer(tmp_path, 0, every=1, last=10)
    save(ckpt, range(1, 3))
    write = checkpoint._write

    def faulty(path, data):
        if path.name == "node0_epoch3.pt":
            data = bytes(data[:-1]) + b"?"
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write", faulty)
    with caplog.at_level(logging.WARNING, logger="p2p"):
        save(ckpt, range(3, 4))
    assert ckpt.epochs() == [1, 2, 3]
    assert re.fullmatch(r"checkpoint .*node0_epoch3.pt does not read back as written \(its SHA-256 differs .*\): "
                        r"keeping the older ones", caplog.records[0].getMessage())
    assert sorted(ckpt.readable(torch.device("cpu"))) == [1, 2]
    monkeypatch.setattr(checkpoint, "_write", write)
    save(ckpt, range(4, 5))
    assert ckpt.epochs() == [3, 4]
    assert sorted(p.name for p in tmp_path.glob("*.sha256")) == ["node0_epoch3.pt.sha256", "node0_epoch4.pt.sha256"]


@pytest.mark.timeout(30)
def test_a_checkpoint_without_checksum_loads_with_a_warning(tmp_path, caplog):
    """Checkpoints written before checksums existed still resume, unverified, and say so."""
    ckpt = Checkpointer(tmp_path, 0, every=1, last=10)
    save(ckpt, range(1, 2))
    checksum_path(tmp_path / "node0_epoch1.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="p2p"):
        assert sorted(ckpt.readable(torch.device("cpu"))) == [1]
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {tmp_path / 'node0_epoch1.pt'} has no checksum (node0_epoch1.pt.sha256; written before p2p "
        f"wrote them): loading it unverified"]


class Foreign:
    """Not something a checkpoint holds: weights_only loading refuses it."""


@pytest.mark.timeout(30)
def test_a_checkpoint_that_only_an_unsafe_load_reads_is_refused_without_advice(tmp_path):
    path = tmp_path / "node0_epoch1.pt"
    buf = io.BytesIO()
    torch.save({"model": Foreign()}, buf)
    path.write_bytes(buf.getvalue())
    checksum_path(path).write_text(f"{hashlib.sha256(buf.getvalue()).hexdigest()}  {path.name}\n")
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    assert str(e.value) == ("it holds objects that a safe load refuses (Unsupported global: GLOBAL "
                            "test_verified_checkpoints.Foreign was not an allowed global by default.)")
    assert "weights_only" not in str(e.value)


@pytest.mark.timeout(180)
def test_a_corrupted_checkpoint_resumes_from_the_one_before(tmp_path):
    """Node 1's newest checkpoint (epoch 3) gets 300 bytes flipped: the network resumes from epoch 2, redoes epoch 3
    exactly, and each epoch appears once."""
    run = tmp_path / "run"
    sim = [sys.executable, *QUICK, "--sim.nodes", "2", "--topology.path=", "--run.dir", str(run)]
    first = launch([*sim, "--train.epochs", "3"], timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    before = csv_rows(run / "node1.csv")
    corrupted = run / "ckpt" / "node1_epoch3.pt"
    flip(corrupted)
    resumed = launch([*sim, "--train.epochs", "4", "--run.resume"], timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"checkpoint {re.escape(str(corrupted))} cannot be read \(its SHA-256 differs from "
                     rf"node1_epoch3.pt.sha256: the file changed after it was written\): not resuming from it",
                     resumed.stderr), resumed.stderr[-3000:]
    assert "resumed from epoch 2 (step" in resumed.stderr
    for rank in range(2):
        assert [r["epoch"] for r in csv_rows(run / f"node{rank}.csv")] == [1, 2, 3, 4]
    after = csv_rows(run / "node1.csv")
    for key in ("train_loss", "test_loss", "test_acc", "bytes_sent"):
        assert after[2][key] == before[2][key], key  # epoch 3 again, from the same state
    assert read_checkpoint(corrupted)["progress"]["epoch"] == 3  # rewritten, and it verifies


@pytest.mark.timeout(120)
def test_evaluate_leaves_out_an_epoch_whose_checkpoint_fails_in_one_line(tmp_path, capsys):
    from p2p import evaluate, sim
    from p2p.config import load_config

    run = tmp_path / "run"
    sim.run(load_config([*QUICK[1:], "--sim.nodes", "2", "--topology.path=", "--run.dir", str(run), "--train.epochs",
                         "2", "--train.keep_checkpoints", "0", "--log.tensorboard", "false"]))
    capsys.readouterr()
    flip(run / "ckpt" / "node1_epoch2.pt")
    assert evaluate.main([str(run)]) == 0
    assert [r["epoch"] for r in csv_rows(run / "network.csv")] == [1]
    assert capsys.readouterr().err == (
        f"warning: checkpoint {run / 'ckpt' / 'node1_epoch2.pt'} cannot be read (its SHA-256 differs from "
        f"node1_epoch2.pt.sha256: the file changed after it was written): epoch 2 left out\n")
    flip(run / "ckpt" / "node0_epoch1.pt")
    assert evaluate.main([str(run)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {run}: no epoch whose checkpoints can all be read (see the warnings above)")


@pytest.mark.timeout(30)
def test_a_verified_checkpoint_of_another_structure_is_one_line(tmp_path):
    """A file that verifies but was written by another program or version: a ConfigError, never a KeyError."""
    from p2p.config import ConfigError

    ckpt = Checkpointer(tmp_path, 0, every=1, last=1)
    save(ckpt, range(1, 2))
    path = tmp_path / "node0_epoch1.pt"
    state = read_checkpoint(path)
    for change, message in ((lambda s: {k: v for k, v in s.items() if k != "rng"},
                             r"is not a checkpoint of this p2p \(it has no rng\): start a new run with --run.name NAME"),
                            (lambda s: {**s, "rng": {"torch": 1}}, r"does not fit this run \(.+\): resume with")):
        buf = io.BytesIO()
        torch.save(change(state), buf)
        path.write_bytes(buf.getvalue())
        checksum_path(path).write_text(f"{hashlib.sha256(buf.getvalue()).hexdigest()}  {path.name}\n")
        with pytest.raises(ConfigError, match=rf"^checkpoint {re.escape(str(path))} .*{message}"):
            ckpt.load(1, ckpt.readable(torch.device("cpu"))[1], _fake_node(0.0), CPU)


@pytest.mark.timeout(30)
def test_damaged_csv_rows_are_left_out_with_a_warning_when_resuming(tmp_path, caplog):
    """A row cut short by a crash, undecodable bytes, a field too long for csv: the log never stops a resume."""
    from p2p.config import LogConfig
    from p2p.metrics import Metrics, logged_epochs

    path = tmp_path / "node0.csv"
    path.write_bytes(b"epoch,train_loss\n1,0.5\n2,0.4\n\xff\xfe garbage\n3,0.3,extra\n4,0.2\n" + b"x" * 200_000)
    assert logged_epochs(tmp_path, 0) == [1, 2, 4]
    with caplog.at_level(logging.WARNING, logger="p2p"):
        Metrics(tmp_path, 0, LogConfig(tensorboard=False), resume_epoch=2).close()
    assert [r["epoch"] for r in csv_rows(path)] == [1, 2]
    assert [r.getMessage() for r in caplog.records] == [f"{path}: 3 damaged row(s) left out"]
