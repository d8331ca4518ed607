"""The user's model: what `--model.name examples.my_model.nets:build` builds on every node."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from p2p.config import ModelConfig


class SpiralNet(nn.Module):
    """A small residual MLP with LayerNorm (no BatchNorm, so the simulator can batch it), and a loss of its own."""

    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.inp = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
                                    for _ in range(2))
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2) -> (B, C) logits
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Used by train.py instead of plain cross-entropy (a batch mean, as every training loss there is)."""
        return F.cross_entropy(logits, y, label_smoothing=0.05)


def build(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The contract: the [model] section (its `hidden` field is used here), one sample's shape, the class count."""
    return SpiralNet(math.prod(in_shape), cfg.hidden, num_classes)
