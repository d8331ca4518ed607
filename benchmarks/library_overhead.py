"""What the public optimizer costs per step over calling the rule and its transport directly (the trainer's
path before it was built on the library), in one process, measured in alternating blocks so noise cancels.

    python benchmarks/library_overhead.py [--steps 300] [--rounds 5]

Per model: a whole training step (zero_grad, forward, backward, step) through `DecentralizedOptimizer.step()`
and through `rule.update(lr)` + `transport.after_step(rule, t)`, and the ratio of the medians. A network of one
(no neighbour): the exchange itself is the same code on both paths, so what differs is the optimizer's own work
(gradient views check, GradScaler hooks, l2 term, step counting).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from p2p.comm import Comm, Env
from p2p.config import CommConfig, ModelConfig
from p2p.models import build_model
from p2p.network import Network
from p2p.optimizer import DecentralizedOptimizer
from p2p.topology import Topology


def models() -> dict[str, nn.Module]:
    deep = nn.Sequential(nn.Flatten(), *[m for _ in range(40) for m in (nn.Linear(64, 64), nn.Tanh())],
                         nn.Linear(64, 10))  # 82 parameter tensors: where a per-tensor loop would show
    return {"digits cnn (8 tensors)": build_model(ModelConfig(name="cnn"), (1, 8, 8), 10),
            "mlp 40x64 (82 tensors)": deep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = Network(Comm(Env(0, 1, 0, 1), torch.device("cpu"), "gloo", CommConfig()), Topology(1, ()))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    print(f"| model | library step (µs) | direct rule + transport (µs) | library / direct |\n|---|---|---|---|")
    for name, model in models().items():
        opt = DecentralizedOptimizer(model.parameters(), net, "dsgd", lr=0.01, momentum=0.9)
        rule, transport = opt.rule, opt.transport

        def library() -> None:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def direct(t: int) -> None:
            opt.flat.g.zero_()
            F.cross_entropy(model(x), y).backward()
            rule.update(0.01)
            transport.after_step(rule, t)

        times: dict[str, list[float]] = {"library": [], "direct": []}
        for _ in range(args.rounds):  # alternate, so a slow spell hits both
            start = time.perf_counter()
            for _ in range(args.steps):
                library()
            times["library"].append((time.perf_counter() - start) / args.steps)
            start = time.perf_counter()
            for t in range(args.steps):
                direct(t)
            times["direct"].append((time.perf_counter() - start) / args.steps)
        lib, dire = statistics.median(times["library"]), statistics.median(times["direct"])
        print(f"| {name} | {lib * 1e6:.0f} | {dire * 1e6:.0f} | {lib / dire:.3f} |")


if __name__ == "__main__":
    main()
