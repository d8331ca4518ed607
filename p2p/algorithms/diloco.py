"""diloco: local steps with an outer Nesterov optimizer on an anchor (DiLoCo, Douillard et al. 2023), averaged
over all nodes or gossiped with the topology's mixing weights."""

from collections import deque

import torch

from p2p.algorithms.dsgd import mixing_rows
from p2p.algorithms.local import Local


class DiLoCo(Local):
    """Every step a step of the local torch optimizer on w_i (`algorithm.optimizer`, AdamW in DiLoCo). Node i keeps
    an anchor θ_i (starts at w_0) and an outer momentum b_i (starts at 0). At the end of round r (every K steps),
    with w_j the weights node j sent in round r:

        w̄_i = W_ii w_i + Σ_{j∈N_r(i)} W_ij w_j   (gossip: dsgd's mixing rows, time-varying graphs included;
                                                  `outer_average = all`: W_ij = 1/n for every j ≠ i)
        Δ_i = θ_i − w̄_i                           (the outer gradient)
        b_i ← μ b_i + Δ_i
        θ_i ← θ_i − η (Δ_i + μ b_i)               (Nesterov SGD: η = `outer_lr`, μ = `outer_momentum`)
        w_i ← θ_i                                  (the local optimizer's state is kept)

    `overlap` (Streaming DiLoCo's delay): round r's average arrives at the end of round r + 1. Then Δ_i is the
    outer gradient of round r, θ_i(r) − w̄_i(r) with θ_i(r) the anchor round r started from, applied to the
    anchor now; each round's local progress enters θ once, one round late.

    Decisions. `all` sends w_i to every other node ((n − 1)|w| per round, counted as sent) instead of an
    all-reduce (2(n − 1)/n |w|): the rule holds no Comm, and messages are correct in every transport (the
    simulator's and `overlap` too). At messages() the node keeps d_i = θ_i − W_ii w_i of that round, so receive()
    needs only Σ_j W_ij w_j, whichever round it is applied in. A round needs every peer's message: no `async`,
    no dropped messages (config.py refuses both).
    """

    per_edge = False  # messages() ends a round (it keeps that round's d_i): one call per round

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n, i = self.topology.n, self.rank
        self.rows = ([(1 / n, {j: 1 / n for j in range(n) if j != i})] if self.cfg.outer_average == "all"
                     else mixing_rows(self.topology, self.cfg.mixing, i))
        self.theta = self.flat.w.clone()  # θ_i, the anchor
        self.b = torch.zeros_like(self.theta)  # b_i, the outer momentum
        self.rounds = 0  # rounds whose messages were built: r
        self.pending: deque[tuple[torch.Tensor, dict[int, float]]] = deque()  # (d_i, {j: W_ij}) per round sent

    def messages(self) -> dict[int, torch.Tensor]:
        """w_i to round r's peers; keeps d_i = θ_i − W_ii w_i for the outer step that round's average makes."""
        W_ii, W_ij = self.rows[self.rounds % len(self.rows)]
        self.rounds += 1
        self.pending.append((self.theta - W_ii * self.flat.w, W_ij))
        return {j: self.flat.w for j in W_ij}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        """The outer step of the oldest round not yet applied, once its messages are here (at once with no peers)."""
        while self.pending and (msgs or not self.pending[0][1]):
            delta, W_ij = self.pending.popleft()  # Δ_i = d_i − Σ_j W_ij w_j
            if msgs:
                if msgs.keys() != W_ij.keys():
                    raise RuntimeError(f"diloco got messages from {sorted(msgs)}, expected {sorted(W_ij)}")
                for j, w_j in msgs.items():
                    delta.add_(w_j, alpha=-W_ij[j])
                msgs = {}
            mu = self.cfg.outer_momentum
            self.b.mul_(mu).add_(delta)
            self.theta.sub_(delta.add_(self.b, alpha=mu), alpha=self.cfg.outer_lr)
            self.flat.w.copy_(self.theta)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "theta": self.theta, "b": self.b, "rounds": self.rounds,
                "pending": [d for d, _ in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.theta.copy_(state["theta"])
        self.b.copy_(state["b"])
        self.rounds = state["rounds"]
        first = self.rounds - len(state["pending"])  # the rounds whose outer step is still to come
        self.pending = deque((d.clone(), self.rows[(first + k) % len(self.rows)][1])
                             for k, d in enumerate(state["pending"]))
