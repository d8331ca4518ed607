"""Pairwise averaging for gossip: send/recv vs a 2-rank subgroup all-reduce, timed in one run.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 4 benchmarks/gossip_pair.py [--numel 1000000]

Ranks pair up (0-1, 2-3, ...) and average a flat buffer of `numel` floats many times with each
method; rank 0 prints the median time per exchange and the ratio subgroup / send-recv.
"""

import argparse
import statistics
import time

import torch

from p2p.comm import Comm, read_env, resolve_device
from p2p.config import CommConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    env = read_env()
    device, backend = resolve_device("auto", "auto", env)
    comm = Comm(env, device, backend, CommConfig())
    comm.start()
    n, i = env.world_size, env.rank
    edges = [(r, r + 1) for r in range(0, n - 1, 2)]
    groups = comm.pair_groups(edges)
    j = i + 1 if i % 2 == 0 else i - 1
    w = torch.randn(args.numel, device=device)
    w_j = torch.empty_like(w)

    def send_recv() -> None:
        comm.exchange({j: w}, {j: w_j})
        w.add_(w_j).mul_(0.5)

    def subgroup() -> None:
        comm.pair_average_(w, groups[(min(i, j), max(i, j))])

    times: dict[str, list[float]] = {"send_recv": [], "subgroup": []}
    for _ in range(args.repeats):  # interleaved, so load on a shared machine hits both alike
        for name, fn in (("send_recv", send_recv), ("subgroup", subgroup)):
            comm.barrier()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    if env.is_main:
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{n} ranks, {backend}, {args.numel} floats ({args.numel * 4 / 1e6:.1f} MB): send/recv "
              f"{med['send_recv']:.2f} ms, subgroup all-reduce {med['subgroup']:.2f} ms, "
              f"ratio subgroup/send-recv {med['subgroup'] / med['send_recv']:.2f}")
    comm.stop()


if __name__ == "__main__":
    main()
