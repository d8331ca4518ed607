"""The network's metrics of a finished (or stopped) run, from its checkpoints, with no process group.

    python -m p2p.evaluate RUN_DIR

For every epoch of which every node has a checkpoint: the consensus distance (1/n) Σ_i ||w_i − w̄||² and
the test loss and accuracy of the averaged model w̄, as the trainer computes them at evaluation time.
`async` runs need this: they meet nobody during training, so their CSVs hold these columns for the last
epoch only. Written to RUN_DIR/network.csv and printed. Nodes keep their two newest checkpoints unless
the run had `--train.keep_checkpoints 0` (all) or more.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import torch

from p2p.algorithms import FlatParams
from p2p.checkpoint import read_checkpoint
from p2p.config import ConfigError, load_config, one_line
from p2p.data import eval_loader, load_splits
from p2p.models import build_model
from p2p.loop import evaluate, task_of
from p2p.metrics import task_row

COLUMNS = ["epoch", "consensus_dist", "avg_test_loss", "avg_test_acc"]


def checkpoints(run_dir: Path) -> dict[int, dict[int, Path]]:
    """{epoch: {rank: file}} for the epochs of which every node (every node<k>.csv or file's rank) has one."""
    found: dict[int, dict[int, Path]] = {}
    for path in (run_dir / "ckpt").glob("node*_epoch*.pt"):
        if m := re.fullmatch(r"node(\d+)_epoch(\d+)\.pt", path.name):
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = path
    ranks = {int(m.group(1)) for p in run_dir.glob("node*.csv") if (m := re.fullmatch(r"node(\d+)\.csv", p.name))}
    ranks |= {rank for files in found.values() for rank in files}
    return {epoch: files for epoch, files in sorted(found.items()) if set(files) == ranks}


def _weights(model: torch.nn.Module, flat: FlatParams, path: Path) -> torch.Tensor:
    """The trainable weights saved in checkpoint `path`, verified against its checksum first, as a resume does;
    ValueError naming the file when it cannot be read."""
    try:
        model.load_state_dict(read_checkpoint(path)["model"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path} cannot be read ({one_line(e)})") from None
    return flat.w.clone()


def evaluate_run(run_dir: Path) -> list[dict[str, float]]:
    """One row per epoch that every node checkpointed (COLUMNS); ConfigError when there is none."""
    config = run_dir / "config.toml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = load_config(["--config", str(config), "--run.device", "cpu"])
    epochs = checkpoints(run_dir)
    if not epochs:
        raise ConfigError(f"{run_dir} holds no epoch that every node checkpointed (--train.checkpoint_every 0?)")
    splits = load_splits(cfg.data)
    model = build_model(cfg.model, splits.in_shape, splits.num_classes)
    flat = FlatParams(model)
    test = eval_loader(splits.test, 1000)
    rows = []
    for epoch, files in epochs.items():
        try:
            W = torch.stack([_weights(model, flat, files[rank]) for rank in sorted(files)])
        except ValueError as e:
            sys.stderr.write(f"warning: {e}: epoch {epoch} left out\n")
            continue
        w_bar = W.mean(0)
        flat.w.copy_(w_bar)  # as the trainer: only trainable parameters are averaged
        loss, acc = evaluate(model, test, torch.device("cpu"))
        rows.append(task_row({"epoch": epoch, "consensus_dist": (W - w_bar).pow(2).sum(1).mean().item(),
                              "avg_test_loss": loss, "avg_test_acc": acc}, task_of(cfg)))
    if not rows:
        raise ConfigError(f"{run_dir}: no epoch whose checkpoints can all be read (see the warnings above)")
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run_dir = Path(argv[0])
    try:
        rows = evaluate_run(run_dir)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    columns = list(rows[0]) if rows else COLUMNS  # a language model's: bits per character, token accuracy
    with (run_dir / "network.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    print("  ".join(f"{c:>14}" for c in columns))
    for r in rows:
        print("  ".join(f"{r[c]:>14.4g}" if c != "epoch" else f"{r[c]:>14}" for c in columns))
    print(f"written to {run_dir / 'network.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
