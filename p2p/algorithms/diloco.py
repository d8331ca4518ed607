"""diloco: local steps with an outer Nesterov optimizer on an anchor (DiLoCo, Douillard et al. 2023), averaged
over all nodes or gossiped with the topology's mixing weights; in `overlap` the average is one round late."""

from collections import deque

import torch

from p2p.algorithms.dsgd import mixing_rows
from p2p.algorithms.local import Local


class DiLoCo(Local):
    """Every step a step of the local torch optimizer on w_i (`algorithm.optimizer`; DiLoCo's is adamw). Node i
    keeps an anchor θ_i (starts at w_0) and an outer momentum b_i (starts at 0). At the end of round r (every K
    steps) it sends, with δ_i(r) its progress over round r's K local steps,

        m_i(r) = θ_i + δ_i(r)                        (in sync w_i itself: round r started at θ_i)

    and, when the messages of round q arrive (q = r in sync; q = r − 1 in overlap, where they travel while
    round r's steps run, as Streaming DiLoCo overlaps them),

        m̄_i = m_i(q) + Σ_{j∈N_q(i)} W_ij (m_j(q) − m_i(q))   (gossip: dsgd's mixing rows of round q, time-varying
                                                         graphs included; `outer_average = all`: W_ij = 1/n)
        Δ_i = m_i(q) − δ_i(q) − m̄_i                  (the outer gradient; θ_i − w̄_i in sync)
        b_i ← μ b_i + Δ_i
        θ_i ← θ_i − η (Δ_i + μ b_i)                  (Nesterov SGD: η = `outer_lr`, μ = `outer_momentum`)
        w_i ← θ_i + Σ_{q < p ≤ r} δ_i(p)             (sync: w_i ← θ_i; overlap: plus round r's own progress,
                                                      whose average comes next round; the local optimizer's
                                                      state is kept)

    In overlap the first round's end applies nothing (no messages were in flight). A message that did not arrive
    (`sim.drop_prob`) leaves its weight on m_i(q), as in dsgd.

    Decisions. `all` sends m_i to every other node ((n − 1)|w| per round, counted as sent) instead of an
    all-reduce (2(n − 1)/n |w|): the rule holds no Comm and its messages are correct in every transport, the
    simulator's included. In overlap a node keeps its own unaveraged last round in w_i (DiLoCo's eager form)
    instead of restarting from the anchor, which would throw away the K steps it ran while the average
    travelled (that restart stalled the digits CNN at 30 %; docs/algorithms.md, "diloco").
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n, i = self.topology.n, self.rank
        self.rows = ([(1 / n, {j: 1 / n for j in range(n) if j != i})] if self.cfg.outer_average == "all"
                     else mixing_rows(self.topology, self.cfg.mixing, i))  # per graph of the schedule
        self.theta = self.flat.w.clone()  # θ_i, the anchor
        self.b = torch.zeros_like(self.theta)  # b_i, the outer momentum
        self.start = self.flat.w.clone()  # w_i where this round's local steps started
        self.rounds = 0  # rounds so far: r
        self.sent: deque = deque()  # (δ_i(p), m_i(p), W_ij of round p) of the rounds p not yet applied

    def messages(self) -> dict[int, torch.Tensor]:
        """m_i(r) = θ_i + δ_i(r) to round r's peers; r advances once per round."""
        W_ij = self.rows[self.rounds % len(self.rows)][1]
        self.rounds += 1
        delta = self.flat.w - self.start
        self.sent.append((delta, self.theta + delta, W_ij))
        return {j: self.sent[-1][1] for j in W_ij}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        w, mu = self.flat.w, self.cfg.outer_momentum
        if len(self.sent) > self.late:  # else overlap's first round: nothing was in flight
            delta_q, m_q, W_ij = self.sent.popleft()
            outer = delta_q.neg_()  # Δ_i = m_i − δ_i − m̄_i = −δ_i − Σ_j W_ij (m_j − m_i)
            for j, m_j in msgs.items():
                outer.sub_(m_j - m_q, alpha=W_ij[j])
            self.b.mul_(mu).add_(outer)
            self.theta.sub_(outer.add_(self.b, alpha=mu), alpha=self.cfg.outer_lr)
            w.copy_(self.theta)
            for delta_p, _, _ in self.sent:  # the rounds still travelling (overlap: round r)
                w.add_(delta_p)
        self.start.copy_(w)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "theta": self.theta, "b": self.b, "start": self.start,
                "rounds": self.rounds, "sent": list(self.sent)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.theta.copy_(state["theta"])
        self.b.copy_(state["b"])
        self.start.copy_(state.get("start", self.theta))
        self.rounds = state["rounds"]
        self.sent = deque((d.to(self.theta.device), m.to(self.theta.device), W) for d, m, W in state.get("sent", []))
