"""The language-model table (issue 22): the rules people compare for decentralized LLM training, on a character
transformer, 8 simulated nodes on a ring, equal tokens per node, the corpus dealt iid and by document.

    python benchmarks/lm_table.py                                  # every row (~35 min: 2 at a time, 1 core each)
    python benchmarks/lm_table.py --rows dsgd_adamw diloco_all_k10 --partitions iid
    python benchmarks/lm_table.py --torchrun                       # adds dsgd under torchrun (8 processes)

The model is charlm's transformer cut to fit this table on 2 CPU cores (2 layers, 64 wide, 0.11 M parameters;
windows of 64 characters, batch 16): every node takes the same 6 epochs of its shard, 306 steps and 313 k
tokens. Adam(W) rules use charlm's AdamW (lr 0.002, β2 0.95); qgm and pdmm, whose update is not a torch
optimizer, SGD with momentum 0.9 at lr 0.05 (a 400-step probe of one model: lr 0.03 and 0.1 within 0.05 bits
of each other, 0.3 stalls, 1.0 diverges). Each run is `train.py --sim.nodes 8 ...` called in this process,
one at a time; every finished run is a row of <out>/results.csv (kept: a rerun skips it), and the Markdown
table (<out>/table.md) is redrawn from it at the end. The torchrun row is the same run as dsgd_adamw iid, in 8
real gloo processes: its numbers should equal the simulator's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_algorithms import final_rows  # noqa: E402
from benchmarks.heterogeneity_table import append, read  # noqa: E402
from p2p import sim  # noqa: E402
from p2p.config import load_config  # noqa: E402

ADAMW = ["--algorithm.optimizer", "adamw", "--algorithm.lr", "0.002", "--algorithm.beta2", "0.95"]
SGD = ["--algorithm.optimizer", "sgd", "--algorithm.lr", "0.05", "--algorithm.momentum", "0.9",
       "--algorithm.weight_decay", "0"]


def diloco(average: str, k: int, *extra: str) -> list[str]:
    return ["--algorithm.name", "diloco", *ADAMW, "--algorithm.outer_average", average, "--algorithm.interval",
            str(k), *extra]


# row -> (its flags, the partitions it runs on)
BOTH, IID = ("iid", "documents"), ("iid",)
ROWS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "allreduce_adamw": (["--algorithm.name", "allreduce", *ADAMW], BOTH),
    "dsgd_adamw": (["--algorithm.name", "dsgd", *ADAMW], BOTH),
    "gossip_adamw": (["--algorithm.name", "gossip", *ADAMW], BOTH),
    "qgm": (["--algorithm.name", "qgm", *SGD], BOTH),
    "pdmm": (["--algorithm.name", "pdmm", *SGD], BOTH),
    "diloco_all_k10": (diloco("all", 10), BOTH),
    "diloco_all_k50": (diloco("all", 50), BOTH),
    "diloco_gossip_k10": (diloco("gossip", 10), BOTH),
    "diloco_gossip_k50": (diloco("gossip", 50), BOTH),
    "diloco_all_k10_overlap": (diloco("all", 10, "--comm.mode", "overlap"), IID),
    "dsgd_adamw_bf16": (["--algorithm.name", "dsgd", *ADAMW, "--train.precision", "bf16"], IID),
    "dsgd_adamw_wire_bf16": (["--algorithm.name", "dsgd", *ADAMW, "--comm.wire_dtype", "bf16"], IID),
}
NODES = 8
COMMON = ["--config", "configs/charlm.toml", "--topology.path", "topologies/ring8.json", "--model.layers", "2", "--model.embed", "64",
          "--data.seq_len", "64", "--data.batch_size", "16", "--train.epochs", "6", "--train.eval_every", "6",
          "--train.checkpoint_every", "0", "--log.progress", "false", "--log.plots", "false",
          "--log.tensorboard", "false", "--log.level", "warning"]
FIELDS = ["row", "partition", "launcher", "seed", "avg_bpc", "avg_token_acc", "node_val_bpc", "mb_sent", "run_s"]


def flags(row: str, partition: str, seed: int, out: Path) -> list[str]:
    return [*COMMON, *ROWS[row][0], "--data.partition", partition, "--run.seed", str(seed), "--run.dir", str(out)]


def summary(row: str, partition: str, launcher: str, seed: int, out: Path, seconds: float) -> dict:
    last = final_rows(out)
    return {"row": row, "partition": partition, "launcher": launcher, "seed": seed,
            "avg_bpc": float(last[0]["avg_test_bpc"]), "avg_token_acc": float(last[0]["avg_test_token_acc"]),
            "node_val_bpc": sum(float(r["val_bpc"]) for r in last) / len(last),
            "mb_sent": sum(float(r["bytes_sent"]) for r in last) / len(last) / 1e6, "run_s": round(seconds, 1)}


def run_sim(row: str, partition: str, seed: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    sim.run(load_config([*flags(row, partition, seed, out), "--sim.nodes", str(NODES)]))
    return summary(row, partition, "sim", seed, out, time.perf_counter() - start)


def run_torchrun(row: str, partition: str, seed: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NODES),
                    "train.py", *flags(row, partition, seed, out)], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return summary(row, partition, "torchrun", seed, out, time.perf_counter() - start)


def table(rows: list[dict]) -> str:
    """Per row: the averaged model's held-out bits per character (iid, by document), MB sent, wall time."""
    def cell(row: str, partition: str, launcher: str, key: str, fmt: str) -> str:
        """The mean over seeds, and each seed's value after it when there are several."""
        hit = [float(r[key]) for r in rows if (r["row"], r["partition"], r["launcher"]) == (row, partition, launcher)]
        if not hit:
            return "–"
        mean = format(statistics.mean(hit), fmt)
        if len(hit) == 1 or key in ("mb_sent", "run_s"):
            return mean
        return f"{mean} ({', '.join(format(v, fmt) for v in hit)})"

    head = ["rule", "launcher", "avg-model bpc, iid", "token acc, iid", "avg-model bpc, by document",
            "node val bpc, iid", "MB sent / node", "wall s (iid)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        for launcher in ("sim", "torchrun"):
            if not any((r["row"], r["launcher"]) == (row, launcher) for r in rows):
                continue
            lines.append("| " + " | ".join([
                row, launcher, cell(row, "iid", launcher, "avg_bpc", ".3f"),
                cell(row, "iid", launcher, "avg_token_acc", ".3f"), cell(row, "documents", launcher, "avg_bpc", ".3f"),
                cell(row, "iid", launcher, "node_val_bpc", ".3f"), cell(row, "iid", launcher, "mb_sent", ".1f"),
                cell(row, "iid", launcher, "run_s", ".0f")]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--partitions", nargs="+", default=list(BOTH), choices=list(BOTH))
    parser.add_argument("--torchrun", action="store_true", help="also dsgd_adamw iid under torchrun")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lm_table")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--share", default="1/1", help="k/m: run every m-th row from the k-th (parallel halves)")
    args = parser.parse_args()
    results = args.out / "results.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(r["row"], r["partition"], r["launcher"], r.get("seed") or "0") for r in read(results)}
    todo = [(row, p, "sim", s) for s in args.seeds for p in args.partitions for row in args.rows if p in ROWS[row][1]]
    todo += [("dsgd_adamw", "iid", "torchrun", 0)] if args.torchrun else []
    k, m = map(int, args.share.split("/"))
    for row, partition, launcher, seed in todo[k - 1::m]:
        if (row, partition, launcher, str(seed)) in done:
            continue
        out = args.out / f"{row}_{partition}_{launcher}_s{seed}"
        result = (run_sim if launcher == "sim" else run_torchrun)(row, partition, seed, out)
        append(results, FIELDS, result)
        print(f"{row} {partition} {launcher} seed {seed}: avg-model {result['avg_bpc']:.3f} bpc, "
              f"{result['mb_sent']:.1f} MB, {result['run_s']} s", flush=True)
    md = table(read(results))
    (args.out / "table.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
