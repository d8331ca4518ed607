"""What one node trains with. Its own module so that checkpoints, the trainer and the simulator share it
without checkpoint.py importing the trainer that uses it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.utils.data import DataLoader

from p2p.algorithms import Algorithm, FlatParams
from p2p.transport import InMemory, Transport


@dataclass
class Node:
    """Everything one node trains with; built after validation, before the first step."""

    model: nn.Module
    flat: FlatParams
    algorithm: Algorithm
    transport: Transport | InMemory  # the simulator's nodes share one InMemory
    loader: DataLoader
    val_loader: DataLoader
    test_loader: DataLoader
