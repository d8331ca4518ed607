"""Configuration: a dataclass tree, loaded from TOML, every field overridable as `--section.field value`.

Precedence is CLI > TOML > defaults. Unknown keys are errors that suggest the nearest name, and
`validate` names the flag to change, so a bad config fails on every rank before any collective.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import os
import re
import sys
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user mistake: printed as one line by train.py, never as a traceback."""


def one_line(error: BaseException) -> str:
    """An exception from deep inside torch as a short reason for a one-line message: its first line,
    without gloo's "[/path/to/pair.cc:561] " location prefix, at most 200 characters."""
    text = str(error).strip()
    return re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])[:200] if text else type(error).__name__


@dataclass
class RunConfig:
    name: str = "run"  # run name; outputs go to runs/<name>
    dir: str = ""  # output directory; empty = runs/<name>
    seed: int = 0  # minibatch seed; node i draws with seed + i
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False  # continue the run in `dir` from the newest checkpoint every node has (none: start)


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashionmnist | cifar10 | text | module:callable (your own, docs/library.md)
    root: str = "data"  # where torchvision datasets live (<root>/FashionMNIST/raw/...)
    download: bool = False  # let torchvision download a missing dataset
    partition: str = "iid"  # iid | dirichlet | classes | documents (text: whole documents per node)
    alpha: float = 0.5  # dirichlet concentration (smaller = more skewed)
    classes_per_node: int = 2  # classes partition: classes each node holds
    class_shift: int = 1  # classes partition: node k starts at (class_shift * k) mod C
    val_fraction: float = 0.1  # share of the training set held out as a global validation split; 0 = none
    samples_per_epoch: int = 0  # samples each node sees per epoch; 0 = len(train) / n (same steps on every node)
    batch_size: int = 32  # minibatch size per node; 0 = full batch (the whole shard, one step per epoch)
    data_seed: int = 0  # seed of the split and partition (identical on every node)
    augment: bool = True  # random crop + flip for cifar10
    workers: int = 0  # DataLoader worker processes for training batches (cifar10 on GPUs: 4-8)
    path: str = ""  # text: a UTF-8 file (documents split at blank lines); empty = Python's pydoc_data/topics.py
    seq_len: int = 128  # text: characters per window (the model's context)
    vocab: str = "char"  # text: char (the corpus's characters) | byte (256 UTF-8 bytes)


@dataclass
class ModelConfig:
    name: str = "logistic"  # logistic | mlp | cnn | resnet50 | transformer | module:callable (yours: docs/library.md)
    hidden: int = 128  # mlp width
    group_channels: int = 32  # resnet50: channels per GroupNorm group (groups = ceil(C / group_channels))
    drop_rate: float = 0.0  # resnet50: Dropout2d after the stem and layers 1-3
    last_drop_rate: float = 0.0  # resnet50: Dropout before the classifier
    layers: int = 4  # transformer: blocks
    heads: int = 4  # transformer: attention heads per block
    embed: int = 128  # transformer: embedding width (4 layers x 128: ~0.8 M parameters)
    tie_weights: bool = True  # transformer: the output layer shares the token embedding
    model_seed: int = 0  # every node builds the model from this seed, so all start identical


@dataclass
class TopologyConfig:
    path: str = ""  # topology file (JSON, ours or the seed's node_list.json); overrides `name` (not a CLI name)
    # generator: ring | torus | complete | star | exponential | random_regular | one_peer_hypercube | exponential_schedule
    name: str = "ring"
    n: int = 0  # node count for the generator; 0 = the world size
    degree: int = 3  # random_regular: degree of every node
    seed: int = 0  # random_regular: graph seed


