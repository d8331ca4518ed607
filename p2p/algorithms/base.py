"""What every algorithm shares: the model as one flat vector, and the one-method interface."""

from __future__ import annotations

import torch
from torch import nn

from p2p.config import AlgorithmConfig, ConfigError
from p2p.topology import Topology


class FlatParams:
    """The trainable parameters as views into one flat buffer `w`, their gradients into `g`.

    Every rule in ALGORITHMS.md is element-wise, so it runs once on `w` instead of once per
    tensor, and a message is `w` itself (or one vector shaped like it): no packing per exchange.
    Autograd accumulates into the existing `.grad` views, so `g` must be zeroed, never set to None.
    Non-trainable buffers (e.g. BatchNorm running stats) are not part of it and never exchanged.
    """

    def __init__(self, model: nn.Module | list[torch.Tensor]):
        params = model.parameters() if isinstance(model, nn.Module) else model
        self.params = [p for p in params if p.requires_grad]
        kinds = sorted({f"{p.dtype} on {p.device}" for p in self.params})
        if len(kinds) > 1:
            raise ConfigError(f"all trainable parameters must share one dtype and device, found {' and '.join(kinds)}: "
                              f"model.to(device, dtype) first (autocast keeps parameters in one dtype)")
        self.w = torch.cat([p.detach().reshape(-1) for p in self.params])  # (P,)
        self.g = torch.zeros_like(self.w)  # (P,)
        for p, (w, g) in zip(self.params, self._views(self.params)):
            p.data, p.grad = w, g

    @classmethod
    def row(cls, like: list[torch.Tensor], w: torch.Tensor, g: torch.Tensor) -> FlatParams:
        """A simulated node (p2p/sim.py): tensors shaped as `like`, viewing given buffers `w` and `g` (its
        rows of the network's stacked weights and gradients) instead of a model's own parameters."""
        flat = cls.__new__(cls)
        flat.w, flat.g = w, g
        flat.params = []
        for w_p, g_p in flat._views(like):
            w_p.grad = g_p
            flat.params.append(w_p)
        return flat

    def _views(self, like: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(view of w, view of g) per tensor of `like`, in order: the tensors as slices of the flat buffers."""
        views, offset = [], 0
        for p in like:
            n = p.numel()
            views.append((self.w[offset:offset + n].view_as(p), self.g[offset:offset + n].view_as(p)))
            offset += n
        return views

    def fan_in(self) -> torch.Tensor:
        """sqrt(fan_in) of each element's tensor: the `penalty_scale = fan_in` v_p, shaped like w.

        fan_in = numel / shape[0] for tensors of 2+ dims, shape[0] for 1-D tensors.
        """
        v = torch.empty_like(self.w)
        offset = 0
        for p in self.params:
            fan = p.numel() // p.shape[0] if p.dim() >= 2 else p.shape[0]
            v[offset:offset + p.numel()] = fan ** 0.5
            offset += p.numel()
        return v


class Algorithm:
    """One node's update rule, in the three parts a transport (p2p/transport.py) drives:

        update(lr)       every step: the local update of `flat.w` from the gradient g_i in `flat.g`
        messages()       at the end of a round: {neighbour j: the flat tensor to send j}
        receive(msgs)    what the rule does with received messages {j: tensor}

    A rule never calls the network and holds no process group: `p2p.DecentralizedOptimizer` is where a
    rule meets a transport, and the transport decides when messages travel and which received ones it hands
    over (`sync`: this round's; `overlap`, `async`: older ones, at most one per edge
    and each once; possibly for only some neighbours). The tensors `messages()` returns may be the
    rule's own buffers (the transport copies what it keeps in flight); those `receive()` gets are
    valid only during the call (copy what is kept). Everything with state (duals, neighbour copies,
    momentum) is in `state_dict()` so a checkpoint restores it exactly.
    """

    # messages() may be called at any step, its messages sent to some peers only: edges can exchange at
    # different steps (the seed's per-edge slots). False for a rule whose messages() picks the round's partners.
    per_edge = True
    # g_i ← (1/n) Σ_j g_j before every update (allreduce): the optimizer asks its transport for it
    averages_gradients = False
    # rounds between messages() and receive() of the replies to them: 0 in sync, 1 in overlap (set by
    # DecentralizedOptimizer from the mode; a rule that keeps what it sent, diloco, needs to know which round)
    late = 0

    def __init__(self, flat: FlatParams, cfg: AlgorithmConfig, topology: Topology, rank: int):
        self.flat, self.cfg, self.topology, self.rank = flat, cfg, topology, rank
        self.neighbors = topology.neighbors(rank) if topology.n > 1 else []
        self.lr = cfg.lr  # γ_t of the latest update, for rules whose receive() needs it (cadmm)

    def update(self, lr: float) -> None:
        raise NotImplementedError

    def messages(self) -> dict[int, torch.Tensor]:
        return {}

    def receive(self, msgs: dict[int, torch.Tensor]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def diagnostics(self, lr: float) -> dict[str, float]:
        """Scalars worth a CSV column (e.g. how hard duals pull), read from the state after a step."""
        return {}


class MomentumDirection:
    """d_i from g_i exactly as torch.optim.SGD computes its step direction, for the rules whose primal
    update is not a torch optimizer step (the primal-dual family, cadmm):

        g ← g + weight_decay·w;   m ← β m + (1 − dampening) g   (m = g at the first step)
        d = g + β m  (nesterov)   or   d = m

    At a fixed point m is constant, so d ∝ g with the same factor on every node and Σ_i d_i = 0 ⇔
    Σ_i g_i = 0: the exact optimum is kept. With β = 0 and no weight decay, d = g (no copy).
    Decision (the spec names momentum, dampening and nesterov): weight_decay is applied here too, as
    torch does, so every torch SGD knob means the same for every rule.
    """

    def __init__(self, cfg: AlgorithmConfig, like: torch.Tensor):
        self.beta, self.dampening, self.nesterov, self.weight_decay = (
            cfg.momentum, cfg.dampening, cfg.nesterov, cfg.weight_decay)
        self.m = torch.zeros_like(like) if self.beta else None  # m_i, the momentum buffer
        self.started = False  # torch's "buffer is None": m = g at the first step

    def __call__(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.weight_decay:
            g = g.add(w, alpha=self.weight_decay)
        if self.m is None:
            return g
        if self.started:
            self.m.mul_(self.beta).add_(g, alpha=1 - self.dampening)
        else:
            self.m.copy_(g)
            self.started = True
        return g.add(self.m, alpha=self.beta) if self.nesterov else self.m

    def state_dict(self) -> dict:
        return {"m": self.m, "started": self.started} if self.m is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.m is not None:
            self.m.copy_(state["m"])
            self.started = state["started"]


def make_optimizer(flat: FlatParams, cfg: AlgorithmConfig) -> torch.optim.Optimizer:
    """The local optimizer of the torch-optimizer rules (local, allreduce, dsgd, gossip, choco): exactly torch's
    SGD, Adam (weight_decay as an L2 term in the gradient) or AdamW (weight_decay decoupled), as torch defines them.
    """
    if cfg.optimizer in ("adam", "adamw"):
        adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return adam(flat.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(flat.params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                           nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
