"""dsgd: decentralized SGD, adapt-then-combine (D-PSGD, Lian et al. 2017)."""

import torch

from p2p.algorithms.local import Local


class DSGD(Local):
    """Local step exactly as torch.optim.SGD: w_i ← w_i − γ_t d_i (momentum stays local).

    At an exchange (every K-th step): send w_i to every neighbour, receive every w_j, then

        w_i ← W_ii w_i + Σ_{j∈N(i)} W_ij w_j

    with W from the topology (`algorithm.mixing`: metropolis, uniform or the file's weights).
    w_j is the last copy received from j (initially the common starting weights): in `sync` every
    exchange brings all of them; with staleness an edge with nothing new mixes its older copy again.
    """

    def __init__(self, *args):
        super().__init__(*args)
        W = self.topology.mixing_matrix(self.cfg.mixing)
        i = self.rank
        self.W_ii = float(W[i, i])
        self.W_ij = {j: float(W[i, j]) for j in self.neighbors}
        self.w_j = {j: self.flat.w.clone() for j in self.neighbors}  # last received neighbour weights

    def messages(self) -> dict[int, torch.Tensor]:
        return {j: self.flat.w for j in self.neighbors}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        for j, w_j in msgs.items():
            self.w_j[j].copy_(w_j)
        w = self.flat.w
        w.mul_(self.W_ii)
        for j, w_j in self.w_j.items():
            w.add_(w_j, alpha=self.W_ij[j])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "w_j": self.w_j}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for j in self.neighbors:
            self.w_j[j].copy_(state["w_j"][j])
