"""What one node trains with. Its own module so that checkpoints, the trainer and the simulator share it
without checkpoint.py importing the trainer that uses it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from p2p.algorithms import Algorithm, FlatParams
from p2p.optimizer import DecentralizedOptimizer
from p2p.transport import Link, Transport


@dataclass
class Node:
    """Everything one node trains with; built after validation, before the first step."""

    model: nn.Module
    optimizer: DecentralizedOptimizer  # the library's: the rule and its transport
    scheduler: LRScheduler | None
    loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader

    @property
    def flat(self) -> FlatParams:
        return self.optimizer.flat

    @property
    def algorithm(self) -> Algorithm:
        return self.optimizer.rule

    @property
    def transport(self) -> Transport | Link:  # a simulated node's Link into the shared InMemory
        return self.optimizer.transport
