"""ed: exact diffusion / D² (Yuan et al. 2019; Tang et al. 2018)."""

import torch

from p2p.algorithms.base import Algorithm, MomentumDirection
from p2p.algorithms.dsgd import mixing_rows
from p2p.config import ConfigError


class ExactDiffusion(Algorithm):
    """Diffusion with a correction that removes dsgd's bias on non-IID data:

        ψ_i = x_i − γ d_i                       (adapt)
        φ_i = ψ_i + x_i − ψ_i,prev               (correct; φ_i = ψ_i at the first step)
        x_i⁺ = Σ_j W̄_ij φ_j,   W̄ = (I + W)/2    (combine)

    with W = dsgd's mixing matrix (`algorithm.mixing`) and d_i torch SGD's direction of g_i (d_i = g_i
    without momentum; see MomentumDirection). Σ_i (x_i⁺ − ψ_i) = 0 every step, so at a fixed point
    (consensus, ψ constant) Σ_i ∇f_i = 0: exact. One message per neighbour, φ_i: P floats, as dsgd.

    As update / messages / receive: `update` is adapt and correct (x_i ← φ_i), an exchange sends φ_i and
    combines. A time-varying graph combines with round r's W̄(r); the sum above still holds, and it is
    tested exact (tests/test_heterogeneity.py).

    Decision: K must be 1. The natural local step, the same update with W̄ = I, keeps the fixed point but
    not stability: without gradients the recursion is x⁺ = W̄(2x − x_prev), and with K − 1 steps of W̄ = I
    between combines one round multiplies an eigenvalue λ of W̄ by a 2x2 block of trace λ(K + 1) + 1 − K
    and determinant λ, stable only for λ > (K − 2)/(K + 2). K = 4 diverged on the time-varying ring (consensus
    distance 1e27 whatever the step); running a round's K local steps as one adapt step instead is stable
    but biased by the local drift, which is what ed is for removing. Use gt for K > 1.

    Decision: `sync` only (config.SYNC_ONLY). φ_j mixed one round late no longer satisfies
    Σ_i (x_i⁺ − ψ_i) = 0 (W̄'s columns multiply vectors of different rounds), so the bias comes back and
    the second-order recursion x⁺ = W̄(2x − x_prev − γ(d − d_prev)) can be unstable with delay.
    """

    def __init__(self, *args):
        super().__init__(*args)
        if self.cfg.interval != 1:
            raise ConfigError(f"ed needs --algorithm.interval 1 (got {self.cfg.interval}): its local steps between "
                              f"combines are unstable; use gt for K > 1")
        w = self.flat.w
        self.rows = mixing_rows(self.topology, self.cfg.mixing, self.rank)  # (W_ii, {j: W_ij}) per round graph
        self.W_ij: dict[int, float] = {}  # the row of the round being exchanged
        self.direction = MomentumDirection(self.cfg, w)  # d_i from g_i
        self.psi = torch.zeros_like(w)  # ψ_i of the latest step
        self.started = False  # ψ_prev exists
        self.rounds = 0  # exchanges so far: r

    def update(self, lr: float) -> None:
        self.lr = lr
        x = self.flat.w
        psi = x - lr * self.direction(self.flat.g, x)
        if self.started:  # x ← φ = ψ + x − ψ_prev
            x.add_(psi).sub_(self.psi)
        else:
            x.copy_(psi)
            self.started = True
        self.psi.copy_(psi)

    def messages(self) -> dict[int, torch.Tensor]:
        """φ_i to this round's peers; r advances once per round."""
        _, self.W_ij = self.rows[self.rounds % len(self.rows)]
        self.rounds += 1
        return {j: self.flat.w for j in self.W_ij}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        """x_i ← W̄_ii φ_i + Σ_j W̄_ij φ_j = φ_i + Σ_j (W_ij/2)(φ_j − φ_i), every peer of the round (sync)."""
        phi = self.flat.w.clone()
        for j, W_ij in self.W_ij.items():
            self.flat.w.add_(msgs[j] - phi, alpha=W_ij / 2)

    def state_dict(self) -> dict:
        return {"psi": self.psi, "started": self.started, "momentum": self.direction.state_dict(),
                "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.psi.copy_(state["psi"])
        self.started = state["started"]
        self.direction.load_state_dict(state["momentum"])
        self.rounds = state["rounds"]