@dataclass
class AlgorithmConfig:
    # local | allreduce | dsgd | gossip | pdmm | admm | pdmm_isvr | admm_isvr | cadmm | choco | gt | ed | qgm | diloco
    name: str = "dsgd"
    optimizer: str = "sgd"  # sgd | adam | adamw (local, allreduce, dsgd, gossip, choco, diloco; the others: sgd)
    lr: float = 0.05  # learning rate (gamma)
    momentum: float = 0.0  # SGD momentum β, for every rule (primal-dual and cadmm: torch SGD's direction)
    dampening: float = 0.0  # SGD dampening
    nesterov: bool = False  # SGD Nesterov momentum
    beta1: float = 0.9  # adam, adamw: first-moment decay
    beta2: float = 0.999  # adam, adamw: second-moment decay
    eps: float = 1e-8  # adam, adamw: denominator term
    weight_decay: float = 0.0  # torch optimizer weight decay (every rule as torch SGD applies it; adamw: decoupled)
    l2_lambda: float = 0.0  # loss = mean CE + (l2_lambda / 2) ||w||^2
    mixing: str = "metropolis"  # dsgd, diloco mixing weights: metropolis | uniform | file
    interval: int = 0  # K: exchange after every K-th local step; 0 = the topology file's round, else 1 (ISVR: 4)
    eta: float = 0.05  # pdmm, admm, cadmm: penalty per round, γ c_ij = η v_p / (K max(d_i, d_j)) per step
    penalty_scale: str = "fan_in"  # primal-dual: fan_in | none
    dual_init: str = "consensus"  # primal-dual: consensus (z_ij = A_ij w_0) | zero (the spec's and the seed's)
    piw: float = 1.0  # ISVR: 0.5 | 1 | 2
    use_gcoef: bool = False  # ISVR: scale the gradient by c_g
    schedule: str = "cyclic"  # gossip matchings: cyclic | random
    compressor: str = "none"  # choco: none | topk | randk | qsgd8
    ratio: float = 0.1  # choco topk, randk: the fraction rho of entries sent
    consensus_lr: float = 1.0  # choco: gamma_c; tune it to the compression (about rho for topk; none: 1 = dsgd)
    outer_lr: float = 0.7  # diloco: the outer Nesterov SGD's learning rate (DiLoCo's 0.7)
    outer_momentum: float = 0.9  # diloco: the outer Nesterov momentum (DiLoCo's 0.9)
    outer_average: str = "gossip"  # diloco: gossip (the topology's mixing weights) | all (the mean of all nodes)


@dataclass
class TrainConfig:
    epochs: int = 10  # training epochs
    scheduler: str = "none"  # none | step (per-iteration StepLR)
    precision: str = "fp32"  # fp32 | bf16 (autocast of forward and loss; weights and rule state stay fp32)
    step_size: int = 1000  # step scheduler: iterations between decays
    gamma: float = 0.9  # step scheduler: decay factor
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    checkpoint_every: int = 1  # checkpoint every N epochs and after the last; 0 = never
    checkpoint_every_steps: int = 0  # also checkpoint inside an epoch every N steps (long epochs); 0 = never
    keep_checkpoints: int = 2  # newest checkpoints each node keeps (>= 2); 0 = all (python -m p2p.evaluate reads them)
    sleep_factor: float = 0.0  # straggler simulation: sleep epoch_time * (0.5 + 0.5 * factor * U[0,1))
    step_delay: float = 0.0  # straggler simulation: mean (s) of an exponential sleep per step; 0 = off
    step_delay_dist: str = "exponential"  # exponential (jitter) | constant (a node permanently slower)
    slow_ranks: list[int] = field(default_factory=list)  # ranks that sleep or delay; empty = all


@dataclass
class CommConfig:
    backend: str = "auto"  # auto | nccl | gloo (auto: nccl when every rank has its own GPU)
    timeout_s: float = 300.0  # every collective and exchange fails after this many seconds
    mode: str = "sync"  # sync | overlap | async: when exchanges travel and apply (docs/exchange-modes.md)
    max_staleness: int = 2  # async: a node waits when an edge's completed exchanges lag more rounds than this
    wire_dtype: str = "fp32"  # fp32 | bf16: the dtype float messages travel in (bf16 halves the bytes; rules stay fp32)


@dataclass
class LogConfig:
    tensorboard: bool = True  # write TensorBoard event files under <dir>/tb/
    csv: bool = True  # write <dir>/node<rank>.csv
    level: str = "info"  # debug | info | warning
    progress: bool = True  # tqdm progress bar on rank 0
    plots: bool = True  # write <dir>/curves.png at the end


