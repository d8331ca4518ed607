"""gt: gradient tracking, DSGT (Pu & Nedić 2021), adapt-then-combine."""

import torch

from p2p.algorithms.base import Algorithm, MomentumDirection
from p2p.algorithms.dsgd import mixing_rows


class GradientTracking(Algorithm):
    """Every node tracks the network's mean gradient with y_i, so its step does not follow its own data:

        x_i⁺ = Σ_j W_ij (x_j − γ y_j)
        y_i⁺ = Σ_j W_ij y_j + d_i(x_i⁺) − d_i(x_i),      y_i = d_i(x_0) at the first step

    with W = dsgd's mixing matrix (`algorithm.mixing`; round r's on a time-varying graph) and d_i torch
    SGD's direction of g_i (d_i = g_i without momentum; see MomentumDirection). Σ_i y_i = Σ_i d_i is kept
    by every doubly stochastic W, so at a fixed point y_i = 0, x_i = x* and Σ_i ∇f_i(x*) = 0: exact.

    As update / messages / receive. The gradient at x⁺ exists only at the next step, so y's correction
    is added when that gradient arrives, before y is used; the iterates x are DSGT's exactly:

        update:    y_i ← y_i + d_i − d_prev;  d_prev ← d_i;  x_i ← x_i − γ y_i
        exchange:  send [x_i, y_i] (one flat buffer of 2P), then x_i ← Σ_j W_ij x_j, y_i ← Σ_j W_ij y_j

    Decision, K > 1: the K − 1 local steps between exchanges are the update above with W = I, i.e.
    x ← x − γ y with y ← y + d_new − d_old: the tracker keeps correcting the local drift, and the fixed
    point (y_i = 0, consensus, Σ_i ∇f_i = 0) is unchanged (tests/test_heterogeneity.py: exact at K = 4).

    Decisions: `sync` only (config.SYNC_ONLY). Mixing a stale y_j breaks Σ_i y_i = Σ_i d_i (the two ends
    of an edge would mix copies of different rounds), and the tracking error then accumulates instead of
    vanishing; there is no per-edge form that keeps the sum without knowing which of its own rounds a
    neighbour's message answers. A time-varying graph is accepted: every round's W is doubly stochastic
    (metropolis or file weights; `uniform` is not on irregular graphs and then biases y, as it biases dsgd).
    """

    def __init__(self, *args):
        super().__init__(*args)
        w = self.flat.w
        self.rows = mixing_rows(self.topology, self.cfg.mixing, self.rank)  # (W_ii, {j: W_ij}) per round graph
        self.W_ii, self.W_ij = 1.0, {}  # the row of the round being exchanged
        self.direction = MomentumDirection(self.cfg, w)  # d_i from g_i
        self.y = torch.zeros_like(w)  # y_i, without the newest gradient's correction between steps
        self.d_prev = torch.zeros_like(w)  # the d_i that y_i holds
        self.sent = torch.empty(2 * w.numel(), dtype=w.dtype, device=w.device)  # [x_i, y_i], (2P,)
        self.rounds = 0  # exchanges so far: r

    def update(self, lr: float) -> None:
        self.lr = lr
        d = self.direction(self.flat.g, self.flat.w)
        self.y.add_(d).sub_(self.d_prev)
        self.d_prev.copy_(d)
        self.flat.w.add_(self.y, alpha=-lr)

    def messages(self) -> dict[int, torch.Tensor]:
        """[x_i, y_i] to this round's peers; r advances once per round."""
        self.W_ii, self.W_ij = self.rows[self.rounds % len(self.rows)]
        self.rounds += 1
        P = self.y.numel()
        self.sent[:P].copy_(self.flat.w)
        self.sent[P:].copy_(self.y)
        return {j: self.sent for j in self.W_ij}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        """sync: the messages of every peer of the round just sent."""
        P, w, y = self.y.numel(), self.flat.w, self.y
        w.mul_(self.W_ii)
        y.mul_(self.W_ii)
        for j, W_ij in self.W_ij.items():
            w.add_(msgs[j][:P], alpha=W_ij)
            y.add_(msgs[j][P:], alpha=W_ij)

    def state_dict(self) -> dict:
        return {"y": self.y, "d_prev": self.d_prev, "momentum": self.direction.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.y.copy_(state["y"])
        self.d_prev.copy_(state["d_prev"])
        self.direction.load_state_dict(state["momentum"])
        self.rounds = state["rounds"]
