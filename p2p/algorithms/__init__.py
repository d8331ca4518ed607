"""The update rules, one short file each. `build_algorithm` maps a config name to its class."""

from functools import partial

import torch

from p2p.algorithms.allreduce import AllReduce
from p2p.algorithms.base import Algorithm, FlatParams
from p2p.algorithms.cadmm import CADMM
from p2p.algorithms.choco import Choco
from p2p.algorithms.diloco import DiLoCo
from p2p.algorithms.dsgd import DSGD
from p2p.algorithms.ed import ExactDiffusion
from p2p.algorithms.gossip import Gossip
from p2p.algorithms.gt import GradientTracking
from p2p.algorithms.local import Local
from p2p.algorithms.primal_dual import PrimalDual
from p2p.algorithms.qgm import QGM
from p2p.config import AlgorithmConfig
from p2p.topology import Topology

ALGORITHMS = {
    "local": Local,
    "allreduce": AllReduce,
    "dsgd": DSGD,
    "gossip": Gossip,
    "pdmm": partial(PrimalDual, dual="pdmm", penalty="ecl"),
    "admm": partial(PrimalDual, dual="admm", penalty="ecl"),
    "pdmm_isvr": partial(PrimalDual, dual="pdmm", penalty="isvr"),
    "admm_isvr": partial(PrimalDual, dual="admm", penalty="isvr"),
    "cadmm": CADMM,
    "choco": Choco,
    "gt": GradientTracking,
    "ed": ExactDiffusion,
    "qgm": QGM,
    "diloco": DiLoCo,
}


def build_algorithm(flat: FlatParams, cfg: AlgorithmConfig, topology: Topology, rank: int,
                    optimizer: torch.optim.Optimizer | None = None) -> Algorithm:
    """Node `rank`'s rule. `optimizer`: a torch optimizer the user built over `flat.params`, as the local step of
    the rules whose local step is one (TORCH_OPTIMIZER); the caller checks that the rule is one of them."""
    if optimizer is not None:
        return ALGORITHMS[cfg.name](flat, cfg, topology, rank, optimizer=optimizer)
    return ALGORITHMS[cfg.name](flat, cfg, topology, rank)


__all__ = ["ALGORITHMS", "Algorithm", "FlatParams", "build_algorithm"]