@dataclass
class SimConfig:
    nodes: int = 0  # simulate this many nodes in one process (python train.py, no torchrun), at most 4096; 0 = off
    step_s: float = 0.01  # virtual seconds of one local step (plus train.step_delay draws): the clocks of async
    latency_s: float = 0.0  # virtual seconds for an exchange to complete once both ends posted it
    drop_prob: float = 0.0  # lose each message (edge, direction, exchange) with this probability, seeded by run.seed


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sim: SimConfig = field(default_factory=SimConfig)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")


CHOICES: dict[str, tuple] = {
    "run.device": ("auto", "cpu", "cuda"),
    "data.name": ("digits", "mnist", "fashionmnist", "cifar10", "text"),
    "data.partition": ("iid", "dirichlet", "classes", "documents"),
    "data.vocab": ("char", "byte"),
    "model.name": ("logistic", "mlp", "cnn", "resnet50", "transformer"),
    "topology.name": ("ring", "torus", "complete", "star", "exponential", "random_regular", "one_peer_hypercube",
                      "exponential_schedule"),
    "algorithm.name": (
        "local", "allreduce", "dsgd", "gossip", "pdmm", "admm", "pdmm_isvr", "admm_isvr", "cadmm", "choco",
        "gt", "ed", "qgm", "diloco",
    ),
    "algorithm.optimizer": ("sgd", "adam", "adamw"),
    "algorithm.mixing": ("metropolis", "uniform", "file"),
    "algorithm.penalty_scale": ("fan_in", "none"),
    "algorithm.dual_init": ("consensus", "zero"),
    "algorithm.piw": (0.5, 1.0, 2.0),
    "algorithm.schedule": ("cyclic", "random"),
    "algorithm.compressor": ("none", "topk", "randk", "qsgd8"),
    "algorithm.outer_average": ("gossip", "all"),
    "train.scheduler": ("none", "step"),
    "train.precision": ("fp32", "bf16"),
    "train.step_delay_dist": ("exponential", "constant"),
    "comm.mode": ("sync", "overlap", "async"),
    "comm.backend": ("auto", "nccl", "gloo"),
    "comm.wire_dtype": ("fp32", "bf16"),
    "log.level": ("debug", "info", "warning"),
}


# Fields that also take the user's own `module:callable` (the convention of torchrun's entry points and uvicorn)
PLUGGABLE = ("model.name", "data.name")


