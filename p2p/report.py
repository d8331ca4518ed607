"""One table (and overlaid curves) for several runs, read from their run directories.

    python -m p2p.report runs/sweep                 # every run below runs/sweep
    python -m p2p.report runs/a runs/b --out runs/ --name ab

A run directory is what train.py writes, under torchrun or --sim.nodes alike: config.toml and
node<k>.csv (plus, where another step computed them after training, network.csv with epoch,
consensus_dist, avg_test_loss, avg_test_acc). Writes <out>/<name>.csv, .md and .png.

Unfinished runs are reported at the last epoch every node logged ("3/10"). A column left empty in
some epochs (eval_every > 1, async runs that only evaluate the network at the end) is taken from the
newest epoch that has it; network.csv's values win over the nodes' own.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tomllib
from pathlib import Path

from p2p.metrics import acc_column

# (CSV column, Markdown heading); the CSV keeps full precision, the Markdown table is for reading
COLUMNS = [
    ("run", "run"), ("algorithm", "algorithm"), ("topology", "topology"), ("mode", "mode"), ("nodes", "nodes"),
    ("epochs", "epochs"), ("test_acc_mean", "node test acc mean"), ("test_acc_min", "min"),
    ("test_acc_max", "max"), ("avg_test_acc", "averaged-model acc"), ("avg_test_bpc", "averaged-model bpc"),
    ("consensus_dist", "consensus dist"),
    ("mb_sent", "MB sent / node"), ("wall_s", "wall s"),
]
# network-wide columns, the same on every node (a language model's too: token accuracy, bits per character)
NETWORK = ("consensus_dist", "avg_test_loss", "avg_test_acc", "avg_test_token_acc", "avg_test_bpc")


class ReportError(Exception):
    """A path that holds no readable run: one line, exit 2."""


def is_run(path: Path) -> bool:
    return (path / "config.toml").is_file() and any(path.glob("node*.csv"))


def find_runs(paths: list[Path]) -> list[Path]:
    """The run directories named, or found at any depth below the directories named (sorted, each once)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path} {'is not a directory' if path.exists() else 'does not exist'}")
        if is_run(path):
            found.append(path.resolve())
            continue
        below = []
        for root, dirs, _ in os.walk(path):
            dirs.sort()
            if is_run(Path(root)):
                below.append(Path(root).resolve())
                dirs.clear()  # ckpt/ and tb/ hold no runs
        if not below:
            raise ReportError(f"{path} holds no run (no directory with config.toml and node*.csv below it)")
        found += below
    return sorted(set(found), key=found.index)


def _read(path: Path) -> list[dict[str, float | None]]:
    """A CSV as floats, None for empty cells."""
    with path.open(newline="") as f:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items() if k}
                for row in csv.DictReader(f)]


def _newest(rows: list[dict], key: str) -> tuple[float | None, int | None]:
    """The newest non-empty value of `key` and its epoch."""
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key], int(row["epoch"])
    return None, None


def load_run(run_dir: Path) -> dict:
    """The run's config and its rows: {"cfg", "nodes": [rows of node k], "network": rows up to the common epoch}.

    Only epochs every node logged are kept, so a run interrupted mid-epoch compares like with like.
    """
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    paths = sorted(run_dir.glob("node*.csv"), key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else -1)
    nodes = [_read(p) for p in paths if p.stem[4:].isdigit()]
    done = min((int(rows[-1]["epoch"]) if rows else 0) for rows in nodes) if nodes else 0
    nodes = [[r for r in rows if r["epoch"] is not None and r["epoch"] <= done] for rows in nodes]
    # the network's columns per epoch: node 0's (every node logs the same), then network.csv's over them
    network = {int(r["epoch"]): {k: r.get(k) for k in NETWORK} for r in (nodes[0] if nodes else [])}
    if (run_dir / "network.csv").is_file():
        for r in _read(run_dir / "network.csv"):
            if r.get("epoch") is not None and r["epoch"] <= done:
                old = network.setdefault(int(r["epoch"]), {})
                old.update({k: r[k] for k in NETWORK if r.get(k) is not None})
    net_rows = [{"epoch": e, **network[e]} for e in sorted(network)]
    return {"cfg": cfg, "nodes": nodes, "network": net_rows, "done": done}


def _acc(nodes: list[list[dict]]) -> str:
    """The accuracy column of a run's CSVs: test_acc, or test_token_acc for a language model."""
    return acc_column({key for rows in nodes for row in rows[:1] for key in row})


def summarize(run_dir: Path, name: str) -> dict:
    """One table row: the last common epoch's numbers (the newest non-empty value of each column)."""
    run = load_run(run_dir)
    cfg, nodes = run["cfg"], run["nodes"]
    topo = cfg.get("topology", {})
    planned = cfg.get("train", {}).get("epochs")
    acc = _acc(nodes)  # test_acc, or a language model's test_token_acc (reported in the same columns)
    newest_acc = [a for a in (_newest(rows, acc) for rows in nodes) if a[0] is not None]
    accs = [v for v, _ in newest_acc]
    sent = [v for v in (_newest(rows, "bytes_sent")[0] for rows in nodes) if v is not None]
    wall = [v for v in (_newest(rows, "wall_s")[0] for rows in nodes) if v is not None]
    avg_acc, avg_epoch = _newest(run["network"], f"avg_{acc}")
    consensus, consensus_epoch = _newest(run["network"], "consensus_dist")
    return {
        "run": name, "algorithm": cfg.get("algorithm", {}).get("name", "?"),
        "topology": Path(topo["path"]).stem if topo.get("path") else topo.get("name", "?"),
        "mode": cfg.get("comm", {}).get("mode", "?"), "nodes": len(nodes),
        "simulated": bool(cfg.get("sim", {}).get("nodes")), "epochs_done": run["done"], "epochs_planned": planned,
        "test_acc_mean": sum(accs) / len(accs) if accs else None, "test_acc_min": min(accs, default=None),
        "test_acc_max": max(accs, default=None),
        "test_acc_mean_epoch": min((e for _, e in newest_acc), default=None),
        "avg_test_acc": avg_acc, "avg_test_acc_epoch": avg_epoch,
        "avg_test_bpc": _newest(run["network"], "avg_test_bpc")[0],
        "consensus_dist": consensus, "consensus_dist_epoch": consensus_epoch,
        "mb_sent": sum(sent) / len(sent) / 1e6 if sent else None, "wall_s": max(wall, default=None),
    }


