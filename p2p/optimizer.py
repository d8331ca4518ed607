"""The decentralized optimizer: where a rule (p2p/algorithms) meets a transport (p2p/transport.py).

    opt = p2p.DecentralizedOptimizer(model.parameters(), net, algorithm="pdmm_isvr", lr=0.1, momentum=0.9)
    for x, y in loader:                               # the user's loop, unchanged
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    opt.finish()

A real `torch.optim.Optimizer`: `param_groups[0]["lr"]` is the rule's γ_t (torch's schedulers drive it),
`state_dict()` holds everything a resume needs (duals, momentum, neighbour copies, messages not yet applied,
the step count), and `torch.amp.GradScaler` hands it the skip decision (`_step_supports_amp_scaling`), so a
node with non-finite gradients skips its local update but keeps exchanging in step with its neighbours.
The trainer (p2p/trainer.py) and the simulator (p2p/sim.py) train through this class too.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Iterable

import torch
from torch import nn

from p2p.algorithms import Algorithm, FlatParams, build_algorithm
from p2p.config import (TORCH_OPTIMIZER, AlgorithmConfig, CommConfig, Config, ConfigError, _suggest, _toml_value,
                        validate)
from p2p.topology import Topology

log = logging.getLogger("p2p")
ISVR_INTERVAL = 4  # K for pdmm_isvr/admm_isvr when neither the config nor the topology file sets one
_ALGORITHM_FIELDS = {f.name for f in dataclasses.fields(AlgorithmConfig)} - {"name", "optimizer"}
# the [comm] fields of one optimizer; backend and timeout_s are p2p.init's
_COMM_FIELDS = {"mode", "max_staleness", "wire_dtype"}


def resolve_interval(cfg: AlgorithmConfig, topology: Topology) -> str | None:
    """Set K = cfg.interval in place: 0 (auto) becomes the topology file's round, else 1 (ISVR: 4).

    ISVR's penalty is built for K > 1 local steps per round (at K = 1 it is c_ij = 1/γ, coupling so
    strong that it divides the network's step by 1 + d; see PrimalDual): on the digits CNN, K = 4
    learns as well as K = 8 and better than K = 1 (docs/algorithms.md, "Defaults").

    An explicit K wins over the file's round; the returned warning (None when all agree) says so: the file's
    slots no longer fit K.
    """
    if cfg.interval == 0:
        cfg.interval = topology.round or (ISVR_INTERVAL if cfg.name.endswith("_isvr") else 1)
    elif topology.round is not None and cfg.interval != topology.round:
        return (f"--algorithm.interval {cfg.interval} overrides the round {topology.round} of topology "
                f"{topology.source}: its per-edge slots assume K = {topology.round}")
    return None


def edge_slots(cfg: AlgorithmConfig, mode: str, topology: Topology,
               rule: Algorithm) -> tuple[dict[int, int] | None, str]:
    """{neighbour j: the step of a round at which edge (i, j) exchanges}: the slot of its lower-ranked end in
    the seed's node_list.json, so both ends agree. Only in async with K = the file's round (what the slots
    were made for); otherwise None and why, for a log line (docs/exchange-modes.md)."""
    if topology.slots is None or topology.round is None:
        return None, ""
    K, where = cfg.interval, f"the per-edge slots of topology {topology.source}"
    why = (f"--comm.mode {mode} exchanges every edge at a round's end" if mode != "async" else
           f"K = {K} is not the file's round {topology.round}" if K != topology.round else
           f"{cfg.name} picks its own partners each round" if not rule.per_edge else "")
    if why:
        return None, f"{where} are ignored: {why}"
    i = rule.rank
    return ({j: topology.slots[min(i, j), max(i, j)] for j in rule.neighbors},
            f"async: each edge exchanges once per round at {where} (its lower-ranked end's), K = {K}")


def _library_words(message: str) -> str:
    """A config message in the library's words: `--algorithm.lr` is the keyword `lr`."""
    return re.sub(r"--(?:algorithm|comm)\.(\w+)", r"\1", message.replace("--algorithm.name", "algorithm"))


