"""When a rule's messages travel: the exchange modes of ALGORITHMS.md (`comm.mode`).

A rule (p2p/algorithms) says what it sends, `messages()`, and what it does with what it receives,
`receive(msgs)`; the trainer calls `end_round(rule)` after every K-th local step. With S the
staleness bound (sync 0, overlap 1, async `comm.max_staleness`), at the end of round r:

    sync (S = 0):  post round r's messages; wait for them; hand them to the rule
    S >= 1:        wait until every edge's exchange of round r − S has completed; post round r's
                   messages (private copies, built from the state now), which travel while the
                   next local steps run; then hand the rule the newest message per edge that had
                   completed before the post and that it has not had yet

Build-first (ALGORITHMS.md, "Staleness and the order of build and apply"): with S >= 1 round r's
messages are built before the received ones are applied. For pdmm's dual rule z_ij <- y_ji the order
decides everything: receive-first makes y_ij(r) = y_ji(r-1) - 2 A_ij w_i, a reflection of a reflection
that diverges with one round of staleness (tests/test_exchange_modes.py shows both orders).

Each edge carries one exchange per round in which its rule sends, the m-th message of i paired
with the m-th of j, so both ends complete the same number. With S = 1 round r − 1 is the only one
that can have completed, so `overlap` applies exactly round r − 1's messages at the end of round r:
one round stale and deterministic. `async` applies whatever has arrived, never older than r − S.
A message superseded on its edge before it was handed over is skipped, never applied; none is
applied twice.

With the seed's per-edge slots (`async` only, when K is the topology file's round; the trainer
decides), an edge exchanges not at the round's end but once per round, after the local step t
with t mod K = its slot, the slot of its lower-ranked end, so both ends post at the same step. At
that step the same three moves happen for that edge alone: wait for its exchange of round r − S
(r = t div K), post its message built from the rule's state now, hand over its newest completed
message. Staleness and draining work per edge as above.

`wire_dtype` (comm.wire_dtype) says in which dtype floating-point messages travel: fp32, as the rules hold
them, or bf16, half the bytes. Only the copy that travels is cast: the rules' state stays fp32 and each
received message is cast back before the rule gets it; non-float messages (choco's packed bytes) travel as
they are. allreduce's gradient all-reduce travels, and sums, in bf16 too. In async the stop flag stays an
exact float32 (its 4 bytes as two bf16 elements), as propose_stop's step -(T + 1) must.

This module only decides timing; `Comm` (the one torch.distributed user) moves the bytes.
`InMemory` is the same timing for a whole simulated network in one process (p2p/sim.py), on virtual clocks.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass

import torch

from p2p.comm import Comm, Posted

STALENESS = {"sync": 0, "overlap": 1}  # async: comm.max_staleness
WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # comm.wire_dtype -> the dtype float messages travel in


def on_wire(t: torch.Tensor, wire: torch.dtype | None) -> torch.dtype:
    """The dtype `t` travels in: `wire` for a floating-point message (None: its own), else its own."""
    return wire if wire is not None and t.is_floating_point() else t.dtype


def flag_dtype(wire: torch.dtype) -> torch.dtype:
    """The stop flag's dtype in a message of dtype `wire`: float32 (its bytes as two elements) for a 16-bit float,
    whose 8-bit mantissa would round propose_stop's step -(T + 1) above 256."""
    return wire if wire.itemsize >= 4 else torch.float32


class NetworkStop(RuntimeError):
    """A neighbour's message carried the stop flag: node `origin` stopped the run (async, issue 14)."""

    def __init__(self, origin: int, peer: int):
        super().__init__(f"node {origin} stopped the run (heard from neighbour {peer})")
        self.origin, self.peer = origin, peer


def fresh_stats() -> dict:
    return {"sum": 0, "n": 0, "max": 0, "wait_s": 0.0, "exchanges": 0}


def add_staleness(s: dict, rounds: int) -> None:
    """Count one message applied `rounds` after the round it was built in."""
    s["sum"] += rounds
    s["n"] += 1
    s["max"] = max(s["max"], rounds)


