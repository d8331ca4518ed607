"""A task that is not classification: next-character prediction on text that ships with Python, a nanoGPT-shaped
transformer, metrics named for what they are (bits per character, token accuracy), bf16 autocast, under
torchrun and simulated (parity), resumed exactly. Tiny model sizes keep it fast; configs/charlm.toml is the
real one."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from distributed import csv_rows, launch
from p2p.config import ConfigError, DataConfig, ModelConfig, load_config
from p2p.data import load_splits, partition
from p2p.models import build_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

pytestmark = pytest.mark.timeout(240)
TINY = ["--config", str(ROOT / "configs/charlm.toml"), "--model.layers", "1", "--model.heads", "2", "--model.embed",
        "32", "--data.seq_len", "32", "--data.batch_size", "8", "--data.samples_per_epoch", "64",
        "--algorithm.lr", "0.01", "--algorithm.beta2", "0.999", "--train.eval_every", "1", "--log.progress", "false",
        "--log.plots", "false", "--log.tensorboard", "false"]


def test_text_blocks_windows_and_partitions():
    cfg = DataConfig(name="text", seq_len=64, val_fraction=0.05)
    splits = load_splits(cfg)
    assert splits.task == "language_model" and splits.in_shape == (64,) and splits.num_classes == 103
    x, y = splits.train[5]
    assert torch.equal(x[1:], y[:-1])  # the target is the input shifted by one
    ends = [(ds.starts.min().item(), ds.starts.max().item() + 65) for ds in (splits.train, splits.val, splits.test)]
    assert ends[0][1] <= ends[1][0] and ends[1][1] <= ends[2][0]  # contiguous blocks, no window crosses one
    iid = partition(splits.train_labels, 4, cfg)
    docs = partition(splits.train_labels, 4, DataConfig(name="text", seq_len=64, partition="documents"))
    per_node = [set(splits.train_labels[s].tolist()) for s in docs]
    assert all(a.isdisjoint(b) for i, a in enumerate(per_node) for b in per_node[i + 1:])  # whole documents
    assert sum(map(len, docs)) == sum(map(len, iid)) == len(splits.train)
    assert max(map(len, docs)) < 1.3 * min(map(len, docs))  # shares stay close
    assert load_splits(DataConfig(name="text", vocab="byte")).num_classes == 256


def test_a_text_file_of_your_own(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text("\n\n".join(f"paragraph {i}: " + "the quick brown fox jumps. " * 40 for i in range(12)))
    splits = load_splits(DataConfig(name="text", path=str(path), seq_len=16))
    assert splits.groups == 11 or splits.groups == 12  # paragraphs are the documents (the last ones are held out)
    with pytest.raises(ConfigError, match="cannot be read as UTF-8"):
        load_splits(DataConfig(name="text", path=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError, match="documents splits a text corpus"):
        load_config(["--data.partition", "documents"])


def test_the_transformer_is_causal_tied_and_batchable():
    model = build_model(ModelConfig(name="transformer"), (128,), 103)
    assert 0.7e6 < sum(p.numel() for p in model.parameters()) < 1.0e6  # ~0.8 M by default
    assert model.head.weight is model.tok.weight
    small = build_model(ModelConfig(name="transformer", layers=2, heads=2, embed=32), (16,), 50)
    x = torch.randint(0, 50, (2, 16))
    changed = x.clone()
    changed[:, 10] = (x[:, 10] + 1) % 50
    out, out_changed = small(x), small(changed)
    assert torch.allclose(out[:, :10], out_changed[:, :10]) and not torch.allclose(out[:, 10:], out_changed[:, 10:])
    params = {n: torch.stack([p.detach(), p.detach() * 0.9]) for n, p in small.named_parameters()}
    batched = vmap(lambda p, x: functional_call(small, p, (x,)))(params, torch.stack([x, x]))
    assert torch.allclose(batched[0], out, atol=1e-5)
    with pytest.raises(ConfigError, match="reads token windows"):
        build_model(ModelConfig(name="transformer"), (1, 8, 8), 10)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same tiny run under torchrun (2 nodes) and simulated, and simulated in bf16 and in two halves."""
    base = tmp_path_factory.mktemp("lm")
    nodes2 = ["--topology.name", "ring", "--train.epochs", "3"]
    out = {name: base / name for name in ("torchrun", "sim", "bf16", "halves")}
    result = launch(["torchrun", "--standalone", "--nproc_per_node", "2", "train.py", *TINY, *nodes2,
                     "--run.dir", str(out["torchrun"])], timeout=200)
    assert result.returncode == 0, result.stderr[-2000:]
    assert train.main([*TINY, *nodes2, "--sim.nodes", "2", "--run.dir", str(out["sim"])]) == 0
    assert train.main([*TINY, *nodes2, "--sim.nodes", "2", "--run.dir", str(out["bf16"]),
                       "--train.precision", "bf16"]) == 0
    assert train.main([*TINY, "--topology.name", "ring", "--train.epochs", "2", "--sim.nodes", "2",
                       "--run.dir", str(out["halves"])]) == 0
    assert train.main([*TINY, *nodes2, "--sim.nodes", "2", "--run.dir", str(out["halves"]), "--run.resume"]) == 0
    return out