def _fmt(row: dict, key: str) -> str:
    """A cell of the Markdown table; a network value older than the last epoch says its epoch."""
    value = row.get(key)
    if key == "epochs":
        done, planned = row["epochs_done"], row["epochs_planned"]
        return f"{done}/{planned}" + ("" if done == planned else " unfinished")
    if key == "nodes":
        return f"{value} sim" if row["simulated"] else str(value)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    formats = {"consensus_dist": ".2e", "mb_sent": ".2f", "wall_s": ".1f"}
    text = format(value, formats.get(key, ".3f"))
    epoch = row.get(f"{key}_epoch")
    return text + (f" (epoch {epoch})" if epoch is not None and epoch != row["epochs_done"] else "")


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)


def _node_mean(nodes: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, mean over nodes of `key`) for the epochs where every node has a value."""
    by_epoch: dict[int, list[float]] = {}
    for rows in nodes:
        for r in rows:
            if r.get(key) is not None:
                by_epoch.setdefault(int(r["epoch"]), []).append(r[key])
    epochs = [e for e in sorted(by_epoch) if len(by_epoch[e]) == len(nodes)]
    return epochs, [sum(by_epoch[e]) / len(nodes) for e in epochs]


def plot(runs: dict[str, Path], path: Path) -> None:
    """Four panels, one colour per run: test acc (averaged model dashed), test loss, consensus, acc vs MB sent."""
    import matplotlib  # only here: the table needs no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    positive = True  # consensus distances all > 0: a log axis; else symlog (one node, or exact consensus)
    for i, (name, run_dir) in enumerate(runs.items()):
        run, color = load_run(run_dir), f"C{i % 10}"
        column = _acc(run["nodes"])
        acc = _node_mean(run["nodes"], column)
        axes[0].plot(*acc, color=color, label=name, lw=1.2)
        net = [(r["epoch"], r) for r in run["network"]]
        avg = [(e, r[f"avg_{column}"]) for e, r in net if r.get(f"avg_{column}") is not None]
        if avg:
            axes[0].plot(*zip(*avg), color=color, ls="--", lw=1)
        axes[1].plot(*_node_mean(run["nodes"], "test_loss"), color=color, lw=1.2)
        cons = [(e, r["consensus_dist"]) for e, r in net if r.get("consensus_dist") is not None]
        positive &= all(c > 0 for _, c in cons)
        if cons:
            axes[2].plot(*zip(*cons), color=color, lw=1.2, marker="." if len(cons) == 1 else None)
        mb = dict(zip(*_node_mean(run["nodes"], "bytes_sent")))
        points = [(mb[e] / 1e6, a) for e, a in zip(*acc) if e in mb]
        if points:
            axes[3].plot(*zip(*points), color=color, lw=1.2, marker=".")
    titles = [("test accuracy (node mean; averaged model dashed)", "epoch"), ("test loss (node mean)", "epoch"),
              ("consensus distance", "epoch"), ("test accuracy (node mean)", "MB sent per node")]
    for ax, (title, xlabel) in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if positive:
        axes[2].set_yscale("log")
    else:
        axes[2].set_yscale("symlog", linthresh=1e-8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(paths: list[Path], out: Path | None = None, name: str = "report",
           plots: bool = True) -> tuple[list[dict], Path]:
    """Find the runs under `paths`, write <out>/<name>.csv, .md (and .png); returns the table's rows and `out`."""
    run_dirs = find_runs(paths)
    # one directory named: the report goes there; several: into their runs' common parent
    base = paths[0].resolve() if len(paths) == 1 else Path(os.path.commonpath(run_dirs))
    out = out or base
    labels = {}
    for p in run_dirs:  # a run is named by its path below `base` (a single run by its own name)
        rel = p.relative_to(base)
        labels[str(rel) if str(rel) != "." else p.name] = p
    rows = []
    for label, run_dir in labels.items():
        try:
            rows.append(summarize(run_dir, label))
        except (OSError, ValueError, KeyError, TypeError, tomllib.TOMLDecodeError) as e:
            print(f"warning: skipping {run_dir}: unreadable run ({type(e).__name__}: {e})", file=sys.stderr)
            labels[label] = None
    if not rows:
        raise ReportError(f"no readable run in {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / f"{name}.csv")
    (out / f"{name}.md").write_text(markdown(rows))
    if plots:
        plot({k: v for k, v in labels.items() if v is not None}, out / f"{name}.png")
    return rows, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2p.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, or directories holding runs")
    parser.add_argument("--out", type=Path, help="where to write the report (default: the runs' common parent)")
    parser.add_argument("--name", default="report", help="file name stem of the outputs")
    parser.add_argument("--no-plots", action="store_true", help="write only the table")
    args = parser.parse_args(argv)
    try:
        rows, out = report(args.paths, args.out, args.name, not args.no_plots)
    except ReportError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    print(markdown(rows), end="")
    print(f"wrote {out / args.name}.csv, .md" + ("" if args.no_plots else ", .png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