def stats_columns(s: dict) -> dict[str, float]:
    """A node's CSV columns from its `fresh_stats` counts: staleness in rounds (mean and max over the messages
    applied), seconds blocked waiting for exchanges, exchanges completed."""
    return {"staleness_mean": s["sum"] / s["n"] if s["n"] else 0.0, "staleness_max": s["max"],
            "wait_s": s["wait_s"], "exchanges": s["exchanges"]}


@dataclass
class _InFlight:
    round: int
    posted: Posted
    sent: torch.Tensor  # the private copy being sent (back to the pool when done)
    received: torch.Tensor


class Transport:
    """A node's exchanges over `comm`, in mode `sync`, `overlap` or `async` (bound `max_staleness`).

    Args:
        interval: K, the local steps per round (`after_step` ends a round every K-th step).
        slots: {peer: slot in 0..K-1}, the step of a round at which each edge exchanges; None: at the round's end.
        wire_dtype: fp32 | bf16, the dtype float messages travel in (module docstring).
    """

    def __init__(self, comm: Comm, mode: str = "sync", max_staleness: int = 2, interval: int = 1,
                 slots: dict[int, int] | None = None, wire_dtype: str = "fp32"):
        self.comm, self.mode = comm, mode
        self.wire = WIRE_DTYPES[wire_dtype]
        self.dtype: torch.dtype | None = None  # of the rule's messages: what a received one is cast back to
        self.S = STALENESS.get(mode, max_staleness)
        self.K, self.slots = interval, slots
        if slots is not None and self.S == 0:
            raise ValueError("per-edge slots need a mode with staleness (async)")
        self.round = 0  # rounds ended so far: the next one to end is r = self.round
        self.in_flight: dict[int, deque[_InFlight]] = {}  # per peer, in posting order
        self.ready: dict[int, tuple[int, torch.Tensor]] = {}  # per peer: (round, message), completed, not handed over
        self.completed: dict[int, int] = {}  # per peer: exchanges completed (both directions)
        self.applied: dict[int, int] = {}  # per peer: messages handed to the rule
        self.posted_at: dict[int, Counter] = {}  # slots: per peer, {step mod K: exchanges posted} (what tests check)
        self._pool: list[torch.Tensor] = []  # spare message buffers
        self._recv: dict[int, torch.Tensor] = {}  # sync: one receive buffer per peer
        self._stats = fresh_stats()
        # async: every message carries one more element, the stop flag (0, or 1 + the rank that stopped the run),
        # so a stop spreads through the neighbour exchange instead of a collective every epoch
        self.flagged = mode == "async"
        self.stop_flag = 0.0
        self.stopped_peers: dict[int, int] = {}  # peer: the origin its flagged message named
        self._template: dict[int, torch.Tensor] = {}  # per peer: a message like the ones it gets (announce_stop)

    def epoch_stats(self) -> dict[str, float]:
        """The CSV columns since the last call (`stats_columns`)."""
        s, self._stats = self._stats, fresh_stats()
        return stats_columns(s)

    def average_gradient(self, g: torch.Tensor) -> None:
        """g ← (1/n) Σ_j g_j over all nodes (allreduce's one use of the network), in place; with a bf16 wire the
        all-reduce sends, sums and divides in bf16."""
        if on_wire(g, self.wire) == g.dtype:
            self.comm.all_reduce_mean_(g)
        else:
            g.copy_(self.comm.all_reduce_mean_(g.to(self.wire)))

    def after_step(self, rule, step: int) -> None:
        """After local step `step` (0-based, counted over the run): the exchanges due now, if any."""
        if self.slots is None:
            if (step + 1) % self.K == 0:
                self.end_round(rule)
            return
        due = [j for j, slot in self.slots.items() if slot == step % self.K]
        if due:
            start, r = time.perf_counter(), step // self.K
            self._collect(until=r - self.S, peers=due)
            self._raise_if_stopped()
            send = rule.messages()  # every peer's, built before applying (build-first); only the due ones travel
            self._post({j: send[j] for j in due if j in send}, r)
            self._hand_over(rule, r, peers=due)
            for j in due:
                self.posted_at.setdefault(j, Counter())[step % self.K] += 1
            self.comm.comm_s += time.perf_counter() - start
        self.round = (step + 1) // self.K

    def end_round(self, rule) -> None:
        """The end of round r: exchange and apply as the mode says (module docstring)."""
        start, r = time.perf_counter(), self.round
        if self.S == 0:
            self.ready.clear()  # superseded by this round's (left by a checkpoint of another mode)
            send = self._cast(rule.messages())
            recv = {j: self._sync_buffer(j, t) for j, t in send.items()}
            self.comm.exchange(send, recv)
            self._stats["wait_s"] += time.perf_counter() - start
            for j in recv:
                self.completed[j] = self.completed.get(j, 0) + 1
                self._stats["exchanges"] += 1
                self.ready[j] = (r, recv[j])
            self._hand_over(rule, r)
        else:
            self._collect(until=r - self.S)
            self._raise_if_stopped()
            self._post(rule.messages(), r)  # build-first: round r's messages from the state before applying
            self._hand_over(rule, r)
            self.comm.comm_s += time.perf_counter() - start  # sync's exchange counts its own
        self.round += 1

    def drain(self) -> None:
        """Wait for every exchange in flight; their messages wait, unapplied, for the next round's end.

        Called at every epoch end, where all nodes have posted the same rounds (all finish), so a
        checkpoint holds no message in flight, only `ready` ones (in its state): overlap resumes bit
        for bit, and the last epoch's drain completes every exchange a neighbour still posts.
        """
        start = time.perf_counter()
        self._collect(until=self.round)
        self.comm.comm_s += time.perf_counter() - start
        self._raise_if_stopped()

    def announce_stop(self, origin: int) -> None:
        """Tell every neighbour that node `origin` stopped the run, then return: async's way to stop together.

        One more exchange per edge, its stop flag set (the payload is zeros: nobody applies it). Each
        neighbour meets it in its next exchange on that edge, raises NetworkStop and announces in turn, so
        the stop reaches every node within (diameter x (S + 1)) rounds. Returns when every edge has carried
        the flag, or its neighbour's own flag has arrived (it posts no more), or after comm.timeout_s. The
        exchanges left in flight then never complete: the process group is left to the process exit.
        """
        self.stop_flag = float(origin + 1)
        self._collect(until=-1)  # what has arrived already, without waiting
        peers = [j for j in self._template if j not in self.stopped_peers]
        self._post({j: torch.zeros_like(self._payload(self._template[j])) for j in peers}, self.round)
        deadline = time.monotonic() + self.comm.timeout.total_seconds()
        while time.monotonic() < deadline:
            self._collect(until=-1)
            if all(j in self.stopped_peers or not self.in_flight.get(j) for j in peers):
                break
            time.sleep(0.001)
        self.comm.failed = True  # work that never completes stays in the group: leave it to the process exit

    def propose_stop(self) -> None:
        """Async: stop the whole network at a global step no node can have passed when it hears of it (a signal).

        No node may be more than S rounds ahead of a neighbour, so a flag that this node puts into its next
        messages (round r) reaches every node within (n - 1)(S + 1) of its own rounds, on any connected graph, and
        every node hears of step T = (r + (n - 1)(S + 1) + 2) K before it takes it. Proposals meet in the messages:
        the earliest step wins. The step travels in the message's last element as -(T + 1) < 0 (exact in float32
        to T = 2^24)."""
        if self.flagged and not self.stop_flag:
            self.stop_flag = -float((self.round + (self.comm.world_size - 1) * (self.S + 1) + 2) * self.K + 1)

    def stop_step(self) -> int | None:
        """The global step at which the network stops gracefully (propose_stop), once this node has heard of it."""
        return int(-self.stop_flag) - 1 if self.stop_flag < 0 else None

    def _raise_if_stopped(self) -> None:
        if self.stopped_peers:
            peer, origin = next(iter(self.stopped_peers.items()))
            raise NetworkStop(origin, peer)

    def _post(self, send: dict[int, torch.Tensor], r: int) -> None:
        copies = {j: self._wire(t) for j, t in send.items()}  # the rule may change its buffers now
        recv = {j: self._buffer(copies[j]) for j in send}  # every rule sends and receives alike per edge
        for j, posted in self.comm.post(copies, recv).items():
            self.in_flight.setdefault(j, deque()).append(_InFlight(r, posted, copies[j], recv[j]))
            self._template[j] = recv[j]

    def _cast(self, send: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Sync's messages in the wire dtype, one copy per distinct tensor (dsgd sends w_i to all)."""
        copies: dict[int, torch.Tensor] = {}
        for t in send.values():
            self.dtype = t.dtype
            if id(t) not in copies:
                copies[id(t)] = t.to(on_wire(t, self.wire))
        return {j: copies[id(t)] for j, t in send.items()}

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """The private copy of a message that travels, in the wire dtype: async appends the stop flag."""
        self.dtype, dtype = t.dtype, on_wire(t, self.wire)
        if not self.flagged:
            return self._buffer(t, dtype).copy_(t)
        flat = t.reshape(-1)
        flag = torch.tensor([self.stop_flag], dtype=flag_dtype(dtype)).view(dtype)  # bf16: 2 elements, exact
        wire = self._buffer(flat.new_empty(flat.numel() + flag.numel(), dtype=dtype))
        wire[:flat.numel()].copy_(flat)
        wire[flat.numel():].copy_(flag)
        return wire

    def _flag(self, wire: torch.Tensor) -> float:
        """Async's stop flag, the last element(s) of a received message (`_wire`)."""
        dtype = flag_dtype(wire.dtype)
        return wire[-(dtype.itemsize // wire.element_size()):].clone().view(dtype).item()

    def _payload(self, wire: torch.Tensor) -> torch.Tensor:
        """What the rule gets of a received message: without async's stop flag, in the rule's dtype."""
        if self.flagged:
            wire = wire[:-(flag_dtype(wire.dtype).itemsize // wire.element_size())]
        return wire if self.dtype is None or wire.dtype == self.dtype else wire.to(self.dtype)

    def _collect(self, until: int, peers: list[int] | None = None) -> None:
        """Move completed exchanges (with `peers` only) to `ready`; wait for those of rounds <= until.

        A flagged message (async: its sender stopped) is recorded in `stopped_peers`, never applied, and
        nothing more is waited for on its edge: its sender posts no more."""
        for j, flights in self.in_flight.items():
            if peers is not None and j not in peers:
                continue
            while flights and j not in self.stopped_peers and (flights[0].round <= until or flights[0].posted.done()):
                one = flights.popleft()
                t0 = time.perf_counter()
                one.posted.wait()  # at once if done (NCCL: then the current stream waits for the receive)
                self._stats["wait_s"] += time.perf_counter() - t0
                self.completed[j] = self.completed.get(j, 0) + 1
                self._stats["exchanges"] += 1
                self._pool.append(one.sent)
                flag = self._flag(one.received) if self.flagged else 0.0
                if flag < 0:  # a graceful stop at global step -flag - 1 (propose_stop); the payload is real
                    self.stop_flag = flag if self.stop_flag == 0 else max(self.stop_flag, flag)  # the earliest step
                elif flag:
                    self.stopped_peers[j] = int(flag) - 1
                    self._pool.append(one.received)
                    continue
                if j in self.ready:  # superseded before it was handed over
                    self._pool.append(self.ready[j][1])
                self.ready[j] = (one.round, one.received)

    def _hand_over(self, rule, r: int, peers: list[int] | None = None) -> None:
        """Give the rule the ready messages (from `peers` only), each once."""
        give = {j: one for j, one in self.ready.items() if peers is None or j in peers}
        rule.receive({j: self._payload(msg) for j, (_, msg) in give.items()})
        for j, (built, msg) in give.items():
            self.applied[j] = self.applied.get(j, 0) + 1
            add_staleness(self._stats, r - built)
            if self.S > 0:
                self._pool.append(msg)
            del self.ready[j]

    def _buffer(self, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A spare buffer shaped like `like`, of `dtype` (None: like's)."""
        dtype = dtype or like.dtype
        for k, t in enumerate(self._pool):
            if t.shape == like.shape and t.dtype == dtype and t.device == like.device:
                return self._pool.pop(k)
        return torch.empty_like(like, dtype=dtype)

    def _sync_buffer(self, j: int, like: torch.Tensor) -> torch.Tensor:
        t = self._recv.get(j)
        if t is None or t.shape != like.shape or t.dtype != like.dtype:
            t = self._recv[j] = torch.empty_like(like)
        return t

    def state_dict(self) -> dict:
        """Messages completed but not yet applied (call after `drain`: nothing is in flight), and the epoch's
        counts so far (a checkpoint inside an epoch: the resumed epoch's row counts all of it)."""
        assert not any(self.in_flight.values()), "drain before a checkpoint"
        return {"round": self.round, "ready": {j: self._payload(msg) for j, (_, msg) in self.ready.items()},
                "ready_round": {j: built for j, (built, _) in self.ready.items()}, "stats": dict(self._stats)}

    def load_state_dict(self, state: dict) -> None:
        self.round = state["round"]
        self._stats = {**fresh_stats(), **state.get("stats", {})}
        self.ready = {j: (state["ready_round"][j], self._wire(msg)) for j, msg in state["ready"].items()}


class InMemory:
    """Every node's exchanges, handed from rule object to rule object: the three modes above for a whole
    simulated network in one process (p2p/sim.py), with `after_step`, `end_round`, `drain`, statistics
    and per-node checkpoint state as a Transport's.

    Each node has a virtual clock: `after_step` advances it by the step's duration (`sim.step_s`, plus
    any straggler delay the caller draws). Node i posts round r's messages at its clock t_i(r); the
    exchange of round r on edge (i, j) completes at max(t_i(r), t_j(r)) + latency. At the end of round
    r a node waits (its clock jumps) until its exchanges of rounds <= r − S have completed, and is handed
    the newest completed message per edge it has not had (older ones are superseded, never applied):
    the rule of the module docstring, with time virtual. With every clock in step, sync hands over round
    r's messages, overlap round r − 1's, and async (latency below a round) round r − 1's too.

    All nodes move in lockstep through the rounds (their gradients are computed together), which is
    exact because a node can only ever be handed messages of earlier rounds: what differs between nodes
    is only which of them has arrived, and that is decided by the clocks.

    `drop_prob` (sim.drop_prob) loses each letter (per edge, direction and round) with that probability:
    it is never delivered, so the receiver's rule gets the other messages only. The draws of round r come
    from a generator seeded by (seed, r), so a run, and a resumed run, repeats them.

    `wire_dtype` bf16 rounds every float message through bf16 as a Transport's cast does, so the rules get the
    values a real node's rules get, and counts the bytes of the bf16 copy.
    """

    def __init__(self, comms: list, mode: str, interval: int, max_staleness: int = 2, latency_s: float = 0.0,
                 drop_prob: float = 0.0, seed: int = 0, wire_dtype: str = "fp32"):
        self.comms, self.S, self.K, self.latency = comms, STALENESS.get(mode, max_staleness), interval, latency_s
        self.wire = WIRE_DTYPES[wire_dtype]
        self.drop_prob, self.seed = drop_prob, seed
        self.letters = {"sent": 0, "dropped": 0}  # over the whole run, for tests and benchmarks
        self.round = 0  # rounds ended so far
        self.now = [0.0] * len(comms)  # each node's virtual clock (s)
        self.posted: list[dict[int, float]] = [{} for _ in comms]  # per node: {round: clock when it posted}
        # per node: {sender: [round, message, counted]} sent to it, not yet handed over, oldest first
        self.inbox: list[dict[int, deque[list]]] = [{} for _ in comms]
        self._stats = [fresh_stats() for _ in comms]
        self._stepped: dict[int, object] = {}  # node: its rule, for the nodes that have made the current step
        self.step_seconds: list[float] | None = None  # each node's virtual seconds for the current step

    def link(self, k: int) -> Link:
        """Node k's end of this network: what its optimizer steps, as a real node's optimizer steps a Transport."""
        return Link(self, k)

    def stepped(self, k: int, rule, step: int) -> None:
        """Node k has made local step `step`. The simulator steps its nodes in order 0..n-1, so when the last one
        has, every update of the step is done and the network's exchanges follow (`after_step`), with each node's
        virtual seconds for the step from `step_seconds` (set by the simulator before the step)."""
        self._stepped[k] = rule
        if k == len(self.comms) - 1:
            if len(self._stepped) != len(self.comms):
                raise RuntimeError(f"step {step}: nodes {sorted(set(range(len(self.comms))) - set(self._stepped))} "
                                   f"did not step before the last node")
            rules, self._stepped = [self._stepped[i] for i in range(len(self.comms))], {}
            self.after_step(rules, step, self.step_seconds)

    def after_step(self, rules: list, step: int, seconds: list[float] | None = None) -> None:
        """After local step `step` of every node, which took each node `seconds[k]` of virtual time."""
        for k, s in enumerate(seconds or ()):
            self.now[k] += s
        if (step + 1) % self.K == 0:
            self.end_round(rules)

    def end_round(self, rules: list) -> None:
        start, r = time.perf_counter(), self.round
        if self.S == 0:
            self._send(rules, r)
            self._receive(rules, r, until=r, newest=r)
        else:
            self._wait_for(r - self.S)
            self._send(rules, r)  # build-first, as Transport
            self._receive(rules, r, until=r - self.S, newest=r - 1)  # not round r's, just posted
        for posted in self.posted:  # older rounds' exchanges have all completed
            for old in [m for m in posted if m < r - self.S]:
                del posted[old]
        self.round += 1
        share = (time.perf_counter() - start) / len(rules)
        for comm in self.comms:
            comm.comm_s += share

    def drain(self, k: int | None = None) -> None:
        """Node k (None: every node) waits for all its exchanges; their messages wait, unapplied, for the next
        round's end."""
        for k, inbox in enumerate(self.inbox) if k is None else [(k, self.inbox[k])]:
            for j, letters in inbox.items():
                if letters:
                    self._wait(k, self._done_at(k, j, letters[-1][0]))
                for letter in letters:
                    self._count(k, letter)

    def _done_at(self, k: int, j: int, r: int) -> float:
        """When the exchange of round r between k and j completed (−inf: before the clocks kept it)."""
        return max(self.posted[k].get(r, -math.inf), self.posted[j].get(r, -math.inf)) + self.latency

    def _wait(self, k: int, until: float) -> None:
        if until > self.now[k]:
            self._stats[k]["wait_s"] += until - self.now[k]
            self.now[k] = until

    def _count(self, k: int, letter: list) -> None:
        if not letter[2]:
            letter[2] = True
            self._stats[k]["exchanges"] += 1

    def _send(self, rules: list, r: int) -> None:
        sent = []
        for k, rule in enumerate(rules):
            msgs = rule.messages()
            copies: dict[int, torch.Tensor] = {}  # one copy per distinct tensor (dsgd sends w_i to all)
            for t in msgs.values():
                if id(t) not in copies:  # rounded through the wire dtype: what a real receiver casts back
                    dtype = on_wire(t, self.wire)
                    copies[id(t)] = t.clone() if dtype == t.dtype else t.to(dtype).to(t.dtype)
            sent.append({j: copies[id(t)] for j, t in msgs.items()})
            self.comms[k].bytes_sent += sum(t.numel() * on_wire(t, self.wire).itemsize for t in msgs.values())
            if msgs:
                self.posted[k][r] = self.now[k]
        rng = torch.Generator().manual_seed((self.seed << 32) + r) if self.drop_prob else None
        for k, msgs in enumerate(sent):
            for j, msg in msgs.items():
                if k not in sent[j]:  # a real run would wait for it forever
                    raise RuntimeError(f"round {r}: node {k} sent to node {j}, which sent nothing back")
                self.letters["sent"] += 1
                if rng is not None and torch.rand((), generator=rng).item() < self.drop_prob:
                    self.letters["dropped"] += 1
                    continue  # lost: never delivered, never waited for
                self.inbox[j].setdefault(k, deque()).append([r, msg, False])

    def _wait_for(self, until: int) -> None:
        """Each node waits (its clock jumps) until its exchanges of rounds <= until have completed."""
        for k in range(len(self.comms)):
            for j, letters in self.inbox[k].items():
                due = [letter for letter in letters if letter[0] <= until]
                if due:
                    self._wait(k, self._done_at(k, j, due[-1][0]))

    def _receive(self, rules: list, r: int, until: int, newest: int) -> None:
        """Each node: wait for its exchanges of rounds <= until, then take the newest completed one per edge, of
        rounds <= newest (a Transport collects before it posts: the round it just posted is never handed over)."""
        self._wait_for(until)
        for k, rule in enumerate(rules):
            give, stats = {}, self._stats[k]
            for j, letters in self.inbox[k].items():
                while letters and letters[0][0] <= newest and self._done_at(k, j, letters[0][0]) <= self.now[k]:
                    letter = letters.popleft()
                    self._count(k, letter)
                    give[j] = letter  # a newer one supersedes it
            rule.receive({j: msg for j, (_, msg, _) in give.items()})
            for built, _, _ in give.values():
                add_staleness(stats, r - built)

    def epoch_stats(self, k: int) -> dict[str, float]:
        """Node k's CSV columns since the last call, as Transport.epoch_stats; wait_s in virtual seconds, and
        sim_s, its clock now."""
        s, self._stats[k] = self._stats[k], fresh_stats()
        return {**stats_columns(s), "sim_s": self.now[k]}

    def state_dict(self, k: int) -> dict:
        """A Transport's checkpoint state (call after `drain`: every message is complete, only the newest per
        edge can still be applied), plus node k's clock."""
        newest = {j: letters[-1] for j, letters in self.inbox[k].items() if letters}
        return {"round": self.round, "ready": {j: msg for j, (_, msg, _) in newest.items()},
                "ready_round": {j: built for j, (built, _, _) in newest.items()}, "clock": self.now[k],
                "stats": dict(self._stats[k])}

    def load_state_dict(self, k: int, state: dict) -> None:
        """Node k's state from `state_dict` or a real node's checkpoint (no clock: 0)."""
        self.round, self.now[k], self.posted[k] = state["round"], state.get("clock", 0.0), {}
        self._stats[k] = {**fresh_stats(), **state.get("stats", {})}
        self.inbox[k] = {j: deque([[state["ready_round"][j], msg.clone(), True]]) for j, msg in state["ready"].items()}


class Link:
    """Node k's end of an InMemory network, with a Transport's per-node methods, so a simulated node's
    DecentralizedOptimizer steps it exactly as a real node's optimizer steps its Transport."""

    def __init__(self, net: InMemory, k: int):
        self.net, self.k = net, k

    def after_step(self, rule, step: int) -> None:
        self.net.stepped(self.k, rule, step)

    def average_gradient(self, g: torch.Tensor) -> None:
        self.net.comms[self.k].all_reduce_mean_(g, dtype=on_wire(g, self.net.wire))

    def drain(self) -> None:
        self.net.drain(self.k)

    def epoch_stats(self) -> dict[str, float]:
        return self.net.epoch_stats(self.k)

    def state_dict(self) -> dict:
        return self.net.state_dict(self.k)

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(self.k, state)