def test_columns_are_named_for_what_they_are(runs):
    rows = csv_rows(runs["sim"] / "node0.csv")
    assert "test_acc" not in rows[0] and "avg_test_acc" not in rows[0]
    for r in rows:
        for split in ("train", "val", "test", "avg_test"):
            assert r[f"{split}_bpc"] == pytest.approx(r[f"{split}_loss"] / math.log(2))
        assert 0 < r["test_token_acc"] < 1 and 0 < r["avg_test_token_acc"] < 1
    assert rows[-1]["train_bpc"] < rows[0]["train_bpc"] < math.log2(103)  # it learns


def test_simulated_equals_torchrun(runs):
    for k in range(2):
        real, sim = csv_rows(runs["torchrun"] / f"node{k}.csv"), csv_rows(runs["sim"] / f"node{k}.csv")
        for a, b in zip(real, sim):
            for key in ("train_loss", "test_bpc", "avg_test_bpc", "test_token_acc"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (k, key)


def test_bf16_learns_close_to_fp32(runs):
    bf16, fp32 = csv_rows(runs["bf16"] / "node0.csv"), csv_rows(runs["sim"] / "node0.csv")
    assert bf16[-1]["train_bpc"] < bf16[0]["train_bpc"]
    assert abs(bf16[-1]["avg_test_bpc"] - fp32[-1]["avg_test_bpc"]) < 0.1


def test_a_resumed_language_model_equals_the_uninterrupted_run(runs):
    for k in range(2):
        whole, halves = csv_rows(runs["sim"] / f"node{k}.csv"), csv_rows(runs["halves"] / f"node{k}.csv")
        assert [r["epoch"] for r in halves] == [1, 2, 3]
        for a, b in zip(whole, halves):
            assert a["train_loss"] == b["train_loss"] and a["avg_test_bpc"] == b["avg_test_bpc"], k


def test_evaluate_and_report_read_a_language_model(runs):
    result = launch(["python", "-m", "p2p.evaluate", str(runs["sim"])], timeout=100)
    assert result.returncode == 0, result.stderr
    network = csv_rows(runs["sim"] / "network.csv")
    rows = csv_rows(runs["sim"] / "node0.csv")
    assert network[-1]["avg_test_bpc"] == pytest.approx(rows[-1]["avg_test_bpc"], rel=1e-5)
    report = launch(["python", "-m", "p2p.report", str(runs["sim"]), "--out", str(runs["sim"].parent / "rep")],
                    timeout=100)
    assert report.returncode == 0, report.stderr
    line = next(l for l in report.stdout.splitlines() if l.startswith("| sim"))
    assert f"{rows[-1]['avg_test_bpc']:.3f}" in line and f"{rows[-1]['avg_test_token_acc']:.3f}" in line
    assert np.isfinite(rows[-1]["consensus_dist"])
