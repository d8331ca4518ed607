"""sim.drop_prob: lost messages in the simulator. Drop 0 is the normal run bit for bit; drop p delivers about
(1 − p) of the letters, repeats for a seed and changes the result; the rules that cannot lose a message, and a
drop outside the simulator, are one-line errors."""

import csv
from pathlib import Path

import pytest
import torch

from p2p import sim
from p2p.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(300)


def _run(out: Path, *extra: str) -> tuple[torch.Tensor, int, list[float]]:
    """3 epochs of non-IID digits on 4 simulated nodes (a ring); returns W, letters delivered, test accs."""
    cfg = load_config(["--sim.nodes", "4", "--data.partition", "dirichlet", "--data.batch_size", "16",
                       "--model.name", "logistic", "--algorithm.lr", "0.05", "--algorithm.momentum", "0.9",
                       "--train.epochs", "3", "--train.eval_every", "3", "--train.checkpoint_every", "0",
                       "--log.tensorboard", "false", "--log.plots", "false", "--log.progress", "false",
                       "--run.dir", str(out), *extra])
    captured = {}
    orig = sim.train_loop

    def keep(cfg, s, ckpts, progress):  # the final weights, for a bitwise comparison
        steps = orig(cfg, s, ckpts, progress)
        captured["W"], captured["letters"] = s.W.clone(), dict(s.transport.letters)
        return steps

    sim.train_loop = keep
    try:
        sim.run(cfg)
    finally:
        sim.train_loop = orig
    delivered, accs = 0, []
    for path in sorted(out.glob("node*.csv")):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        delivered += sum(int(r["exchanges"]) for r in rows)
        accs.append(float(rows[-1]["test_acc"]))
    assert captured["letters"]["sent"] - captured["letters"]["dropped"] == delivered
    return captured["W"], delivered, accs


# diloco at K = 1 on top of SGD momentum 0.9 without outer momentum (with it, 0.65 even without drops)
@pytest.mark.parametrize("rule", ["dsgd", "pdmm", "diloco --algorithm.outer_momentum 0"])
def test_drop_counts_and_repeats(tmp_path: Path, rule: str) -> None:
    args = ["--algorithm.name", *rule.split()]
    w_plain, sent, _ = _run(tmp_path / "plain", *args)
    w_zero, sent_zero, _ = _run(tmp_path / "zero", *args, "--sim.drop_prob", "0")
    assert torch.equal(w_plain, w_zero) and sent == sent_zero == 3 * 20 * 8  # 3 epochs x 20 rounds x 8 letters
    w_drop, delivered, accs = _run(tmp_path / "drop", *args, "--sim.drop_prob", "0.3")
    w_again, delivered_again, _ = _run(tmp_path / "again", *args, "--sim.drop_prob", "0.3")
    assert torch.equal(w_drop, w_again) and delivered == delivered_again  # seeded by run.seed
    assert abs(delivered / sent - 0.7) < 0.08, delivered / sent  # 480 letters: std 0.02
    assert not torch.equal(w_drop, w_plain) and min(accs) > 0.5  # changed, and still learns
    w_seed, _, _ = _run(tmp_path / "seed", *args, "--sim.drop_prob", "0.3", "--run.seed", "7")
    assert not torch.equal(w_seed, w_drop)


@pytest.mark.parametrize("argv, words", [
    (["--sim.nodes", "4", "--algorithm.name", "choco"], "choco"),
    (["--sim.nodes", "4", "--algorithm.name", "gt"], "gt needs"),
    (["--sim.nodes", "4", "--algorithm.name", "ed"], "ed needs"),
    (["--sim.nodes", "4", "--algorithm.name", "allreduce"], "allreduce"),
    (["--algorithm.name", "dsgd"], "simulator only"),
])
def test_drop_refused(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config([*argv, "--sim.drop_prob", "0.1"])
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("p", ["1", "-0.1"])
def test_drop_range(p: str) -> None:
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        load_config(["--sim.nodes", "4", "--sim.drop_prob", p])
