"""qgm: quasi-global momentum DSGD, QG-DSGDm (Lin et al., ICML 2021, Algorithm 1)."""

import torch

from p2p.algorithms.dsgd import DSGD


class QGM(DSGD):
    """dsgd whose momentum buffer m̂_i is built from the model's change, which includes what the
    neighbours pulled in, instead of from the local gradient alone (β = `algorithm.momentum`):

        g_i ← g_i + weight_decay·x_i
        v_i = β m̂_i + (1 − dampening) g_i;   d_i = g_i + β v_i (nesterov) or v_i
        x_i ← x_i − γ_t d_i,  then at an exchange dsgd's combine x_i ← Σ_j W_ij x_j
        m̂_i ← μ m̂_i + (1 − μ)(x_i,prev − x_i)/γ_t     (x_i,prev: x_i before this step)

    m̂_i starts at 0. On heterogeneous data a local momentum keeps pushing towards the node's own optimum;
    m̂_i averages the steps the network actually took, a proxy for the global direction.

    Decisions:
    - μ = β (the paper's experiments set μ = β; its code's default factor 1 − μ = 0.1 is β = 0.9), so
      there is no extra knob. With β = 0 this is dsgd (dampening is then ignored, as torch does).
    - m̂_i is updated lazily, at the start of the next step, from x_prev − x: the change covers the local
      step and whatever exchange was applied since, in any order and mode. So with K > 1 every step's
      change counts (a local step alone, or step + combine), and qgm runs wherever dsgd runs: sync,
      overlap, async, time-varying graphs and per-edge slots (messages and receive are dsgd's).
    - Only `optimizer = sgd` (config.validate): the paper's code has a QG-Adam that normalizes the model
      change, not implemented here; the torch optimizer dsgd builds is never stepped.
    """

    def __init__(self, *args):
        super().__init__(*args)
        w = self.flat.w
        self.beta = self.cfg.momentum
        self.m_hat = torch.zeros_like(w)  # m̂_i
        self.x_prev = w.clone()  # x_i before the latest step
        self.lr_prev = 0.0  # γ of the latest step; 0: none yet

    def update(self, lr: float) -> None:
        x, beta, cfg = self.flat.w, self.beta, self.cfg
        if self.lr_prev and beta:  # fold the latest step's change (local step and any exchange since) into m̂
            self.m_hat.mul_(beta).add_(self.x_prev - x, alpha=(1 - beta) / self.lr_prev)
        g = self.flat.g.add(x, alpha=cfg.weight_decay) if cfg.weight_decay else self.flat.g
        if beta:
            v = self.m_hat.mul(beta).add_(g, alpha=1 - cfg.dampening)
            d = g.add(v, alpha=beta) if cfg.nesterov else v
        else:
            d = g
        self.x_prev.copy_(x)
        x.add_(d, alpha=-lr)
        self.lr = self.lr_prev = lr

    def state_dict(self) -> dict:
        return {**super().state_dict(), "m_hat": self.m_hat, "x_prev": self.x_prev, "lr_prev": self.lr_prev}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.m_hat.copy_(state["m_hat"])
        self.x_prev.copy_(state["x_prev"])
        self.lr_prev = state["lr_prev"]
