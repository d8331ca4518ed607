"""The training loop of one node: local step → exchange → evaluate → log → checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from p2p import checkpoint, plots
from p2p.comm import Comm, Env, PeerFailure, check_restarts, read_env, resolve_device
from p2p.config import Config, config_lines, one_line
from p2p.data import class_histogram, eval_loader, load_splits, node_loader, partition
from p2p.loop import (NonFiniteLoss, StopSignals, Stopped, autocast, drains_at, evaluate, log_epoch, loss_function,
                      midway, network, optimizer_kwargs, partial_sums, resume_lr, scheduler, skip_batches,
                      start_run_dir, step_delays, stop_if_nonfinite, task_of)
from p2p.metrics import Metrics
from p2p.models import build_model
from p2p.network import Network
from p2p.node import Node
from p2p.optimizer import DecentralizedOptimizer, mean_and_spread
from p2p.topology import Topology
from p2p.transport import NetworkStop

log = logging.getLogger("p2p")


def train_step(model: nn.Module, optimizer: DecentralizedOptimizer, x: torch.Tensor, y: torch.Tensor,
               precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """One local step, as a user's loop makes it: g_i = ∇ loss (the optimizer adds (l2_lambda/2)||w||²'s
    gradient), the rule's update, then whatever exchange is due after it (a round's end, or an edge's slot).
    `precision` bf16 runs the forward and the loss under autocast; weights, gradients and messages stay fp32.

    Returns the minibatch loss and number of correct predictions (tokens, for a language model), as tensors.
    """
    optimizer.zero_grad()
    with autocast(x.device, precision):
        out = model(x)
        loss = loss_function(model)(out, y)
    loss.backward()
    optimizer.step()
    return loss.detach().float(), (out.argmax(-1) == y).sum()


def evaluate_node(node: Node, device: torch.device) -> dict[str, float]:
    """This node's val/test metrics; without a validation split (val_fraction = 0) the val_* entries are absent."""
    row: dict[str, float] = {}
    if len(node.val_loader.dataset):
        row["val_loss"], row["val_acc"] = evaluate(node.model, node.val_loader, device)
    row["test_loss"], row["test_acc"] = evaluate(node.model, node.test_loader, device)
    return row


def evaluate_network(node: Node, comm: Comm) -> dict[str, float]:
    """This node's val/test metrics plus the network's (collectives): consensus distance and the averaged model.

    consensus_dist = (1/n) Σ_i ||w_i − w̄||²; avg_test_* evaluate w̄ = (1/n) Σ_i w_i (the trainable parameters,
    as p2p.consensus_distance; swapped in place rather than copied as p2p.average_model does).
    """
    row = evaluate_node(node, comm.device)
    w = node.flat.w
    w_bar, row["consensus_dist"] = mean_and_spread(w, comm)
    w_i = w.clone()
    w.copy_(w_bar)
    row["avg_test_loss"], row["avg_test_acc"] = evaluate(node.model, node.test_loader, comm.device)
    w.copy_(w_i)
    return row


def build_node(cfg: Config, comm: Comm, topology: Topology, splits, shard: np.ndarray) -> Node:
    """The model, the library's optimizer over it (its rule and transport) and the loaders of one node."""
    model = build_model(cfg.model, splits.in_shape, splits.num_classes).to(comm.device)
    optimizer = DecentralizedOptimizer(model.parameters(), Network(comm, topology), **optimizer_kwargs(cfg))
    loader = node_loader(splits, shard, cfg.data, seed=cfg.run.seed + comm.rank, n_nodes=comm.world_size)
    return Node(model, optimizer, scheduler(optimizer, cfg.train), loader, eval_loader(splits.val, 1000),
                eval_loader(splits.test, 1000))


def _setup_logging(cfg: Config, env: Env) -> None:
    level = getattr(logging, cfg.log.level.upper()) if env.is_main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [node{env.rank}] %(message)s", datefmt="%H:%M:%S")


class StartUp:
    """Where a process's seconds go before its first step, for one log line (benchmarks/startup.py reads it)."""

    def __init__(self, started: float):
        self.started = self.last = started  # time.perf_counter() when the process began (train.py's first line)
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = now - self.last
        self.last = now

    def line(self) -> str:
        parts = " | ".join(f"{k} {v:.2f}" for k, v in self.phases.items())
        return f"start-up (s): {parts} | first step done {self.last - self.started:.2f} after the process began"