def import_callable(spec: str, flag: str) -> Callable:
    """The user's `module:callable` (`--model.name my_pkg.nets:build`), or one line saying why it is not there.

    The current directory is importable, as under `python -m`, so a package next to where the run is launched is
    found without PYTHONPATH. Errors raised while the user's module runs are theirs and keep their traceback.
    """
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(f"--{flag} {spec}: no module named {e.name!r} (launch from the directory that holds "
                              f"it, or add that directory to PYTHONPATH)") from None
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--{flag} {spec}: module {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--{flag} {spec}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


CLI = "the command line"


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_cli(text: str, typ: Any) -> Any:
    """A command-line string as the field's type: `true`, `0.1`, `3`, `1,2` or `[1, 2]`."""
    if typ is bool:
        return _BOOL_WORDS[text.lower()]
    if typ in (int, float):
        return typ(text)
    if typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        if text.strip().startswith("["):
            return json.loads(text)
        return [_parse_cli(v.strip(), item) for v in text.split(",") if v.strip()]
    return text


def _coerce(value: Any, typ: Any, flag: str, from_cli: bool) -> Any:
    """The value as the field's type, or ConfigError naming the flag.

    Command-line values arrive as strings and are parsed; TOML values must already have the type
    (`epochs = "3"` in a file is an error, not silently 3).
    """
    try:
        if from_cli:
            value = _parse_cli(value, typ)
        if typ is bool and isinstance(value, bool):
            return value
        if typ is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
                return int(value)
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is str and isinstance(value, str):
            return value
        if typing.get_origin(typ) is list and isinstance(value, list):
            (item,) = typing.get_args(typ)
            return [_coerce(v, item, flag, from_cli=False) for v in value]
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        pass
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"--{flag}: expected {name}, got {value!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"unknown config section '{section}' in {source}{_suggest(section, sections)}")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    if key not in types:
        raise ConfigError(f"unknown config key '{section}.{key}' in {source}{_suggest(key, types)}")
    setattr(sub, key, _coerce(value, types[key], f"{section}.{key}", from_cli=source == CLI))


def parse_cli(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split argv into the --config path and (dotted key, raw value) overrides.

    `--a.b value`, `--a.b=value`, and a bare boolean `--a.b` (= true) are accepted.
    """
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': options look like --section.field value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            else:
                value = "true"  # a bare flag: only valid for bools, checked by _coerce
        i += 1
        if key == "config":
            config_path = value
        elif "." not in key:
            raise ConfigError(f"option '--{key}' must be --section.field (e.g. --algorithm.lr 0.1) or --config FILE")
        else:
            overrides.append((key, value))
    return config_path, overrides


def load_config(argv: list[str]) -> Config:
    """Build the resolved, validated config from `--config FILE.toml` and dotted overrides."""
    config_path, overrides = parse_cli(argv)
    cfg = Config()
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key '{section}' must be a [section] table")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for dotted, value in overrides:
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key, value, CLI)
    # a generator named on the command line beats the TOML's file (a command-line path beats a name anyway)
    on_cli = {dotted for dotted, _ in overrides}
    if "topology.name" in on_cli and "topology.path" not in on_cli:
        cfg.topology.path = ""
    validate(cfg)
    return cfg


# Rules that only run in comm.mode sync, and why (docs/exchange-modes.md; tests/test_exchange_modes.py).
SYNC_ONLY = {
    "allreduce": "allreduce is a blocking all-reduce every step; use --comm.mode sync",
    "choco": "choco's copies x_hat_j must stay identical at both ends, and a stale or skipped message "
             "desynchronises them; use --comm.mode sync",
    "cadmm": "cadmm diverges with stale neighbour weights (ALGORITHMS.md); use --comm.mode sync",
    "gt": "gt's trackers keep sum_i y_i = sum_i g_i only if both ends of an edge mix the same round's values; "
          "use qgm or --comm.mode sync",
    "ed": "ed's correction keeps sum_i (x_i - psi_i) = 0 only if every node combines the same round's phi_j; "
          "use qgm or --comm.mode sync",
}

# Rules refused with --sim.drop_prob > 0, and why (docs/heterogeneity.md, "A missing message"). The others
# apply what arrived: dsgd, qgm mix the peers that arrived; gossip skips its average; pdmm, admm (and ISVR)
# keep the edge's old dual; cadmm keeps the old neighbour copy.
DROP_REFUSED = {
    "local": "local sends no messages",
    "allreduce": "allreduce averages gradients, it sends no peer messages",
    "choco": "choco's public copies x_hat_j must match at both ends, and a lost message desynchronises them",
    "gt": "gt needs every peer's [x_j, y_j] each round: a lost one breaks sum_i y_i = sum_i g_i",
    "ed": "ed needs every peer's phi_j each round: a lost one breaks sum_i (x_i - psi_i) = 0",
}

# The most nodes one process simulates (docs/simulation.md measures up to 256): a bound checked before anything
# of that size is built, so that a mistyped --sim.nodes fails at once instead of running out of memory
MAX_SIM_NODES = 4096

# Rules whose local step is a torch optimizer, so --algorithm.optimizer may replace SGD
TORCH_OPTIMIZER = ("local", "allreduce", "dsgd", "gossip", "choco", "diloco")


def validate(cfg: Config) -> None:
    """Check values that no type can express; each message names the flag to change."""
    for flag, options in CHOICES.items():
        section, key = flag.split(".")
        value = getattr(getattr(cfg, section), key)
        if flag in PLUGGABLE and ":" in str(value):  # the user's own module:callable, imported when it is built
            if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
                raise ConfigError(f"--{flag} {value!r}: an import path is module:callable, e.g. my_pkg.nets:build")
            continue
        if value not in options:
            shown = ", ".join(str(o) for o in options)
            hint = _suggest(value, [str(o) for o in options]) if isinstance(value, str) else ""
            raise ConfigError(f"--{flag}: unknown value {value!r}{hint}; choose one of {shown}")
    a, d, t = cfg.algorithm, cfg.data, cfg.train
    finite = math.isfinite
    checks = [
        (a.lr > 0 and finite(a.lr), "--algorithm.lr must be > 0 and finite"),
        (a.optimizer == "sgd" or a.name in TORCH_OPTIMIZER,
         f"--algorithm.optimizer {a.optimizer} is only for {', '.join(TORCH_OPTIMIZER)}; {a.name} uses SGD "
         f"(or its own momentum) for its local step"),
        (a.optimizer == "sgd" or (a.momentum == 0 and not a.nesterov and a.dampening == 0),
         f"--algorithm.momentum, dampening and nesterov are SGD's; {a.optimizer} has --algorithm.beta1 and beta2"),
        (0 <= a.beta1 < 1 and 0 <= a.beta2 < 1, "--algorithm.beta1 and --algorithm.beta2 must be in [0, 1)"),
        (a.eps > 0 and finite(a.eps), "--algorithm.eps must be > 0 and finite"),
        (a.interval >= 0, "--algorithm.interval (K) must be >= 1, or 0 for the topology file's round (else 1)"),
        # K(d+1) - 2d <= 0 for every d >= 1; K = 0 is resolved later, and the algorithm checks it again then
        (not (a.name.endswith("_isvr") and a.piw == 2 and a.interval == 1),
         "--algorithm.piw 2 with --algorithm.interval 1 gives a negative ISVR penalty: use interval >= 2 or piw <= 1"),
        (a.eta > 0, "--algorithm.eta must be > 0"),
        (0 < a.ratio <= 1, "--algorithm.ratio must be in (0, 1]"),
        (a.consensus_lr > 0 and finite(a.consensus_lr), "--algorithm.consensus_lr must be > 0 and finite"),
        (a.outer_lr > 0 and finite(a.outer_lr), "--algorithm.outer_lr must be > 0 and finite"),
        (0 <= a.outer_momentum < 1, "--algorithm.outer_momentum must be in [0, 1)"),
        # torch's optimizers reject negative momentum and weight decay with a traceback; inf/nan only diverge
        (a.momentum >= 0 and finite(a.momentum), "--algorithm.momentum must be >= 0 and finite"),
        (0 <= a.dampening <= 1, "--algorithm.dampening must be in [0, 1]"),
        (a.weight_decay >= 0 and finite(a.weight_decay), "--algorithm.weight_decay must be >= 0 and finite"),
        (a.l2_lambda >= 0 and finite(a.l2_lambda), "--algorithm.l2_lambda must be >= 0 and finite"),
        (not (a.nesterov and (a.momentum <= 0 or a.dampening != 0)),
         "--algorithm.nesterov needs --algorithm.momentum > 0 and --algorithm.dampening 0"),
        (d.batch_size >= 0, "--data.batch_size must be >= 1, or 0 for full batch"),
        (d.batch_size > 0 or d.samples_per_epoch == 0,
         "--data.samples_per_epoch must be 0 with --data.batch_size 0 (full batch: one step per epoch)"),
        (d.workers >= 0, "--data.workers must be >= 0"),
        (d.seq_len >= 1, "--data.seq_len must be >= 1"),
        (d.partition != "documents" or d.name == "text", "--data.partition documents splits a text corpus by "
                                                         "document: use it with --data.name text"),
        (cfg.model.layers >= 1 and cfg.model.heads >= 1 and cfg.model.embed >= 1,
         "--model.layers, --model.heads and --model.embed must be >= 1"),
        (cfg.model.embed % cfg.model.heads == 0, "--model.embed must be a multiple of --model.heads"),
        (d.alpha > 0, "--data.alpha (Dirichlet concentration) must be > 0"),
        (d.classes_per_node >= 1, "--data.classes_per_node must be >= 1"),
        (0 <= d.val_fraction < 1, "--data.val_fraction must be in [0, 1)"),
        (d.samples_per_epoch >= 0, "--data.samples_per_epoch must be >= 0 (0 = the whole shard)"),
        (t.epochs >= 1, "--train.epochs must be >= 1"),
        (t.eval_every >= 1, "--train.eval_every must be >= 1"),
        (t.checkpoint_every >= 0, "--train.checkpoint_every must be >= 0 (0 = never)"),
        (t.checkpoint_every_steps >= 0, "--train.checkpoint_every_steps must be >= 0 (0 = never)"),
        (t.keep_checkpoints == 0 or t.keep_checkpoints >= 2,
         "--train.keep_checkpoints must be 0 (all) or >= 2 (a node may be one checkpoint ahead of a peer)"),
        (t.step_size >= 1, "--train.step_size must be >= 1"),
        (0 < t.gamma <= 1, "--train.gamma must be in (0, 1]"),
        (t.sleep_factor >= 0, "--train.sleep_factor must be >= 0"),
        (t.step_delay >= 0 and finite(t.step_delay), "--train.step_delay must be >= 0 and finite (seconds)"),
        (cfg.comm.max_staleness >= 1, "--comm.max_staleness must be >= 1 (rounds)"),
        (cfg.comm.mode == "sync" or a.name not in SYNC_ONLY,
         f"--comm.mode {cfg.comm.mode} does not fit --algorithm.name {a.name}: {SYNC_ONLY.get(a.name)}"),
        (cfg.comm.mode != "async" or a.name != "diloco",
         "--comm.mode async does not fit --algorithm.name diloco: its outer step needs every message of one round "
         "at once; use --comm.mode overlap (one round late) or sync"),
        (cfg.comm.mode != "overlap" or a.name != "diloco" or a.outer_average == "all",
         "--comm.mode overlap fits diloco with --algorithm.outer_average all only: a gossip average one round late "
         "delays the anchors' consensus under the outer momentum and diverged (docs/algorithms.md, \"diloco\"); "
         "use --comm.mode sync for gossip"),
        (0 < cfg.comm.timeout_s < math.inf, "--comm.timeout_s must be > 0 and finite"),
        (cfg.topology.n >= 0, "--topology.n must be >= 0 (0 = the world size)"),
        (cfg.sim.nodes >= 0, "--sim.nodes must be >= 0 (0 = no simulation: one process per node)"),
        (cfg.sim.nodes <= MAX_SIM_NODES, f"--sim.nodes must be <= {MAX_SIM_NODES}: one process holds every node"),
        (cfg.sim.step_s >= 0 and finite(cfg.sim.step_s), "--sim.step_s must be >= 0 and finite (virtual seconds)"),
        (cfg.sim.latency_s >= 0 and finite(cfg.sim.latency_s),
         "--sim.latency_s must be >= 0 and finite (virtual seconds)"),
        (0 <= cfg.sim.drop_prob < 1, "--sim.drop_prob must be in [0, 1)"),
        (cfg.sim.drop_prob == 0 or cfg.sim.nodes > 0,
         "--sim.drop_prob loses messages in the simulator only: add --sim.nodes N"),
        (cfg.sim.drop_prob == 0 or a.name not in DROP_REFUSED,
         f"--sim.drop_prob does not fit --algorithm.name {a.name}: {DROP_REFUSED.get(a.name)}"),
        # runs/. and runs/.. are not a run's own directory (runs/.. is the working directory)
        (cfg.run.name.strip() not in ("", ".", "..") and not {"/", "\0"} & set(cfg.run.name),
         "--run.name must be a plain name, not empty, '.' or '..' and without '/': outputs go to runs/<name> "
         "(--run.dir PATH puts them anywhere)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _toml_value(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, -inf, nan: TOML spells them so, JSON cannot
    # JSON scalars and lists are valid TOML; raw UTF-8, as TOML rejects JSON's surrogate-pair escapes
    return json.dumps(value, ensure_ascii=False)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, so a run can be repeated with `--config <dir>/config.toml`."""
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


# Fields that may differ between hosts of one run: where the datasets are, how many CPUs load them.
HOST_FIELDS = ("data.root", "data.download", "data.workers")


def field_values(cfg: Config) -> dict[str, Any]:
    """{"section.key": value} for every field, in the dataclasses' order."""
    return {f"{section.name}.{key}": value for section in dataclasses.fields(cfg)
            for key, value in dataclasses.asdict(getattr(cfg, section.name)).items()}


def config_lines(cfg: Config) -> list[str]:
    """`section.key = value` for every field all ranks must share, for comparing ranks (with the graph's
    `Topology.fingerprint()`)."""
    return [f"{flag} = {_toml_value(value)}" for flag, value in field_values(cfg).items() if flag not in HOST_FIELDS]
