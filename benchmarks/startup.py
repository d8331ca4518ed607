"""Where a launch's seconds go before the first step, and what the digits cache saves, in one run.

    python benchmarks/startup.py              # quickstart (4 torchrun nodes) and compare_digits (8 nodes, pdmm)

Each train.py process logs `start-up (s): imports | data | model | join | run dir | first step` (rank 0's line
is read here). "cold" runs with an empty --data.root, so every process imports scikit-learn to build the
digits split, as every run did before the cache; "warm" reads <root>/digits.pt. Cold and warm alternate,
`--repeat` times each, and medians are printed, so that load on a shared machine hits both alike.
Then compare_digits with pdmm: torchrun (8 processes) against --sim.nodes 8, launch included, warm.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
QUIET = ["--log.progress", "false", "--log.plots", "false", "--log.tensorboard", "false"]


def launch(cmd: list[str], run_dir: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of `cmd` and the phases of its start-up line (empty for a simulated run)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([*cmd, "--run.dir", str(run_dir)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    line = next((ln for ln in done.stderr.splitlines() if "start-up (s):" in ln), "")
    phases = {k.strip(): float(v) for k, v in re.findall(r"([a-z ]+?) (\d+\.\d+)(?: \||$| after)", line.split("(s): ")[-1])}
    return wall, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="runs/bench_startup")
    args = parser.parse_args()
    out = ROOT / args.out
    quick = [*TORCHRUN, "--nproc_per_node", "4", "train.py", "--config", "configs/quickstart.toml", *QUIET]
    warm_root = out / "data"
    launch([*quick, "--train.epochs", "1", "--data.root", str(warm_root)], out / "prime")  # writes the cache

    results: dict[str, list[tuple[float, dict]]] = {"cold": [], "warm": []}
    for _ in range(args.repeat):
        for kind in results:
            root = Path(tempfile.mkdtemp()) if kind == "cold" else warm_root
            results[kind].append(launch([*quick, "--train.epochs", "1", "--data.root", str(root)], out / kind))
            if kind == "cold":
                shutil.rmtree(root)
    print("quickstart, 4 torchrun processes, 1 epoch; rank 0's start-up, medians of", args.repeat)
    names = list(results["warm"][0][1])
    print("| digits | " + " | ".join(names) + " | torchrun wall, 1 epoch |")
    print("|---" * (len(names) + 2) + "|")
    for kind, runs in results.items():
        cells = [statistics.median(p.get(n, 0.0) for _, p in runs) for n in names]
        print(f"| {kind} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {statistics.median(w for w, _ in runs):.1f} |")

    full, _ = launch([*quick, "--data.root", str(warm_root)], out / "full")
    print(f"quickstart as in the README (20 epochs, torchrun, 4 nodes, warm): {full:.1f} s")

    compare = ["train.py", "--config", "configs/compare_digits.toml", "--algorithm.name", "pdmm", *QUIET,
               "--data.root", str(warm_root)]
    real, _ = launch([*TORCHRUN, "--nproc_per_node", "8", *compare], out / "real")
    sim, _ = launch([sys.executable, *compare, "--sim.nodes", "8"], out / "sim")
    print(f"compare_digits, pdmm, 8 nodes, 40 epochs, launch included: torchrun {real:.1f} s, simulated {sim:.1f} s, "
          f"ratio {sim / real:.2f}")


if __name__ == "__main__":
    main()
