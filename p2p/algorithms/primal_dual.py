"""pdmm, admm, pdmm_isvr, admm_isvr: edge-consensus learning, one implementation.

Niwa et al., "Edge-consensus learning: deep learning on P2P networks with nonhomogeneous data",
KDD 2020 (pdmm, admm); Niwa et al., "Asynchronous decentralized optimization with implicit
stochastic variance reduction", ICML 2021 (the *_isvr penalty).
"""

import logging

import torch

from p2p.algorithms.base import Algorithm, MomentumDirection
from p2p.config import ConfigError

log = logging.getLogger(__name__)


class PrimalDual(Algorithm):
    """Linearized primal-dual method of multipliers with stochastic gradients.

    Per neighbour j: a dual z_{i|j} (initially 0), the edge sign A_{i|j} = ±1 (= −A_{j|i}) and a
    penalty c_ij = c_ji. Every step, with d_i the momentum direction of g_i (torch SGD's; d_i = g_i
    when momentum = 0, see MomentumDirection):

        w_i ← (w_i/γ_t − c_g d_i + Σ_j c_ij A_{i|j} z_{i|j}) / (1/γ_t + Σ_j c_ij)

    At exchange number r, for every neighbour j active in round r (every neighbour on a static graph):

        y_{i|j} = z_{i|j} − 2 A_{i|j} w_i;   send y_{i|j} to j, receive y_{j|i}
        pdmm:  z_{i|j} ← y_{j|i}             admm:  z_{i|j} ← ½ z_{i|j} + ½ y_{j|i}

    On a time-varying graph every edge of the union keeps its dual, unchanged while the edge is
    inactive, and j ranges over the union's neighbours in the primal step; degrees d_i are the union's,
    so the penalties stay fixed.

    Penalty rules, both written c_ij = k_ij / γ_t with k_ij fixed at start-up, d = max(d_i, d_j), K = interval:
        ecl:   k_ij = η v_p / (K d),  v_p = sqrt(fan_in(p)) (`penalty_scale = fan_in`) or 1;  c_g = 1
        isvr:  k_ij = piw / (K d + K − piw d);  c_g = 1 − (Σ_j k_ij)(K/piw − 1) with `use_gcoef`, else 1

    ecl's η is the penalty per round: the K primal steps between two exchanges add up to
    Σ_t γ_t c_ij = η v_p / d per edge, whatever K (K = 1: the per-step rule as before; ISVR's k_ij also
    shrinks as 1/K). Decision (issue 20, docs/algorithms.md "The penalty per round"): between exchanges
    the duals are fixed, and a per-step k_ij applied K times pulls w_i back to their anchor K times, so a
    node keeps (1 − (1 + Σ_j k_ij)^−K) / (K Σ_j k_ij) of a round's local progress instead of
    1 / (1 + Σ_j k_ij): 0.09 instead of 0.42 on Fashion-MNIST logistic regression at K = 8 (Σ_j k_ij = 1.4),
    where pdmm ended 3.2 points under allreduce, and 0.35 with η/K. The cost: on the strongly non-IID digits
    CNN with momentum (compare_digits, classes) at K = 2 and 4 pdmm is 2.5 to 5 points lower with η/K than
    with the per-step penalty (`--algorithm.eta` 0.05·K); admm gains 4 there.

    Dual initialisation (`dual_init`). The spec (and the seed) start from z_{i|j} = 0. Then Σ_j c_ij
    A_{i|j} z_{i|j} = 0 pulls every w_i towards the origin in the first steps, and the consensus
    dynamics settle halfway between w_0 and 0: with the ISVR penalty at K = 1 (c_ij = 1/γ) the digits
    CNN's ‖w‖ went 5.99 → 2.00 → 3.33 → ... → 3.00 in 8 steps, its logits shrank ~8x and it stalled at
    loss ln 10. `consensus` starts from z_{i|j} = A_{i|j} w_0, the dual at which the common starting
    point is already consensus-stationary (y_{i|j} = −A_{i|j} w_0 = A_{j|i} w_0, so the exchange
    leaves it in place). This is exactly the spec's rule run on w − w_0 instead of w, so the fixed
    point (Σ_i ∇f_i = 0, consensus) is unchanged; only the origin no longer matters. `zero` is the
    spec's literal rule.

    Decision (the spec is silent): an isvr penalty that is not positive (piw = 2 with K = 1, where
    K d + K − 2d < 0) is a configuration error rather than a silent divergence.

    Args:
        dual: "pdmm" or "admm", the dual rule.
        penalty: "ecl" or "isvr", the penalty rule.
    """

    def __init__(self, *args, dual: str, penalty: str):
        super().__init__(*args)
        self.dual = dual
        w, cfg, top = self.flat.w, self.cfg, self.topology
        d_i = top.degree(self.rank) if top.n > 1 else 0
        d = {j: max(d_i, top.degree(j)) for j in self.neighbors}
        K = cfg.interval
        if K < 1:  # a programming error, not a user's: the trainer resolves K = 0 (auto) first
            raise ValueError(f"interval {K} is unresolved: call p2p.optimizer.resolve_interval before building")
        if penalty == "ecl":
            v = self.flat.fan_in() if cfg.penalty_scale == "fan_in" else 1.0
            self.k = {j: cfg.eta * v / (K * d[j]) for j in self.neighbors}  # η per round, η/K per step
            self.c_g = 1.0
            if self.rank == 0 and self.neighbors:
                lo = min(float(torch.as_tensor(k).min()) for k in self.k.values())
                hi = max(float(torch.as_tensor(k).max()) for k in self.k.values())
                log.info("%s: penalty η = %g per round (K = %d local steps): γ c_ij = η v_p / (K max(d_i, d_j)) = "
                         "%.3g to %.3g per step and edge", cfg.name, cfg.eta, K, lo, hi)
        else:
            piw = cfg.piw
            if any(K * d[j] + K - piw * d[j] <= 0 for j in self.neighbors):
                raise ConfigError(f"--algorithm.piw {piw:g} with --algorithm.interval {K} gives a negative ISVR "
                                  f"penalty on degree {max(d.values())}: use interval >= 2 or piw <= 1")
            self.k = {j: piw / (K * d[j] + K - piw * d[j]) for j in self.neighbors}
            self.c_g = 1.0 - sum(self.k.values()) * (K / piw - 1) if cfg.use_gcoef else 1.0
            if K == 1 and self.rank == 0 and self.neighbors:
                log.warning("%s with --algorithm.interval 1: the ISVR penalty is then γ c_ij = %.3g per edge, so "
                            "strong that the network moves at ~1/%.1f of the step (it is built for K > 1 local "
                            "steps); leave interval unset (K = 4) or set it >= 2",
                            cfg.name, max(self.k.values()), 1 + sum(self.k.values()))
            if cfg.use_gcoef and not top.is_regular and self.rank == 0:
                log.warning("use_gcoef on an irregular graph: the fixed point solves Σ_i c_g,i ∇f_i = 0, "
                            "not the true optimum")
        self.A = {j: float(top.edge_sign(self.rank, j)) for j in self.neighbors}
        # k_ij A_{i|j} as tensors (0-dim for a scalar penalty) so the step is in-place addcmul_s
        self.kA = {j: torch.as_tensor(self.k[j] * self.A[j], dtype=w.dtype, device=w.device) for j in self.neighbors}
        self.k_sum = sum(self.k.values())  # Σ_j k_ij
        self.direction = MomentumDirection(cfg, w)  # d_i from g_i
        # z_{i|j}: A_{i|j} w_0 (consensus) or 0 (zero), see the class docstring
        self.z = {j: w.mul(self.A[j]) if cfg.dual_init == "consensus" else torch.zeros_like(w) for j in self.neighbors}
        self.y = {j: torch.empty_like(w) for j in self.neighbors}  # y_{i|j}, sent
        self.rounds = 0  # exchanges so far: r

    def update(self, lr: float) -> None:
        w, z = self.flat.w, self.z
        d = self.direction(self.flat.g, w)
        # w ← (w/γ − c_g d + Σ_j c_ij A_{i|j} z_{i|j}) / (1/γ + Σ_j c_ij), numerator and denominator
        # multiplied by γ (γ c_ij = k_ij): one temporary, in-place updates, whatever the degree
        numer = torch.add(w, d, alpha=-lr * self.c_g)
        for j in self.neighbors:
            numer.addcmul_(self.kA[j], z[j])
        w.copy_(numer.div_(1 + self.k_sum))

    def messages(self) -> dict[int, torch.Tensor]:
        """y_{i|j} to this round's peers; r advances once per round."""
        peers = self.topology.active_neighbors(self.rank, self.rounds)
        self.rounds += 1
        for j in peers:
            torch.sub(self.z[j], self.flat.w, alpha=2 * self.A[j], out=self.y[j])
        return {j: self.y[j] for j in peers}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        z = self.z
        for j, y_in in msgs.items():
            if self.dual == "pdmm":
                z[j].copy_(y_in)
            else:
                z[j].mul_(0.5).add_(y_in, alpha=0.5)

    def diagnostics(self, lr: float) -> dict[str, float]:
        """How hard the duals pull against the gradient (the measurement that explained ISVR's stall).

        dual_norm = sqrt(Σ_j ‖z_{i|j}‖²). penalty_ratio = ‖Σ_j k_ij (A_{i|j} z_{i|j} − w_i)‖ / ‖γ c_g d_i‖:
        the two terms of the primal step before its division by 1 + Σ_j k_ij. Near 1 the duals cancel
        the local step and consensus holds the node; ≪ 1 the nodes barely couple. d_i is the momentum
        buffer (g_i without momentum; nesterov's extra β g_i is left out).
        """
        w = self.flat.w
        pull = w * -self.k_sum
        for j in self.neighbors:
            pull.addcmul_(self.kA[j], self.z[j])
        d = self.direction.m if self.direction.m is not None else self.flat.g
        step = (lr * abs(self.c_g)) * d.norm().item()
        return {"dual_norm": sum(z.pow(2).sum() for z in self.z.values()).sqrt().item() if self.z else 0.0,
                "penalty_ratio": pull.norm().item() / step if step > 0 else 0.0}

    def state_dict(self) -> dict:
        return {"z": self.z, "momentum": self.direction.state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.direction.load_state_dict(state["momentum"])
        self.rounds = state["rounds"]
        for j in self.neighbors:
            self.z[j].copy_(state["z"][j])