class DecentralizedOptimizer(torch.optim.Optimizer):
    """One node's decentralized training step: the local update of `algorithm`, then whatever exchange with
    the graph's neighbours is due (every K-th step, or an edge's slot), timed by `mode`.

    Args:
        params: the model's parameters (one group; trainable ones only are trained and exchanged). They are
            moved into one flat buffer (each parameter's `.data` becomes a view of it), so every rule runs
            once per step on one vector and a message needs no packing.
        net: this node's Network (`p2p.init`).
        algorithm: local | allreduce | dsgd | gossip | pdmm | admm | pdmm_isvr | admm_isvr | cadmm | choco | gt
            | ed | qgm | diloco (docs/algorithms.md).
        optimizer: the local step of local, allreduce, dsgd, gossip, choco and diloco: "sgd" | "adam" | "adamw", or a
            torch optimizer the caller built over the same parameters (e.g. torch.optim.RAdam); its
            param_groups then become this optimizer's, learning rates included.
        mode, max_staleness, wire_dtype: the [comm] fields: sync | overlap | async, async's bound in rounds, and
            fp32 | bf16, the dtype messages travel in (the rule's state stays in the parameters' dtype).
        **fields: the [algorithm] fields, with the names and defaults of docs/configuration.md (lr, momentum,
            weight_decay, interval, eta, mixing, ...).

    Raises ConfigError (a ValueError) with one line for a bad argument, before any communication where it can
    be; with a joined network (`p2p.init`) every rank checks that all hold the same parameter shapes and settings.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler calls step() always, with found_inf and grad_scale

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict] | FlatParams, net,
                 algorithm: str = "dsgd", *, optimizer: str | torch.optim.Optimizer = "sgd", mode: str = "sync",
                 max_staleness: int = 2, wire_dtype: str = "fp32", **fields):
        for key in fields:
            if key not in _ALGORITHM_FIELDS:
                where = "p2p.init's" if key in ("backend", "timeout_s") else "not a field of [algorithm] or [comm]"
                raise ConfigError(f"DecentralizedOptimizer: unknown keyword {key!r} ({where})"
                                  f"{_suggest(key, _ALGORITHM_FIELDS | _COMM_FIELDS)}")
        inner = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        acfg = AlgorithmConfig(name=algorithm, optimizer="sgd" if inner is not None else optimizer, **fields)
        ccfg = CommConfig(mode=mode, max_staleness=max_staleness, wire_dtype=wire_dtype)
        try:
            validate(Config(algorithm=acfg, comm=ccfg))
        except ConfigError as e:
            raise ConfigError(_library_words(str(e))) from None
        if inner is not None and algorithm not in TORCH_OPTIMIZER:
            raise ConfigError(f"{algorithm}'s local step is its own update (docs/algorithms.md), not a torch "
                              f"optimizer: pass optimizer='sgd' (its direction), or use one of "
                              f"{', '.join(TORCH_OPTIMIZER)} to wrap {type(inner).__name__}")
        flat = params if isinstance(params, FlatParams) else _flatten(params, inner)
        if flat.w.device != net.device:
            raise ConfigError(f"the parameters are on {flat.w.device} but this node's network device is "
                              f"{net.device}: move the model first, model.to(net.device)")
        wrapped = {id(p) for group in (inner.param_groups if inner is not None else []) for p in group["params"]}
        if inner is not None and wrapped != {id(p) for p in flat.params}:
            raise ConfigError(f"optimizer={type(inner).__name__}(...) must be built over exactly the trainable "
                              f"parameters given to DecentralizedOptimizer")
        if net.started:  # the library's path: every rank checks now; the trainer compared its config already
            net.check_same([f"parameters = {[tuple(p.shape) for p in flat.params]} {flat.w.dtype}",
                            *(f"{k} = {_toml_value(v)}" for k, v in dataclasses.asdict(acfg).items()),
                            f"mode = {mode}", f"max_staleness = {max_staleness}", f"wire_dtype = {wire_dtype}"])
        if warning := resolve_interval(acfg, net.topology):
            if net.rank == 0:
                log.warning(warning)
        super().__init__(flat.params, {"lr": acfg.lr})
        self.cfg, self.flat, self.net = acfg, flat, net
        self._grads = [p.grad for p in flat.params]  # the views into flat.g that autograd accumulates into
        self.rule = build_algorithm(flat, acfg, net.topology, net.rank, optimizer=inner)
        self.rule.late = 0 if mode == "sync" else 1
        slots, self.slots_line = edge_slots(acfg, mode, net.topology, self.rule)
        self.transport = net.transport(mode, max_staleness, acfg.interval, slots, wire_dtype)
        if inner is not None:  # torch's wrapping convention (PostLocalSGDOptimizer): the inner groups are ours
            self.param_groups = inner.param_groups
        if hasattr(self.rule, "optimizer"):
            self.state = self.rule.optimizer.state
        self.steps = 0  # step() calls so far: the transport's step count
        self.finished = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (they are views into one flat buffer; `set_to_none` is ignored)."""
        self.flat.g.zero_()
        self._own_grads()

    def _own_grads(self) -> None:
        """Put back the flat buffer's views where a user's `model.zero_grad()` or code replaced `.grad`."""
        for p, view in zip(self.flat.params, self._grads):
            grad = p.grad
            if grad is not view:  # torch keeps a tensor's Python object: identity is the cheap check (6 µs / 82)
                view.zero_() if grad is None else view.copy_(grad)
                p.grad = view

    @torch.no_grad()
    def step(self, closure=None):
        """The local update from the gradients in `.grad`, then the exchanges due after this step.

        Under torch.amp.GradScaler (`scaler.step(opt)`) a step whose gradients are not finite makes no local
        update on this node (nothing of the rule's state changes), while the exchanges due still happen, so no
        neighbour waits and no rank falls a round behind. allreduce averages first, so every node skips together.
        """
        if self.finished:
            raise RuntimeError("DecentralizedOptimizer.step() after finish(): the exchanges are closed; build a new "
                               "optimizer to train on")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._own_grads()
        g, lr = self.flat.g, self.param_groups[0]["lr"]
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)  # set by GradScaler
        if scale is not None:
            g.mul_(scale.double().reciprocal().float().to(g.dtype))  # as GradScaler.unscale_ does
        if self.rule.averages_gradients:
            self.transport.average_gradient(g)
        # allreduce: a node's infinity is in everyone's mean now, so all skip together
        skip = found_inf is not None and (found_inf.item() > 0 or (self.rule.averages_gradients
                                                                   and not torch.isfinite(g).all().item()))
        if not skip:
            if self.cfg.l2_lambda:
                g.add_(self.flat.w, alpha=self.cfg.l2_lambda)
            self.rule.update(lr)
        self.transport.after_step(self.rule, self.steps)
        self.steps += 1
        return loss

    def finish(self) -> None:
        """Complete every exchange in flight and close; call on every node after the last step."""
        if not self.finished:
            self.transport.drain()
            self.finished = True

    def __enter__(self) -> DecentralizedOptimizer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.finish()

    def state_dict(self) -> dict:
        """Everything a resume needs. Completes the exchanges in flight first (overlap, async), so call it at the
        same step on every node, as a checkpoint is."""
        self.transport.drain()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": {}, "param_groups": groups, "rule": self.rule.state_dict(),
                "transport": self.transport.state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = {"param_groups", "rule", "transport", "steps"} - state_dict.keys()
        if missing:
            raise ValueError(f"not a DecentralizedOptimizer state_dict: {sorted(missing)} missing")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"the state_dict has {len(state_dict['param_groups'])} parameter groups, this "
                             f"optimizer {len(self.param_groups)}")
        self.rule.load_state_dict(state_dict["rule"])
        self.transport.load_state_dict(state_dict["transport"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.steps = state_dict["steps"]


def _flatten(params, inner: torch.optim.Optimizer | None) -> FlatParams:
    """The parameters as one FlatParams, or one line saying why they cannot be."""
    params = list(params)
    if params and isinstance(params[0], dict):
        if len(params) > 1 and inner is None:
            raise ConfigError("DecentralizedOptimizer takes one parameter group (the rule runs on one flat vector "
                              "with one γ): for per-group settings, build a torch optimizer with your groups and "
                              "pass it as optimizer=")
        params = [p for group in params for p in group["params"]]
    tensors = [p for p in params if isinstance(p, torch.Tensor) and p.requires_grad]
    if not tensors:
        raise ConfigError("DecentralizedOptimizer got no trainable parameters (is the model empty, or frozen?)")
    return FlatParams(tensors)  # one line when their dtypes or devices differ


def mean_and_spread(w: torch.Tensor, comm) -> tuple[torch.Tensor, float]:
    """(w̄ = (1/n) Σ_i w_i, (1/n) Σ_i ||w_i − w̄||²) over all nodes: two collectives, not training traffic."""
    w_bar = comm.all_reduce_mean_(w.clone(), training=False)
    spread = comm.all_reduce_sum([(w - w_bar).pow(2).sum().item()])[0] / comm.world_size
    return w_bar, spread


def _trained(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


@torch.no_grad()
def average_model(model: nn.Module, net) -> nn.Module:
    """A copy of `model` whose parameters and floating-point buffers are their mean over all nodes: the
    network-averaged model w̄, e.g. to evaluate. A collective: every node calls it at the same point."""
    avg = copy.deepcopy(model)
    tensors = [t for t in (*avg.parameters(), *avg.buffers()) if t.is_floating_point()]
    flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
    net.comm.all_reduce_mean_(flat, training=False)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return avg


@torch.no_grad()
def consensus_distance(model: nn.Module, net) -> float:
    """(1/n) Σ_i ||w_i − w̄||² over the trainable parameters: how far the nodes are from agreeing. A collective."""
    return mean_and_spread(_trained(model), net.comm)[1]
