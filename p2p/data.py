"""Datasets, the global validation split, per-node partitions and loaders.

Every node calls the same functions with the same `DataConfig`, so the validation split and the
partition are identical everywhere without any communication; only the minibatch seed differs.
"""

from __future__ import annotations

import copy
import gzip
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset

from p2p.config import ConfigError, DataConfig, import_callable, one_line
from p2p.text import load_text

# Debian's `dataset-fashion-mnist` package installs the four idx .gz files here (`dpkg -L` shows it).
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)

# name -> (torchvision class name, mean, std) of the 1-channel 28x28 datasets. torchvision itself is
# imported only when one of its datasets is used: it costs seconds per rank that digits runs don't need.
_MNIST_LIKE = {
    "mnist": ("MNIST", 0.1307, 0.3081),
    "fashionmnist": ("FashionMNIST", 0.2860, 0.3530),
}
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class Splits:
    train: Dataset  # the training set minus the validation split; partitions index into it
    val: Dataset
    test: Dataset
    train_labels: np.ndarray  # labels of `train`, for partitioning (text: the document a window starts in)
    num_classes: int  # classes (text: the vocabulary size)
    in_shape: tuple[int, ...]  # (C, H, W) of one sample (text: (seq_len,))
    task: str = "classification"  # or "language_model": next-token prediction, reported as bits per character
    groups: int = 0  # label values for the per-node histogram (text: documents); 0 = num_classes


def _missing(cfg: DataConfig, error: Exception) -> ConfigError:
    """The one-line message for a dataset torchvision could not open (or download)."""
    title = {"mnist": "MNIST", "fashionmnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}[cfg.name]
    if cfg.download:
        return ConfigError(f"{title} could not be downloaded into {cfg.root}/ ({one_line(error)}): fetch it by hand")
    how = {
        "mnist": f"put the four idx files in {cfg.root}/MNIST/raw/",
        "fashionmnist": "run `apt-get install dataset-fashion-mnist`",
        "cifar10": "put cifar-10-batches-py there",
    }[cfg.name]
    return ConfigError(f"{title} not found under {cfg.root}/: {how} or pass --data.download true")


def _open(cls: type, cfg: DataConfig, **kwargs) -> Dataset:
    try:
        return cls(cfg.root, download=cfg.download, **kwargs)
    except (RuntimeError, OSError) as e:  # torchvision: RuntimeError when missing, OSError when a download fails
        raise _missing(cfg, e) from None


def _unpack_system_fashion_mnist(root: Path) -> None:
    """Fill <root>/FashionMNIST/raw/ from the Debian package's copy, so no download is needed.

    Each file is written under a temporary name and renamed, so ranks that start together on one
    machine never read a half-written file.
    """
    raw = root / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in _IDX_FILES):
        return
    if not all((FASHION_SYSTEM_DIR / f"{name}.gz").is_file() for name in _IDX_FILES):
        return  # no system copy: torchvision then downloads or reports the dataset missing
    raw.mkdir(parents=True, exist_ok=True)
    for name in _IDX_FILES:
        if (raw / name).is_file():
            continue
        tmp = raw / f".{name}.{os.getpid()}.tmp"
        with gzip.open(FASHION_SYSTEM_DIR / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, raw / name)