def run(cfg: Config, started: float | None = None) -> None:
    """Train one node until the configured epochs are done. Validates everything before any rank waits.
    `started`: time.perf_counter() at the process's start, for the start-up log line."""
    startup = StartUp(started if started is not None else time.perf_counter())
    startup.mark("imports")
    env = read_env()
    _setup_logging(cfg, env)
    check_restarts()
    device, backend = resolve_device(cfg.run.device, cfg.comm.backend, env)
    topology = network(cfg, env.world_size)
    splits = load_splits(cfg.data)
    shards = partition(splits.train_labels, env.world_size, cfg.data)
    startup.mark("data")
    comm = Comm(env, device, backend, cfg.comm)
    torch.manual_seed(cfg.run.seed + env.rank)  # dropout etc.; the model has its own seed
    node = build_node(cfg, comm, topology, splits, shards[env.rank])  # an algorithm may still reject the config
    out_dir = cfg.out_dir
    startup.mark("model")

    comm.start()  # the first wait for other ranks: everything above fails alone, on every rank
    startup.mark("join")
    try:
        # the same config on every rank, then continue the run or start one: decided together, before any write
        comm.check_same(config_lines(cfg) + [topology.fingerprint()])
        ckpt = checkpoint.Checkpointer(out_dir / "ckpt", env.rank, cfg.train.checkpoint_every, cfg.train.epochs,
                                       checkpoint.fixed_fields(cfg, env.world_size, topology),
                                       cfg.train.keep_checkpoints, cfg.train.checkpoint_every_steps)
        progress = checkpoint.begin(out_dir, cfg.run.resume, node, comm, ckpt)
        if progress:
            resume_lr(node.optimizer, node.scheduler, cfg.algorithm.lr, progress["epoch"])
        out_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            start_run_dir(cfg, topology, f"{env.world_size} nodes, {cfg.algorithm.name} on {device} ({backend})",
                          node.flat.w.numel())
            if node.optimizer.slots_line:
                log.info(node.optimizer.slots_line)
        hist = comm.all_gather_floats(class_histogram(splits.train_labels, shards[env.rank],
                                                      splits.groups or splits.num_classes))
        what = "windows per document" if splits.task == "language_model" else "classes"
        for rank, h in enumerate(hist):
            log.info("node%d: %d samples, %s %s", rank, int(sum(h)), what, [int(c) for c in h])
        startup.mark("run dir")
        train_loop(cfg, env, comm, node, ckpt, progress, startup)
        comm.barrier()
        if env.is_main and cfg.log.plots and cfg.log.csv:
            plots.plot_run(out_dir)
    except BaseException as e:  # this node stops: its neighbours, left waiting, name it and the reason
        if not isinstance(e, PeerFailure):
            comm.report_failure(f"{type(e).__name__}: {one_line(e)}")
        raise
    finally:
        comm.stop()


