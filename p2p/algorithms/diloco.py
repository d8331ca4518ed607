"""diloco: local steps with an outer Nesterov optimizer on an anchor (DiLoCo, Douillard et al. 2023), averaged
over all nodes or gossiped with the topology's mixing weights."""

import torch

from p2p.algorithms.dsgd import mixing_rows
from p2p.algorithms.local import Local


class DiLoCo(Local):
    """Every step a step of the local torch optimizer on w_i (`algorithm.optimizer`; DiLoCo's is adamw). Node i
    keeps an anchor θ_i (starts at w_0) and an outer momentum b_i (starts at 0). At the end of round r (every K
    steps), with w_j the weights node j sent in round r:

        w̄_i = W_ii w_i + Σ_{j∈N_r(i)} W_ij w_j   (gossip: dsgd's mixing rows, time-varying graphs included;
                                                  `outer_average = all`: W_ij = 1/n for every j ≠ i)
        Δ_i = θ_i − w̄_i                           (the outer gradient)
        b_i ← μ b_i + Δ_i
        θ_i ← θ_i − η (Δ_i + μ b_i)               (Nesterov SGD: η = `outer_lr`, μ = `outer_momentum`)
        w_i ← θ_i                                  (the local optimizer's state is kept)

    w̄_i is computed as w_i + Σ_{j∈M} W_ij (w_j − w_i) over the peers M whose message arrived (W_ii = 1 − Σ_j W_ij):
    the same with every message, and with a lost one (`sim.drop_prob`) its weight stays on w_i, as in dsgd.

    Decisions. `all` sends w_i to every other node ((n − 1)|w| per round, counted as sent) instead of an
    all-reduce (2(n − 1)/n |w|): the rule holds no Comm and its messages are correct in every transport, the
    simulator's included. `sync` only: with the outer average one round late (`overlap`, the outer gradient
    of round r applied to the anchor at the end of round r + 1) the digits CNN diverged with gossip and stalled
    at 30% test accuracy with `all` (docs/algorithms.md, "diloco").
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n, i = self.topology.n, self.rank
        self.rows = ([(1 / n, {j: 1 / n for j in range(n) if j != i})] if self.cfg.outer_average == "all"
                     else mixing_rows(self.topology, self.cfg.mixing, i))  # per graph of the schedule
        self.theta = self.flat.w.clone()  # θ_i, the anchor
        self.b = torch.zeros_like(self.theta)  # b_i, the outer momentum
        self.rounds = 0  # rounds so far: r
        self.W_ij: dict[int, float] = {}  # round r's weights of the peers

    def messages(self) -> dict[int, torch.Tensor]:
        """w_i to round r's peers; r advances once per round."""
        self.W_ij = self.rows[self.rounds % len(self.rows)][1]
        self.rounds += 1
        return {j: self.flat.w for j in self.W_ij}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        w, mu = self.flat.w, self.cfg.outer_momentum
        delta = self.theta - w  # Δ_i = θ_i − w̄_i, w̄_i = w_i + Σ_j W_ij (w_j − w_i)
        for j, w_j in msgs.items():
            delta.sub_(w_j - w, alpha=self.W_ij[j])
        self.b.mul_(mu).add_(delta)
        self.theta.sub_(delta.add_(self.b, alpha=mu), alpha=self.cfg.outer_lr)
        w.copy_(self.theta)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "theta": self.theta, "b": self.b, "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.theta.copy_(state["theta"])
        self.b.copy_(state["b"])
        self.rounds = state["rounds"]