def _digits(root: Path) -> tuple[Dataset, np.ndarray, Dataset]:
    """scikit-learn's 8x8 digits; it has no test set, so a fixed stratified 20% is held out (seed 0).

    Importing scikit-learn costs ~0.8 s per process (every torchrun rank): the first run writes the split to
    <root>/digits.pt and later runs read only that (tests/test_data.py checks it equals scikit-learn's).
    """
    cache = root / "digits.pt"
    try:
        saved = torch.load(cache, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # none yet, or unreadable: rebuilt
        saved = _digits_from_sklearn()
        try:  # atomic: ranks starting together may all write it
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".digits.{os.getpid()}.tmp"
            torch.save(saved, tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only root: every run reads scikit-learn's copy
    x, y, train, test = saved["x"], saved["y"], saved["train"], saved["test"]
    return TensorDataset(x[train], y[train]), y[train].numpy(), TensorDataset(x[test], y[test])


def _digits_from_sklearn() -> dict[str, torch.Tensor]:
    """The digits as tensors, with the sorted train/test indices of the stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target, random_state=0)
    return {"x": x, "y": y, "train": torch.from_numpy(np.sort(train)), "test": torch.from_numpy(np.sort(test))}


def _mnist_like(cfg: DataConfig) -> tuple[Dataset, np.ndarray, Dataset]:
    """MNIST / Fashion-MNIST as normalised tensors, converted once: far faster than PIL per sample."""
    import torchvision

    name, mean, std = _MNIST_LIKE[cfg.name]
    cls = getattr(torchvision.datasets, name)
    if cfg.name == "fashionmnist":
        _unpack_system_fashion_mnist(Path(cfg.root))

    def tensors(ds: Dataset) -> TensorDataset:
        x = ((ds.data.float() / 255.0 - mean) / std).unsqueeze(1)  # (N, 1, 28, 28)
        return TensorDataset(x, ds.targets.long())

    train, test = _open(cls, cfg, train=True), _open(cls, cfg, train=False)
    return tensors(train), train.targets.numpy(), tensors(test)


def _cifar10(cfg: DataConfig) -> tuple[Dataset, Dataset, np.ndarray, Dataset]:
    """CIFAR-10 through torchvision transforms; the validation copy is never augmented."""
    import torchvision
    import torchvision.transforms as T

    plain = T.Compose([T.ToTensor(), T.Normalize(_CIFAR_MEAN, _CIFAR_STD)])
    augmented = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), plain])
    train = _open(torchvision.datasets.CIFAR10, cfg, train=True, transform=augmented if cfg.augment else plain)
    test = _open(torchvision.datasets.CIFAR10, cfg, train=False, transform=plain)
    val = copy.copy(train)  # shares the image array, differs only in the transform
    val.transform = plain
    return train, val, np.asarray(train.targets), test


def _user_data(cfg: DataConfig) -> tuple[Dataset, np.ndarray, Dataset]:
    """The user's `--data.name module:callable`: `load(cfg: DataConfig) -> (train, test)`, two map-style datasets
    of (input tensor, class index) pairs. The training labels come from `train.targets` (torchvision's
    convention), a TensorDataset's last tensor, or else one pass over the samples."""
    spec = cfg.name
    out = import_callable(spec, "data.name")(cfg)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(d, Dataset) for d in out)):
        raise ConfigError(f"--data.name {spec} must return (train, test), two torch Datasets; got {type(out).__name__}")
    train, test = out
    for name, ds in (("train", train), ("test", test)):
        if len(ds) == 0:
            raise ConfigError(f"--data.name {spec}: the {name} set is empty")
        sample = ds[0]
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], torch.Tensor)):
            raise ConfigError(f"--data.name {spec}: a {name} sample must be an (input tensor, class index) pair; got "
                              f"{type(sample).__name__}")
    if hasattr(train, "targets"):
        labels = np.asarray(train.targets)
    elif isinstance(train, TensorDataset):
        labels = train.tensors[-1].numpy()
    else:
        labels = np.asarray([int(train[i][1]) for i in range(len(train))])
    if labels.shape != (len(train),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ConfigError(f"--data.name {spec}: the training labels must be class indices, one int >= 0 per sample "
                          f"(the iid, dirichlet and classes partitions and the accuracy need them); got shape "
                          f"{labels.shape} of {labels.dtype}")
    return train, labels.astype(np.int64), test


def load_splits(cfg: DataConfig) -> Splits:
    """Load the dataset and hold out `val_fraction` of its training set before any partitioning.

    The held-out indices come from `default_rng(data_seed)`, so every node gets the same split.
    Both parts keep the dataset's original order (indices sorted).
    """
    if cfg.name == "text":  # contiguous blocks of one corpus: its own validation block, no random hold-out
        train, labels, val, test, vocab = load_text(cfg)
        return Splits(train, val, test, labels, vocab, (cfg.seq_len,), "language_model", int(labels.max()) + 1)
    if ":" in cfg.name:
        full, labels, test = _user_data(cfg)
        full_val = full
    elif cfg.name == "digits":
        full, labels, test = _digits(Path(cfg.root))
        full_val = full
    elif cfg.name in _MNIST_LIKE:
        full, labels, test = _mnist_like(cfg)
        full_val = full
    elif cfg.name == "cifar10":
        full, full_val, labels, test = _cifar10(cfg)
    else:
        raise ConfigError(f"--data.name: unknown dataset {cfg.name!r}; choose digits, mnist, fashionmnist, cifar10 or "
                          f"module:callable")

    perm = np.random.default_rng(cfg.data_seed).permutation(len(labels))
    n_val = int(round(cfg.val_fraction * len(labels)))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    x0, _ = full_val[0]
    return Splits(
        train=Subset(full, train_idx.tolist()),
        val=Subset(full_val, val_idx.tolist()),
        test=test,
        train_labels=labels[train_idx],
        num_classes=int(labels.max()) + 1,
        in_shape=tuple(x0.shape),
    )


def _iid(labels: np.ndarray, n_nodes: int, cfg: DataConfig) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(cfg.data_seed).permutation(len(labels)), n_nodes)


