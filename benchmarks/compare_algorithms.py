"""Run every algorithm on the same non-IID problem and print the comparison table of docs/algorithms.md.

    python benchmarks/compare_algorithms.py                      # 9 algorithms x 2 partitions
    python benchmarks/compare_algorithms.py --algorithms dsgd pdmm --partitions dirichlet
    python benchmarks/compare_algorithms.py --partitions classes --out runs/compare_b0 -- \
        --algorithm.momentum 0 --algorithm.lr 0.3                 # the β = 0 table
    python benchmarks/compare_algorithms.py --config configs/quickstart.toml --nproc 4 --partitions dirichlet
    python benchmarks/compare_algorithms.py --sim                # every row simulated in one process

Each row is one torchrun launch of configs/compare_digits.toml (or --config), or with --sim one simulated run
(`python train.py --sim.nodes`, the same numbers in a fraction of the time); results are read from the run's CSVs.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["local", "allreduce", "dsgd", "gossip", "pdmm", "admm", "pdmm_isvr", "admm_isvr", "cadmm"]


def run(config: str, algorithm: str, partition: str, nproc: int, out: Path, extra: list[str],
        simulate: bool) -> tuple[float, str | None]:
    """(launch seconds, None), or (seconds, the run's last error line) when it failed."""
    launcher = (["train.py", "--sim.nodes", str(nproc)] if simulate else
                ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "train.py"])
    cmd = [sys.executable, *launcher, "--config", config, "--algorithm.name", algorithm,
           "--data.partition", partition, "--run.dir", str(out), *extra]
    start = time.perf_counter()
    env = os.environ if simulate else {**os.environ, "OMP_NUM_THREADS": "1"}  # one process may use every core
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a row that says why, and the table goes on
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return time.perf_counter() - start, (lines[-1] if lines else f"exit status {done.returncode}")[:300]
    return time.perf_counter() - start, None


def final_rows(out: Path) -> list[dict]:
    """Every node's last CSV row of the run in `out` (node0 first); the other benchmarks use it too."""
    rows = []
    for path in sorted(out.glob("node*.csv")):
        with path.open() as f:
            rows.append(list(csv.DictReader(f))[-1])
    return rows


def summarize(out: Path) -> dict[str, float]:
    last = final_rows(out)
    accs = [float(r["test_acc"]) for r in last]
    return {"mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs),
            "avg_model": float(last[0]["avg_test_acc"]), "consensus": float(last[0]["consensus_dist"]),
            "mb_sent": sum(float(r["bytes_sent"]) for r in last) / len(last) / 1e6,
            "train_s": max(float(r["wall_s"]) for r in last),
            "K": tomllib.loads((out / "config.toml").read_text())["algorithm"]["interval"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/compare_digits.toml")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--partitions", nargs="+", default=["classes", "dirichlet"])
    parser.add_argument("--nproc", type=int, default=8, help="nodes")
    parser.add_argument("--sim", action="store_true", help="simulate the nodes in one process (--sim.nodes)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "compare")
    parser.add_argument("extra", nargs="*", help="config overrides passed to every run, after --")
    args = parser.parse_args()
    print("| partition | algorithm | K | node test acc mean [min, max] | averaged-model acc | consensus dist "
          "| MB sent / node | train s | launch s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for partition in args.partitions:
        for algorithm in args.algorithms:
            out = args.out / f"{algorithm}_{partition}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run per row
            launch_s, error = run(args.config, algorithm, partition, args.nproc, out, args.extra, args.sim)
            if error:
                print(f"| {partition} | {algorithm} | - | failed: {error.replace('|', '/')} | | | | | {launch_s:.0f} |",
                      flush=True)
                continue
            s = summarize(out)
            print(f"| {partition} | {algorithm} | {s['K']} | {s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}] | "
                  f"{s['avg_model']:.3f} | {s['consensus']:.2e} | {s['mb_sent']:.1f} | {s['train_s']:.0f} "
                  f"| {launch_s:.0f} |", flush=True)


if __name__ == "__main__":
    main()
