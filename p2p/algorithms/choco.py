"""choco: CHOCO-SGD, compressed gossip (Koloskova et al. 2019)."""

import torch

from p2p.algorithms.local import Local
from p2p.compress import Compressor, message_seed
from p2p.config import ConfigError

SEED = 0  # of message_seed: the algorithm section holds no run seed; streams still differ per sender and round


class Choco(Local):
    """Local step exactly as torch.optim.SGD: w_i ← w_i − γ_t d_i (momentum stays local).

    Node i keeps public copies x̂_j of itself and its neighbours, all starting at the common w_0. At
    exchange number r (every K-th step), with Q = `algorithm.compressor` and γ_c = `algorithm.consensus_lr`:

        q_i = Q(w_i − x̂_i)                        sent to every neighbour j, q_j received
        x̂_j ← x̂_j + q_j    for j ∈ N(i) ∪ {i}
        w_i ← w_i + γ_c Σ_{j∈N(i)} W_ij (x̂_j − x̂_i)

    W: dsgd's mixing weights (`algorithm.mixing`). With Q = none and γ_c = 1, x̂_j = w_j after every
    exchange and this is dsgd. A message is Q's payload packed into one flat uint8 tensor (values, and
    int32 indices for topk), so `bytes_sent` counts exactly `Compressor.nbytes()` per neighbour;
    randk and qsgd8 draw from `message_seed(0, sender, r)`, known at both ends. Both ends apply the
    same bytes through the same `decompress`, so i's x̂_i equals j's copy of it bit for bit.

    Decisions: `sync` only (config.SYNC_ONLY) and no time-varying graph: a skipped, stale or unsent
    q_i would leave a neighbour's copy x̂_i different from i's own, and the two never meet again.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.topology.schedule is not None:
            raise ConfigError(f"choco cannot use the time-varying topology {self.topology.source}: an inactive "
                              f"neighbour would miss q_i and its copy x_hat_i would drift; use dsgd")
        w, i = self.flat.w, self.rank
        W = self.topology.mixing_matrix(self.cfg.mixing) if self.neighbors else None
        self.W_ij = {j: float(W[i, j]) for j in self.neighbors}
        self.Q = Compressor(self.cfg.compressor, w.numel(), self.cfg.ratio, w.dtype)
        self.x_hat = {j: w.clone() for j in [i, *self.neighbors]}  # x̂_j, j ∈ N(i) ∪ {i}
        self.rounds = 0  # exchanges so far: r
        self.q_i: torch.Tensor | None = None  # the packed q_i of the latest round, until receive() applies it

    def messages(self) -> dict[int, torch.Tensor]:
        """The same packed q_i = Q(w_i − x̂_i) to every neighbour; r advances once per round."""
        payload = self.Q.compress(self.flat.w - self.x_hat[self.rank], message_seed(SEED, self.rank, self.rounds))
        self.q_i = torch.cat([t.contiguous().view(torch.uint8) for t in payload.values()])  # (nbytes,)
        self.rounds += 1
        return {j: self.q_i for j in self.neighbors}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        r = self.rounds - 1  # sync: every message is of the round just sent
        for j, q_j in {self.rank: self.q_i, **msgs}.items():
            self.x_hat[j].add_(self.Q.decompress(self._unpack(q_j), message_seed(SEED, j, r)))
        x_hat_i = self.x_hat[self.rank]
        for j, W_ij in self.W_ij.items():
            self.flat.w.add_(self.x_hat[j] - x_hat_i, alpha=self.cfg.consensus_lr * W_ij)

    def _unpack(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """The packed uint8 bytes back into Q's payload tensors (cloned: a dtype view needs aligned storage)."""
        payload, offset = {}, 0
        for name, (n, dtype) in self.Q.shapes().items():
            nbytes = n * dtype.itemsize
            payload[name] = q[offset:offset + nbytes].clone().view(dtype)
            offset += nbytes
        return payload

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rounds": self.rounds, "x_hat": self.x_hat}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rounds = state["rounds"]
        for j, x in state["x_hat"].items():
            self.x_hat[j].copy_(x)
