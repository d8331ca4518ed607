"""RelaySGD's Table 2 in miniature: every rule on 16 simulated nodes as the data grow more non-IID.

    python benchmarks/heterogeneity_table.py                         # seed 1, both datasets (~15 min on 1 core)
    python benchmarks/heterogeneity_table.py --seeds 1 2 3           # adds seeds; finished runs are kept
    python benchmarks/heterogeneity_table.py --datasets digits --rules dsgd_ring qgm

Vogels et al. (2021), Table 2: on CIFAR-10 with 16 workers and Dirichlet α ∈ {1, 0.1, 0.01}, ring methods
lose to all-reduce as α falls and collapse at 0.01, while time-varying exponential graphs hold. Here the same
rules (and ours) run with momentum 0.9, one lr per dataset and equal epochs; α → 0 is 1 class per node
(`data.partition classes`): our Dirichlet split leaves 6 of 16 nodes empty at α = 0.01 with 10 classes.
At α = 0.1 the rules that allow it also run with 1 % and 10 % of messages lost (`sim.drop_prob`).

Each run is `python train.py --sim.nodes 16 ...`, called in this process (one at a time) so imports and the
dataset load are paid once; every finished run is a row of <out>/results.csv, and the Markdown table
(<out>/table.md) and docs/heterogeneity.png are redrawn from it at the end.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_algorithms import final_rows  # noqa: E402
from p2p import sim  # noqa: E402
from p2p.config import DROP_REFUSED, load_config  # noqa: E402
from p2p.data import load_splits  # noqa: E402

# rule row -> its flags (ring unless stated)
RULES: dict[str, list[str]] = {
    "allreduce": ["--algorithm.name", "allreduce"],
    "dsgd_ring": ["--algorithm.name", "dsgd"],
    "dsgd_expo_tv": ["--algorithm.name", "dsgd", "--topology.name", "exponential_schedule"],
    "gossip": ["--algorithm.name", "gossip"],
    "qgm": ["--algorithm.name", "qgm"],
    "gt": ["--algorithm.name", "gt"],
    "ed": ["--algorithm.name", "ed"],
    "pdmm": ["--algorithm.name", "pdmm"],
    "admm": ["--algorithm.name", "admm"],
    "pdmm_isvr": ["--algorithm.name", "pdmm_isvr"],
    "admm_isvr": ["--algorithm.name", "admm_isvr"],
    "choco_qsgd8": ["--algorithm.name", "choco", "--algorithm.compressor", "qsgd8"],
}
ALPHAS = ["1", "0.1", "0"]  # "0": 1 class per node, the α → 0 limit
DROPS = ["0.01", "0.1"]  # at α = 0.1
COMMON = ["--sim.nodes", "16", "--topology.name", "ring", "--algorithm.momentum", "0.9", "--data.val_fraction", "0",
          "--train.checkpoint_every", "0", "--log.progress", "false", "--log.plots", "false", "--log.level", "warning"]
# same lr for every rule of a dataset; epochs equal for all rules
DATASETS: dict[str, list[str]] = {
    "fashionmnist": ["--data.name", "fashionmnist", "--model.name", "mlp", "--data.batch_size", "32",
                     "--data.samples_per_epoch", "320", "--algorithm.lr", "0.03", "--train.epochs", "20"],
    "digits": ["--data.name", "digits", "--model.name", "cnn", "--data.batch_size", "8",
               "--algorithm.lr", "0.03", "--train.epochs", "40"],
}
FIELDS = ["dataset", "rule", "alpha", "drop", "seed", "node_acc", "node_min", "avg_acc", "mb_sent", "exchanges",
          "run_s"]

_splits: dict = {}


def cached_splits(cfg):
    """load_splits once per dataset: the splits are read-only, and Fashion-MNIST takes seconds to convert."""
    key = (cfg.name, cfg.val_fraction, cfg.data_seed)
    if key not in _splits:
        _splits[key] = load_splits(cfg)
    return _splits[key]


def flags(dataset: str, rule: str, alpha: str, drop: str, seed: int, out: Path) -> list[str]:
    part = (["--data.partition", "classes", "--data.classes_per_node", "1"] if alpha == "0" else
            ["--data.partition", "dirichlet", "--data.alpha", alpha])
    return [*COMMON, *DATASETS[dataset], *RULES[rule], *part, "--sim.drop_prob", drop, "--run.seed", str(seed),
            "--run.dir", str(out)]


def run_one(dataset: str, rule: str, alpha: str, drop: str, seed: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    sim.run(load_config(flags(dataset, rule, alpha, drop, seed, out)))
    last = final_rows(out)
    accs = [float(r["test_acc"]) for r in last]
    exchanges = 0
    for path in out.glob("node*.csv"):  # letters delivered over the run (the column is per epoch)
        with path.open() as f:
            exchanges += sum(int(r["exchanges"]) for r in csv.DictReader(f))
    return {"dataset": dataset, "rule": rule, "alpha": alpha, "drop": drop, "seed": seed,
            "node_acc": sum(accs) / len(accs), "node_min": min(accs), "avg_acc": float(last[0]["avg_test_acc"]),
            "mb_sent": sum(float(r["bytes_sent"]) for r in last) / len(last) / 1e6, "exchanges": exchanges,
            "run_s": round(time.perf_counter() - start, 1)}


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def append(path: Path, fields: list[str], row: dict) -> None:
    """One finished run's row at the end of a results CSV (its header first in a new file): nothing is lost if
    a later run fails, and a rerun skips what is there."""
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerow(row)


def pm(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def table(rows: list[dict], dataset: str) -> str:
    """One Markdown table: per rule, node-mean and averaged-model test acc per α, MB sent, the drop columns."""
    def pick(rule: str, alpha: str, drop: str, key: str) -> list[float]:
        return [float(r[key]) for r in rows if (r["dataset"], r["rule"], r["alpha"], r["drop"]) ==
                (dataset, rule, alpha, drop)]

    name = {"1": "α = 1", "0.1": "α = 0.1", "0": "α → 0 (1 class)"}
    head = ["rule", *(f"{name[a]} node acc" for a in ALPHAS), *(f"{name[a]} avg-model" for a in ALPHAS),
            "MB sent / node", *(f"α = 0.1, {float(d):.0%} dropped" for d in DROPS), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in RULES:
        seeds = len(pick(rule, "0.1", "0", "seed"))
        if not seeds:
            continue
        algo = RULES[rule][1]
        drops = [pm(pick(rule, "0.1", d, "node_acc")) if algo not in DROP_REFUSED else "refused" for d in DROPS]
        mb = pick(rule, "0.1", "0", "mb_sent")
        cells = [rule, *(pm(pick(rule, a, "0", "node_acc")) for a in ALPHAS),
                 *(pm(pick(rule, a, "0", "avg_acc")) for a in ALPHAS), f"{mb[0]:.1f}", *drops, str(seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for i, rule in enumerate(RULES):
            xs, ys, es = [], [], []
            for x, alpha in enumerate(ALPHAS):
                accs = [float(r["node_acc"]) for r in rows if (r["dataset"], r["rule"], r["alpha"], r["drop"]) ==
                        (dataset, rule, alpha, "0")]
                if accs:
                    xs.append(x)
                    ys.append(statistics.mean(accs))
                    es.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="os^D"[i % 4], capsize=3, label=rule, color=plt.cm.tab20(i),
                            linestyle="--" if rule in ("allreduce", "dsgd_expo_tv") else "-")
        ax.set_xticks(range(len(ALPHAS)), ["α = 1", "α = 0.1", "α → 0\n(1 class/node)"])
        ax.set_title(f"{dataset}, 16 nodes: node-mean test accuracy")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "heterogeneity")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "heterogeneity.png")
    parser.add_argument("--deadline", default="", help="HH:MM: start no run after it (the table is partial)")
    args = parser.parse_args()
    sim.load_splits = cached_splits
    results = args.out / "results.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(r["dataset"], r["rule"], r["alpha"], r["drop"], r["seed"]) for r in read(results)}
    todo = [(d, rule, a, "0", s) for s in args.seeds for d in args.datasets for a in ALPHAS for rule in args.rules]
    todo += [(d, rule, "0.1", p, s) for s in args.seeds for d in args.datasets for p in DROPS for rule in args.rules
             if RULES[rule][1] not in DROP_REFUSED]
    start = time.perf_counter()
    for d, rule, a, p, s in todo:
        if (d, rule, a, p, str(s)) in done:
            continue
        if args.deadline and time.strftime("%H:%M") >= args.deadline:
            print(f"deadline {args.deadline}: stopping", flush=True)
            break
        row = run_one(d, rule, a, p, s, args.out / f"{d}_{rule}_a{a}_p{p}_s{s}")
        append(results, FIELDS, row)
        print(f"{d} {rule} alpha={a} drop={p} seed={s}: node {row['node_acc']:.3f} avg {row['avg_acc']:.3f} "
              f"{row['mb_sent']:.1f} MB {row['run_s']}s", flush=True)
    rows = read(results)
    md = "\n\n".join(f"**{d}**\n\n{table(rows, d)}" for d in DATASETS if any(r["dataset"] == d for r in rows))
    (args.out / "table.md").write_text(md + "\n")
    print(md)
    figure(rows, args.figure)
    print(f"wall {time.perf_counter() - start:.0f} s for the runs of this call; figure {args.figure}")


if __name__ == "__main__":
    main()
