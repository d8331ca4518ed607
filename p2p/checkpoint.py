"""Checkpoints, and the rule that decides whether a launch continues a run or starts one.

Each node writes `ckpt/node<rank>_epoch<E>.pt` and keeps its two newest: a node can be one
checkpoint ahead of a peer that died while writing, and the network resumes from the newest epoch
that *every* node can read. Files are written to a temporary name, fsynced and `os.replace`d, so a
crash never leaves a half-written checkpoint under a real name. Each has its SHA-256 beside it
(`<name>.pt.sha256`): a file whose bytes changed afterwards (a bad disk, a copy, a bit flip) is not
loaded, however well torch.load would take it, and loading uses weights_only=True.

A run directory belongs to one job at a time: its processes hold `.lock` (RunLock, `claim`) from before they
read anything in it until they end, and a second job stops with one line naming the holder.

A launch only ever *continues* a run from a checkpoint every node has, or *starts* in a directory
that holds no results (CSV rows, checkpoints); see `decide`. A torchrun restart is recognised by
the `started_by` file, not by TORCHELASTIC_RESTART_COUNT: once every check has passed and training
is about to begin, each host writes the identities of the job's torchrun agents there (host, agent
pid and start time, rdzv id). An attempt whose agents are all listed is a restart of the job that
wrote the file, and may continue (or, with no common checkpoint, redo) its own run. Anything else in
the directory belongs to another launch: someone else's results, or an attempt of this job that
stopped before training (its restarts then fail the same way, instead of training over them). The
counter could not tell these apart, and it is per host.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
import numpy as np
import torch

from p2p.comm import Comm
from p2p.config import Config, ConfigError, field_values, one_line
from p2p.metrics import logged_epochs
from p2p.node import Node
from p2p.topology import Topology

log = logging.getLogger("p2p")
KEEP = 2
MARKER = "started_by"
LOCK = ".lock"  # held by the job that owns the run directory (RunLock)
# What a resumed run may change: where and how it runs and logs, how long, and the learning rate (each epoch's CSV
# row records the γ it ran with: lowering it after a divergence is the usual way on). Everything else decides what
# the earlier epochs' rows mean (the data, its order, the model, the rule and its settings, the graph, the timing),
# so a resume that changes it is refused with one line naming the field: the run directory stays one experiment's
# record (docs/faults.md, "What a resume may change"). train.epochs may grow, or shrink to no fewer than are done.
MAY_CHANGE = ("run.name", "run.dir", "run.device", "run.resume", "data.root", "data.download", "data.workers",
              "algorithm.lr", "train.epochs", "train.eval_every", "train.checkpoint_every",
              "train.checkpoint_every_steps", "train.keep_checkpoints", "comm.backend",
              "comm.timeout_s", "log.tensorboard", "log.csv", "log.level", "log.progress", "log.plots", "sim.nodes")


def fixed_fields(cfg: Config, world_size: int, topology: Topology | None = None) -> dict[str, object]:
    """Every field a resume may not change (all but MAY_CHANGE), the world size and the graph: recorded in every
    checkpoint and compared on resume."""
    fields: dict[str, object] = {"world size": world_size}
    if topology is not None:
        fields["topology"] = topology.fingerprint().removeprefix("topology graph = ")
    fields.update({f"--{flag}": value for flag, value in field_values(cfg).items() if flag not in MAY_CHANGE})
    return fields


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _numpy_state() -> dict:
    """numpy's global RNG state with its key as a tensor, so weights_only loading accepts it."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _set_numpy_state(s: dict) -> None:
    np.random.set_state(("MT19937", s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


def checksum_path(path: Path) -> Path:
    """A checkpoint's checksum file, `<name>.pt.sha256`, in `sha256sum -c` format."""
    return path.with_name(path.name + ".sha256")


def _write(path: Path, data: bytes | memoryview) -> None:
    """`data` under `path`, atomically: a temporary file, fsynced (on disk before a name points at it), renamed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk, Ctrl-C: no partial file stays behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _verified_bytes(path: Path) -> bytes:
    """The bytes of checkpoint `path` once their SHA-256 matches its checksum file; ValueError(reason) when not.

    A checkpoint without a checksum file, from before p2p wrote them, is accepted with a warning: refusing it
    would strand every older run, and its loading still has to succeed.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(e.strerror) from None
    side = checksum_path(path)
    try:
        expected = side.read_text().split()[0]
    except FileNotFoundError:
        log.warning("checkpoint %s has no checksum (%s; written before p2p wrote them): loading it unverified",
                    path, side.name)
        return data
    except (OSError, UnicodeDecodeError, IndexError):
        raise ValueError(f"its checksum file {side.name} cannot be read") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"its SHA-256 differs from {side.name}: the file changed after it was written")
    return data


def _why(error: BaseException) -> str:
    """Why torch.load failed, in one line, never with torch's advice to load with weights_only=False: a
    checkpoint that needs it was not written by p2p, and loading it so would run whatever code it holds."""
    text = str(error)
    if "Weights only load failed" not in text:
        return one_line(error)
    refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please|$)", text, re.M)
    return "it holds objects that a safe load refuses" + (f" ({refused.group(1).strip()})" if refused else "")


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """The state saved in checkpoint `path`: loaded (weights_only) only once its bytes match their checksum.
    ValueError with a one-line reason when they do not, or when it does not load."""
    data = _verified_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except (EOFError, pickle.UnpicklingError, RuntimeError, KeyError, ValueError, AttributeError) as e:
        raise ValueError(_why(e)) from None


