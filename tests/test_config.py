"""Config: TOML + dotted CLI overrides, precedence, suggestions for typos, validation, and the saved copy."""

import dataclasses
import math
from pathlib import Path

import pytest

import torch

from p2p.config import AlgorithmConfig, Config, ConfigError, load_config, to_toml, validate
from p2p.topology import Topology
from p2p.optimizer import resolve_interval

pytestmark = pytest.mark.timeout(30)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return str(path)


def error(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    return str(e.value)


# --- loading and precedence -------------------------------------------------------------------------------------


def test_defaults_without_arguments():
    assert load_config([]) == Config()


def test_toml_sets_fields_and_keeps_the_other_defaults(tmp_path):
    path = write(tmp_path, """
[algorithm]
name = "pdmm"
lr = 1           # an integer where a float is expected is fine
[data]
batch_size = 16
augment = false
[train]
slow_ranks = [1, 3]
""")
    cfg = load_config(["--config", path])
    assert cfg.algorithm.name == "pdmm"
    assert cfg.algorithm.lr == 1.0 and isinstance(cfg.algorithm.lr, float)
    assert cfg.data.batch_size == 16 and cfg.data.augment is False
    assert cfg.train.slow_ranks == [1, 3]
    assert cfg.train.epochs == Config().train.epochs  # untouched: the default
    assert cfg.model == Config().model


def test_cli_forms_space_equals_and_bare_bool(tmp_path):
    cfg = load_config(["--algorithm.lr", "0.25", "--train.epochs=7", "--run.resume", "--data.augment", "false",
                       "--train.slow_ranks", "0,2", "--log.progress"])
    assert cfg.algorithm.lr == 0.25
    assert cfg.train.epochs == 7
    assert cfg.run.resume is True  # bare flag followed by another option
    assert cfg.log.progress is True  # bare flag at the very end
    assert cfg.data.augment is False
    assert cfg.train.slow_ranks == [0, 2]
    assert load_config(["--train.slow_ranks=[1, 2]"]).train.slow_ranks == [1, 2]
    assert load_config(["--run.dir="]).run.dir == ""


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = write(tmp_path, """
[algorithm]
lr = 0.2
momentum = 0.5
[train]
epochs = 4
""")
    # --config may come after the overrides: the CLI still wins
    cfg = load_config(["--algorithm.lr", "0.3", "--config", path])
    assert cfg.algorithm.lr == 0.3  # CLI over TOML
    assert cfg.algorithm.momentum == 0.5 and cfg.train.epochs == 4  # TOML over defaults
    assert cfg.algorithm.interval == 0 and cfg.data.batch_size == 32  # defaults (K = 0: auto)


# --- mistakes: one message that says what to change ---------------------------------------------------------------


def test_unknown_section_and_key_suggest_the_nearest_name(tmp_path):
    msg = error(["--algoritm.lr", "0.1"])
    assert "algoritm" in msg and "did you mean 'algorithm'" in msg
    msg = error(["--algorithm.lrr", "0.1"])
    assert "algorithm.lrr" in msg and "did you mean 'lr'" in msg
    msg = error(["--config", write(tmp_path, "[trian]\nepochs = 3\n")])
    assert "trian" in msg and "did you mean 'train'" in msg and "cfg.toml" in msg
    msg = error(["--config", write(tmp_path, "[train]\nepoch = 3\n")])
    assert "train.epoch" in msg and "did you mean 'epochs'" in msg


def test_wrong_type_names_the_flag(tmp_path):
    msg = error(["--train.epochs", "abc"])
    assert msg.startswith("--train.epochs") and "int" in msg and "'abc'" in msg
    assert error(["--train.epochs", "2.5"]).startswith("--train.epochs")
    assert error(["--algorithm.lr", "fast"]).startswith("--algorithm.lr")
    assert error(["--run.resume", "maybe"]).startswith("--run.resume")
    assert error(["--train.slow_ranks", "1,x"]).startswith("--train.slow_ranks")
    assert error(["--config", write(tmp_path, "[train]\nepochs = 2.5\n")]).startswith("--train.epochs")
    assert error(["--config", write(tmp_path, "[data]\naugment = 1\n")]).startswith("--data.augment")


def test_malformed_command_lines_and_files(tmp_path):
    assert "--section.field" in error(["epochs", "3"])
    assert "--section.field" in error(["--lr", "0.1"])
    assert "not found" in error(["--config", str(tmp_path / "missing.toml")])
    assert "not valid TOML" in error(["--config", write(tmp_path, "[train\n")])
    assert "[section]" in error(["--config", write(tmp_path, "epochs = 3\n")])


@pytest.mark.parametrize("argv, expected", [
    (["--algorithm.lr", "0"], "--algorithm.lr must be > 0"),
    (["--algorithm.lr", "-0.1"], "--algorithm.lr must be > 0"),
    (["--data.batch_size", "-1"], "--data.batch_size must be >= 1, or 0 for full batch"),
    (["--data.batch_size", "0", "--data.samples_per_epoch", "100"],
     "--data.samples_per_epoch must be 0 with --data.batch_size 0 (full batch: one step per epoch)"),
    (["--train.epochs", "0"], "--train.epochs must be >= 1"),
    (["--algorithm.interval", "-1"], "--algorithm.interval (K) must be >= 1, or 0 for the topology file's round"),
    (["--algorithm.weight_decay", "-1"], "--algorithm.weight_decay must be >= 0 and finite"),
    (["--algorithm.weight_decay", "nan"], "--algorithm.weight_decay must be >= 0 and finite"),
    (["--algorithm.momentum", "-0.5"], "--algorithm.momentum must be >= 0 and finite"),
    (["--algorithm.momentum", "inf"], "--algorithm.momentum must be >= 0 and finite"),
    (["--algorithm.dampening", "1.5"], "--algorithm.dampening must be in [0, 1]"),
    (["--algorithm.lr", "inf"], "--algorithm.lr must be > 0 and finite"),
    (["--algorithm.l2_lambda", "nan"], "--algorithm.l2_lambda must be >= 0 and finite"),
    (["--data.alpha", "0"], "--data.alpha (Dirichlet concentration) must be > 0"),
    (["--algorithm.piw", "3"], "--algorithm.piw: unknown value 3.0; choose one of 0.5, 1.0, 2.0"),
    (["--algorithm.name", "dsdg"], "--algorithm.name: unknown value 'dsdg' (did you mean 'dsgd'?)"),
    (["--model.name", "cnnn"], "--model.name: unknown value 'cnnn' (did you mean 'cnn'?)"),
    (["--data.name", "fashionmnst"], "--data.name: unknown value 'fashionmnst' (did you mean 'fashionmnist'?)"),
    (["--data.partition", "dirichelt"], "--data.partition: unknown value 'dirichelt' (did you mean 'dirichlet'?)"),
    (["--train.scheduler", "stepp"], "--train.scheduler: unknown value 'stepp' (did you mean 'step'?)"),
    (["--algorithm.name", "pdmm", "--algorithm.optimizer", "adam"],
     "--algorithm.optimizer adam is only for local, allreduce, dsgd, gossip, choco, diloco; pdmm uses SGD"),
    (["--comm.timeout_s", "inf"], "--comm.timeout_s must be > 0 and finite"),  # timedelta(inf) would overflow
    (["--algorithm.ratio", "0"], "--algorithm.ratio must be in (0, 1]"),
    (["--algorithm.ratio", "1.5"], "--algorithm.ratio must be in (0, 1]"),
    (["--algorithm.consensus_lr", "0"], "--algorithm.consensus_lr must be > 0 and finite"),
    (["--algorithm.compressor", "top_k"], "--algorithm.compressor: unknown value 'top_k' (did you mean 'topk'?)"),
    (["--algorithm.name", "choco", "--comm.mode", "overlap"], "x_hat_j must stay identical at both ends"),
    (["--algorithm.outer_lr", "0"], "--algorithm.outer_lr must be > 0 and finite"),
    (["--algorithm.outer_momentum", "1"], "--algorithm.outer_momentum must be in [0, 1)"),
    (["--algorithm.outer_average", "al"], "--algorithm.outer_average: unknown value 'al' (did you mean 'all'?)"),
    (["--algorithm.name", "diloco", "--comm.mode", "overlap"], "fits diloco with --algorithm.outer_average all only"),
    (["--algorithm.name", "diloco", "--comm.mode", "async", "--algorithm.outer_average", "all"],
     "--comm.mode async does not fit --algorithm.name diloco"),
])
def test_validate_names_the_flag(argv, expected):
    assert expected in error(argv)


def test_validate_accepts_what_it_should():
    for name in ("local", "allreduce", "dsgd", "gossip", "diloco"):
        assert load_config(["--algorithm.name", name, "--algorithm.optimizer", "adam"]).algorithm.optimizer == "adam"
    assert load_config(["--algorithm.piw", "0.5"]).algorithm.piw == 0.5
    cfg = Config()
    cfg.data.alpha = -1.0  # validate also works on a config built in code
    with pytest.raises(ConfigError, match="--data.alpha"):
        validate(cfg)


# --- the copy saved with a run ----------------------------------------------------------------------------------


def test_to_toml_round_trips(tmp_path):
    cfg = load_config([
        "--run.name", "räty-😀", "--run.dir", str(tmp_path / "some dir"), "--run.resume",
        "--data.partition", "classes", "--data.alpha", "0.125", "--data.augment", "false",
        "--model.name", "mlp", "--model.hidden", "17",
        "--topology.name", "torus", "--topology.n", "16",
        "--algorithm.name", "admm_isvr", "--algorithm.lr", "1e-05", "--algorithm.piw", "2", "--algorithm.interval", "3",
        "--algorithm.eta", "0.0003", "--algorithm.use_gcoef",
        "--train.epochs", "2", "--train.slow_ranks", "1,5", "--train.gamma", "0.5",
        "--comm.timeout_s", "12.5", "--log.tensorboard", "false", "--log.level", "debug",
    ])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = load_config(["--config", str(path)])
    assert again == cfg
    for section in dataclasses.fields(Config):  # and with the exact types, not just equal values
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            assert type(getattr(getattr(again, section.name), key)) is type(value), (section.name, key)
    assert load_config(["--config", write(tmp_path, to_toml(Config()))]) == Config()
    cfg = Config()
    cfg.algorithm.eta = math.inf  # valid (> 0) yet not a JSON number: written as TOML's inf
    assert load_config(["--config", write(tmp_path, to_toml(cfg))]).algorithm.eta == math.inf


def test_toml_values_must_already_have_the_field_type(tmp_path):
    path = tmp_path / "strict.toml"
    path.write_text('[train]\nepochs = "3"\n')
    with pytest.raises(ConfigError, match=r"--train.epochs: expected int, got '3'"):
        load_config(["--config", str(path)])


def test_isvr_with_piw_2_needs_an_interval_of_at_least_2():
    with pytest.raises(ConfigError, match="negative ISVR penalty"):
        load_config(["--algorithm.name", "admm_isvr", "--algorithm.piw", "2", "--algorithm.interval", "1"])
    assert load_config(["--algorithm.name", "admm_isvr", "--algorithm.piw", "2", "--algorithm.interval", "2"])
    # K = 0 (auto) is known only with the topology: the algorithm checks the resolved K (test_bad_input)
    assert load_config(["--algorithm.name", "admm_isvr", "--algorithm.piw", "2"]).algorithm.interval == 0


# --- K from the topology file -----------------------------------------------------------------------------------


@pytest.mark.parametrize("interval,round_,K,warns", [
    (0, 10, 10, False),  # auto: the file's round
    (0, None, 1, False),  # auto without a round: every step
    (10, 10, 10, False),
    (4, 10, 4, True),  # explicit K wins, with a warning: the slots assume 10
    (3, None, 3, False),
])
def test_resolve_interval(interval, round_, K, warns):
    cfg = AlgorithmConfig(interval=interval)
    topology = Topology(3, ((0, 1), (0, 2), (1, 2)), source="t.json", round=round_)
    warning = resolve_interval(cfg, topology)
    assert cfg.interval == K
    assert (warning is not None) == warns
    if warns:
        assert warning == ("--algorithm.interval 4 overrides the round 10 of topology t.json: "
                           "its per-edge slots assume K = 10")


# --- the optimizer fields: what validate accepts, torch's optimizers accept --------------------------------------


@pytest.mark.parametrize("field,value", [("weight_decay", -1e-9), ("weight_decay", 0.0), ("weight_decay", 0.5),
                                         ("momentum", -0.1), ("momentum", 0.0), ("momentum", 0.9),
                                         ("lr", -0.1), ("lr", 0.1)])
def test_validate_agrees_with_torch_optimizers(field, value):
    params = [torch.nn.Parameter(torch.zeros(2))]
    try:
        torch.optim.SGD(params, **{"lr": 0.1, field: value})
        if field != "momentum":
            torch.optim.Adam(params, **{"lr": 0.1, field: value})
        torch_ok = True
    except ValueError:
        torch_ok = False
    try:
        load_config([f"--algorithm.{field}", str(value)])
        ours_ok = True
    except ConfigError:
        ours_ok = False
    assert ours_ok == torch_ok


# --- command line over TOML, also between competing fields ------------------------------------------------------


def test_a_generator_on_the_command_line_beats_a_file_in_the_toml(tmp_path):
    path = write(tmp_path, '[topology]\npath = "topologies/ring4.json"\nname = "torus"\n')
    assert load_config(["--config", path]).topology.path == "topologies/ring4.json"  # TOML alone: path wins
    cfg = load_config(["--config", path, "--topology.name", "ring"])
    assert (cfg.topology.path, cfg.topology.name) == ("", "ring")
    # a path on the command line wins over the TOML's name, and over a name beside it
    other = write(tmp_path, '[topology]\nname = "star"\n')
    assert load_config(["--config", other, "--topology.path", "x.json"]).topology.path == "x.json"
    both = load_config(["--config", path, "--topology.name", "ring", "--topology.path", "x.json"])
    assert both.topology.path == "x.json"


def test_documented_configuration_reference_matches_the_defaults():
    """docs/configuration.md's reference block is valid TOML holding every field with its real default."""
    import dataclasses
    import tomllib
    from pathlib import Path

    from p2p.config import Config

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    section = page[page.index("## Configuration reference"):]
    block = section[section.index("```toml") + len("```toml"):]
    documented = tomllib.loads(block[:block.index("```")])
    assert documented == dataclasses.asdict(Config())
