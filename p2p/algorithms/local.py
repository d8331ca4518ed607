"""local: no communication. With one node and all the data, the single-node reference;
with n nodes, the "no collaboration" lower bound."""

import torch

from p2p.algorithms.base import Algorithm, make_optimizer, set_lr


class Local(Algorithm):
    """w_i ← torch SGD/Adam step on g_i. Nothing is exchanged.

    The local step is `algorithm.optimizer`'s torch optimizer, or one the user built over the same
    parameters (`optimizer=`, e.g. torch.optim.RAdam): then its own param_groups hold the learning rates
    (per group, driven by the user's schedulers) and γ_t is not written into them.
    """

    def __init__(self, *args, optimizer: torch.optim.Optimizer | None = None):
        super().__init__(*args)
        self.owns_lr = optimizer is None
        self.optimizer = optimizer if optimizer is not None else make_optimizer(self.flat, self.cfg)

    def update(self, lr: float) -> None:
        self.lr = lr
        if self.owns_lr:
            set_lr(self.optimizer, lr)
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
