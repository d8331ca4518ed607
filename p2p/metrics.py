"""Per-node metrics: one CSV per node and TensorBoard event files, behind one `Metrics` container."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from p2p.config import LogConfig

log = logging.getLogger("p2p")

# The seed's columns first, then ours.
COLUMNS = [
    "epoch", "train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc",
    "consensus_dist", "avg_test_loss", "avg_test_acc", "lr", "bytes_sent", "compute_s", "comm_s",
    "sleep_s", "wall_s", "staleness_mean", "staleness_max", "wait_s", "exchanges", "dual_norm", "penalty_ratio",
    "sim_s",
]
# CSV column -> TensorBoard tag; the network-wide ones go to tb/global (rank 0) only.
NODE_TAGS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
    "train_acc": "acc/train", "val_acc": "acc/val", "test_acc": "acc/test",
    "lr": "lr", "bytes_sent": "comm/bytes_sent", "compute_s": "time/compute_s", "comm_s": "time/comm_s",
    "staleness_mean": "comm/staleness_mean", "staleness_max": "comm/staleness_max", "wait_s": "time/wait_s",
    "exchanges": "comm/exchanges", "dual_norm": "dual/norm", "penalty_ratio": "dual/penalty_ratio",
    "sim_s": "time/sim_s",
    "train_token_acc": "token_acc/train", "val_token_acc": "token_acc/val", "test_token_acc": "token_acc/test",
    "train_bpc": "bpc/train", "val_bpc": "bpc/val", "test_bpc": "bpc/test",
}
GLOBAL_TAGS = {
    "consensus_dist": "consensus/distance", "avg_test_loss": "avg_model/test_loss",
    "avg_test_acc": "avg_model/test_acc", "avg_test_token_acc": "avg_model/test_token_acc",
    "avg_test_bpc": "avg_model/test_bpc",
}


# A language model's columns say what they are: token accuracy, and bits per character (loss / ln 2) beside each loss
LM_NAMES = {"train_acc": "train_token_acc", "val_acc": "val_token_acc", "test_acc": "test_token_acc",
            "avg_test_acc": "avg_test_token_acc"}
LM_BITS = {"train_loss": "train_bpc", "val_loss": "val_bpc", "test_loss": "test_bpc", "avg_test_loss": "avg_test_bpc"}


def columns(task: str) -> list[str]:
    """The CSV columns of a task: classification's (the seed's first), or a language model's."""
    if task != "language_model":
        return COLUMNS
    named = [LM_NAMES.get(c, c) for c in COLUMNS]
    for loss, bits in LM_BITS.items():
        named.insert(named.index(loss) + 1, bits)
    return named


def task_row(row: dict[str, float], task: str) -> dict[str, float]:
    """A row with the generic keys the loops produce (train_acc, test_loss, ...) in the task's own names."""
    if task != "language_model":
        return row
    out = {LM_NAMES.get(k, k): v for k, v in row.items()}
    for loss, bits in LM_BITS.items():
        if row.get(loss) is not None:
            out[bits] = row[loss] / math.log(2)
    return out


def acc_column(fields: list[str] | set[str]) -> str:
    """The accuracy column a CSV holds: test_token_acc for a language model, else test_acc."""
    return "test_token_acc" if "test_token_acc" in fields else "test_acc"


def _rows(path: Path) -> tuple[list[dict[str, str]], int]:
    """The rows of a node's CSV whose epoch is a whole number, and how many others it holds (a row cut short by a
    crash, damaged bytes). Neither stops a resume: the checkpoints decide where a run continues, not its log."""
    rows, bad = [], 0
    with path.open(newline="", errors="replace") as f:
        try:
            for row in csv.DictReader(f):
                if (row.get("epoch") or "").isdigit() and None not in row:  # None: more fields than the header
                    rows.append(row)
                else:
                    bad += 1
        except csv.Error:  # e.g. a field over csv's size limit: the rest cannot be split into rows
            bad += 1
    return rows, bad


def logged_epochs(out_dir: Path, rank: int) -> list[int]:
    """The epochs node<rank>.csv holds: results, which no launch may overwrite without continuing them."""
    path = out_dir / f"node{rank}.csv"
    return sorted({int(r["epoch"]) for r in _rows(path)[0]}) if path.is_file() else []


class CSVLogger:
    """node<rank>.csv. On resume, rows after the resumed epoch are dropped so each epoch appears once."""

    def __init__(self, path: Path, resume_epoch: int | None, fields: list[str] = COLUMNS):
        self.path, self.fields = path, fields
        rows = []
        if resume_epoch is not None and path.exists():
            rows, bad = _rows(path)
            rows = [r for r in rows if int(r["epoch"]) <= resume_epoch]
            if bad:
                log.warning("%s: %d damaged row(s) left out", path, bad)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def log(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:  # reopened per row: nothing is lost on a crash
            csv.DictWriter(f, self.fields).writerow({k: row.get(k, "") for k in self.fields})

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Scalars of one node at tb/node<rank>/, plus the network-wide ones at tb/global/ from rank 0."""

    def __init__(self, tb_dir: Path, rank: int, resume_epoch: int | None):
        purge = None if resume_epoch is None else resume_epoch + 1  # drop points after the resumed epoch
        self.node = SummaryWriter(str(tb_dir / f"node{rank}"), purge_step=purge)
        self.net = SummaryWriter(str(tb_dir / "global"), purge_step=purge) if rank == 0 else None

    def log(self, row: dict[str, float]) -> None:
        epoch = int(row["epoch"])
        for key, tag in NODE_TAGS.items():
            if row.get(key) is not None:
                self.node.add_scalar(tag, row[key], epoch)
        for key, tag in GLOBAL_TAGS.items():
            if self.net is not None and row.get(key) is not None:
                self.net.add_scalar(tag, row[key], epoch)
        self.node.flush()

    def close(self) -> None:
        self.node.close()
        if self.net is not None:
            self.net.close()


class Metrics:
    """Sends each epoch's row to every enabled backend."""

    def __init__(self, out_dir: Path, rank: int, cfg: LogConfig, resume_epoch: int | None = None,
                 task: str = "classification"):
        self.task = task
        self.backends: list[CSVLogger | TensorBoardLogger] = []
        if cfg.csv:
            self.backends.append(CSVLogger(out_dir / f"node{rank}.csv", resume_epoch, columns(task)))
        if cfg.tensorboard:
            self.backends.append(TensorBoardLogger(out_dir / "tb", rank, resume_epoch))

    def log(self, row: dict[str, float]) -> None:
        row = task_row(row, self.task)
        for backend in self.backends:
            backend.log(row)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
