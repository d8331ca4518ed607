"""What the torchrun trainer (p2p/trainer.py) and the simulator (p2p/sim.py) share, below both of them: the
graph and K of a run, the optimizer's keyword arguments and scheduler from the config, the loss, evaluation,
straggler delays, where a node drains, the run directory's header and the epoch's log line."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from p2p import checkpoint
from p2p.config import Config, ConfigError, TrainConfig, to_toml
from p2p.optimizer import resolve_interval
from p2p.topology import Topology, build_topology

log = logging.getLogger("p2p")


STOP_CHECK_STEPS = 16  # sync/overlap nodes agree whether to stop every this many steps (one 1-float all-gather)


class Stopped(Exception):
    """SIGTERM or SIGINT stopped the run at `step` (global, in `epoch`), after every node checkpointed there."""

    def __init__(self, signum: int, epoch: int, step: int):
        self.code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch} step {step}; continue with "
                         f"--run.resume")


class StopSignals:
    """SIGTERM and SIGINT, from construction to `restore()`, only record that a stop was asked for;
    the loop stops at a step every node agrees on (`agreed`) and checkpoints there. A second SIGINT (Ctrl-C twice)
    stops at once (KeyboardInterrupt: exit code 130, the checkpoints written before are kept); more SIGTERMs (Slurm
    signals torchrun and its workers, and torchrun passes its own on) change nothing."""

    def __init__(self) -> None:
        self.signum = 0  # the first signal received, 0 while none
        self._old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():  # (signal handlers live in the main thread)
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """The handlers from before: call when the loop ends, however it ends."""
        for s, old in self._old.items():
            signal.signal(s, old)

    def _handle(self, signum: int, frame) -> None:
        if self.signum:  # Slurm signals torchrun and its workers alike, then torchrun passes it on: one stop
            if self.signum == signum == signal.SIGINT:  # Ctrl-C twice: now
                raise KeyboardInterrupt
            return
        self.signum = signum
        log.warning("%s received: stopping at a step every node agrees on, after a checkpoint there",
                    signal.Signals(signum).name)

    def agreed(self, step: int, comm=None, transport=None) -> int:
        """The signal every node stops for after global step `step`, 0 to go on.

        With `comm` (nodes that meet: sync, overlap) the nodes compare every STOP_CHECK_STEPS steps, the largest
        signal number winning. Without it, an async transport (it has `propose_stop`) agrees through its messages
        on a step ahead (a node that only heard of it stops as for SIGTERM); else (the simulator, one process)
        the stop is at once."""
        if comm is not None:
            if step % STOP_CHECK_STEPS:
                return 0
            return int(max(s[0] for s in comm.all_gather_floats([float(self.signum)])))
        if transport is None or not getattr(transport, "flagged", False):
            return self.signum
        if self.signum:
            transport.propose_stop()
        stop = transport.stop_step()
        return (self.signum or signal.SIGTERM) if stop is not None and step >= stop else 0


def midway(epoch: int, step: int, wall_s: float, batch: int, loss_sum: torch.Tensor, correct: torch.Tensor,
           n_seen, delay_s: float) -> dict:
    """A checkpoint's progress after `batch` batches of `epoch` (global step `step`): the epochs done, and the
    epoch's sums so far, so that the resumed epoch's train_loss and train_acc are the uninterrupted run's."""
    return {"epoch": epoch - 1, "step": step, "wall_s": wall_s, "batch": batch,
            "partial": {"loss_sum": loss_sum.clone(), "correct": correct.clone(), "n_seen": torch.as_tensor(n_seen),
                        "delay_s": delay_s, "batches": batch}}


def partial_sums(partial: dict, delays: Iterator[float] | None) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """A resumed epoch's sums from `midway`'s "partial" (loss_sum, correct, n_seen, delay_s), and `delays`
    advanced past the batches already taken, as the uninterrupted run drew them."""
    for _ in range(partial["batches"] if delays else 0):
        next(delays)
    return partial["loss_sum"].clone(), partial["correct"].clone(), int(partial["n_seen"]), float(partial["delay_s"])


def skip_batches(loader: DataLoader, done: int) -> Iterator:
    """`loader`'s batches of this epoch after the first `done` (a resume inside an epoch), without loading those.

    The sampler's generator must be at the epoch's start (a checkpoint inside an epoch saves it so); the global
    torch RNG is left as it is, as the uninterrupted run drew the loader's seed at the epoch's start, before it."""
    if not done:
        return iter(loader)
    rest = list(itertools.islice(iter(loader.batch_sampler), done, None))
    torch_rng = torch.get_rng_state()
    batches = iter(DataLoader(loader.dataset, batch_sampler=rest, num_workers=loader.num_workers,
                              collate_fn=loader.collate_fn, pin_memory=loader.pin_memory))
    torch.set_rng_state(torch_rng)
    return batches


class NonFiniteLoss(RuntimeError):
    """Some node's loss became NaN/inf: every node stops together, keeping the last good checkpoint."""


