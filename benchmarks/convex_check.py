"""The convex check through the real trainer: every rule on configs/convex_digits.toml (full batch,
non-IID logistic regression, momentum 0.9), its final training loss against allreduce's.

    python benchmarks/convex_check.py          # 4 torchrun processes per rule
    python benchmarks/convex_check.py --sim    # the same nodes simulated in one process

The objective is the one allreduce minimises, F(w) = (1/n) Σ_i f_i(w) with f_i(w) = mean CE over
node i's shard + (l2_lambda/2)||w||². It is evaluated here, after each run, from the final
checkpoints: at the averaged model w̄ and at the worst node's own w_i. (The CSV's train_loss,
f_i(w_i) on the node's own shard, would flatter a biased rule: a node that fits its own classes
has a low f_i(w_i) and a high F(w_i).)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from p2p.config import load_config  # noqa: E402
from p2p.data import load_splits, partition  # noqa: E402
from p2p.models import build_model  # noqa: E402

from compare_algorithms import final_rows  # noqa: E402  (benchmarks/ is on the path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["allreduce", "dsgd", "pdmm", "admm", "pdmm_isvr", "admm_isvr", "cadmm"]


@torch.no_grad()
def objective(out: Path) -> tuple[float, float]:
    """(F(w̄), max_i F(w_i)) from the run's final checkpoints and its own config."""
    cfg = load_config(["--config", str(out / "config.toml")])
    splits = load_splits(cfg.data)
    shards = partition(splits.train_labels, len(final_rows(out)), cfg.data)
    data = [(torch.stack([splits.train[int(k)][0] for k in s]), torch.as_tensor(splits.train_labels[s])) for s in shards]
    model = build_model(cfg.model, splits.in_shape, splits.num_classes)
    states = [torch.load(max(out.glob(f"ckpt/node{i}_epoch*.pt"), key=lambda p: int(p.stem.split("epoch")[1])),
                         weights_only=True)["model"] for i in range(len(shards))]

    def F_at(state: dict) -> float:
        model.load_state_dict(state)
        l2 = sum(p.pow(2).sum() for p in model.parameters()).item() * cfg.algorithm.l2_lambda / 2
        return sum(F.cross_entropy(model(x), y).item() + l2 for x, y in data) / len(data)

    w_bar = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    return F_at(w_bar), max(F_at(s) for s in states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "convex")
    parser.add_argument("--sim", action="store_true", help="simulate the 4 nodes in one process (--sim.nodes 4)")
    parser.add_argument("extra", nargs="*", help="config overrides passed to every run, after --")
    args = parser.parse_args()
    print("| algorithm | F(w̄) | F(w̄) / allreduce's | max_i F(w_i) / allreduce's | consensus dist | averaged-model test acc |")
    print("|---|---|---|---|---|---|")
    reference = None
    for algorithm in args.algorithms:
        out = args.out / algorithm
        shutil.rmtree(out, ignore_errors=True)
        launcher = (["train.py", "--sim.nodes", "4"] if args.sim else
                    ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", "train.py"])
        cmd = [sys.executable, *launcher, "--config", "configs/convex_digits.toml", "--algorithm.name", algorithm,
               "--run.dir", str(out), *args.extra]
        done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"{algorithm} failed:\n{done.stderr[-3000:]}")
        rows = final_rows(out)
        loss, worst = objective(out)
        reference = loss if algorithm == "allreduce" else reference
        ratios = f"{loss / reference:.5f} | {worst / reference:.5f}" if reference else "- | -"
        print(f"| {algorithm} | {loss:.5f} | {ratios} | {float(rows[0]['consensus_dist']):.2e} "
              f"| {float(rows[0]['avg_test_acc']):.3f} |", flush=True)


if __name__ == "__main__":
    main()
