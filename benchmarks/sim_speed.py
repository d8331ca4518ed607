"""The simulator (`--sim.nodes`): its speed against torchrun, its scaling, and a result that needs many nodes.

    python benchmarks/sim_speed.py compare    # compare_digits (8 nodes, CNN, 40 epochs): torchrun vs --sim.nodes 8
    python benchmarks/sim_speed.py scaling    # 8, 64, 256 simulated digits-CNN nodes on a torus: steps/s, memory, phases
    python benchmarks/sim_speed.py ring       # dsgd vs pdmm vs gossip on a ring as n grows 8 -> 64, non-IID digits

Every run is its own process (peak memory is per process); the ratios and tables are printed as Markdown.
Run nothing else meanwhile: the timings share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from compare_algorithms import final_rows  # benchmarks/ is on the path when run as a script

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--log.progress", "false", "--log.plots", "false"]


def _wall(cmd: list[str], env: dict) -> float:
    shutil.rmtree(cmd[cmd.index("--run.dir") + 1], ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def compare(out: Path, algorithm: str) -> None:
    """Wall time of one row of docs/algorithms.md's comparison, launch included: 8 torchrun processes vs one simulation."""
    args = ["--config", "configs/compare_digits.toml", "--algorithm.name", algorithm, *QUIET]
    real = _wall([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", "train.py",
                  *args, "--run.dir", str(out / "real")], {**os.environ, "OMP_NUM_THREADS": "1"})
    simulated = _wall([sys.executable, "train.py", *args, "--sim.nodes", "8", "--run.dir", str(out / "sim")],
                      dict(os.environ))
    accs = {name: sum(float(r["test_acc"]) for r in final_rows(out / name)) / 8 for name in ("real", "sim")}
    print("| run | wall s (launch included) | node test acc mean |\n|---|---|---|")
    print(f"| torchrun, 8 processes | {real:.1f} | {accs['real']:.4f} |")
    print(f"| --sim.nodes 8, one process | {simulated:.1f} | {accs['sim']:.4f} |")
    print(f"\nsimulated / torchrun wall time: {simulated / real:.3f}")


def _one(args: list[str]) -> dict:
    """One simulated run in a fresh process; sim.run's seconds per phase and peak memory."""
    shutil.rmtree(args[args.index("--run.dir") + 1], ignore_errors=True)
    code = ("import json, sys; from p2p import sim; from p2p.config import load_config; "
            "print(json.dumps(sim.run(load_config(sys.argv[1:]))))")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"simulation {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling(out: Path, sizes: list[int], topology: str, batch: int) -> None:
    """Digits CNN, dsgd, `batch` samples per step per node, 10 steps per epoch whatever n, 3 epochs, one evaluation.
    (256 nodes hold 5 digits each: batch 4 is the largest that every n allows.)"""
    print(f"batch {batch} per node, {topology}")
    print("| nodes | steps/s | node-steps/s | peak RSS MB | data | compute (fwd+bwd) | rules | exchange | eval (1x) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        s = _one(["--model.name", "cnn", "--data.batch_size", str(batch), "--data.samples_per_epoch", str(10 * batch),
                  "--topology.name", topology, "--algorithm.name", "dsgd", "--train.epochs", "3",
                  "--train.eval_every", "3", "--train.checkpoint_every", "0", "--sim.nodes", str(n),
                  "--run.dir", str(out / f"scaling{n}"), *QUIET])
        train = s["data"] + s["compute"] + s["rules"] + s["exchange"]
        share = {k: f"{s[k]:.2f}s ({100 * s[k] / train:.0f}%)" for k in ("data", "compute", "rules", "exchange")}
        print(f"| {n} | {s['steps'] / train:.1f} | {n * s['steps'] / train:.0f} | {s['peak_rss_mb']:.0f} | "
              f"{share['data']} | {share['compute']} | {share['rules']} | {share['exchange']} | {s['eval']:.2f}s |",
              flush=True)


def ring(out: Path, sizes: list[int], algorithms: list[str], epochs: int) -> None:
    """compare_digits' CNN and momentum on a ring of n, 2 classes per node, 10 steps of 8 samples per epoch for
    every n (64 nodes hold 15 to 25 digits each)."""
    from p2p.topology import generate

    print("| nodes | ring spectral gap | " + " | ".join(f"{a} acc (avg model) | {a} consensus" for a in algorithms) + " |")
    print("|---|---|" + "---|---|" * len(algorithms))
    for n in sizes:
        ring_n = generate("ring", n)
        cells = [f"{n}", f"{ring_n.spectral_gap(ring_n.mixing_matrix('metropolis')):.4f}"]
        for algorithm in algorithms:
            run_dir = out / f"ring{n}_{algorithm}"
            _one(["--config", "configs/compare_digits.toml", "--topology.name", "ring", "--algorithm.name", algorithm,
                  "--data.classes_per_node", "2", "--data.batch_size", "8", "--data.samples_per_epoch", "80",
                  "--train.epochs", str(epochs),
                  "--train.eval_every", str(epochs), "--sim.nodes", str(n), "--run.dir", str(run_dir), *QUIET])
            rows = final_rows(run_dir)
            mean = sum(float(r["test_acc"]) for r in rows) / n
            cells += [f"{mean:.3f} ({float(rows[0]['avg_test_acc']):.3f})", f"{float(rows[0]['consensus_dist']):.2e}"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["compare", "scaling", "ring"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sim_speed")
    parser.add_argument("--algorithm", default="dsgd", help="compare: the row to time")
    parser.add_argument("--sizes", type=int, nargs="+", help="node counts (scaling: 8 64 256; ring: 8 16 32 64)")
    parser.add_argument("--topology", default="torus", help="scaling: the graph")
    parser.add_argument("--batch", type=int, default=4, help="scaling: samples per node and step")
    parser.add_argument("--algorithms", nargs="+", default=["dsgd", "pdmm", "gossip"], help="ring: the rules")
    parser.add_argument("--epochs", type=int, default=40, help="ring: epochs of 10 steps")
    args = parser.parse_args()
    if args.what == "compare":
        compare(args.out, args.algorithm)
    elif args.what == "scaling":
        scaling(args.out, args.sizes or [8, 64, 256], args.topology, args.batch)
    else:
        ring(args.out, args.sizes or [8, 16, 32, 64], args.algorithms, args.epochs)


if __name__ == "__main__":
    main()
