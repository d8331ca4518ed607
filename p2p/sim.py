"""A whole network in one process (`python train.py --sim.nodes n`): the same rules, another transport.

Every node keeps its own rule object from p2p/algorithms, unchanged, working on its own row of the
network's stacked weights W (n, P) and gradients G (n, P) (FlatParams.row). What differs from a
torchrun job:

    compute    one forward/backward for all nodes: torch.func.functional_call of one template module,
               vmapped over the rows of W and the nodes' minibatches (n, B, ...), so n small models cost
               about one model with an n-times larger batch (dropout draws differently per node)
    messages   transport.InMemory hands each round's messages from rule to rule with the timing of the
               `sync`, `overlap` and `async` modes, on virtual clocks: a local step takes `sim.step_s`
               plus the node's `train.step_delay` draw (the real run's draws), an exchange completes
               `sim.latency_s` after both ends posted it
    data       node k draws from its shard with seed + k through the same sampler as a real node,
               so it sees the same samples in the same order

So a simulated run reproduces the real run's per-node losses (tests/test_sim.py), writes the same
run directory (node<k>.csv, tb/node<k>/, tb/global/, checkpoints, curves.png) and resumes like it.
"""

from __future__ import annotations

import itertools
import logging
import resource
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate
from tqdm import tqdm

from p2p import checkpoint, plots
from p2p.algorithms import FlatParams
from p2p.comm import Env, read_env, resolve_device
from p2p.config import Config, ConfigError, one_line
from p2p.data import Splits, class_histogram, eval_loader, load_splits, node_loader, partition
from p2p.loop import (StopSignals, Stopped, autocast, drains_at, log_epoch, loss_function, midway, network,
                      optimizer_kwargs, partial_sums, resume_lr, scheduler, start_run_dir, step_delays,
                      stop_if_nonfinite, task_of)
from p2p.metrics import Metrics
from p2p.models import build_model
from p2p.node import Node
from p2p.optimizer import DecentralizedOptimizer
from p2p.topology import Topology
from p2p.transport import InMemory, Link

log = logging.getLogger("p2p")
EVAL_SAMPLES = 1 << 16  # samples per batched evaluation call (nodes × batch): bounds its activations


