"""A plain single-device PyTorch script: the digits CNN, SGD with momentum, a StepLR schedule.

    python examples/own_loop_single.py

examples/own_loop.py is the same script made decentralized; docs/library.md shows the few lines between them.
"""

import argparse

import numpy as np
import torch
from torch import nn

from p2p.config import DataConfig
from p2p.data import eval_loader, load_splits, node_loader  # scikit-learn's digits, offline


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(256, 10))


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    return sum((model(x).argmax(1) == y).sum().item() for x, y in loader) / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    data = DataConfig(name="digits", partition="dirichlet", alpha=0.5, batch_size=32)
    splits = load_splits(data)
    shard = np.arange(len(splits.train_labels))
    loader = node_loader(splits, shard, data, seed=0, n_nodes=1)
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.9)
    for epoch in range(1, args.epochs + 1):
        total = torch.zeros(())
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        print(f"epoch {epoch} train loss {total.item() / len(loader):.8f}", flush=True)
    print(f"test accuracy {accuracy(model, eval_loader(splits.test)):.4f}")


if __name__ == "__main__":
    main()
