"""The only module that calls torch.distributed: set-up, neighbour exchange on flat buffers, reductions.

The same code runs on NCCL (one GPU per rank) and gloo (CPU); the backend is chosen from the device.
Every exchange posts all its sends and receives together with `batch_isend_irecv`, so no ordering
of peers can deadlock, and counts the bytes it sends.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from p2p.config import CommConfig, ConfigError, one_line


class PeerFailure(RuntimeError):
    """A peer died or did not answer within comm.timeout_s: this node stops, naming whom it waited for."""


@dataclass
class Env:
    """Rank facts, read from torchrun's environment before any process group exists."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_env() -> Env:
    """Rank facts from torchrun; a plain `python train.py` is a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    get = lambda key, default: int(os.environ.get(key, default))  # noqa: E731
    world = get("WORLD_SIZE", 1)
    return Env(get("RANK", 0), world, get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", world))


def check_restarts() -> None:
    """Reject `torchrun --max-restarts` with a rendezvous store that outlives an attempt.

    torchrun shares its store with the workers by default; its keys survive a restart, so a
    restarted worker can read the previous attempt's addresses and never connect
    (pytorch/pytorch#135712). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every attempt its own store
    with the c10d rendezvous (`--standalone` or `--rdzv-backend c10d`); the static one always shares.
    """
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError("torchrun --max-restarts needs a fresh rendezvous store per attempt: launch with "
                          "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --standalone or --rdzv-backend c10d")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str, backend: str, env: Env) -> tuple[torch.device, str]:
    """Pick (device, backend) and reject impossible requests before any rank waits for another."""
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("--run.device cuda was asked for but CUDA is not available: use --run.device cpu")
    use_cuda = device == "cuda" or (device == "auto" and has_cuda)
    if backend == "nccl" and not use_cuda:
        raise ConfigError("--comm.backend nccl needs GPUs: use --comm.backend gloo on CPU")
    if use_cuda and torch.cuda.device_count() < env.local_world_size:
        if device == "cuda" or backend == "nccl":
            raise ConfigError(
                f"{env.local_world_size} ranks on this host but only {torch.cuda.device_count()} GPUs: "
                f"lower --nproc_per_node or use --run.device cpu --comm.backend gloo")
        use_cuda = False  # auto: fall back to CPU rather than share a GPU between ranks
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    dev = torch.device("cuda", env.local_rank) if use_cuda else torch.device("cpu")
    return dev, backend


class Posted:
    """One peer's share of a posted exchange (its send and its receive): poll `done()`, or `wait()`.

    gloo's point-to-point work never reports completion before `wait()` (`is_completed()` stays
    False; torch 2.x), although gloo moves the bytes in its own threads. So on gloo a daemon thread
    per peer calls `wait()` on each posted exchange in order and sets `finished`; `wait()` releases
    the GIL, so training goes on meanwhile. NCCL's work is polled with `is_completed()`, and
    `wait()` then makes the current CUDA stream wait for the receive, so no kernel reads the buffer
    before it has arrived (NCCL runs point-to-point work on its own streams, after the work the
    current stream had queued when the exchange was posted: the sender's private copies are
    complete). The NCCL path is written but not yet exercised on GPUs.
    """

    def __init__(self, comm: Comm, peer: int, works: list):
        self.comm, self.peer, self.works = comm, peer, works
        self.finished = threading.Event()  # gloo: set by the peer's waiter thread
        self.error: BaseException | None = None

    def done(self) -> bool:
        if self.comm.backend == "nccl":
            return all(w.is_completed() for w in self.works)
        if self.error is not None:
            self.wait()  # raises it as a PeerFailure
        return self.finished.is_set()

    def wait(self) -> None:
        """Block until both messages have travelled, at most comm.timeout_s."""
        label = f"exchange with neighbour {self.peer}"
        with self.comm._guard(label):
            if self.comm.backend == "nccl":
                for w in self.works:
                    w.wait()  # the current stream waits for the receive
                return
            if not self.finished.wait(self.comm.timeout.total_seconds()):
                raise RuntimeError("no answer")
            if self.error is not None:
                raise RuntimeError(one_line(self.error))


class Comm:
    """A node's view of the network: its rank, its device, and the messages it sends."""

    def __init__(self, env: Env, device: torch.device, backend: str, cfg: CommConfig):
        self.env, self.device, self.backend = env, device, backend
        self.rank, self.world_size = env.rank, env.world_size
        self.timeout = timedelta(seconds=cfg.timeout_s)
        self.bytes_sent = 0  # payload bytes this node has sent, all exchanges together
        self.comm_s = 0.0  # wall time spent waiting on communication
        self.failed = False  # a wait failed: the group may hold work that never completes
        self.collectives = 0  # calls that every rank must join (async training makes none before its end; tested)
        self._waiters: dict[int, queue.Queue] = {}  # gloo: one waiter thread per peer (see Posted)

    def start(self) -> None:
        """Join the process group (NCCL or gloo) and check that every rank is there."""
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            torch.cuda.set_device(self.device)
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        with self._guard(f"joining the process group at {where}"):
            dist.init_process_group(self.backend, timeout=self.timeout, device_id=self.device if on_gpu else None)
        self.barrier()

    def stop(self) -> None:
        """Leave the process group. After a failure it is left alone: destroying a group whose
        work timed out blocks until that work ends, which may be never; the process exit frees it."""
        if dist.is_initialized() and not self.failed:
            dist.destroy_process_group()

    def barrier(self) -> None:
        flag = torch.ones(1, device=self.device)
        self.collectives += 1
        with self._guard("barrier over all ranks"):
            dist.all_reduce(flag)

    def exchange(self, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor]) -> None:
        """Send `send[j]` to each peer j and receive into `recv[j]`, all posted together.

        Each tensor is one flat contiguous buffer: one message per edge and direction.
        """
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout.total_seconds()  # for the whole exchange, not per message
        ops = [dist.P2POp(dist.isend, t, peer) for peer, t in send.items()]
        ops += [dist.P2POp(dist.irecv, t, peer) for peer, t in recv.items()]
        everyone = f"exchange with neighbour(s) {sorted(set(send) | set(recv))}"
        if ops:
            with self._guard(everyone):
                works = dist.batch_isend_irecv(ops)
            # gloo returns one work per message, so a failure names its peer; NCCL coalesces the batch
            what = ([f"send to neighbour {p}" for p in send] + [f"receive from neighbour {p}" for p in recv]
                    if len(works) == len(ops) else [everyone] * len(works))
            for label, work in zip(what, works):
                with self._guard(label):
                    work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
        with self._guard(everyone):
            self._sync()
        self.bytes_sent += sum(t.numel() * t.element_size() for t in send.values())
        self.comm_s += time.perf_counter() - start

    def post(self, send: dict[int, torch.Tensor], recv: dict[int, torch.Tensor]) -> dict[int, Posted]:
        """Post `send[j]` to and a receive into `recv[j]` for each peer j, all together, without waiting.

        Returns one `Posted` per peer. Nobody may touch these buffers until its peer's Posted is done:
        the caller passes private copies. The bytes count when posted.
        """
        ops = [dist.P2POp(dist.isend, t, peer) for peer, t in send.items()]
        ops += [dist.P2POp(dist.irecv, t, peer) for peer, t in recv.items()]
        if not ops:
            return {}
        with self._guard(f"exchange with neighbour(s) {sorted(set(send) | set(recv))}"):
            works = dist.batch_isend_irecv(ops)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in send.values())
        peers = [*send, *recv]
        by_peer: dict[int, list] = {p: [] for p in peers}
        for peer, work in zip(peers, works) if len(works) == len(ops) else ((p, w) for p in by_peer for w in works):
            by_peer[peer].append(work)  # NCCL coalesces the batch into one work: every peer waits on it
        posted = {p: Posted(self, p, ws) for p, ws in by_peer.items()}
        if self.backend != "nccl":
            for p, one in posted.items():
                if p not in self._waiters:
                    self._waiters[p] = queue.Queue()
                    threading.Thread(target=self._wait_loop, args=(self._waiters[p],), daemon=True).start()
                self._waiters[p].put(one)
        return posted

    def _wait_loop(self, todo: queue.Queue) -> None:
        """gloo: wait on one peer's posted exchanges in order, marking each finished (see Posted)."""
        while True:
            one = todo.get()
            try:
                for work in one.works:
                    work.wait(self.timeout)
            except BaseException as e:  # handed to the training thread, which raises it as a PeerFailure
                one.error = e
            one.finished.set()

    def all_reduce_mean_(self, t: torch.Tensor, training: bool = True) -> torch.Tensor:
        """In-place mean over all ranks.

        Training traffic (`training=True`) counts the ring all-reduce's 2(n-1)/n·|t| bytes sent
        and its time; evaluation traffic (averaged model, consensus distance) counts neither.
        """
        start = time.perf_counter()
        self.collectives += 1
        with self._guard("all-reduce over all ranks"):
            dist.all_reduce(t)
        t.div_(self.world_size)
        if training:
            self._sync()
            self.bytes_sent += 2 * (self.world_size - 1) * t.numel() * t.element_size() // self.world_size
            self.comm_s += time.perf_counter() - start
        return t

    def pair_groups(self, edges: list[tuple[int, int]]) -> dict[tuple[int, int], dist.ProcessGroup]:
        """A 2-rank subgroup per edge. Every rank must call this, with the same edges in the same order."""
        return {(i, j): dist.new_group([i, j]) for i, j in edges}

    def pair_average_(self, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        """t ← (t_i + t_j)/2 over a 2-rank subgroup: gossip's alternative to one send/recv pair."""
        start = time.perf_counter()
        with self._guard(f"pair all-reduce with ranks {dist.get_process_group_ranks(group)}"):
            dist.all_reduce(t, group=group)
        t.div_(2)
        self._sync()
        self.bytes_sent += t.numel() * t.element_size()  # ring all-reduce of 2 ranks: |t| each way
        self.comm_s += time.perf_counter() - start
        return t

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over all ranks (metrics, flags); not counted as training traffic."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.collectives += 1
        with self._guard("all-reduce over all ranks"):
            dist.all_reduce(t)
        return t.tolist()

    def all_gather_floats(self, values: list[float]) -> list[list[float]]:
        """Every rank's scalars, indexed by rank (for logs that compare nodes)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self.collectives += 1
        with self._guard("all-gather over all ranks"):
            dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, by rank: the lengths, then one uint8 tensor per rank padded to the longest.

        Plain bytes, never pickles: torch's object collectives would unpickle whatever a peer sends.
        """
        sizes = [int(s[0]) for s in self.all_gather_floats([float(len(data))])]
        t = torch.zeros(max(sizes + [1]), dtype=torch.uint8)
        t[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        self.collectives += 1
        with self._guard("all-gather over all ranks"):
            dist.all_gather(out, t)
        return [o[:n].cpu().numpy().tobytes() for o, n in zip(out, sizes)]

    def agree(self, error: str) -> None:
        """ConfigError on every rank when any rank has an `error` (the lowest rank's), so that a mistake one
        rank sees stops them all here, instead of leaving the others waiting at their next collective."""
        first = next((e for e in self.all_gather_bytes(error.encode()) if e), b"")
        if first:
            raise ConfigError(first.decode())

    def check_same(self, lines: list[str]) -> None:
        """Stop every rank with one line unless all ranks hold the same `lines` ("key = value").

        A 32-byte digest travels first; only when they differ does every rank send its lines, so that the
        message can name the first differing key and both values.
        """
        text = "\n".join(lines).encode()
        digests = self.all_gather_bytes(hashlib.sha256(text).digest())
        if len(set(digests)) == 1:
            return
        other = next(r for r, d in enumerate(digests) if d != digests[0])
        texts = self.all_gather_bytes(text)
        ours, theirs = (dict(ln.split(" = ", 1) for ln in texts[r].decode().splitlines()) for r in (0, other))
        key = next(k for k in [*ours, *theirs] if ours.get(k) != theirs.get(k))
        raise ConfigError(f"nodes were launched with different configs: {key} is {ours.get(key, '(absent)')} on node 0 "
                          f"but {theirs.get(key, '(absent)')} on node {other}; launch every host with the same "
                          f"command and files")

    def report_failure(self, reason: str) -> None:
        """Leave why this node stops in the rendezvous store, so that the nodes left waiting for it say so instead
        of advising a restart, which cannot help a local, repeatable failure. Best effort: no store, no report."""
        try:
            dist.distributed_c10d._get_default_store().set(f"p2p_failed_{self.rank}", reason[:300])
        except Exception:  # noqa: BLE001 - the group may be gone; the process is stopping anyway
            pass

    def _peer_failures(self) -> list[str]:
        """The reasons other nodes left with `report_failure`, as "node k stopped: reason"."""
        try:
            store = dist.distributed_c10d._get_default_store()
            keys = {r: f"p2p_failed_{r}" for r in range(self.world_size) if r != self.rank}
            return [f"node {r} stopped: {store.get(k).decode()}" for r, k in keys.items() if store.check([k])]
        except Exception:  # noqa: BLE001 - the store went with its host: fall back to the generic line
            return []

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Turn a backend error or timeout into one line naming the peers this node waited for, and the reason a
        peer gave when it stopped (report_failure), where it left one."""
        try:
            yield
        except RuntimeError as e:  # DistBackendError, DistStoreError, gloo timeouts and closed connections all are
            self.failed = True
            if known := self._peer_failures():
                raise PeerFailure(f"node {self.rank}: {what} failed: {'; '.join(known)}") from e
            raise PeerFailure(f"node {self.rank}: {what} failed (timeout {self.timeout.total_seconds():.0f}s): "
                              f"{one_line(e)}; a peer died or hangs, restart with torchrun --max-restarts") from e

    def _sync(self) -> None:
        # NCCL work completes on a stream; wait for it so comm_s measures the transfer.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
