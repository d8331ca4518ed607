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
    if path.parent.name == "seed":  # the seed's published set-up, exactly
        assert (cfg.data.name, cfg.model.name, cfg.topology.path) == ("cifar10", "resnet50", "topologies/complete3.json")
        assert (cfg.data.classes_per_node, cfg.data.class_shift, cfg.data.data_seed) == (8, 4, 11)
        assert (cfg.algorithm.lr, cfg.algorithm.l2_lambda, cfg.algorithm.interval) == (0.002, 0.01, 10)
        assert (cfg.train.epochs, cfg.train.scheduler, cfg.train.step_size, cfg.train.gamma) == (200, "step", 410, 0.9)
        assert (cfg.model.group_channels, cfg.model.drop_rate, cfg.model.last_drop_rate) == (32, 0.1, 0.5)
        assert (cfg.data.batch_size, cfg.data.samples_per_epoch) == (100, 10000)
