"""A model for tests/test_peer_reason.py, loaded by train.py as `--model.name tests.flaky_model:flaky`: the digits
logistic model whose forward raises on node 1 at its 5th call, a bug of that node's own."""

import os

from torch import nn


class Flaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.calls = nn.Linear(64, 10), 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls == 5:
            raise RuntimeError("boom on this host")
        return self.linear(x.flatten(1))


def flaky(cfg, in_shape, num_classes):
    return Flaky()