def train_loop(cfg: Config, env: Env, comm: Comm, node: Node, ckpt: checkpoint.Checkpointer,
               progress: dict | None, startup: StartUp | None = None) -> None:
    """Train from the start, or from `progress` ({"epoch", "step", "wall_s"}) of a resumed checkpoint (whose
    optimizer state holds the messages not applied yet). With `startup`, log where the seconds before the first
    step went, once it is done."""
    tcfg = cfg.train
    start_epoch, step = (progress["epoch"], progress["step"]) if progress else (0, 0)
    # drop the rows after the checkpoint (all of them when this job starts its own run over)
    metrics = Metrics(cfg.out_dir, env.rank, cfg.log, resume_epoch=start_epoch, task=task_of(cfg))
    steps_per_epoch = len(node.loader)
    slow = not tcfg.slow_ranks or env.rank in tcfg.slow_ranks  # sleep_factor and step_delay apply here
    bar = tqdm(total=tcfg.epochs * steps_per_epoch, initial=step, disable=not (env.is_main and cfg.log.progress),
               desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter() - (progress["wall_s"] if progress else 0.0)  # wall_s continues across restarts
    # async meets nobody during training: no collective before the last epoch's end (docs/exchange-modes.md);
    # a stop travels in the messages, the network's metrics wait for the end (or python -m p2p.evaluate)
    meets = cfg.comm.mode != "async"
    partial = progress.get("partial") if progress else None  # resumed inside an epoch: its sums so far
    signals = StopSignals()  # SIGTERM/SIGINT: stop at a step every node agrees on, checkpointed (docs/faults.md)
    try:  # close the writers and the bar however the loop ends, so TensorBoard keeps every point
        for epoch in range(start_epoch + 1, tcfg.epochs + 1):
            last = epoch == tcfg.epochs
            # local steps, exchanging every K-th
            t_epoch, comm_s0 = time.perf_counter(), comm.comm_s
            loss_sum = torch.zeros((), device=comm.device)
            correct = torch.zeros((), device=comm.device, dtype=torch.long)
            n_seen = 0  # samples (tokens), counted: a full batch is the shard, whatever batch_size says
            delays, delay_s = step_delays(cfg, env.rank, epoch), 0.0
            sampler, batch = node.loader.sampler.generator.get_state(), 0  # at the epoch's start, for midway's
            if partial:  # resumed inside this epoch
                loss_sum, correct, n_seen, delay_s = partial_sums(partial, delays)
                batch, partial = progress["batch"], None
            try:
                for x, y in skip_batches(node.loader, batch):
                    lr = node.optimizer.param_groups[0]["lr"]  # γ_t of this step
                    if delays:
                        delay_s += (d := next(delays))
                        time.sleep(d)
                    loss, right = train_step(node.model, node.optimizer, x.to(comm.device), y.to(comm.device),
                                             tcfg.precision)
                    if node.scheduler is not None:
                        node.scheduler.step()
                    loss_sum += loss
                    correct += right
                    n_seen += y.numel()
                    step += 1
                    batch += 1
                    bar.update()
                    if startup is not None:
                        startup.mark("first step")  # its optimizer's first call imports torch._dynamo
                        log.info(startup.line())
                        startup = None
                    # a signal: every node checkpoints at the same step and stops; or a checkpoint inside the epoch
                    signum = signals.agreed(step, comm if meets else None, node.transport)
                    if signum or (ckpt.due_step(step) and batch < steps_per_epoch):
                        ckpt.save_midway(node, comm, midway(epoch, step, time.perf_counter() - t_start, batch, loss_sum,
                                                            correct, n_seen, delay_s), sampler)
                    if signum:
                        raise Stopped(signum, epoch, step)
                if drains_at(cfg, epoch, ckpt):  # async waits for its neighbours' exchanges only there
                    node.transport.drain()
            except NetworkStop as e:  # async: a node stopped the run; pass it on, then stop
                node.transport.announce_stop(e.origin)
                raise NonFiniteLoss(checkpoint.nonfinite_message(f"node {e.origin} (heard from neighbour {e.peer})",
                                                                 epoch, ckpt.dir)) from None
            train_s = time.perf_counter() - t_epoch
            row = {**node.transport.epoch_stats(), "epoch": epoch, "train_loss": loss_sum.item() / steps_per_epoch,
                   "train_acc": correct.item() / n_seen, "lr": lr, "bytes_sent": comm.bytes_sent,
                   "comm_s": comm.comm_s - comm_s0}
            row["compute_s"] = train_s - row["comm_s"] - delay_s
            row.update(node.algorithm.diagnostics(lr))

            # stop every node together if any loss is not finite (async: this node's, told to its neighbours)
            if meets or last:
                stop_if_nonfinite([loss[0] for loss in comm.all_gather_floats([row["train_loss"]])], epoch, ckpt.dir)
            elif not np.isfinite(row["train_loss"]):
                node.transport.announce_stop(env.rank)
                raise NonFiniteLoss(checkpoint.nonfinite_message(f"node {env.rank}", epoch, ckpt.dir))

            # evaluate the node and the network (async: the node alone until the end)
            if meets or last:
                if epoch % tcfg.eval_every == 0 or last:
                    row.update(evaluate_network(node, comm))
                    accs = [a[0] for a in comm.all_gather_floats([row["test_acc"]])]
                    log_epoch(epoch, tcfg.epochs, row, accs, time.perf_counter() - t_start, bar, task_of(cfg))
            elif epoch % tcfg.eval_every == 0:
                row.update(evaluate_node(node, comm.device))
                log.info("epoch %d/%d | train loss %.4f | test acc %.4f (node %d; async: the network's metrics after "
                         "the last epoch) | %.1fs", epoch, tcfg.epochs, row["train_loss"], row["test_acc"], env.rank,
                         time.perf_counter() - t_start)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['test_acc']:.3f}")

            # straggler simulation (the seed's sleep_factor); U per (seed, rank, epoch): a resumed run repeats it
            u = np.random.default_rng((cfg.run.seed, env.rank, epoch)).random()
            sleep_s = train_s * (0.5 + 0.5 * tcfg.sleep_factor * u) if slow and tcfg.sleep_factor > 0 else 0.0
            time.sleep(sleep_s)
            row["sleep_s"] = sleep_s + delay_s
            row["wall_s"] = time.perf_counter() - t_start
            metrics.log(row)
            if ckpt.due(epoch):  # (async drained only then)
                ckpt.maybe_save(node, comm, {"epoch": epoch, "step": step, "wall_s": row["wall_s"]})
    finally:
        signals.restore()
        bar.close()
        metrics.close()
