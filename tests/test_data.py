"""Partitions, splits and loaders, in-process."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from p2p.config import ConfigError, DataConfig
from p2p.data import FASHION_SYSTEM_DIR, class_histogram, load_splits, node_loader, partition

pytestmark = pytest.mark.timeout(120)

LABELS = np.repeat(np.arange(10), 100)  # 10 classes x 100 samples


@pytest.mark.parametrize(
    "kw",
    [
        dict(partition="iid"),
        dict(partition="dirichlet", alpha=0.5),
        dict(partition="classes", classes_per_node=3, class_shift=3),
    ],
)
def test_partition_disjoint_covering_deterministic(kw):
    shards = partition(LABELS, 4, DataConfig(data_seed=3, **kw))
    flat = np.concatenate(shards)
    assert len(flat) == len(np.unique(flat))  # disjoint
    assert all(len(s) > 0 for s in shards)
    # classes: 4 nodes x 3 classes shifted by 3 hold all 10 classes, so the cover is complete here
    assert np.array_equal(np.sort(flat), np.arange(len(LABELS)))
    again = partition(LABELS, 4, DataConfig(data_seed=3, **kw))
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = partition(LABELS, 4, DataConfig(data_seed=4, **kw))
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_iid_near_equal():
    sizes = [len(s) for s in partition(LABELS[:999], 4, DataConfig(partition="iid"))]
    assert sorted(sizes) == [249, 250, 250, 250]


def test_classes_reproduces_seed_scheme():
    cfg = DataConfig(partition="classes", data_seed=11, classes_per_node=8, class_shift=4)
    shards = partition(LABELS, 3, cfg)
    held = [set(LABELS[s].tolist()) for s in shards]
    assert held == [{1, 2, 3, 4, 5, 6, 7, 8}, {0, 1, 3, 4, 5, 7, 8, 9}, {0, 2, 4, 5, 6, 7, 8, 9}]
    # each class is shared in near-equal shares (0.8..1 before normalising) and fully used
    hist = np.array([class_histogram(LABELS, s, 10) for s in shards])
    assert hist.sum(axis=0).tolist() == [100] * 10
    assert hist[hist > 0].min() >= 100 * 0.8 / (0.8 + 2 * 1.0) - 1


def test_classes_unheld_class_is_unused():
    # 2 nodes x 1 class cannot hold 10 classes: the other classes' samples belong to nobody
    shards = partition(LABELS, 2, DataConfig(partition="classes", classes_per_node=1, class_shift=1))
    assert [len(s) for s in shards] == [100, 100]


def test_classes_per_node_too_large():
    with pytest.raises(ConfigError, match="--data.classes_per_node 11 .* 10 classes"):
        partition(LABELS, 3, DataConfig(partition="classes", classes_per_node=11))


def test_dirichlet_small_alpha_is_skewed():
    shards = partition(LABELS, 4, DataConfig(partition="dirichlet", alpha=0.05))
    hist = np.array([class_histogram(LABELS, s, 10) for s in shards])
    # most of each class lands on one node (iid would give ~25%)
    assert (hist.max(axis=0) / hist.sum(axis=0)).mean() > 0.8


def test_dirichlet_empty_node_errors():
    with pytest.raises(ConfigError, match="alpha=0.01 leaves node .* no samples"):
        partition(np.repeat(np.arange(3), 10), 20, DataConfig(partition="dirichlet", alpha=0.01))


def test_too_many_nodes_errors():
    with pytest.raises(ConfigError, match="no samples"):
        partition(LABELS[:5], 8, DataConfig(partition="iid"))


def test_digits_splits():
    cfg = DataConfig(name="digits", val_fraction=0.1, data_seed=1)
    s = load_splits(cfg)
    assert s.in_shape == (1, 8, 8) and s.num_classes == 10
    assert len(s.test) == 360
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.val) == round(0.1 * 1437)
    assert len(s.train_labels) == len(s.train)
    x, y = s.train[5]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert int(y) == s.train_labels[5]
    s2 = load_splits(cfg)
    assert torch.equal(torch.stack([v[0] for v in s.val]), torch.stack([v[0] for v in s2.val]))
    # the test set never depends on data_seed; the val split does
    s3 = load_splits(DataConfig(name="digits", data_seed=2))
    assert torch.equal(s.test.tensors[0], s3.test.tensors[0])
    assert s.val.indices != s3.val.indices


@pytest.mark.timeout(120)
def test_digits_cache_is_scikit_learns_split_and_spares_its_import(tmp_path):
    """The first load writes <root>/digits.pt from scikit-learn; a later process reads only it (no sklearn import,
    ~0.8 s per rank) and gets exactly the same data; a corrupt cache is rebuilt."""
    first = load_splits(DataConfig(name="digits", root=str(tmp_path)))
    assert (tmp_path / "digits.pt").is_file()
    code = ("import sys; from p2p.config import DataConfig; from p2p.data import load_splits; "
            f"s = load_splits(DataConfig(name='digits', root={str(tmp_path)!r})); "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'; "
            "import torch; torch.save((s.train.dataset.tensors, s.test.tensors), sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], check=True, cwd=Path(__file__).parents[1])
    (train_x, train_y), (test_x, test_y) = torch.load(tmp_path / "out.pt")
    assert torch.equal(train_x, first.train.dataset.tensors[0]) and torch.equal(test_y, first.test.tensors[1])
    assert torch.equal(test_x, first.test.tensors[0]) and torch.equal(train_y, first.train.dataset.tensors[1])
    (tmp_path / "digits.pt").write_bytes(b"not a checkpoint")
    again = load_splits(DataConfig(name="digits", root=str(tmp_path)))
    assert torch.equal(again.test.tensors[0], first.test.tensors[0])


def test_node_loader():
    s = load_splits(DataConfig(name="digits"))
    cfg = DataConfig(batch_size=16, samples_per_epoch=100)
    shard = partition(s.train_labels, 4, cfg)[1]

    def epoch(seed: int) -> list[torch.Tensor]:
        batches = list(node_loader(s, shard, cfg, seed, n_nodes=4))
        assert len(batches) == 100 // 16
        assert all(x.shape == (16, 1, 8, 8) and y.shape == (16,) for x, y in batches)
        return [y for _, y in batches]

    assert all(torch.equal(a, b) for a, b in zip(epoch(0), epoch(0)))
    assert not all(torch.equal(a, b) for a, b in zip(epoch(0), epoch(1)))

    # samples_per_epoch 0: len(train)/n on every node, whatever the shard size (same steps everywhere)
    skewed = partition(s.train_labels, 4, DataConfig(partition="dirichlet", alpha=0.3))
    assert len({len(sh) for sh in skewed}) > 1
    steps = {len(node_loader(s, sh, DataConfig(batch_size=16), 0, n_nodes=4)) for sh in skewed}
    assert steps == {len(s.train_labels) // 4 // 16}
    # the generator is reachable for checkpoints
    loader = node_loader(s, shard, DataConfig(batch_size=16), 0, n_nodes=4)
    state = loader.sampler.generator.get_state()
    first = [y for _, y in loader]
    loader.sampler.generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader]))


def test_fashion_mnist_from_debian_copy(tmp_path):
    if not (FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no Debian Fashion-MNIST under {FASHION_SYSTEM_DIR} (apt-get install dataset-fashion-mnist)")
    s = load_splits(DataConfig(name="fashionmnist", root=str(tmp_path), val_fraction=0.1))
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert len(s.train) == 54000 and len(s.val) == 6000 and len(s.test) == 10000
    assert s.in_shape == (1, 28, 28) and s.num_classes == 10
    x, y = s.test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= int(y) < 10


def test_missing_cifar10(tmp_path):
    with pytest.raises(ConfigError, match="CIFAR-10 not found under .*cifar-10-batches-py.*--data.download true"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_missing_mnist(tmp_path):
    with pytest.raises(ConfigError, match="MNIST not found under .*--data.download true"):
        load_splits(DataConfig(name="mnist", root=str(tmp_path), download=False))


def test_no_validation_split():
    s = load_splits(DataConfig(name="digits", val_fraction=0.0))
    assert len(s.val) == 0 and len(s.train) == 1437 == len(s.train_labels)


def test_full_batch_is_the_whole_shard_once_per_epoch():
    s = load_splits(DataConfig(name="digits"))
    cfg = DataConfig(batch_size=0, partition="dirichlet", alpha=0.3)
    shards = partition(s.train_labels, 4, cfg)
    for shard in shards[:2]:
        loader = node_loader(s, shard, cfg, seed=0, n_nodes=4)
        (x, y), = list(loader)  # one step per epoch
        assert x.shape == (len(shard), 1, 8, 8)
        assert sorted(y.tolist()) == sorted(s.train_labels[shard].tolist())  # every sample once


def test_a_batch_larger_than_a_shard_names_the_node():
    sizes = [len(sh) for sh in partition(LABELS, 4, DataConfig(partition="dirichlet", alpha=0.3))]
    small = int(np.argmin(sizes))
    cfg = DataConfig(partition="dirichlet", alpha=0.3, batch_size=sizes[small] + 1)
    with pytest.raises(ConfigError, match=rf"^--data.batch_size {sizes[small] + 1} is larger than node {small}'s "
                                          rf"shard of {sizes[small]} samples: lower it, or use --data.batch_size 0"):
        partition(LABELS, 4, cfg)
    cfg.batch_size = sizes[small]  # exactly the smallest shard is fine, and so is full batch
    assert [len(sh) for sh in partition(LABELS, 4, cfg)] == sizes
    cfg.batch_size = 0
    assert [len(sh) for sh in partition(LABELS, 4, cfg)] == sizes
