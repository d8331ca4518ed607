"""Learning curves of every node of a run, from its CSVs, into <dir>/curves.png."""

from __future__ import annotations

import csv
from pathlib import Path

PANELS = [("train_loss", "train loss"), ("test_loss", "test loss"), ("test_acc", "test accuracy"),
          ("consensus_dist", "consensus distance")]
# a language model's: bits per character, and the averaged model's bits dashed in the third panel
LM_PANELS = [("train_bpc", "train bits per character"), ("test_token_acc", "test token accuracy"),
             ("test_bpc", "test bits per character"), ("consensus_dist", "consensus distance")]


def _read(path: Path) -> dict[str, list[float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: [float(r[key]) if r[key] not in ("", None) else float("nan") for r in rows] for key in rows[0]}


def plot_run(run_dir: Path) -> Path:
    """One panel per metric, one line per node; the averaged model dashed (accuracy, or a language model's bits)."""
    import matplotlib  # here: 0.35 s per process that most ranks never spend

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    nodes = sorted(run_dir.glob("node*.csv"), key=lambda p: int(p.stem[4:]))
    first = _read(nodes[0]) if nodes else {}
    panels, averaged = (LM_PANELS, "avg_test_bpc") if "test_bpc" in first else (PANELS, "avg_test_acc")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for path in nodes:
        data = _read(path)
        if not data:
            continue
        for ax, (key, _) in zip(axes, panels):
            if key != "consensus_dist":
                ax.plot(data["epoch"], data[key], label=path.stem if len(nodes) <= 16 else None, lw=1)
    if nodes and (data := first):
        axes[2].plot(data["epoch"], data[averaged], "k--", label="averaged model", lw=1.5)
        axes[3].plot(data["epoch"], data["consensus_dist"], "k-", lw=1.5)
        axes[3].set_yscale("symlog", linthresh=1e-8)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
