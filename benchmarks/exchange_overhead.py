"""What the neighbour exchange costs: step time with exchange / step time without, in one run.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 benchmarks/exchange_overhead.py \
        --algorithms dsgd pdmm cadmm --model mlp --hidden 1024
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/exchange_overhead.py \
        --algorithms dsgd pdmm --modes sync overlap          # what overlapping the exchange saves

Every rank builds the same model on a ring, then times blocks of training steps (forward, backward,
update) without exchange and with one every step in each `--modes` (comm.mode), interleaved so that
load on a shared machine hits all alike. Rank 0 prints the median step times and their ratios per
algorithm. On GPUs the same script runs on NCCL (`--device cuda`, one rank per GPU). `--sleep_ms`
adds an idle wait per step, as accelerator compute leaves the CPU free for the transfer to overlap.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from p2p.algorithms import FlatParams, build_algorithm
from p2p.comm import Comm, read_env, resolve_device
from p2p.config import SYNC_ONLY, AlgorithmConfig, CommConfig, ModelConfig
from p2p.models import build_model
from p2p.topology import generate
from p2p.transport import Transport


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["dsgd", "gossip", "pdmm", "cadmm"])
    parser.add_argument("--model", default="mlp", choices=["logistic", "mlp", "cnn", "resnet50"])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shape", type=int, nargs=3, default=[1, 28, 28], help="input C H W")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=["sync"], choices=["sync", "overlap", "async"])
    parser.add_argument("--sleep_ms", type=float, default=0.0,
                        help="sleep per step: stands for accelerator compute, which leaves the CPU free")
    args = parser.parse_args()

    env = read_env()
    device, backend = resolve_device(args.device, "auto", env)
    comm = Comm(env, device, backend, CommConfig())
    comm.start()
    topology = generate("ring", env.world_size)
    x = torch.randn(args.batch, *args.shape, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    for name in args.algorithms:
        model = build_model(ModelConfig(name=args.model, hidden=args.hidden), tuple(args.shape), 10).to(device)
        flat = FlatParams(model)
        algorithm = build_algorithm(flat, AlgorithmConfig(name=name, lr=0.01), topology, comm.rank)
        # some rules run in sync mode only (config.SYNC_ONLY); their timing says nothing about the others
        transports = {m: Transport(comm, m) for m in args.modes if m == "sync" or name not in SYNC_ONLY}

        def block(mode: str | None) -> float:
            comm.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                flat.g.zero_()
                F.cross_entropy(model(x), y).backward()
                time.sleep(args.sleep_ms / 1e3)
                algorithm.update(0.01)
                if mode:
                    transports[mode].end_round(algorithm)
            if mode:
                transports[mode].drain()  # the block's last exchange counts too
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / args.steps

        for mode in transports:
            block(mode)  # warm-up
        times: dict[str | None, list[float]] = {None: [], **{m: [] for m in transports}}
        for _ in range(args.blocks):
            for mode in times:
                times[mode].append(block(mode))
        ms = {mode: statistics.median(t) * 1e3 for mode, t in times.items()}
        if env.is_main:
            print(f"{name:10s} {env.world_size} ranks {backend} {args.model} {flat.w.numel() / 1e6:.2f}M params: "
                  f"step {ms[None]:.2f} ms without exchange; " + "; ".join(
                      f"{m} {ms[m]:.2f} ms (x{ms[m] / ms[None]:.2f})" for m in transports)
                  + (f"; overlap / sync {ms['overlap'] / ms['sync']:.2f}" if {"sync", "overlap"} <= set(ms) else ""),
                  flush=True)
    comm.stop()


if __name__ == "__main__":
    main()
