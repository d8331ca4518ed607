"""gossip: randomized pairwise gossip SGD (Boyd et al. 2006)."""

import random

import torch

from p2p.algorithms.local import Local
from p2p.config import ConfigError


class Gossip(Local):
    """Local SGD step as in dsgd. At exchange number r one matching of the graph is active and
    every matched pair averages:

        w_i ← (w_i + w_j) / 2        (unmatched nodes keep w_i)

    so a node sends at most one model per exchange (dsgd sends d_i). The matchings are the colours
    of the topology's deterministic edge colouring; `schedule = cyclic` takes colour r mod C,
    `random` draws it from `random.Random(r)`, identical on every node, so all nodes agree on the
    matching without talking and the schedule needs no state beyond r. Pairs use send/recv:
    benchmarks/gossip_pair.py found a 2-rank subgroup all-reduce no faster on gloo.

    Decision: a time-varying topology is a configuration error. Its matchings already are such a
    schedule; dsgd on a schedule of matchings (one_peer_hypercube) is pairwise averaging.
    """

    per_edge = False  # messages() advances the matching: one call per round

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.topology.schedule is not None:
            raise ConfigError(f"gossip picks its own matching per exchange, so it takes a static topology, not "
                              f"{self.topology.source}; use dsgd (on one_peer_hypercube it is pairwise averaging)")
        self.matchings = self.topology.matchings()
        self.rounds = 0  # exchanges so far: r

    def partner(self, r: int) -> int | None:
        """This node's partner in the matching active at exchange r (None if unmatched)."""
        C = len(self.matchings)
        colour = r % C if self.cfg.schedule == "cyclic" else random.Random(r).randrange(C)
        for i, j in self.matchings[colour]:
            if self.rank in (i, j):
                return j if i == self.rank else i
        return None

    def messages(self) -> dict[int, torch.Tensor]:
        """w_i to this round's partner, if any; r advances once per round."""
        if not self.matchings:
            return {}
        j = self.partner(self.rounds)
        self.rounds += 1
        return {} if j is None else {j: self.flat.w}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        for w_j in msgs.values():  # at most one
            self.flat.w.add_(w_j).mul_(0.5)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rounds = state["rounds"]