def network(cfg: Config, n: int) -> Topology:
    """The topology of n nodes, with K resolved in cfg (before config.toml records it)."""
    topology = build_topology(cfg.topology, n) if n > 1 else Topology(1, ())
    if cfg.algorithm.mixing == "file" and topology.weights is None:
        raise ConfigError(f"--algorithm.mixing file: topology {topology.source} has no per-edge weights")
    resolve_interval(cfg.algorithm, topology)  # its warning is the optimizer's to log
    return topology


def optimizer_kwargs(cfg: Config) -> dict:
    """The config as DecentralizedOptimizer's keyword arguments: one vocabulary for the config and the library."""
    fields = dataclasses.asdict(cfg.algorithm)
    return {"algorithm": fields.pop("name"), **fields, "mode": cfg.comm.mode, "max_staleness": cfg.comm.max_staleness,
            "wire_dtype": cfg.comm.wire_dtype}


def scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """`train.scheduler` as torch's own scheduler, stepped once per iteration (the seed's StepLR)."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


def resume_lr(optimizer: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler | None, lr: float,
              epoch: int, say: bool = True) -> None:
    """A resumed run's `--algorithm.lr`: the checkpoint restored the γ it was written with; a new base rate takes
    over from here, keeping the schedule's position (each epoch's CSV row records the γ it ran with)."""
    group = optimizer.param_groups[0]
    base = group.get("initial_lr", group["lr"])
    if base == lr:
        return  # unchanged: the restored state as it was, bit for bit
    if say:
        log.info("resumed with --algorithm.lr %g (the run had %g): epochs after %d use it; the CSV's lr column "
                 "records each epoch's", lr, base, epoch)
    group["lr"] = group["lr"] * lr / base
    if "initial_lr" in group:
        group["initial_lr"] = lr
    if sched is not None:
        sched.base_lrs = [lr]


def loss_function(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss: the model's own `loss(output, target)` (a mean over the batch) if it has one, else
    cross-entropy of logits (B, C) against class indices (B,)."""
    own = getattr(model, "loss", None)
    return own if callable(own) else F.cross_entropy


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """`train.precision`: bf16 autocast of the forward and the loss, on CPU and GPU alike (fp32: off)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy of `model` on a whole split, per sample (per token for a language model)."""
    model.eval()
    loss_fn = loss_function(model)
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        if loss_fn is F.cross_entropy:  # summed in one call, as before the model could bring its own
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        else:  # the model's own loss, a batch mean
            loss_sum += loss_fn(out, y).item() * y.numel()
        correct += (out.argmax(-1) == y).sum().item()
        count += y.numel()
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
        raise NonFiniteLoss(checkpoint.nonfinite_message(f"node(s) {bad}", epoch, ckpt_dir))


def drains_at(cfg: Config, epoch: int, ckpt: checkpoint.Checkpointer) -> bool:
    """Whether a node completes all its posted exchanges at the end of `epoch`: where a checkpoint is written
    (it must hold no message in flight) and after the last epoch; sync and overlap at every epoch end, where
    they meet anyway. Real nodes and the simulator drain alike."""
    return cfg.comm.mode != "async" or epoch == cfg.train.epochs or ckpt.due(epoch)


def start_run_dir(cfg: Config, topology: Topology, what: str, n_params: int) -> None:
    """The resolved config and graph into the run directory, and the run's header in the log."""
    (cfg.out_dir / "config.toml").write_text(to_toml(cfg))
    topology.save(cfg.out_dir / "topology.json")
    log.info("%s, K = %d, %d parameters", what, cfg.algorithm.interval, n_params)
    if topology.n > 1:
        log.info("topology: %s", topology.summary(cfg.algorithm.mixing))


def task_of(cfg: Config) -> str:
    """What the run learns, which names its metrics: next-character prediction on text, else classification."""
    return "language_model" if cfg.data.name == "text" else "classification"


def log_epoch(epoch: int, epochs: int, row: dict[str, float], accs: list[float], elapsed: float, bar: tqdm,
              task: str = "classification") -> None:
    """The evaluation line: node 0's train loss, every node's test accuracy, the averaged model, consensus (a
    language model: bits per character and token accuracy)."""
    if task == "language_model":
        bits = math.log(2)
        log.info("epoch %d/%d | train bpc %.3f | test token acc mean %.4f [%.4f, %.4f] | avg model test bpc %.3f, "
                 "token acc %.4f | consensus %.3e | %.1fs", epoch, epochs, row["train_loss"] / bits,
                 float(np.mean(accs)), min(accs), max(accs), row["avg_test_loss"] / bits, row["avg_test_acc"],
                 row["consensus_dist"], elapsed)
        bar.set_postfix(bpc=f"{row['train_loss'] / bits:.3f}")
        return
    log.info("epoch %d/%d | train loss %.4f | test acc mean %.4f [%.4f, %.4f] | avg model %.4f | consensus %.3e | "
             "%.1fs", epoch, epochs, row["train_loss"], float(np.mean(accs)), min(accs), max(accs),
             row["avg_test_acc"], row["consensus_dist"], elapsed)
    bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{np.mean(accs):.3f}")
