"""dsgd: decentralized SGD, adapt-then-combine (D-PSGD, Lian et al. 2017)."""

import torch

from p2p.algorithms.local import Local
from p2p.topology import Topology


def mixing_rows(topology: Topology, kind: str, i: int) -> list[tuple[float, dict[int, float]]]:
    """Node i's row of W(r) for each graph of the schedule (one for a static graph): (W_ii, {j: W_ij}) over
    round r's peers, W(r) the `kind` mixing matrix (metropolis, uniform, file) of round r's graph."""
    rows = []
    for r, graph in enumerate(topology.schedule if topology.schedule is not None else (topology.edges,)):
        W = topology.mixing_matrix(kind, graph)
        rows.append((float(W[i, i]), {j: float(W[i, j]) for j in topology.active_neighbors(i, r)}))
    return rows


class DSGD(Local):
    """Local step exactly as torch.optim.SGD: w_i ← w_i − γ_t d_i (momentum stays local).

    At exchange number r (every K-th step): send w_i to every neighbour j active in round r
    (every neighbour on a static graph), receive every such w_j, then

        w_i ← W_ii(r) w_i + Σ_{j∈N_r(i)} W_ij(r) w_j

    with W(r) the mixing matrix of round r's graph (`algorithm.mixing`: metropolis, uniform or the
    file's weights; a static graph's W every round). With staleness (`overlap`, `async`) a round may
    bring messages from only some neighbours M; each is mixed in once, as the same update written per
    edge (W_ii = 1 − Σ_j W_ij), with W_ij of the latest round in which this node sent to j:

        w_i ← w_i + Σ_{j∈M} W_ij (w_j − w_i)

    Decision: mixing an old copy again when nothing new came would pull w_i back towards it every
    round and apply one message several times: on benchmarks/async_stragglers.py it cost 1.8 points
    of test accuracy against sync, mixing each message once 0.8.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = mixing_rows(self.topology, self.cfg.mixing, self.rank)  # per graph of the schedule
        self.rounds = 0  # exchanges so far: r
        self.W_ii, self.W_ij = 1.0, {}  # the row of the latest round this node sent in
        self.weight: dict[int, float] = {}  # per neighbour: W_ij of the latest round this node sent to j

    def _sent(self, r: int) -> None:
        self.W_ii, self.W_ij = self.rows[r % len(self.rows)]
        self.weight.update(self.W_ij)

    def messages(self) -> dict[int, torch.Tensor]:
        """w_i to this round's peers; r advances once per round."""
        self._sent(self.rounds)
        self.rounds += 1
        return {j: self.flat.w for j in self.W_ij}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        w = self.flat.w
        if msgs.keys() == self.W_ij.keys():  # every peer of the latest round: sync, or overlap on time
            w.mul_(self.W_ii)
            for j, W_ij in self.W_ij.items():
                w.add_(msgs[j], alpha=W_ij)
        elif msgs:
            w_i = w.clone()
            for j, w_j in msgs.items():
                w.add_(w_j - w_i, alpha=self.weight[j])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rounds = state["rounds"]
        for r in range(max(0, self.rounds - len(self.rows)), self.rounds):  # the weights of the last period
            self._sent(r)