def _dirichlet(labels: np.ndarray, n_nodes: int, cfg: DataConfig) -> list[np.ndarray]:
    """Per class c: shares p ~ Dir(alpha * 1_n); node k gets the k-th cut of c's shuffled samples."""
    rng = np.random.default_rng(cfg.data_seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        p = rng.dirichlet(np.full(n_nodes, cfg.alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].append(chunk)
    shards = [np.concatenate(p) for p in parts]
    for k, shard in enumerate(shards):
        if len(shard) == 0:
            raise ConfigError(
                f"dirichlet partition with alpha={cfg.alpha} leaves node {k} with no samples: "
                "raise --data.alpha or lower the node count"
            )
    return shards


def _classes(labels: np.ndarray, n_nodes: int, cfg: DataConfig) -> list[np.ndarray]:
    """The seed's scheme: node k holds `classes_per_node` consecutive entries of a shuffled class
    list, starting at (class_shift * k) mod C; each class is cut into contiguous chunks of
    near-equal random shares (0.8 to 1, normalised) among its holders, in node order.

    A class that no node holds is unused: its samples belong to nobody.
    RandomState(seed) draws exactly what `np.random.seed(seed)` + `np.random.*` would, without
    touching numpy's global RNG.
    """
    C = int(labels.max()) + 1
    if cfg.classes_per_node > C:
        raise ConfigError(f"--data.classes_per_node {cfg.classes_per_node} exceeds the {C} classes of the dataset")
    rs = np.random.RandomState(cfg.data_seed)
    class_list = list(range(C))
    rs.shuffle(class_list)
    held = [{class_list[(cfg.class_shift * k + j) % C] for j in range(cfg.classes_per_node)} for k in range(n_nodes)]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for c in range(C):
        holders = [k for k in range(n_nodes) if c in held[k]]
        if not holders:
            continue
        r = rs.rand(len(holders)) * 0.2 + 0.8
        r = r / r.sum()
        idx = np.flatnonzero(labels == c)
        start = 0
        for h, k in enumerate(holders):
            end = len(idx) if h == len(holders) - 1 else start + int(r[h] * len(idx))
            parts[k].append(idx[start:end])
            start = end
    return [np.concatenate(p) if p else np.zeros(0, dtype=np.int64) for p in parts]


def _documents(labels: np.ndarray, n_nodes: int, cfg: DataConfig) -> list[np.ndarray]:
    """Whole documents (labels) per node: largest first, each to the node with the fewest samples so far, so
    every node's text differs in content while the shares stay close."""
    docs = np.unique(labels)
    if len(docs) < n_nodes:
        raise ConfigError(f"--data.partition documents: {len(docs)} documents for {n_nodes} nodes; use iid")
    sizes = np.bincount(labels)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    load = np.zeros(n_nodes)
    for d in sorted(docs, key=lambda d: (-sizes[d], d)):
        k = int(np.argmin(load))
        parts[k].append(np.flatnonzero(labels == d))
        load[k] += sizes[d]
    return [np.concatenate(p) for p in parts]


_PARTITIONS = {"iid": _iid, "dirichlet": _dirichlet, "classes": _classes, "documents": _documents}


def partition(labels: np.ndarray, n_nodes: int, cfg: DataConfig) -> list[np.ndarray]:
    """Split the train split among `n_nodes`: disjoint, deterministic for `data_seed`.

    Returns each node's indices into `Splits.train`, sorted. Together they cover every sample
    (for `classes`: every sample of a class some node holds). C is `labels.max() + 1`. Every rank
    computes every shard, so a shard too small for the batch fails on every rank alike.
    """
    if cfg.partition not in _PARTITIONS:
        raise ConfigError(f"--data.partition: unknown scheme {cfg.partition!r}; choose iid, dirichlet, classes or "
                          f"documents")
    shards = [np.sort(s).astype(np.int64) for s in _PARTITIONS[cfg.partition](np.asarray(labels), n_nodes, cfg)]
    for k, shard in enumerate(shards):
        if len(shard) == 0:
            raise ConfigError(
                f"{cfg.partition} partition leaves node {k} with no samples: lower the node count"
                + (" or raise --data.classes_per_node" if cfg.partition == "classes" else "")
            )
    k = min(range(n_nodes), key=lambda k: len(shards[k]))
    if cfg.batch_size > len(shards[k]):  # the batch would repeat samples of the shard, every step
        raise ConfigError(f"--data.batch_size {cfg.batch_size} is larger than node {k}'s shard of {len(shards[k])} "
                          f"samples: lower it, or use --data.batch_size 0 (full batch: the whole shard every step)")
    return shards


def class_histogram(labels: np.ndarray, indices: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class in one node's shard, for logging how skewed a partition is."""
    return np.bincount(np.asarray(labels)[indices], minlength=num_classes).tolist()


def node_loader(splits: Splits, indices: np.ndarray, cfg: DataConfig, seed: int, n_nodes: int) -> DataLoader:
    """The node's training loader: `samples_per_epoch // batch_size` full batches per epoch, or with
    `batch_size = 0` (full batch) one batch of the whole shard per epoch.

    Every node must take the same number of steps (exchanges are synchronous), but non-IID shards
    differ in size, so `samples_per_epoch = 0` means len(train) / n_nodes on every node: one epoch
    is one pass of the network over the whole training split, not of each node over its shard.

    Sampling is without replacement (reshuffled when an epoch asks for more than the shard). The
    generator lives at `loader.sampler.generator` so a checkpoint can save and restore its state.
    """
    shard = Subset(splits.train, np.asarray(indices).tolist())
    if cfg.batch_size == 0:  # full batch (validation keeps samples_per_epoch at 0)
        batch, steps = len(shard), 1
    else:
        batch = cfg.batch_size
        steps = max(1, (cfg.samples_per_epoch or len(splits.train_labels) // n_nodes) // batch)
    sampler = RandomSampler(
        shard,
        replacement=False,
        num_samples=steps * batch,
        generator=torch.Generator().manual_seed(seed),
    )
    # workers only decode/augment; the sampler (and its checkpointed generator) stays in this process
    return DataLoader(shard, batch_size=batch, sampler=sampler, drop_last=True,
                      num_workers=cfg.workers, persistent_workers=cfg.workers > 0)


def eval_loader(dataset: Dataset, batch_size: int = 1000) -> DataLoader:
    """Sequential, large batches: evaluation order does not matter and needs no gradients."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
