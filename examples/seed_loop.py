"""The seed's (nttcslab/ecl-isvr) single-node training loop, which its README presents as the starting point of
P2P training, with only the optimizer line changed: `optim.SGD(...)` becomes the seed's `PdmmISVR --async_step`,
p2p's pdmm_isvr in async mode. On the digits CNN, one node per process:

    torchrun --standalone --nproc_per_node 4 examples/seed_loop.py [--epochs 40]
"""

import argparse

import torch
from torch import nn

import p2p
from p2p.config import DataConfig
from p2p.data import eval_loader, load_splits, node_loader, partition


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    net = p2p.init(topology="ring")  # a ring over however many processes torchrun started
    data = DataConfig(name="digits", batch_size=32)
    splits = load_splits(data)
    dataloader = node_loader(splits, partition(splits.train_labels, net.world_size, data)[net.rank], data,
                             seed=net.rank, n_nodes=net.world_size)
    torch.manual_seed(0)  # every node starts from the same weights
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(256, 10))
    epochs = args.epochs

    # --- the seed README's loop; only the optimizer line differs ---
    loss_fn = nn.CrossEntropyLoss()
    # optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer = p2p.DecentralizedOptimizer(model.parameters(), net, algorithm="pdmm_isvr", mode="async",
                                           lr=0.01, momentum=0.9)
    for t in range(epochs):
        for batch, (X, y) in enumerate(dataloader):
            pred = model(X)
            loss = loss_fn(pred, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # --- end of the seed's loop ---

    optimizer.finish()  # complete the exchanges still in flight
    average = p2p.average_model(model, net)
    with torch.no_grad():
        test = eval_loader(splits.test)
        acc = sum((average(x).argmax(1) == y).sum().item() for x, y in test) / len(test.dataset)
        own = sum((model(x).argmax(1) == y).sum().item() for x, y in test) / len(test.dataset)
    print(f"node {net.rank}: last loss {loss.item():.4f}, test accuracy {own:.4f}, averaged model {acc:.4f}")
    net.close()


if __name__ == "__main__":
    main()
