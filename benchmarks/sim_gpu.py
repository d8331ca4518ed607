"""Simulated nodes on one GPU: steps per second and peak memory of 64 and 256 nodes of a CIFAR-sized model
(3x32x32 random input, 10 classes), dsgd on a ring, batch 32 per node, the simulator's own step.

    python benchmarks/sim_gpu.py                                              # on the GPU
    python benchmarks/sim_gpu.py --device cpu --nodes 2 --models cnn --steps 2  # a smoke test anywhere

A configuration that does not fit prints "out of memory" and the next one runs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

from p2p.config import Config
from p2p.data import Splits
from p2p.sim import Simulation
from p2p.topology import generate


def measure(model: str, n: int, steps: int, batch: int, device: torch.device) -> str:
    cfg = Config()
    cfg.model.name, cfg.algorithm.name, cfg.algorithm.interval = model, "dsgd", 1
    cfg.data.batch_size, cfg.data.samples_per_epoch = batch, batch * (steps + 2)  # 2 warm-up steps
    samples = n * batch * 4
    x, y = torch.randn(samples, 3, 32, 32), torch.randint(0, 10, (samples,))
    data = TensorDataset(x, y)
    splits = Splits(train=data, val=TensorDataset(x[:0], y[:0]), test=TensorDataset(x[:256], y[:256]),
                    train_labels=y.numpy(), num_classes=10, in_shape=(3, 32, 32))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sim = Simulation(cfg, generate("ring", n), splits, np.array_split(np.arange(samples), n), device)
        for step, (X, Y) in enumerate(sim.epoch_batches()):
            if step == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            sim.gradients(X, Y, 0.0)
            for opt in sim.optimizers:  # in rank order: the last one's step runs the exchanges, as in sim.train_loop
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_s = steps / (time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return f"| {model} | {n} | out of memory | | | |"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return (f"| {model} | {n} | {sim.W.shape[1] / 1e6:.2f} M | {per_s:.2f} | {per_s * n * batch:.0f} | "
            f"{peak:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=["cnn", "resnet50"])
    parser.add_argument("--nodes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| model | nodes | parameters / node | steps/s | samples/s | peak GPU GiB |\n|---|---|---|---|---|---|")
    for model in args.models:
        for n in args.nodes:
            print(measure(model, n, args.steps, args.batch, device), flush=True)


if __name__ == "__main__":
    main()
