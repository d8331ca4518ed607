"""What `async` saves when every node jitters: wall time and accuracy of async / sync, in one run.

    python benchmarks/async_stragglers.py            # 4 nodes on a ring, the quickstart's CNN and data

First a short sync run without delays measures the mean step time; then the same training runs in
`sync` and in `async` (max_staleness 2) with `train.step_delay` equal to it on every node: an
exponential per-step delay, as real clusters jitter. In sync every exchange waits for the slowest
neighbour of that step; in async a node waits only when it is max_staleness rounds ahead. Both
evaluate only after the last epoch, so the wall times are training. Prints the ratio and accuracies.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(out: Path, args: list[str], nproc: int) -> list[dict]:
    """One torchrun launch of the quickstart; every node's CSV rows."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "train.py", "--config", "configs/quickstart.toml", "--run.dir", str(out), "--log.progress", "false",
           "--log.plots", "false", *args]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    every = []
    for path in sorted(out.glob("node*.csv")):
        with path.open() as f:
            every.append(list(csv.DictReader(f)))
    return every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples_per_epoch", type=int, default=3200, help="per node: 100 steps of 32")
    parser.add_argument("--out", default="runs/bench_async")
    args = parser.parse_args()
    out = ROOT / args.out
    steps = args.samples_per_epoch // 32
    common = ["--data.samples_per_epoch", str(args.samples_per_epoch), "--train.epochs", str(args.epochs),
              "--train.eval_every", str(args.epochs + 1)]

    rows = run(out / "measure", [*common[:2], "--train.epochs", "1"], args.nproc)
    step_s = sum(float(r[-1]["compute_s"]) + float(r[-1]["comm_s"]) for r in rows) / len(rows) / steps
    print(f"mean step time (sync, no delay): {step_s * 1e3:.1f} ms; step_delay = that on every node")

    result = {}
    for mode in ("sync", "async"):
        rows = run(out / mode, [*common, "--comm.mode", mode, "--train.step_delay", f"{step_s:.6f}"], args.nproc)
        wall = max(float(r[-1]["wall_s"]) for r in rows)
        acc = sum(float(r[-1]["test_acc"]) for r in rows) / len(rows)
        wait = sum(float(row["wait_s"]) for r in rows for row in r) / len(rows)
        stale = max(float(row["staleness_max"]) for r in rows for row in r)
        result[mode] = wall, acc
        avg = float(rows[0][-1]["avg_test_acc"])
        print(f"{mode:5s}: wall {wall:.1f} s, node test acc mean {acc:.4f}, avg model {avg:.4f}, "
              f"exchange wait {wait:.1f} s per node, max staleness {stale:.0f}", flush=True)
    print(f"async / sync wall time {result['async'][0] / result['sync'][0]:.2f}, "
          f"accuracy difference {100 * (result['async'][1] - result['sync'][1]):+.1f} points")


if __name__ == "__main__":
    main()
