"""Every config we ship loads, validates and names files that exist, so none of them rots."""

from pathlib import Path

import pytest

from p2p.config import load_config
from p2p.topology import load_topology

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.toml"))


def test_the_seed_runs_cover_every_decentralized_algorithm():
    names = {p.stem.removeprefix("cifar10_resnet50_") for p in (ROOT / "configs" / "seed").glob("*.toml")}
    assert {"dsgd", "gossip", "pdmm", "admm", "pdmm_isvr", "admm_isvr", "cadmm"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads_and_its_topology_exists(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(["--config", str(path)])
    if cfg.topology.path:
        assert load_topology(cfg.topology.path).n >= 2
    if path.name.startswith("cifar10_resnet50_"):  # the seed's published set-up, exactly
        assert (cfg.data.name, cfg.model.name, cfg.topology.path) == ("cifar10", "resnet50", "topologies/complete3.json")
        assert (cfg.data.classes_per_node, cfg.data.class_shift, cfg.data.data_seed) == (8, 4, 11)
        K = 1 if cfg.algorithm.name == "cadmm" else 10  # cadmm needs K = 1 (p2p/algorithms/cadmm.py)
        assert (cfg.algorithm.lr, cfg.algorithm.l2_lambda, cfg.algorithm.interval) == (0.002, 0.01, K)
        assert (cfg.train.epochs, cfg.train.scheduler, cfg.train.step_size, cfg.train.gamma) == (200, "step", 410, 0.9)
        assert (cfg.model.group_channels, cfg.model.drop_rate, cfg.model.last_drop_rate) == (32, 0.1, 0.5)
        assert (cfg.data.batch_size, cfg.data.samples_per_epoch) == (100, 10000)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
@pytest.mark.parametrize("name", ["dsgd", "gossip", "pdmm", "admm", "pdmm_isvr", "admm_isvr", "cadmm", "gt", "ed",
                                  "qgm"])
def test_every_algorithm_accepts_every_shipped_config(path, name, monkeypatch):
    """`--algorithm.name X` on any shipped config builds (the checks that fire before the first
    collective: ISVR's penalty sign, cadmm's K = 1), with K resolved as train.py resolves it."""
    from types import SimpleNamespace

    from torch import nn

    from p2p.algorithms import FlatParams, build_algorithm
    from p2p.topology import build_topology, generate
    from p2p.optimizer import resolve_interval

    from p2p.config import SYNC_ONLY, ConfigError

    monkeypatch.chdir(ROOT)
    if name in SYNC_ONLY and load_config(["--config", str(path)]).comm.mode != "sync":
        with pytest.raises(ConfigError, match=f"does not fit --algorithm.name {name}"):  # one line, by design
            load_config(["--config", str(path), "--algorithm.name", name])
        return
    from p2p.config import TORCH_OPTIMIZER

    if name not in TORCH_OPTIMIZER and load_config(["--config", str(path)]).algorithm.optimizer != "sgd":
        with pytest.raises(ConfigError, match=f"is only for .*; {name} uses SGD"):  # one line, by design
            load_config(["--config", str(path), "--algorithm.name", name])
        return
    cfg = load_config(["--config", str(path), "--algorithm.name", name])
    topology = build_topology(cfg.topology, load_topology(cfg.topology.path).n) if cfg.topology.path else generate("ring", 4)
    resolve_interval(cfg.algorithm, topology)
    if name in ("cadmm", "ed") and cfg.algorithm.interval != 1:
        pytest.skip(f"{path.name} sets interval {cfg.algorithm.interval}: {name} refuses it with a one-line error")
    build_algorithm(FlatParams(nn.Linear(3, 2)), cfg.algorithm, topology, 0)
