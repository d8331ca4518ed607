"""What the neighbour exchange costs: step time with exchange / step time without, in one run.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 benchmarks/exchange_overhead.py \
        --algorithms dsgd pdmm cadmm --model mlp --hidden 1024

Every rank builds the same model on a ring, then times blocks of training steps (forward, backward,
update) with `exchange=True` and `exchange=False`, interleaved so that load on a shared machine hits
both alike. Rank 0 prints the median step times and their ratio per algorithm. On GPUs the same
script runs on NCCL (`--device cuda`, one rank per GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from p2p.algorithms import FlatParams, build_algorithm
from p2p.comm import Comm, read_env, resolve_device
from p2p.config import AlgorithmConfig, CommConfig, ModelConfig
from p2p.models import build_model
from p2p.topology import generate


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
        algorithm = build_algorithm(flat, AlgorithmConfig(name=name, lr=0.01), topology, comm)

        def block(exchange: bool) -> float:
            comm.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                flat.g.zero_()
                F.cross_entropy(model(x), y).backward()
                algorithm.step(0.01, exchange)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return (time.perf_counter() - start) / args.steps

        block(True)  # warm-up
        times = {True: [], False: []}
        for _ in range(args.blocks):
            for exchange in (True, False):
                times[exchange].append(block(exchange))
        with_x, without = statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3
        if env.is_main:
            print(f"{name:10s} {env.world_size} ranks {backend} {args.model} {flat.w.numel() / 1e6:.2f}M params: "
                  f"step {without:.2f} ms without exchange, {with_x:.2f} ms with, ratio {with_x / without:.2f}",
                  flush=True)
    comm.stop()


if __name__ == "__main__":
    main()
