"""examples/own_loop_single.py, decentralized: every node trains its own copy on its own part of the data and
talks only to its neighbours on the graph.

    torchrun --standalone --nproc_per_node 4 examples/own_loop.py [--algorithm pdmm] [--epochs 20]

With the same settings it gives the same per-node losses as
`torchrun ... train.py --config configs/quickstart.toml --train.scheduler step --train.step_size 100` (tested).
"""

import argparse

import torch
from torch import nn

import p2p
from p2p.config import DataConfig
from p2p.data import eval_loader, load_splits, node_loader, partition  # scikit-learn's digits, offline


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
    parser.add_argument("--algorithm", default="dsgd")
    parser.add_argument("--topology", default="topologies/ring4.json")
    args = parser.parse_args()
    net = p2p.init(topology=args.topology)
    data = DataConfig(name="digits", partition="dirichlet", alpha=0.5, batch_size=32)
    splits = load_splits(data)
    shard = partition(splits.train_labels, net.world_size, data)[net.rank]  # this node's part of the data
    loader = node_loader(splits, shard, data, seed=net.rank, n_nodes=net.world_size)
    model = make_model().to(net.device)
    loss_fn = nn.CrossEntropyLoss()
    opt = p2p.DecentralizedOptimizer(model.parameters(), net, args.algorithm, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.9)
    for epoch in range(1, args.epochs + 1):
        total = torch.zeros(())
        for x, y in loader:
            x, y = x.to(net.device), y.to(net.device)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach()
        print(f"node {net.rank} epoch {epoch} train loss {total.item() / len(loader):.8f}", flush=True)
    opt.finish()
    average = p2p.average_model(model, net)  # a collective: every node calls it
    print(f"node {net.rank} test accuracy {accuracy(model, eval_loader(splits.test)):.4f}, "
          f"averaged model {accuracy(average, eval_loader(splits.test)):.4f}, "
          f"consensus distance {p2p.consensus_distance(model, net):.3e}")
    net.close()


if __name__ == "__main__":
    main()
