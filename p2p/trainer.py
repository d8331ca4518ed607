"""The training loop of one node: local step → exchange → evaluate → log → checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from p2p import checkpoint, plots
from p2p.algorithms import Algorithm, FlatParams, build_algorithm
from p2p.comm import Comm, Env, check_restarts, read_env, resolve_device
from p2p.config import AlgorithmConfig, Config, ConfigError, TrainConfig, config_lines, to_toml
from p2p.data import class_histogram, eval_loader, load_splits, node_loader, partition
from p2p.models import build_model
from p2p.metrics import Metrics
from p2p.node import Node
from p2p.topology import Topology, build_topology
from p2p.transport import NetworkStop, Transport

log = logging.getLogger("p2p")


class NonFiniteLoss(RuntimeError):
    """Some node's loss became NaN/inf: every node stops together, keeping the last good checkpoint."""


def lr_at(step: int, cfg: TrainConfig, base_lr: float) -> float:
    """γ_t: the scheduler, stepped once per iteration (the seed's StepLR)."""
    if cfg.scheduler == "step":
        return base_lr * cfg.gamma ** (step // cfg.step_size)
    return base_lr


def train_step(model: nn.Module, flat: FlatParams, algorithm: Algorithm, transport: Transport, x: torch.Tensor,
               y: torch.Tensor, lr: float, step: int, l2_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Local step `step` (counted over the run): g_i = ∇(mean CE + (l2_lambda/2)||w||²), the algorithm's
    update, then whatever exchange the transport has due after it (a round's end, or an edge's slot).

    Returns the minibatch loss and number of correct predictions, as tensors (no device sync).
    """
    flat.g.zero_()
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    if l2_lambda:
        flat.g.add_(flat.w, alpha=l2_lambda)
    algorithm.update(lr)
    transport.after_step(algorithm, step)
    return loss.detach(), (out.argmax(1) == y).sum()


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on a whole split."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    model.train()
    return loss_sum / count, correct / count


def step_delays(cfg: Config, rank: int, epoch: int) -> Iterator[float] | None:
    """Node `rank`'s straggler delay per step of `epoch` (`train.step_delay`, `slow_ranks`): seconds it sleeps, or
    in simulation virtual seconds. Exponential draws per (seed, rank, epoch), so a resumed run repeats them, and a
    simulated node k draws what a real node k does. None when the node has none."""
    t = cfg.train
    if t.step_delay <= 0 or (t.slow_ranks and rank not in t.slow_ranks):
        return None
    if t.step_delay_dist == "constant":
        return iter(lambda: t.step_delay, None)
    rng = np.random.default_rng((cfg.run.seed, rank, epoch, 1))
    return iter(lambda: float(rng.exponential(t.step_delay)), None)


def stop_if_nonfinite(train_losses: list[float], epoch: int, ckpt_dir: Path) -> None:
    """NonFiniteLoss naming the nodes whose training loss (by rank, every node's) is NaN or inf."""
    bad = [rank for rank, loss in enumerate(train_losses) if not np.isfinite(loss)]
    if bad:
        raise NonFiniteLoss(nonfinite_message(f"node(s) {bad}", epoch, ckpt_dir))


def drains_at(cfg: Config, epoch: int, ckpt: checkpoint.Checkpointer) -> bool:
    """Whether a node completes all its posted exchanges at the end of `epoch`: where a checkpoint is written
    (it must hold no message in flight) and after the last epoch; sync and overlap at every epoch end, where
    they meet anyway. Real nodes and the simulator drain alike."""
    return cfg.comm.mode != "async" or epoch == cfg.train.epochs or ckpt.due(epoch)


def nonfinite_message(who: str, epoch: int, ckpt_dir: Path) -> str:
    return checkpoint.nonfinite_message(who, epoch, ckpt_dir)


def log_epoch(epoch: int, epochs: int, row: dict[str, float], accs: list[float], elapsed: float, bar: tqdm) -> None:
    """The evaluation line: node 0's train loss, every node's test accuracy, the averaged model, consensus."""
    log.info("epoch %d/%d | train loss %.4f | test acc mean %.4f [%.4f, %.4f] | avg model %.4f | consensus %.3e | "
             "%.1fs", epoch, epochs, row["train_loss"], float(np.mean(accs)), min(accs), max(accs),
             row["avg_test_acc"], row["consensus_dist"], elapsed)
    bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{np.mean(accs):.3f}")


def evaluate_node(node: Node, device: torch.device) -> dict[str, float]:
    """This node's val/test metrics; without a validation split (val_fraction = 0) the val_* entries are absent."""
    row: dict[str, float] = {}
    if len(node.val_loader.dataset):
        row["val_loss"], row["val_acc"] = evaluate(node.model, node.val_loader, device)
    row["test_loss"], row["test_acc"] = evaluate(node.model, node.test_loader, device)
    return row


def evaluate_network(node: Node, comm: Comm) -> dict[str, float]:
    """This node's val/test metrics plus the network's (collectives): consensus distance and the averaged model.

    consensus_dist = (1/n) Σ_i ||w_i − w̄||²; avg_test_* evaluate w̄ = (1/n) Σ_i w_i.
    """
    row = evaluate_node(node, comm.device)
    w = node.flat.w
    w_bar = comm.all_reduce_mean_(w.clone(), training=False)
    row["consensus_dist"] = comm.all_reduce_sum([(w - w_bar).pow(2).sum().item()])[0] / comm.world_size
    w_i = w.clone()
    w.copy_(w_bar)
    row["avg_test_loss"], row["avg_test_acc"] = evaluate(node.model, node.test_loader, comm.device)
    w.copy_(w_i)
    return row


def build_node(cfg: Config, comm: Comm, topology: Topology, splits, shard: np.ndarray) -> Node:
    model = build_model(cfg.model, splits.in_shape, splits.num_classes).to(comm.device)
    flat = FlatParams(model)  # after .to(): the views must live on the final device
    algorithm = build_algorithm(flat, cfg.algorithm, topology, comm)
    loader = node_loader(splits, shard, cfg.data, seed=cfg.run.seed + comm.rank, n_nodes=comm.world_size)
    slots, _ = edge_slots(cfg, topology, algorithm)
    transport = Transport(comm, cfg.comm.mode, cfg.comm.max_staleness, cfg.algorithm.interval, slots)
    return Node(model, flat, algorithm, transport, loader, eval_loader(splits.val, 1000),
                eval_loader(splits.test, 1000))


def edge_slots(cfg: Config, topology: Topology, algorithm: Algorithm) -> tuple[dict[int, int] | None, str]:
    """{neighbour j: the step of a round at which edge (i, j) exchanges}: the slot of its lower-ranked end in
    the seed's node_list.json, so both ends agree. Only in async with K = the file's round (what the slots
    were made for); otherwise None and why, for a log line (docs/exchange-modes.md)."""
    if topology.slots is None or topology.round is None:
        return None, ""
    K, mode, where = cfg.algorithm.interval, cfg.comm.mode, f"the per-edge slots of topology {topology.source}"
    why = (f"--comm.mode {mode} exchanges every edge at a round's end" if mode != "async" else
           f"K = {K} is not the file's round {topology.round}" if K != topology.round else
           f"{cfg.algorithm.name} picks its own partners each round" if not algorithm.per_edge else "")
    if why:
        return None, f"{where} are ignored: {why}"
    i = algorithm.rank
    return ({j: topology.slots[min(i, j), max(i, j)] for j in algorithm.neighbors},
            f"async: each edge exchanges once per round at {where} (its lower-ranked end's), K = {K}")


ISVR_INTERVAL = 4  # K for pdmm_isvr/admm_isvr when neither the config nor the topology file sets one


def resolve_interval(cfg: AlgorithmConfig, topology: Topology) -> str | None:
    """Set K = cfg.interval in place: 0 (auto) becomes the topology file's round, else 1 (ISVR: 4).

    ISVR's penalty is built for K > 1 local steps per round (at K = 1 it is c_ij = 1/γ, coupling so
    strong that it divides the network's step by 1 + d; see PrimalDual): on the digits CNN, K = 4
    learns as well as K = 8 and better than K = 1 (docs/algorithms.md, "Defaults").

    Algorithms read cfg.interval, so this runs before they are built and before config.toml is
    written, which then records the K used. An explicit K wins over the file's round; the returned
    warning (None when all agree) says so, for the caller to log once: the file's slots no longer fit K.
    """
    if cfg.interval == 0:
        cfg.interval = topology.round or (ISVR_INTERVAL if cfg.name.endswith("_isvr") else 1)
    elif topology.round is not None and cfg.interval != topology.round:
        return (f"--algorithm.interval {cfg.interval} overrides the round {topology.round} of topology "
                f"{topology.source}: its per-edge slots assume K = {topology.round}")
    return None


def network(cfg: Config, n: int) -> tuple[Topology, str | None]:
    """The topology of n nodes, with K resolved in cfg (and resolve_interval's warning, if any)."""
    topology = build_topology(cfg.topology, n) if n > 1 else Topology(1, ())
    if cfg.algorithm.mixing == "file" and topology.weights is None:
        raise ConfigError(f"--algorithm.mixing file: topology {topology.source} has no per-edge weights")
    return topology, resolve_interval(cfg.algorithm, topology)


def start_run_dir(cfg: Config, topology: Topology, what: str, n_params: int, interval_warning: str | None) -> None:
    """The resolved config and graph into the run directory, and the run's header in the log."""
    (cfg.out_dir / "config.toml").write_text(to_toml(cfg))
    topology.save(cfg.out_dir / "topology.json")
    log.info("%s, K = %d, %d parameters", what, cfg.algorithm.interval, n_params)
    if interval_warning:
        log.warning(interval_warning)
    if topology.n > 1:
        log.info("topology: %s", topology.summary(cfg.algorithm.mixing))


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
    topology, interval_warning = network(cfg, env.world_size)
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
                                       checkpoint.fixed_fields(cfg, env.world_size), cfg.train.keep_checkpoints)
        progress = checkpoint.begin(out_dir, cfg.run.resume, node, comm, ckpt)
        out_dir.mkdir(parents=True, exist_ok=True)
        if env.is_main:
            start_run_dir(cfg, topology, f"{env.world_size} nodes, {cfg.algorithm.name} on {device} ({backend})",
                          node.flat.w.numel(), interval_warning)
            if slots_line := edge_slots(cfg, topology, node.algorithm)[1]:
                log.info(slots_line)
        hist = comm.all_gather_floats(class_histogram(splits.train_labels, shards[env.rank], splits.num_classes))
        for rank, h in enumerate(hist):
            log.info("node%d: %d samples, classes %s", rank, int(sum(h)), [int(c) for c in h])
        startup.mark("run dir")
        train_loop(cfg, env, comm, node, ckpt, progress, startup)
        comm.barrier()
        if env.is_main and cfg.log.plots and cfg.log.csv:
            plots.plot_run(out_dir)
    finally:
        comm.stop()


def train_loop(cfg: Config, env: Env, comm: Comm, node: Node, ckpt: checkpoint.Checkpointer,
               progress: dict | None, startup: StartUp | None = None) -> None:
    """Train from the start, or from `progress` ({"epoch", "step", "wall_s", "transport"}) of a resumed checkpoint.
    With `startup`, log where the seconds before the first step went, once it is done."""
    tcfg, acfg = cfg.train, cfg.algorithm
    start_epoch, step = (progress["epoch"], progress["step"]) if progress else (0, 0)
    if progress:  # received messages not applied yet (overlap, async): where the pipeline stood
        node.transport.load_state_dict(progress["transport"])
    # drop the rows after the checkpoint (all of them when this job starts its own run over)
    metrics = Metrics(cfg.out_dir, env.rank, cfg.log, resume_epoch=start_epoch)
    steps_per_epoch = len(node.loader)
    slow = not tcfg.slow_ranks or env.rank in tcfg.slow_ranks  # sleep_factor and step_delay apply here
    bar = tqdm(total=tcfg.epochs * steps_per_epoch, initial=step, disable=not (env.is_main and cfg.log.progress),
               desc="train", unit="step", dynamic_ncols=True)
    t_start = time.perf_counter() - (progress["wall_s"] if progress else 0.0)  # wall_s continues across restarts
    # async meets nobody during training: no collective before the last epoch's end (docs/exchange-modes.md);
    # a stop travels in the messages, the network's metrics wait for the end (or python -m p2p.evaluate)
    meets = cfg.comm.mode != "async"
    try:  # close the writers and the bar however the loop ends, so TensorBoard keeps every point
        for epoch in range(start_epoch + 1, tcfg.epochs + 1):
            last = epoch == tcfg.epochs
            # local steps, exchanging every K-th
            t_epoch, comm_s0 = time.perf_counter(), comm.comm_s
            loss_sum = torch.zeros((), device=comm.device)
            correct = torch.zeros((), device=comm.device, dtype=torch.long)
            n_seen = 0  # samples, counted: a full batch is the shard, whatever batch_size says
            delays, delay_s = step_delays(cfg, env.rank, epoch), 0.0
            try:
                for x, y in node.loader:
                    lr = lr_at(step, tcfg, acfg.lr)
                    if delays:
                        delay_s += (d := next(delays))
                        time.sleep(d)
                    loss, right = train_step(node.model, node.flat, node.algorithm, node.transport,
                                             x.to(comm.device), y.to(comm.device), lr, step, acfg.l2_lambda)
                    loss_sum += loss
                    correct += right
                    n_seen += len(y)
                    step += 1
                    bar.update()
                    if startup is not None:
                        startup.mark("first step")  # its optimizer's first call imports torch._dynamo
                        log.info(startup.line())
                        startup = None
                if drains_at(cfg, epoch, ckpt):  # async waits for its neighbours' exchanges only there
                    node.transport.drain()
            except NetworkStop as e:  # async: a node stopped the run; pass it on, then stop
                node.transport.announce_stop(e.origin)
                raise NonFiniteLoss(nonfinite_message(f"node {e.origin} (heard from neighbour {e.peer})", epoch,
                                                      ckpt.dir)) from None
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
                raise NonFiniteLoss(nonfinite_message(f"node {env.rank}", epoch, ckpt.dir))

            # evaluate the node and the network (async: the node alone until the end)
            if meets or last:
                if epoch % tcfg.eval_every == 0 or last:
                    row.update(evaluate_network(node, comm))
                    accs = [a[0] for a in comm.all_gather_floats([row["test_acc"]])]
                    log_epoch(epoch, tcfg.epochs, row, accs, time.perf_counter() - t_start, bar)
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
                ckpt.maybe_save(node, comm, {"epoch": epoch, "step": step, "wall_s": row["wall_s"],
                                             "transport": node.transport.state_dict()})
    finally:
        bar.close()
        metrics.close()