class SimComm:
    """What a rule and a checkpoint read of node k's Comm; its traffic is counted as a real node's."""

    def __init__(self, rank: int, sim: Simulation):
        self.rank, self.world_size, self.device, self.sim = rank, sim.n, sim.device, sim
        self.bytes_sent = 0
        self.comm_s = 0.0  # this node's share of the time spent delivering messages

    def all_reduce_mean_(self, t: torch.Tensor, training: bool = True,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
        """allreduce's gradient average (its one use of the network): the mean of the rows of G, travelling in
        `dtype` (None: t's; bf16: comm.wire_dtype)."""
        assert t.data_ptr() == self.sim.G[self.rank].data_ptr(), "only a node's gradient row is averaged"
        dtype = dtype or t.dtype
        t.copy_(self.sim.grad_mean(dtype))
        self.bytes_sent += 2 * (self.world_size - 1) * t.numel() * dtype.itemsize // self.world_size
        return t


class SimNetwork:
    """Node k's view of the simulated network, as DecentralizedOptimizer asks it of a Network: its optimizer's
    transport is its Link into the shared InMemory (the seed's per-edge slots are not simulated)."""

    started = False  # no process group: the simulator's nodes share one config by construction

    def __init__(self, rank: int, sim: Simulation, topology: Topology):
        self.rank, self.world_size, self.device, self.topology, self.sim = rank, sim.n, sim.device, topology, sim

    def transport(self, mode: str, max_staleness: int, interval: int, slots: dict[int, int] | None,
                  wire_dtype: str = "fp32") -> Link:
        return self.sim.transport.link(self.rank)


class RowModel:
    """Node k's model as a checkpoint sees it: the template's state_dict with row k of W as parameters."""

    def __init__(self, sim: Simulation, k: int):
        self.sim, self.k = sim, k

    def _rows(self) -> dict[str, torch.Tensor]:
        """Row k's view per parameter name, tied names too (a tied output layer is its embedding's row)."""
        rows = self.sim.param_views(self.sim.W[self.k])
        return {name: rows[canonical] for name, canonical in self.sim.aliases.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        rows = self._rows()
        # clones: torch.save would write a view's whole storage, all n rows
        return {name: rows[name].clone() if name in rows else t for name, t in self.sim.template.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        rows = self._rows()
        expected = self.sim.template.state_dict()
        if state.keys() != expected.keys():
            raise KeyError(f"parameters {sorted(set(state) ^ set(expected))[:3]} differ")
        for name, t in state.items():
            (rows[name] if name in rows else expected[name]).copy_(t)


def _tensor_source(ds: Dataset) -> tuple[tuple[torch.Tensor, ...], torch.Tensor] | None:
    """(the tensors of the TensorDataset under a chain of Subsets, positions in `ds` → rows of them), or
    None when the samples are not plain tensors (torchvision transforms): then they are fetched one by one."""
    index = None
    while isinstance(ds, Subset):
        ids = torch.as_tensor(ds.indices, dtype=torch.long)
        index = ids if index is None else ids[index]
        ds = ds.dataset
    if not isinstance(ds, TensorDataset):
        return None
    return ds.tensors, index if index is not None else torch.arange(len(ds))


class Simulation:
    """n nodes: their rules (one object each, unchanged), loaders and comms, and the batched model.

    W (n, P) and G (n, P) hold every node's flat weights and gradients; row k is node k's FlatParams.
    All nodes start from the template's weights, as all real nodes build the same model.
    """

    def __init__(self, cfg: Config, topology: Topology, splits: Splits, shards: list[np.ndarray],
                 device: torch.device):
        self.n, self.device, self.cfg_model, self.precision = len(shards), device, cfg.model.name, cfg.train.precision
        self.template = build_model(cfg.model, splits.in_shape, splits.num_classes).to(device)
        batchnorm = [n for n, m in self.template.named_modules()
                     if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if batchnorm:
            raise ConfigError(f"--sim.nodes cannot simulate model {cfg.model.name}: its BatchNorm layers "
                              f"({batchnorm[0]}, ...) update running statistics in place, which one batched call for "
                              f"all nodes cannot do per node; use GroupNorm or LayerNorm, or launch with torchrun")
        self.like = {name: p for name, p in self.template.named_parameters() if p.requires_grad}
        first = {id(p): name for name, p in self.like.items()}  # a tied parameter's every name -> its first one
        self.aliases = {name: first[id(p)] for name, p in self.template.named_parameters(remove_duplicate=False)
                        if id(p) in first}
        self.loss = loss_function(self.template)
        self._batched_once = False  # the first batched step turns torch.func's refusals into one line
        w0 = torch.cat([p.detach().reshape(-1) for p in self.like.values()])
        self.W = w0.repeat(self.n, 1)  # (n, P)
        self.G = torch.zeros_like(self.W)  # (n, P)
        self._g_mean: torch.Tensor | None = None
        self.comms = [SimComm(k, self) for k in range(self.n)]
        self.transport = InMemory(self.comms, cfg.comm.mode, cfg.algorithm.interval, cfg.comm.max_staleness,
                                  cfg.sim.latency_s, cfg.sim.drop_prob, cfg.run.seed, cfg.comm.wire_dtype)
        # every node's own library optimizer over its rows of W and G. l2_lambda's term is added to all of G at
        # once in `gradients`, as a real node adds it before allreduce's mean (which reads every row)
        kwargs = {**optimizer_kwargs(cfg), "l2_lambda": 0.0}
        self.optimizers = [DecentralizedOptimizer(FlatParams.row(list(self.like.values()), self.W[k], self.G[k]),
                                                  SimNetwork(k, self, topology), **kwargs) for k in range(self.n)]
        loaders = [node_loader(splits, shards[k], cfg.data, seed=cfg.run.seed + k, n_nodes=self.n)
                   for k in range(self.n)]
        val, test = eval_loader(splits.val, 1000), eval_loader(splits.test, 1000)
        # what a checkpoint saves and restores of each node, as of a real one
        self.nodes = [Node(RowModel(self, k), opt, scheduler(opt, cfg.train), loaders[k], val, test)
                      for k, opt in enumerate(self.optimizers)]
        sources = [_tensor_source(ld.dataset) for ld in loaders]  # every shard: a Subset of the same training split
        self.tensors = tuple(t.to(device) for t in sources[0][0]) if sources[0] else None
        self.index = [index.to(device) for _, index in sources] if sources[0] else None
        self.seconds = dict.fromkeys(("data", "compute", "rules", "exchange", "eval"), 0.0)  # where the time goes

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: charge them to their phase
        self.seconds[what] += time.perf_counter() - start

    def param_views(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """The template's parameters as views into W: (P,) → shapes as in the model, (m, P) → (m, *shape)."""
        views, offset, lead = {}, 0, W.shape[:-1]
        for name, p in self.like.items():
            views[name] = W[..., offset:offset + p.numel()].view(*lead, *p.shape)
            offset += p.numel()
        return views

    def grad_mean(self, dtype: torch.dtype) -> torch.Tensor:
        """(1/n) Σ_k g_k of the latest gradients, computed once per step (allreduce), in `dtype` as an all-reduce in
        it sums (bf16: each g_k, the sum and the mean rounded to bf16; a ring's partial sums are not)."""
        if self._g_mean is None:
            self._g_mean = self.G.to(dtype).sum(0).div_(self.n)
        return self._g_mean

    def epoch_batches(self, skip: int = 0) -> Iterator[tuple]:
        """Per step, every node's minibatch: (X, Y) stacked (n, B, ...) when all batches have one size,
        else lists. Indices come from each node's own sampler, so the order is a real node's. `skip`: the
        epoch's first batches, already taken before a resume."""
        for picks in zip(*(itertools.islice(node.loader.batch_sampler, skip, None) for node in self.nodes)):
            with self.timed("data"):
                if self.tensors is not None and len({len(p) for p in picks}) == 1:  # one gather for all nodes
                    rows = torch.stack([self.index[k][torch.as_tensor(p)] for k, p in enumerate(picks)])
                    batch = tuple(t[rows] for t in self.tensors)
                else:
                    xs, ys = zip(*(self._fetch(k, p) for k, p in enumerate(picks)))
                    batch = (torch.stack(xs), torch.stack(ys)) if len({len(y) for y in ys}) == 1 else (xs, ys)
            yield batch

    def _fetch(self, k: int, pick: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Node k's minibatch of samples `pick` (positions in its shard)."""
        if self.tensors is not None:
            rows = self.index[k][torch.as_tensor(pick)]
            return self.tensors[0][rows], self.tensors[1][rows]
        x, y = default_collate([self.nodes[k].loader.dataset[i] for i in pick])  # decoded and transformed
        return x.to(self.device), y.to(self.device)

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, params, (x,))

    def _outputs(self, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The logits (m, B, C) of every row of W (m, P) on one batch x shared by all.

        vmapped on GPUs. On CPU one row at a time: without gradients, the vmapped (grouped) convolutions of
        many digits CNNs over one shared batch ran 1.3x (8 nodes) to 3.5x (256 nodes) slower than a loop.
        """
        if self.device.type == "cuda":
            return vmap(self._forward, in_dims=(0, None), randomness="different")(self.param_views(W), x)
        return torch.stack([self._forward(self.param_views(w), x) for w in W])

    def gradients(self, X: torch.Tensor | tuple, Y: torch.Tensor | tuple, l2_lambda: float) -> tuple[torch.Tensor, ...]:
        """G ← every node's ∇(mean loss + (l2_lambda/2)||w||²) on its minibatch, as real nodes compute g_i.

        Returns the nodes' minibatch losses (n,), correct predictions (n,) and batch sizes (n,).
        """
        if self._batched_once:
            return self._gradients(X, Y, l2_lambda)
        try:
            out = self._gradients(X, Y, l2_lambda)
        except RuntimeError as e:  # e.g. a model that changes a buffer in place, which vmap cannot batch
            raise ConfigError(f"--sim.nodes cannot batch model {self.cfg_model}: {one_line(e)}; launch it with "
                              f"torchrun instead") from None
        self._batched_once = True
        return out

    def _gradients(self, X: torch.Tensor | tuple, Y: torch.Tensor | tuple,
                   l2_lambda: float) -> tuple[torch.Tensor, ...]:
        W = self.W.detach().requires_grad_()  # shares W's storage; the gradient lands in W.grad
        params = self.param_views(W)
        with autocast(self.device, self.precision):  # train.precision, as a real node's forward
            if isinstance(X, torch.Tensor):  # one vmapped call for every node
                def loss_of(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    out = self._forward(p, x)
                    return self.loss(out, y), (out.argmax(-1) == y).sum()

                with warnings.catch_warnings():  # vmap loops over nodes for CPU attention; it said so per run
                    warnings.filterwarnings("ignore", message="There is a performance drop because we have not")
                    losses, correct = vmap(loss_of, randomness="different")(params, X, Y)
                sizes = torch.full((self.n,), Y[0].numel(), device=self.device)
            else:  # batches of different sizes: one call per node, one backward
                outs = [self._forward({name: v[k] for name, v in params.items()}, x) for k, x in enumerate(X)]
                losses = torch.stack([self.loss(out, y) for out, y in zip(outs, Y)])
                correct = torch.stack([(out.argmax(-1) == y).sum() for out, y in zip(outs, Y)])
                sizes = torch.tensor([y.numel() for y in Y], device=self.device)
        losses.sum().backward()  # node k's loss depends on row k only: each row gets its own gradient
        self.G.copy_(W.grad)
        if l2_lambda:
            self.G.add_(self.W, alpha=l2_lambda)
        self._g_mean = None
        return losses.detach(), correct, sizes

    @torch.no_grad()
    def evaluate(self, loader, W: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Mean loss and accuracy of every row of W (m, P) on a split: all rows per batch, in chunks."""
        self.template.eval()
        m = W.shape[0]
        loss_sum, correct, count = np.zeros(m), np.zeros(m), 0
        chunk = max(1, EVAL_SAMPLES // loader.batch_size)
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            for a in range(0, m, chunk):
                out = self._outputs(W[a:a + chunk], x)  # (c, B, C)
                c = out.shape[0]
                if self.loss is F.cross_entropy:
                    loss = F.cross_entropy(out.transpose(1, 2), y.expand(c, -1), reduction="none").sum(1)
                else:  # the model's own loss, a batch mean: row by row
                    loss = torch.stack([self.loss(o, y) for o in out]) * y.numel()
                loss_sum[a:a + c] += loss.cpu().numpy()
                correct[a:a + c] += (out.argmax(-1) == y).flatten(1).sum(1).cpu().numpy()
            count += y.numel()
        self.template.train()
        return loss_sum / count, correct / count

    def evaluate_network(self) -> list[dict[str, float]]:
        """Every node's row of evaluate_network (p2p/trainer.py), from the stacked weights directly."""
        rows: list[dict[str, float]] = [{} for _ in range(self.n)]
        node = self.nodes[0]
        if len(node.val_loader.dataset):
            loss, acc = self.evaluate(node.val_loader, self.W)
            for k, row in enumerate(rows):
                row["val_loss"], row["val_acc"] = float(loss[k]), float(acc[k])
        loss, acc = self.evaluate(node.test_loader, self.W)
        w_bar = self.W.mean(0, keepdim=True)
        consensus = (self.W - w_bar).pow(2).sum(1).mean().item()  # (1/n) Σ_k ||w_k − w̄||²
        avg_loss, avg_acc = self.evaluate(node.test_loader, w_bar)
        for k, row in enumerate(rows):
            row.update(test_loss=float(loss[k]), test_acc=float(acc[k]), consensus_dist=consensus,
                       avg_test_loss=float(avg_loss[0]), avg_test_acc=float(avg_acc[0]))
        return rows


def _begin(cfg: Config, sim: Simulation, ckpts: list[checkpoint.Checkpointer]) -> list[dict] | None:
    """checkpoint.begin for all nodes at once: continue from the newest checkpoint every node can read, or
    start, by the same `decide`; returns each node's progress, or None at epoch 0."""
    agent = checkpoint.agent_id()
    checkpoint.claim(cfg.out_dir, agent)  # one job per run directory, for as long as this process lives
    found = [checkpoint.node_facts(cfg.out_dir, k, ckpts[k], sim.device, agent) for k in range(sim.n)]
    facts = [f for f, _ in found]
    epoch = checkpoint.decide(facts, cfg.run.resume, cfg.out_dir)
    step = checkpoint.midway_step(facts, epoch, found[0][1]) if cfg.run.resume or all(f.ours for f in facts) else None
    progress = None
    if epoch is not None or step is not None:
        progress = [ckpts[k].load(epoch, states[("step", step) if step is not None else epoch], sim.nodes[k],
                                  sim.comms[k], step) for k, (_, states) in enumerate(found)]
    checkpoint.mark_started(cfg.out_dir, facts, 0)
    checkpoint.log_start(progress[0] if progress else None)
    return progress


def run(cfg: Config) -> dict[str, float]:
    """Simulate `cfg.sim.nodes` nodes to the end; returns the seconds spent per phase (and peak memory)."""
    n, tcfg = cfg.sim.nodes, cfg.train
    logging.basicConfig(level=getattr(logging, cfg.log.level.upper()), format="%(asctime)s [sim] %(message)s",
                        datefmt="%H:%M:%S")
    if read_env().world_size > 1:
        raise ConfigError("--sim.nodes runs the whole network in one process: start it with python train.py, "
                          "not torchrun with several ranks")
    if tcfg.sleep_factor > 0:
        raise ConfigError("--train.sleep_factor sleeps real processes between epochs: simulate stragglers with "
                          "--train.step_delay (virtual seconds per step) or launch with torchrun")
    if cfg.data.workers:
        log.warning("--data.workers %d is not used with --sim.nodes: the simulator gathers every node's batch itself",
                    cfg.data.workers)
    device, _ = resolve_device(cfg.run.device, "auto", Env(0, 1, 0, 1))  # no process group: any backend
    topology = network(cfg, n)
    splits = load_splits(cfg.data)
    shards = partition(splits.train_labels, n, cfg.data)
    torch.manual_seed(cfg.run.seed)  # dropout of every node, drawn per node by vmap
    sim = Simulation(cfg, topology, splits, shards, device)
    fixed = checkpoint.fixed_fields(cfg, n, topology)
    ckpts = [checkpoint.Checkpointer(cfg.out_dir / "ckpt", k, tcfg.checkpoint_every, tcfg.epochs, fixed,
                                     tcfg.keep_checkpoints, tcfg.checkpoint_every_steps) for k in range(n)]
    progress = _begin(cfg, sim, ckpts)
    for k, node in enumerate(sim.nodes if progress else []):
        resume_lr(node.optimizer, node.scheduler, cfg.algorithm.lr, progress[0]["epoch"], say=k == 0)
    start_run_dir(cfg, topology, f"{n} simulated nodes, {cfg.algorithm.name} on {device}", sim.W.shape[1])
    if sim.optimizers[0].slots_line.startswith("async"):
        log.warning("the per-edge slots of topology %s are not simulated: every edge exchanges at a round's end",
                    topology.source)
    for k, shard in enumerate(shards):
        log.debug("node%d: %d samples, classes %s", k, len(shard),
                  class_histogram(splits.train_labels, shard, splits.groups or splits.num_classes))
    steps = train_loop(cfg, sim, ckpts, progress)
    if cfg.log.plots and cfg.log.csv:
        plots.plot_run(cfg.out_dir)
    seconds = dict(sim.seconds)
    log.info("time: %s", ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    seconds["steps"] = steps
    seconds["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        seconds["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return seconds


def train_loop(cfg: Config, sim: Simulation, ckpts: list[checkpoint.Checkpointer], progress: list[dict] | None) -> int:
    """trainer.train_loop for every node at once: the same steps, rows, evaluations and checkpoints.
    Returns the steps taken (per node)."""
    tcfg, n = cfg.train, sim.n
    start_epoch, step = (progress[0]["epoch"], progress[0]["step"]) if progress else (0, 0)
    metrics = [Metrics(cfg.out_dir, k, cfg.log, resume_epoch=start_epoch, task=task_of(cfg)) for k in range(n)]
    steps_per_epoch = len(sim.nodes[0].loader)
    bar = tqdm(total=tcfg.epochs * steps_per_epoch, initial=step, disable=not cfg.log.progress, desc="train",
               unit="step", dynamic_ncols=True)
    t_start = time.perf_counter() - (progress[0]["wall_s"] if progress else 0.0)
    first_step = step
    partial = [p.get("partial") for p in progress] if progress and "partial" in progress[0] else None
    signals = StopSignals()  # SIGTERM/SIGINT (Ctrl-C): stop after this step, checkpointed (docs/faults.md)
    try:
        for epoch in range(start_epoch + 1, tcfg.epochs + 1):
            t_epoch, comm_s0 = time.perf_counter(), [c.comm_s for c in sim.comms]
            loss_sum = torch.zeros(n, device=sim.device)
            correct = torch.zeros(n, device=sim.device, dtype=torch.long)
            n_seen = torch.zeros(n, device=sim.device, dtype=torch.long)
            delays = [step_delays(cfg, k, epoch) for k in range(n)]  # per node: a real node k's draws
            samplers, batch = [node.loader.sampler.generator.get_state() for node in sim.nodes], 0  # for midway's
            if partial:  # resumed inside this epoch
                for k, sums in enumerate(partial_sums(p, d) for p, d in zip(partial, delays)):
                    loss_sum[k], correct[k], n_seen[k], _ = sums
                batch, partial = progress[0]["batch"], None
            for X, Y in sim.epoch_batches(batch):
                lr = sim.optimizers[0].param_groups[0]["lr"]  # γ_t of this step, every node's
                with sim.timed("compute"):
                    loss, right, size = sim.gradients(X, Y, cfg.algorithm.l2_lambda)
                # every node's optimizer steps, in rank order; the last one's step runs the network's exchanges
                sim.transport.step_seconds = [cfg.sim.step_s + (next(d) if d else 0.0) for d in delays]
                exchange_s = sum(c.comm_s for c in sim.comms)
                with sim.timed("rules"):
                    for node in sim.nodes:
                        node.optimizer.step()
                        if node.scheduler is not None:
                            node.scheduler.step()
                exchange_s = sum(c.comm_s for c in sim.comms) - exchange_s  # InMemory's share of the above
                sim.seconds["rules"] -= exchange_s
                sim.seconds["exchange"] += exchange_s
                loss_sum += loss
                correct += right
                n_seen += size
                step += 1
                batch += 1
                bar.update()
                # a signal: every node checkpoints here and the run stops; or a checkpoint inside the epoch
                if signals.signum or (ckpts[0].due_step(step) and batch < steps_per_epoch):
                    wall_s = time.perf_counter() - t_start
                    for k, node in enumerate(sim.nodes):
                        ckpts[k].save_midway(node, sim.comms[k], midway(epoch, step, wall_s, batch, loss_sum[k],
                                                                        correct[k], n_seen[k], 0.0), samplers[k])
                if signals.signum:
                    raise Stopped(signals.signum, epoch, step)
            if drains_at(cfg, epoch, ckpts[0]):
                sim.transport.drain()  # as a real node: every exchange complete where a checkpoint is written
            train_s = time.perf_counter() - t_epoch
            train_loss = (loss_sum.double() / steps_per_epoch).tolist()  # as a real node divides its .item()
            train_acc = (correct.double() / n_seen).tolist()
            rows = []
            for k, comm in enumerate(sim.comms):
                row = {**sim.transport.epoch_stats(k), "epoch": epoch, "train_loss": train_loss[k],
                       "train_acc": train_acc[k], "lr": lr, "bytes_sent": comm.bytes_sent,
                       "comm_s": comm.comm_s - comm_s0[k], "sleep_s": 0.0}
                row["compute_s"] = train_s / n - row["comm_s"]  # each node's share of the process's time
                rows.append({**row, **sim.optimizers[k].rule.diagnostics(lr)})

            stop_if_nonfinite(train_loss, epoch, ckpts[0].dir)

            if epoch % tcfg.eval_every == 0 or epoch == tcfg.epochs:
                with sim.timed("eval"):
                    for row, evaluated in zip(rows, sim.evaluate_network()):
                        row.update(evaluated)
                log_epoch(epoch, tcfg.epochs, rows[0], [row["test_acc"] for row in rows],
                          time.perf_counter() - t_start, bar, task_of(cfg))

            wall_s = time.perf_counter() - t_start
            for k, row in enumerate(rows):
                row["wall_s"] = wall_s
                metrics[k].log(row)
                if ckpts[k].due(epoch):
                    ckpts[k].maybe_save(sim.nodes[k], sim.comms[k], {"epoch": epoch, "step": step, "wall_s": wall_s})
    finally:
        signals.restore()
        bar.close()
        for m in metrics:
            m.close()
    return step - first_step
