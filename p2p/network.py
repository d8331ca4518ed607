"""The network handle of the public API: this process's node, its process group and the graph.

    net = p2p.init(topology="topologies/ring8.json")     # under torchrun; a plain `python` run is a network of one

`p2p.init` joins the process group (NCCL when every rank has its own GPU, else gloo), loads or generates
the topology for the world size and checks that every rank holds the same graph, so a mistake stops every
rank with one line instead of leaving the others waiting. The trainer builds the same object around its Comm.
"""

from __future__ import annotations

from pathlib import Path

import torch

from p2p.comm import Comm, read_env, resolve_device
from p2p.config import CHOICES, CommConfig, ConfigError, TopologyConfig
from p2p.topology import Topology, build_topology
from p2p.transport import Transport


class Network:
    """One node's view of the decentralized network: its rank, device, graph and process group.

    What `DecentralizedOptimizer`, `average_model` and `consensus_distance` use; made by `p2p.init` (or by the
    trainer around the Comm it joins later). `started`: the process group is joined, so the optimizer can check
    its parameters against the other ranks' when it is built.
    """

    def __init__(self, comm: Comm, topology: Topology, started: bool = False):
        if topology.n != comm.world_size:
            raise ConfigError(f"topology {topology.source} has {topology.n} nodes but the world size is "
                              f"{comm.world_size}: launch with torchrun --nproc_per_node {topology.n} or pick another "
                              f"topology")
        self.comm, self.topology, self.started = comm, topology, started

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def device(self) -> torch.device:
        """Where this node's model belongs: its own GPU (cuda:LOCAL_RANK) under NCCL, else the CPU."""
        return self.comm.device

    def transport(self, mode: str, max_staleness: int, interval: int, slots: dict[int, int] | None,
                  wire_dtype: str = "fp32") -> Transport:
        """The exchanges of one optimizer, timed as `mode` says, in `wire_dtype` (p2p/transport.py)."""
        return Transport(self.comm, mode, max_staleness, interval, slots, wire_dtype)

    def check_same(self, lines: list[str]) -> None:
        """One line on every rank unless all ranks hold the same `lines` ("key = value"); a collective."""
        self.comm.check_same(lines)

    def close(self) -> None:
        """Leave the process group (after a failure it is left to the process exit, see Comm.stop)."""
        self.comm.stop()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def init(topology: str | Topology = "ring", *, device: str = "auto", backend: str = "auto", timeout_s: float = 300.0,
         degree: int = 3, seed: int = 0) -> Network:
    """Join the network as one node: the process group, this node's device and the graph.

    Args:
        topology: a topology file (ours or the seed's node_list.json; a path ending in .json or an existing
            file), a generator name (ring, torus, complete, ...; docs/topologies.md) sized to the world, or a
            Topology.
        device: auto | cpu | cuda (auto: this rank's own GPU when every local rank has one, else CPU).
        backend: auto | nccl | gloo (auto: nccl on GPUs, gloo on CPU).
        timeout_s: every collective and exchange fails, with one line naming the peer, after this long.
        degree, seed: the `random_regular` generator's.

    Raises ConfigError (a ValueError) with one line for a bad argument, before any rank waits for another.
    """
    if device not in CHOICES["run.device"] or backend not in CHOICES["comm.backend"]:
        raise ConfigError(f"p2p.init: device must be one of {CHOICES['run.device']} and backend one of "
                          f"{CHOICES['comm.backend']}, got device={device!r}, backend={backend!r}")
    if not 0 < timeout_s < float("inf"):
        raise ConfigError(f"p2p.init: timeout_s must be > 0 and finite, got {timeout_s}")
    env = read_env()
    dev, backend = resolve_device(device, backend, env)
    if not isinstance(topology, Topology):
        path = str(topology).endswith(".json") or Path(str(topology)).is_file()
        if not path and topology not in CHOICES["topology.name"]:
            raise ConfigError(f"p2p.init: topology {topology!r} is neither a file nor a generator "
                              f"({', '.join(CHOICES['topology.name'])})")
        cfg = TopologyConfig(path=str(topology), degree=degree, seed=seed) if path else \
            TopologyConfig(name=str(topology), degree=degree, seed=seed)
        topology = build_topology(cfg, env.world_size) if path or env.world_size > 1 else Topology(1, ())
    comm = Comm(env, dev, backend, CommConfig(backend=backend, timeout_s=timeout_s))
    net = Network(comm, topology)  # the size check, before joining
    comm.start()
    net.started = True
    net.check_same([topology.fingerprint()])
    return net
