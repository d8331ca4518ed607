"""What `async` saves over `sync` when nodes are slow: wall time, staleness and accuracy, in one run.

    python benchmarks/async_stragglers.py            # 4 nodes on a ring, the quickstart's CNN and data

First a short sync run without delays measures the mean step time t. Then the same training runs in
`sync` and in `async` (max_staleness 2, and 4) in two scenarios:
- jitter: every node sleeps an exponential delay of mean t per step (`train.step_delay`), as real
  clusters jitter; in sync every exchange waits for the slowest neighbour of that step, in async a node
  waits only when it is max_staleness rounds ahead of a neighbour;
- straggler: node 0 sleeps t every step (`--train.step_delay_dist constant --train.slow_ranks 0`): it is
  permanently 2x slower. Bounded staleness cannot hide that (no node may get more than S rounds ahead of
  a neighbour), so async can only save what sync loses to the others' waits.
The floor is the busiest node's own work, its compute plus its own delays: no mode can end sooner.
Evaluation runs only after the last epoch (async meets nobody before it; sync skips its per-epoch
evaluation too), so wall times are training. Prints a Markdown table: job wall (the slowest node's),
the mean of the other nodes' walls, staleness, node-mean and averaged-model test accuracy.
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


def run(out: Path, args: list[str], nproc: int) -> list[list[dict]]:
    """One torchrun launch of the quickstart; every node's CSV rows."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "train.py", "--config", "configs/quickstart.toml", "--run.dir", str(out), "--log.progress", "false",
           "--log.plots", "false", "--log.tensorboard", "false", *args]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    every = []
    for path in sorted(out.glob("node*.csv"), key=lambda p: int(p.stem[4:])):
        with path.open() as f:
            every.append(list(csv.DictReader(f)))
    return every


def summary(rows: list[list[dict]], slow: int | None) -> dict[str, float]:
    walls = [float(r[-1]["wall_s"]) for r in rows]
    others = [w for k, w in enumerate(walls) if k != slow] if slow is not None else walls
    applied = [(float(row["staleness_mean"]), float(row["exchanges"])) for r in rows for row in r]
    own = max(sum(float(row["compute_s"]) + float(row["sleep_s"]) for row in r) for r in rows)
    return {"job": max(walls), "others": sum(others) / len(others), "own": own,
            "stale_mean": sum(m * n for m, n in applied) / max(sum(n for _, n in applied), 1),
            "stale_max": max(float(row["staleness_max"]) for r in rows for row in r),
            "acc": sum(float(r[-1]["test_acc"]) for r in rows) / len(rows), "avg": float(rows[0][-1]["avg_test_acc"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--samples_per_epoch", type=int, default=3200, help="per node: 100 steps of 32")
    parser.add_argument("--algorithm", default="dsgd")
    parser.add_argument("--out", default="runs/bench_async")
    args = parser.parse_args()
    out = ROOT / args.out
    steps = args.samples_per_epoch // 32
    common = ["--data.samples_per_epoch", str(args.samples_per_epoch), "--train.epochs", str(args.epochs),
              "--train.eval_every", str(args.epochs + 1), "--algorithm.name", args.algorithm]

    rows = run(out / "measure", [*common[:2], "--train.epochs", "1"], args.nproc)
    step_s = sum(float(r[-1]["compute_s"]) + float(r[-1]["comm_s"]) for r in rows) / len(rows) / steps
    print(f"mean step time (sync, no delay): {step_s * 1e3:.1f} ms = t; {args.nproc} nodes, ring, {args.algorithm}, "
          f"{args.epochs} epochs of {steps} steps", flush=True)

    scenarios = {"jitter": ([], None),
                 "straggler": (["--train.step_delay_dist", "constant", "--train.slow_ranks", "0"], 0)}
    # async drains (meets its neighbours) at every checkpoint epoch: the last mode checkpoints only at the end
    modes = {"sync": ["--comm.mode", "sync"], "async S=2": ["--comm.mode", "async", "--comm.max_staleness", "2"],
             "async S=4": ["--comm.mode", "async", "--comm.max_staleness", "4"],
             "async S=4, checkpoint at the end": ["--comm.mode", "async", "--comm.max_staleness", "4",
                                                  "--train.checkpoint_every", "0"]}
    print("| scenario | mode | job wall s | other nodes' wall s | / sync (job) | floor / sync | staleness mean / max | "
          "node test acc | avg model acc |\n|---|---|---|---|---|---|---|---|---|")
    for name, (extra, slow) in scenarios.items():
        sync = None
        for mode, flags in modes.items():
            s = summary(run(out / f"{name}_{mode.replace(' ', '')}",
                            [*common, *flags, "--train.step_delay", f"{step_s:.6f}", *extra], args.nproc), slow)
            sync = sync or s
            print(f"| {name} | {mode} | {s['job']:.1f} | {s['others']:.1f} | {s['job'] / sync['job']:.2f} | "
                  f"{s['own'] / sync['job']:.2f} | "
                  f"{s['stale_mean']:.2f} / {s['stale_max']:.0f} | {s['acc']:.4f} | {s['avg']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
