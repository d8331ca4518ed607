"""The user's data set: what `--data.name examples.my_model.data:load` loads on every node."""

import math

import torch
from torch.utils.data import TensorDataset

from p2p.config import DataConfig


def spirals(n_per_class: int, classes: int, seed: int) -> TensorDataset:
    """`classes` interleaved noisy spiral arms in the plane: (x (N, 2), y (N,)), deterministic for `seed`."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(classes, n_per_class, generator=gen) * 3.0 + 0.25  # (C, n) position along each arm
    angle = t * 1.6 + torch.arange(classes).unsqueeze(1) * (2 * math.pi / classes)
    x = torch.stack([t * angle.cos(), t * angle.sin()], -1) + 0.08 * torch.randn(classes, n_per_class, 2, generator=gen)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return TensorDataset(x.reshape(-1, 2), y)


def load(cfg: DataConfig) -> tuple[TensorDataset, TensorDataset]:
    """The contract: the [data] section in, (train, test) datasets of (input, class index) pairs out.
    Every node calls it with the same config, so it must be deterministic (here: fixed seeds)."""
    return spirals(1500, 3, seed=cfg.data_seed), spirals(300, 3, seed=cfg.data_seed + 1)