class Checkpointer:
    """Saves a node every `every` epochs and after epoch `last` (never when every = 0), and restores
    it from a checkpoint. Saving the last epoch lets `--run.resume` extend a finished run."""

    def __init__(self, ckpt_dir: Path, rank: int, every: int, last: int, fixed: dict[str, object] | None = None,
                 keep: int = KEEP, every_steps: int = 0):
        self.dir, self.rank, self.every, self.last = ckpt_dir, rank, every, last
        self.fixed = fixed or {}  # fixed_fields(): recorded in every checkpoint, compared when loading
        self.keep = keep  # newest files kept (0: all); resuming reads only the KEEP newest
        self.every_steps = every_steps  # also inside an epoch, every this many (global) steps; 0: never

    def _path(self, epoch: int) -> Path:
        return self.dir / f"node{self.rank}_epoch{epoch}.pt"

    def _step_path(self, step: int) -> Path:
        return self.dir / f"node{self.rank}_step{step}.pt"

    def epochs(self, kind: str = "epoch") -> list[int]:
        """Epochs this node has checkpoint files of, oldest first (kind "step": global steps of its checkpoints
        inside an epoch)."""
        pattern = re.compile(rf"node{self.rank}_{kind}(\d+)\.pt")
        found = [pattern.fullmatch(p.name) for p in self.dir.glob(f"node{self.rank}_{kind}*.pt")]
        return sorted(int(m.group(1)) for m in found if m)

    def due_step(self, step: int) -> bool:
        """Whether a checkpoint is written inside the epoch after global step `step` (train.checkpoint_every_steps)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def save_midway(self, node: Node, comm: Comm, progress: dict, sampler: torch.Tensor) -> None:
        """Write a checkpoint inside an epoch, `node<rank>_step<step>.pt`: `progress` ({"epoch": epochs done,
        "step", "wall_s", "batch": batches of the next epoch taken, "partial": its sums so far}) and all state,
        with `sampler` (the generator's state at the epoch's start) as the sampler's. Keeps the two newest."""
        if not self._save(self._step_path(progress["step"]), node, comm, progress, sampler):
            return
        for old in self.epochs("step")[:-KEEP]:
            self._step_path(old).unlink(missing_ok=True)
            checksum_path(self._step_path(old)).unlink(missing_ok=True)

    def due(self, epoch: int) -> bool:
        """Whether `maybe_save` writes after `epoch`."""
        return self.every > 0 and (epoch % self.every == 0 or epoch == self.last)

    def maybe_save(self, node: Node, comm: Comm, progress: dict) -> None:
        """Write `progress` ({"epoch", "step", "wall_s"}) and all state, if this epoch is due."""
        epoch = progress["epoch"]
        if not self.due(epoch):
            return
        if not self._save(self._path(epoch), node, comm, progress, node.loader.sampler.generator.get_state()):
            return
        for old in self.epochs()[:-self.keep] if self.keep else []:
            self._path(old).unlink(missing_ok=True)
            checksum_path(self._path(old)).unlink(missing_ok=True)
        for old in self.epochs("step"):  # inside epochs up to this one: superseded
            if old <= progress["step"]:
                self._step_path(old).unlink(missing_ok=True)
                checksum_path(self._step_path(old)).unlink(missing_ok=True)

    def _save(self, path: Path, node: Node, comm: Comm, progress: dict, sampler: torch.Tensor) -> bool:
        """Write `progress` and all state to `path`, atomically, checksum first; whether it reads back verified."""
        state = {
            "progress": progress,
            "fixed": self.fixed,
            "model": node.model.state_dict(),
            "optimizer": node.optimizer.state_dict(),  # the rule's state and the messages not yet applied
            "scheduler": node.scheduler.state_dict() if node.scheduler is not None else {},
            "bytes_sent": comm.bytes_sent,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(comm.device) if comm.device.type == "cuda" else torch.empty(0),
                "numpy": _numpy_state(),
                "python": random.getstate(),
                "sampler": sampler,
            },
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getbuffer()
        self.dir.mkdir(parents=True, exist_ok=True)
        # the checksum first: a checkpoint under its real name always has one (its own, or an older one's that
        # fails it, if the second rename never happens)
        _write(checksum_path(path), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
        _write(path, data)  # atomic: the old checkpoints stay until this one exists
        _fsync_dir(self.dir)  # and so are the renames, before an older checkpoint goes
        try:  # read back as the file system returns it now: never delete older ones for a checkpoint that fails
            _verified_bytes(path)
        except ValueError as e:
            log.warning("checkpoint %s does not read back as written (%s): keeping the older ones", path, e)
            return False
        return True

    def readable(self, device: torch.device) -> dict[int, dict]:
        """This node's KEEP newest checkpoints that verify and load, by epoch. One that does not (truncated,
        corrupt, changed) is skipped with a warning naming it, so the network falls back to an older epoch that
        every node can read."""
        return self._readable(device, "epoch")

    def _readable(self, device: torch.device, kind: str) -> dict[int, dict]:
        states: dict[int, dict] = {}
        path = self._path if kind == "epoch" else self._step_path
        for key in reversed(self.epochs(kind)):
            if len(states) == KEEP:
                break
            try:
                states[key] = read_checkpoint(path(key), device)
            except ValueError as e:
                log.warning("checkpoint %s cannot be read (%s): not resuming from it", path(key), e)
        return states

    def load(self, epoch: int, state: dict, node: Node, comm: Comm, step: int | None = None) -> dict:
        """Restore `node` and `comm` from this node's checkpoint of `epoch` (or inside an epoch, at global `step`),
        read by `readable`.

        Returns its progress ({"epoch", "step", "wall_s"}, inside an epoch also "batch" and "partial"); ConfigError
        when it belongs to another setting.
        """
        path = self._path(epoch) if step is None else self._step_path(step)
        own_config = self.dir.parent / "config.toml"
        missing = [k for k in ("progress", "model", "optimizer", "bytes_sent", "rng") if k not in state]
        if missing:  # verified, so written like this: by another program or version
            raise ConfigError(f"checkpoint {path} is not a checkpoint of this p2p (it has no {', '.join(missing)}): "
                              f"start a new run with --run.name NAME")
        done = state["progress"]["epoch"]
        if done > self.last:  # a finished run must not become "done/last, unfinished"
            raise ConfigError(f"checkpoint {path} has {done} epochs done, this launch asks for --train.epochs "
                              f"{self.last}: resume with --train.epochs {done} or more")
        for key, now in self.fixed.items():
            then = state.get("fixed", {}).get(key, now)  # checkpoints from before this check record nothing
            if then != now:
                raise ConfigError(f"checkpoint {path} was written with {key} {then}, this launch has {now}: a resumed "
                                  f"run cannot change it; resume with the run's own config, {own_config}")
        try:  # fails when written by another model or algorithm setting (e.g. --model.hidden)
            node.model.load_state_dict(state["model"])
            node.optimizer.load_state_dict(state["optimizer"])
            if node.scheduler is not None:
                node.scheduler.load_state_dict(state["scheduler"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"].cpu())
            if comm.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"].cpu(), comm.device)
            _set_numpy_state(rng["numpy"])
            random.setstate(rng["python"])
            node.loader.sampler.generator.set_state(rng["sampler"].cpu())
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"checkpoint {path} does not fit this run ({one_line(e)}): resume with the run's own "
                              f"config, {own_config}") from None
        comm.bytes_sent = state["bytes_sent"]
        return state["progress"]


def agent_id() -> str:
    """This worker's torchrun agent: the same in every attempt of one torchrun job, different in any other
    launch (a pid can be reused, not together with its start time). Outside torchrun: unique."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return uuid.uuid4().hex
    ppid = os.getppid()
    try:  # field 22 of /proc/<pid>/stat: start time in clock ticks since boot
        started = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{socket.gethostname()} pid {ppid} started {started} rdzv {os.environ['TORCHELASTIC_RUN_ID']}"


class RunLock:
    """Who owns a run directory: an exclusive POSIX record lock (lockf) on `<dir>/.lock`, held until the holding
    process ends, however it ends: the kernel (or the NFS server) drops it then, so a crash leaves no stale owner
    behind, as a marker file would. The file names its holder, for the message of whoever is refused.

    A POSIX lock belongs to the process and goes with *any* close of the file by that process, so the holder
    opens it once and keeps it open; a process owns one run directory at a time (claiming another releases the
    first), so runs one after another in one process (tests, sweeps) do not pile up open files.
    """

    def __init__(self) -> None:
        self.file = None  # the open lock file while held
        self.dir: Path | None = None

    def acquire(self, out_dir: Path, agent: str) -> bool:
        """Take the lock of `out_dir` (creating both), writing this process's identity into it; False when
        another process holds it. ConfigError when the directory cannot be written."""
        if self.dir == out_dir.resolve():
            return True  # already ours: an in-process run after another one here
        self.release()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise ConfigError(f"run directory {out_dir} is a file: pass a directory to --run.dir") from None
        except OSError as e:
            raise ConfigError(f"cannot write to run directory {out_dir} ({e.strerror}): pick another --run.dir or "
                              f"--run.name") from None
        file = os.fdopen(fd, "r+")
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                file.close()  # this process holds no lock on it: closing drops nothing
                return False
            log.warning("cannot lock run directory %s (%s): another job could write into it at the same time",
                        out_dir, e.strerror)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "agent": agent}
        file.seek(0)
        file.truncate()
        file.write(json.dumps(holder) + "\n")
        file.flush()
        os.fsync(file.fileno())  # on a shared file system, other hosts read it after the next collective
        self.file, self.dir = file, out_dir.resolve()
        return True

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.dir = None


_OWNER = RunLock()  # this process's run directory


def _holder(out_dir: Path) -> dict:
    """The holder that `<dir>/.lock` names; {} when it cannot be read (or is still being written)."""
    for _ in range(20):  # a holder that took the lock this instant writes its name right after
        try:
            return json.loads((out_dir / LOCK).read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def claim(out_dir: Path, agent: str, comm: Comm | None = None) -> None:
    """Own `out_dir` for this job until its processes end: ConfigError on every rank, naming the holder, when
    another job owns it. Call before reading or writing anything in it.

    With `comm` every rank calls it. Ranks of one host share a directory, so only local rank 0 takes the lock;
    a host whose lock is held by another host of this same job (a directory shared over a network file system)
    goes on. Without `comm` (the simulator) this process alone takes it.
    """
    got, error = True, ""
    if comm is None or comm.env.local_rank == 0:
        try:
            got = _OWNER.acquire(out_dir, agent)
        except ConfigError as e:  # not a writable directory: every rank stops with this line, not this one alone
            error = str(e)
    # a collective: every host that got the lock has written its name by the time the others read it
    agents = {a.decode() for a in comm.all_gather_bytes(agent.encode())} if comm is not None else {agent}
    if not got and (holder := _holder(out_dir)).get("agent") not in agents:
        who = f"host {holder.get('host')}, pid {holder.get('pid')}" if holder else "a process that did not say who"
        error = (f"run directory {out_dir} is in use by another job ({who}): wait for it to end or stop it, or start "
                 f"a new run with --run.name NAME")
    if comm is not None:
        comm.agree(error)
    elif error:
        raise ConfigError(error)


def follow_agent(agent_pid: int) -> None:
    """Under torchrun on Linux, have the kernel SIGKILL this worker when its agent dies.

    A SIGKILLed agent (OOM killer, scancel -9) cannot stop its workers, which run in sessions of their own, so
    without this they would go on training and holding the run directory. `agent_pid`: the parent's pid, read
    when the process began; if it is no longer the parent, the agent died before the kernel was told.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the torchrun agent (%s)", os.strerror(ctypes.get_errno()))
    elif os.getppid() != agent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Facts:
    """What one node sees of the run directory; gathered from every node before anything is decided."""

    nonempty: bool  # the directory exists and holds anything but its lock
    ours: bool  # `started_by` lists this node's agent: an earlier attempt of this job began training here
    agent: str  # this node's agent (agent_id)
    logged: list[int]  # epochs in node<rank>.csv
    saved: list[int]  # epochs of this node's checkpoint files
    readable: list[int]  # those of them that load
    midway: list[int] = field(default_factory=list)  # global steps of the checkpoints inside an epoch that load


def _epochs(epochs: list[int]) -> str:
    """[] -> "none", [2] -> "2", [1, 2, 3] -> "1-3", [2, 5] -> "[2, 5]"."""
    if len(epochs) <= 1:
        return str(epochs[0]) if epochs else "none"
    return f"{epochs[0]}-{epochs[-1]}" if epochs == list(range(epochs[0], epochs[-1] + 1)) else str(epochs)


def _who_has(facts: list[Facts]) -> str:
    """Which nodes have which epochs, nodes with the same ones grouped: `nodes 0-2: logged 1-3, checkpoints none`."""
    groups: dict[str, list[int]] = {}
    for rank, f in enumerate(facts):
        unreadable = sorted(set(f.saved) - set(f.readable))
        what = f"logged {_epochs(f.logged)}, checkpoints {_epochs(f.readable)}"
        groups.setdefault(what + (f", unreadable {_epochs(unreadable)}" if unreadable else ""), []).append(rank)
    return "; ".join(f"node{'s' if len(r) > 1 else ''} {_epochs(r)}: {what}" for what, r in groups.items())


def decide(facts: list[Facts], resume: bool, out_dir: Path) -> int | None:
    """The epoch to continue from, None to start at epoch 0, or ConfigError when neither is safe.

    Without --run.resume, and unless this is a restart of the job that began the run (`ours` on every
    node), the directory must be missing or empty. Otherwise continue from the newest checkpoint every
    node can read; with none, start at epoch 0 only where nothing would be lost (no CSV rows, no
    checkpoint files) or where it is this job's own; else stop, saying which node has which epochs.
    Pure, and every rank calls it with the same gathered facts, so every rank decides the same.
    """
    ours = all(f.ours for f in facts)
    if not (resume or ours):
        if any(f.nonempty for f in facts):
            raise ConfigError(f"run directory {out_dir} already exists: continue it with --run.resume or start a "
                              f"new run with --run.name NAME")
        return None
    common = set.intersection(*(set(f.readable) for f in facts))
    if common:
        return max(common)
    if ours or not any(f.logged or f.saved for f in facts):
        return None  # an empty directory, or our own earlier attempt that never checkpointed
    raise ConfigError(f"run directory {out_dir} holds results but no checkpoint that every node can resume from "
                      f"({_who_has(facts)}): nothing was changed; start a new run with --run.name NAME")


def node_facts(out_dir: Path, rank: int, ckpt: Checkpointer, device: torch.device, agent: str) -> tuple[Facts, dict]:
    """What node `rank` sees of `out_dir`, and its readable checkpoints by epoch."""
    marker = out_dir / MARKER
    states = ckpt.readable(device)
    midway = ckpt._readable(device, "step")
    states.update({("step", step): state for step, state in midway.items()})
    return Facts(nonempty=out_dir.is_dir() and any(p.name != LOCK for p in out_dir.iterdir()),
                 ours=marker.is_file() and agent in marker.read_text().splitlines(), agent=agent,
                 logged=logged_epochs(out_dir, rank), saved=ckpt.epochs(), readable=sorted(k for k in states if
                                                                                           isinstance(k, int)),
                 midway=sorted(midway)), states


def midway_step(facts: list[Facts], epoch: int | None, states: dict) -> int | None:
    """The global step of the newest checkpoint inside an epoch that every node can read and that lies after
    checkpoint `epoch` (None: the run's start), or None: resume from `epoch`. Pure given the gathered facts (and
    `epoch`'s step, the same in every node's checkpoint), so every rank decides the same."""
    after = states[epoch]["progress"]["step"] if epoch is not None else -1
    common = set.intersection(*(set(f.midway) for f in facts))
    later = [s for s in common if s > after]
    return max(later) if later else None


def mark_started(out_dir: Path, facts: list[Facts], rank: int) -> None:
    """Write `started_by`: the agents of every node, once training is about to begin."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MARKER}.{rank}.tmp"
    tmp.write_text("".join(f"{a}\n" for a in sorted({f.agent for f in facts})))
    os.replace(tmp, out_dir / MARKER)


def begin(out_dir: Path, resume: bool, node: Node, comm: Comm, ckpt: Checkpointer) -> dict | None:
    """Continue the run in `out_dir` or start it, decided on every rank together, and mark it begun.

    Returns the progress ({"epoch", "step", "wall_s"}) of the checkpoint it continues from, None when
    it starts at epoch 0. Call right after joining the process group, before writing anything.
    """
    agent = agent_id()
    claim(out_dir, agent, comm)
    mine, states = node_facts(out_dir, comm.rank, ckpt, comm.device, agent)
    facts = [Facts(**json.loads(b)) for b in comm.all_gather_bytes(json.dumps(asdict(mine)).encode())]
    epoch = decide(facts, resume, out_dir)
    step = midway_step(facts, epoch, states) if resume or all(f.ours for f in facts) else None
    progress, error = None, ""
    if epoch is not None or step is not None:
        try:
            progress = ckpt.load(epoch, states[("step", step) if step is not None else epoch], node, comm, step)
        except ConfigError as e:
            error = str(e)
    comm.agree(error)  # one node's unfit checkpoint stops them all here, not at the next collective
    if comm.env.local_rank == 0:  # one writer per host: the directory may be shared, or one per host
        mark_started(out_dir, facts, comm.rank)
    log_start(progress)
    return progress


def nonfinite_message(who: str, epoch: int, ckpt_dir: Path) -> str:
    """The line that stops a run whose loss on `who` became NaN or inf in `epoch`: how to go on, which depends on
    whether any checkpoint was written before it (in epoch 1, or with checkpoint_every 0, none was)."""
    found = (re.fullmatch(r"node\d+_epoch(\d+)\.pt", p.name) for p in ckpt_dir.glob("node*_epoch*.pt"))
    saved = [int(m.group(1)) for m in found if m and int(m.group(1)) < epoch]
    head = f"non-finite training loss on {who} in epoch {epoch}: lower --algorithm.lr"
    if not saved:
        return f"{head} and start a new run (no checkpoint was written before epoch {epoch})"
    return f"{head} and continue with --run.resume (the checkpoints up to epoch {max(saved)} are kept in {ckpt_dir})"


def log_start(progress: dict | None) -> None:
    if progress is None:
        log.info("starting at epoch 0")
    elif progress.get("batch"):
        log.info("resumed inside epoch %d, after its batch %d (step %d)", progress["epoch"] + 1, progress["batch"],
                 progress["step"])
    else:
        log.info("resumed from epoch %d (step %d)", progress["epoch"], progress["step"])
