"""dsgd: decentralized SGD, adapt-then-combine (D-PSGD, Lian et al. 2017)."""

import torch

from p2p.algorithms.local import Local


class DSGD(Local):
    """Local step exactly as torch.optim.SGD: w_i ← w_i − γ_t d_i (momentum stays local).

    At an exchange (every K-th step): send w_i to every neighbour, receive every w_j, then

        w_i ← W_ii w_i + Σ_{j∈N(i)} W_ij w_j

    with W from the topology (`algorithm.mixing`: metropolis, uniform or the file's weights).
    With staleness (`overlap`, `async`) a round may bring messages from only some neighbours M ⊆ N(i);
    each is mixed in once, as the same update written per edge (W_ii = 1 − Σ_j W_ij):

        w_i ← w_i + Σ_{j∈M} W_ij (w_j − w_i)

    Decision: mixing an old copy again when nothing new came would pull w_i back towards it every
    round and apply one message several times: on benchmarks/async_stragglers.py it cost 1.8 points
    of test accuracy against sync, mixing each message once 0.8.
    """

    def __init__(self, *args):
        super().__init__(*args)
        W = self.topology.mixing_matrix(self.cfg.mixing)
        i = self.rank
        self.W_ii = float(W[i, i])
        self.W_ij = {j: float(W[i, j]) for j in self.neighbors}

    def messages(self) -> dict[int, torch.Tensor]:
        return {j: self.flat.w for j in self.neighbors}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        w = self.flat.w
        if len(msgs) == len(self.neighbors):
            w.mul_(self.W_ii)
            for j in self.neighbors:
                w.add_(msgs[j], alpha=self.W_ij[j])
        elif msgs:
            w_i = w.clone()
            for j, w_j in msgs.items():
                w.add_(w_j - w_i, alpha=self.W_ij[j])
