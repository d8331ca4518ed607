"""local: no communication. With one node and all the data, the single-node reference;
with n nodes, the "no collaboration" lower bound."""

from p2p.algorithms.base import Algorithm, make_optimizer, set_lr


class Local(Algorithm):
    """w_i ← torch SGD/Adam step on g_i. Nothing is exchanged."""

    def __init__(self, *args):
        super().__init__(*args)
        self.optimizer = make_optimizer(self.flat, self.cfg)

    def update(self, lr: float) -> None:
        self.lr = lr
        set_lr(self.optimizer, lr)
        self.optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
