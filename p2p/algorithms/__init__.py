"""The update rules, one short file each. `build_algorithm` maps a config name to its class."""

from functools import partial

from p2p.algorithms.allreduce import AllReduce
from p2p.algorithms.base import Algorithm, FlatParams
from p2p.algorithms.cadmm import CADMM
from p2p.algorithms.choco import Choco
from p2p.algorithms.dsgd import DSGD
from p2p.algorithms.ed import ExactDiffusion
from p2p.algorithms.gossip import Gossip
from p2p.algorithms.gt import GradientTracking
from p2p.algorithms.local import Local
from p2p.algorithms.primal_dual import PrimalDual
from p2p.algorithms.qgm import QGM
from p2p.comm import Comm
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
}


def build_algorithm(flat: FlatParams, cfg: AlgorithmConfig, topology: Topology, comm: Comm) -> Algorithm:
    return ALGORITHMS[cfg.name](flat, cfg, topology, comm)


__all__ = ["ALGORITHMS", "Algorithm", "FlatParams", "build_algorithm"]
