"""dsgd: decentralized SGD, adapt-then-combine (D-PSGD, Lian et al. 2017)."""

import torch

from p2p.algorithms.local import Local


class DSGD(Local):
    """Local step exactly as torch.optim.SGD: w_i ← w_i − γ_t d_i (momentum stays local).

    At an exchange (every K-th step): send w_i to every neighbour, receive every w_j, then

        w_i ← W_ii w_i + Σ_{j∈N(i)} W_ij w_j

    with W from the topology (`algorithm.mixing`: metropolis, uniform or the file's weights).
    """

    def __init__(self, *args):
        super().__init__(*args)
        W = self.topology.mixing_matrix(self.cfg.mixing)
        i = self.rank
        self.W_ii = float(W[i, i])
        self.W_ij = {j: float(W[i, j]) for j in self.neighbors}
        self.w_j = {j: torch.empty_like(self.flat.w) for j in self.neighbors}  # receive buffers

    def step(self, lr: float, exchange: bool) -> None:
        super().step(lr, exchange)  # the torch SGD step
        if not exchange:
            return
        w = self.flat.w
        self.comm.exchange({j: w for j in self.neighbors}, self.w_j)
        w.mul_(self.W_ii)
        for j, w_j in self.w_j.items():
            w.add_(w_j, alpha=self.W_ij[j])
