"""cadmm: decentralized consensus ADMM (Mateos et al. 2010; Shi et al. 2014), linearized as in
DLM (Ling et al. 2015)."""

import torch

from p2p.algorithms.base import Algorithm, MomentumDirection
from p2p.config import ConfigError


class CADMM(Algorithm):
    """One dual α_i per node (initially 0) and one message per node, like dsgd. Every step, with d_i
    the momentum direction of g_i (torch SGD's; d_i = g_i when momentum = 0, see MomentumDirection):

        w_i ← (w_i/γ_t − d_i − α_i + Σ_j c_ij (w_i + w_j)) / (1/γ_t + 2 Σ_j c_ij)

    At an exchange: send the new w_i to every neighbour, receive every w_j, then

        α_i ← α_i + Σ_j c_ij (w_i − w_j)

    with the symmetric penalty of pdmm, c_ij = (η/γ_t) v_p / max(d_i, d_j). Σ_i α_i stays 0, so at
    a fixed point Σ_i ∇f_i = 0. Between exchanges w_j is the last received copy (initially the
    common starting weights).

    Its pace (measured, docs/fmnist_regressions.md): near consensus (w_j ≈ w_i) the step reads
    w_i ← w_i − γ (d_i + α_i) / (1 + 2 Σ_j γ c_ij) with Σ_i α_i = 0, so the network average moves at
    γ / (1 + 2 Σ_j γ c_ij), where pdmm's moves at γ / (1 + Σ_j γ c_ij / 2): on the full-batch convex check
    cadmm ends where allreduce with the step γ / 1.8 ends, to five digits, and converges with more steps.
    `--algorithm.eta` at a quarter of pdmm's gives pdmm's pace and wins on step-limited problems (convex,
    Fashion-MNIST logistic regression), but loses on the strongly non-IID Fashion-MNIST MLP (0.835 vs 0.859),
    so the default penalty stays pdmm's.

    `sync` mode only: with one round of staleness (own w_i current, neighbours' w_j old) it diverged
    on a ring in the spec's reference simulation, so `overlap` and `async` are configuration errors.

    Decision (the spec is silent on K > 1): K must be 1. Between exchanges the primal step keeps
    pulling towards neighbour copies up to K − 1 steps old — the staleness for which the spec already
    forbids cadmm in overlap/async — and it diverged on the digits CNN (8-node ring, compare_digits:
    K = 4 ended with consensus distance 1e29 with and without momentum; K = 2 learned, 0.899 vs 0.925
    at K = 1). pdmm at K = 4 is stable (0.920). For the same staleness a time-varying topology is a
    configuration error (an inactive edge's copy w_j would be rounds old).
    """

    def __init__(self, *args):
        super().__init__(*args)
        if self.cfg.interval != 1:
            raise ConfigError(f"cadmm needs --algorithm.interval 1 (got {self.cfg.interval}): with stale neighbour "
                              f"copies between exchanges it diverges; use pdmm for K > 1")
        if self.topology.schedule is not None:
            raise ConfigError(f"cadmm cannot use the time-varying topology {self.topology.source}: its neighbour "
                              f"copies would go stale on inactive edges; use pdmm or admm")
        w, top = self.flat.w, self.topology
        v = self.flat.fan_in() if self.cfg.penalty_scale == "fan_in" else 1.0
        d_i = top.degree(self.rank) if top.n > 1 else 0
        k = {j: self.cfg.eta * v / max(d_i, top.degree(j)) for j in self.neighbors}  # γ_t c_ij
        self.k = {j: torch.as_tensor(k[j], dtype=w.dtype, device=w.device) for j in self.neighbors}
        self.k_sum = sum(self.k.values())
        self.direction = MomentumDirection(self.cfg, w)  # d_i from g_i
        self.alpha = torch.zeros_like(w)  # α_i
        self.w_j = {j: w.clone() for j in self.neighbors}  # last received neighbour weights

    def update(self, lr: float) -> None:
        self.lr = lr
        w, k = self.flat.w, self.k
        d = self.direction(self.flat.g, w)
        # w ← (w/γ − d − α + Σ_j c_ij (w + w_j)) / (1/γ + 2 Σ_j c_ij), numerator and denominator
        # multiplied by γ (γ c_ij = k_ij): one temporary, in-place updates
        numer = torch.add(d, self.alpha).mul_(-lr).add_(w)
        for j in self.neighbors:
            numer.addcmul_(k[j], w + self.w_j[j])
        w.copy_(numer.div_(1 + 2 * self.k_sum))

    def messages(self) -> dict[int, torch.Tensor]:
        return {j: self.flat.w for j in self.neighbors}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        w = self.flat.w
        for j, w_j in msgs.items():
            self.w_j[j].copy_(w_j)
        for j in self.neighbors:
            self.alpha.addcmul_(self.k[j] / self.lr, w - self.w_j[j])  # α += c_ij (w − w_j)

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "w_j": self.w_j, "momentum": self.direction.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.direction.load_state_dict(state["momentum"])
        self.alpha.copy_(state["alpha"])
        for j in self.neighbors:
            self.w_j[j].copy_(state["w_j"][j])
