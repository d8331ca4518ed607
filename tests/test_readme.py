"""The commands and links of README.md and docs/*.md work.

- Every line of a fenced shell block whose first word (after `VAR=value` assignments) is `python` or `torchrun`
  is checked: `train.py`'s arguments resolve with p2p.config.load_config (the config file exists, every
  `--section.field value` is a known field with a valid value), every topology file named exists and has as many
  nodes as the command starts (torchrun's processes or `--sim.nodes`); `python -m p2p.sweep` plans every
  combination of its grid; `python -m X` names a module that exists; another script exists.
- The cheap ones run for real, with tiny epochs (a later flag wins): the README's simulated quickstart, and its
  `python -m p2p.report` on that run.
- The README keeps the set-up commands .ci/run calls, and stays a landing page (at most 200 lines).
- Every relative link in README.md and docs/*.md points to an existing file, and a `#fragment` to a heading
  of it.
"""

import csv
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from distributed import csv_rows, launch
from p2p import sweep
from p2p.config import load_config
from p2p.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# pages linked from docs/algorithms.md that other branches are writing; drop each once it exists
PENDING: set[str] = set()
TINY = ["--train.epochs", "1", "--data.samples_per_epoch", "64", "--log.progress", "false",
        "--log.tensorboard", "false"]
FENCE = re.compile(r"^```(\S*)\s*$")
SHELL = ("", "sh", "bash", "shell", "console")


def commands(page: Path) -> list[list[str]]:
    """The `python` / `torchrun` command lines of a page's fenced shell blocks, as words (continuations
    joined, comments and leading VAR=value assignments dropped)."""
    found, lang, line_so_far = [], None, ""
    for line in page.read_text().splitlines():
        if m := FENCE.match(line.strip()):
            lang = m.group(1) if lang is None else None
            continue
        if lang not in SHELL:  # outside a block (None) or a toml / json block
            continue
        line_so_far += line.rstrip()
        if line_so_far.endswith("\\"):
            line_so_far = line_so_far[:-1] + " "
            continue
        words, line_so_far = shlex.split(line_so_far, comments=True), ""
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words and words[0] in ("python", "torchrun"):
            found.append(words)
    return found


ALL = [(page, words) for page in PAGES for words in commands(page)]


def _id(case) -> str:
    page, words = case
    return f"{page.relative_to(ROOT)}: {' '.join(words)[:90]}"


def _option(words: list[str], *names: str) -> str | None:
    for i, w in enumerate(words):
        for name in names:
            if w == name and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(name + "="):
                return w.split("=", 1)[1]
    return None


def _check_train_args(args: list[str], nodes: int | None) -> None:
    cfg = load_config(args)
    for i, w in enumerate(args):  # every file the arguments name
        if w.endswith((".toml", ".json")):
            assert (ROOT / w).is_file(), f"{w} does not exist"
    if cfg.topology.path and nodes:
        n = load_topology(cfg.topology.path).n
        assert n == nodes, f"{cfg.topology.path} has {n} nodes, the command starts {nodes}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ALL, ids=[_id(c) for c in ALL])
def test_documented_command_parses(case, monkeypatch, tmp_path):
    page, words = case
    monkeypatch.chdir(ROOT)  # the commands run from the repository root
    if words[0] == "torchrun":
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        assert scripts, "torchrun without a script"
        script = words[scripts[0]]
        assert (ROOT / script).is_file(), f"{script} does not exist"
        if script == "train.py":
            launcher = words[1:scripts[0]]
            per_host = _option(launcher, "--nproc_per_node", "--nproc-per-node")
            hosts = _option(launcher, "--nnodes") or "1"
            _check_train_args(words[scripts[0] + 1:], int(per_host) * int(hosts) if per_host else None)
        return
    # python ...
    if words[1] == "-m":
        module = words[2]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        if module == "p2p.sweep":  # the whole grid resolves, as the sweep checks before it runs anything
            rest, grid, config = words[3:], [], None
            overrides = []
            i = 0
            while i < len(rest):
                if rest[i] == "--grid":
                    grid.append(rest[i + 1])
                elif rest[i] == "--config":
                    config = rest[i + 1]
                elif rest[i] not in ("--name", "--dir", "--nproc"):
                    overrides.append(rest[i])
                    i += 1
                    continue
                i += 2
            combos = sweep.plan(config, sweep.parse_grid(grid), overrides, tmp_path)
            assert len(combos) >= 2
            nodes = int(_option(words, "--nproc") or 4)
            for name, _, cfg in combos:  # as many nodes as the topology file has
                if cfg.topology.path:
                    n = load_topology(cfg.topology.path).n
                    assert n == (cfg.sim.nodes or nodes), f"{name}: {cfg.topology.path} has {n} nodes"
        return
    script = words[1]
    assert (ROOT / script).is_file(), f"{script} does not exist"
    if script == "train.py":
        args = words[2:]
        _check_train_args(args, int(_option(args, "--sim.nodes") or 0) or None)


def test_commands_were_found():
    """The scan finds the README's commands (a changed fence or layout would silently check nothing)."""
    readme = [" ".join(w) for w in commands(README)]
    assert "python -m pytest" in readme
    assert "torchrun --standalone --nproc_per_node 4 train.py --config configs/quickstart.toml" in readme
    assert any(c.startswith("python -m p2p.report") for c in readme)
    assert any(c.startswith("python -m p2p.sweep") for c in readme)
    assert len(ALL) >= 20


def test_readme_keeps_the_ci_commands_and_stays_short():
    """.ci/run runs the README's install and test commands; the README is a landing page."""
    text = README.read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for marker in ("# README: install", "# README: test"):
        command = next(line.split("#")[0].strip() for line in ci.splitlines() if line.rstrip().endswith(marker))
        command = command.replace(" -q ", " ")  # CI installs quietly
        assert f"\n{command}\n" in text, command
    assert len(text.splitlines()) <= 200
    assert (ROOT / "docs" / "quickstart.png").is_file()


@pytest.mark.timeout(150)
def test_readme_quickstart_simulated_and_report_run(tmp_path):
    """The README's simulated quickstart and its report command, run for real with one tiny epoch."""
    readme = [w for w in commands(README)]
    quick = next(w for w in readme if w[:2] == ["python", "train.py"] and "--sim.nodes" in w)
    run = tmp_path / "quickstart"
    done = launch([sys.executable, *quick[1:], *TINY, "--run.dir", str(run)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    nodes = int(_option(quick, "--sim.nodes"))
    for k in range(nodes):
        (row,) = csv_rows(run / f"node{k}.csv")
        assert row["epoch"] == 1 and 0 <= row["test_acc"] <= 1 and row["avg_test_acc"] is not None
    assert (run / "curves.png").is_file() and (run / "config.toml").is_file()

    report = next(w for w in readme if w[:3] == ["python", "-m", "p2p.report"])
    args = [str(run) if a.startswith("runs") else a for a in report[3:]]
    done = launch([sys.executable, "-m", "p2p.report", *args, "--out", str(tmp_path / "out"), "--no-plots"],
                  timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    with (tmp_path / "out" / "report.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["algorithm"] == "dsgd" and row["nodes"].startswith(str(nodes))


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if str(file.relative_to(ROOT)) in PENDING and not file.exists():
            continue
        if not file.is_file():
            broken.append(target)
        elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"
