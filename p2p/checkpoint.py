"""Checkpoints: everything a node needs to continue exactly, written atomically, resumed together.

Each node writes `ckpt/node<rank>_epoch<E>.pt` and keeps its two newest: a node can be one
checkpoint ahead of a peer that died while writing, and the network resumes from the newest epoch
that *every* node has complete. Files are written to a temporary name and `os.replace`d, so a
crash never leaves a half-written checkpoint under a real name, and loaded with weights_only=True.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from p2p.comm import Comm
from p2p.config import ConfigError, one_line

if TYPE_CHECKING:
    from p2p.trainer import Node

log = logging.getLogger("p2p")
KEEP = 2


def is_restart() -> bool:
    """True when torchrun restarted the workers after a failure (`--max-restarts`)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def check_run_dir(out_dir: Path, resume: bool) -> bool:
    """Whether this launch continues `out_dir`. Never silently overwrites an existing run."""
    if resume or is_restart():
        return True
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"run directory {out_dir} already exists: continue it with --run.resume "
                          f"or start a new run with --run.name NAME")
    return False


def _numpy_state() -> dict:
    """numpy's global RNG state with its key as a tensor, so weights_only loading accepts it."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _set_numpy_state(s: dict) -> None:
    np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


class Checkpointer:
    """Saves a node every `every` epochs and after epoch `last` (never when every = 0), and restores
    the network's newest common epoch. Saving the last epoch lets `--run.resume` extend a finished run."""

    def __init__(self, ckpt_dir: Path, rank: int, every: int, last: int):
        self.dir, self.rank, self.every, self.last = ckpt_dir, rank, every, last

    def _path(self, epoch: int) -> Path:
        return self.dir / f"node{self.rank}_epoch{epoch}.pt"

    def epochs(self) -> list[int]:
        """Epochs this node has complete checkpoints of, oldest first."""
        pattern = re.compile(rf"node{self.rank}_epoch(\d+)\.pt")
        found = [pattern.fullmatch(p.name) for p in self.dir.glob(f"node{self.rank}_epoch*.pt")]
        return sorted(int(m.group(1)) for m in found if m)

    def maybe_save(self, node: Node, comm: Comm, progress: dict) -> None:
        """Write `progress` ({"epoch", "step", "wall_s"}) and everything with state, if this epoch is due."""
        epoch = progress["epoch"]
        if self.every == 0 or (epoch % self.every and epoch != self.last):
            return
        state = {
            "progress": progress,
            "model": node.model.state_dict(),
            "algorithm": node.algorithm.state_dict(),
            "bytes_sent": comm.bytes_sent,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(comm.device) if comm.device.type == "cuda" else torch.empty(0),
                "numpy": _numpy_state(),
                "python": random.getstate(),
                "sampler": node.loader.sampler.generator.get_state(),
            },
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(epoch).with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self._path(epoch))  # atomic: the old checkpoints stay until this one exists
        for old in self.epochs()[:-KEEP]:
            self._path(old).unlink(missing_ok=True)

    def resume(self, node: Node, comm: Comm) -> dict:
        """Load the newest epoch every node has checkpointed (agreed by a collective).

        Returns its progress ({"epoch", "step", "wall_s"}); epoch 0 when there is none (start fresh).
        """
        mine = self.epochs()[-KEEP:]
        padded = mine + [0] * (KEEP - len(mine))
        everyone = [set(int(e) for e in row) for row in comm.all_gather_floats([float(e) for e in padded])]
        common = set.intersection(*everyone) - {0}
        if not common:
            log.info("resume: no checkpoint common to every node, starting from epoch 0")
            return {"epoch": 0, "step": 0, "wall_s": 0.0}
        path = self._path(max(common))
        try:  # fails when the file is unreadable or was written by another config (model, algorithm, world size)
            state = torch.load(path, map_location=comm.device, weights_only=True)
            node.model.load_state_dict(state["model"])
            node.algorithm.load_state_dict(state["algorithm"])
        except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"checkpoint {path} does not fit this run ({one_line(e)}): resume with the run's own "
                              f"config, {self.dir.parent / 'config.toml'}") from None
        comm.bytes_sent = state["bytes_sent"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if comm.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), comm.device)
        _set_numpy_state(rng["numpy"])
        random.setstate(rng["python"])
        node.loader.sampler.generator.set_state(rng["sampler"].cpu())
        progress = state["progress"]
        log.info("resumed from epoch %d (step %d)", progress["epoch"], progress["step"])
        return progress
