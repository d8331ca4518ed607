"""Run every combination of a grid of config values, one run directory each, then report them.

    python -m p2p.sweep --config configs/quickstart.toml --grid algorithm.name=dsgd,pdmm \\
        --grid topology.name=ring,torus --sim.nodes 16 --train.epochs 2 --name cmp

Each combination runs into runs/<name>/<key=value,key=value>/ (or --dir DIR/...): with --sim.nodes (on the
command line or in the config) as `python train.py ...`, else as `torchrun --standalone --nproc_per_node
--nproc train.py ...`. A combination whose nodes all logged train.epochs is skipped, one with results is
continued (--run.resume true), so re-running an interrupted sweep finishes it. Every combination's config
is built and validated before the first one runs. A failed combination is reported (its log is
runs/<name>/<combo>.log) and the sweep goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from p2p.config import CLI, Config, ConfigError, _apply, load_config
from p2p.report import ReportError, markdown, report

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """`section.field=v1,v2` -> [("section.field", ["v1", "v2"])], each key once."""
    grid: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, eq, values = spec.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or "." not in key or not options:
            raise ConfigError(f"--grid {spec!r}: expected section.field=value1,value2,...")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice: list all its values in one --grid")
        if key in ("run.dir", "run.name", "run.resume"):
            raise ConfigError(f"--grid {key}: the sweep sets it for every combination")
        for value in options:  # the key exists and the value has its type, as config.py checks a --section.field
            try:
                _apply(Config(), *key.split(".", 1), value, CLI)
            except ConfigError as e:
                raise ConfigError(f"--grid {key}={value}: {e}") from None
        grid.append((key, options))
    return grid


def combo_name(combo: list[tuple[str, str]]) -> str:
    """The run directory's name: `algorithm.name=dsgd,topology.path=ring8` (a file by its stem, odd characters
    as '_')."""
    text = ",".join(f"{k}={Path(v).stem if '/' in v else v}" for k, v in combo)
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def plan(config: str | None, grid: list[tuple[str, list[str]]], overrides: list[str],
         root: Path) -> list[tuple[str, list[str], Config]]:
    """Every combination's (name, train.py arguments, resolved config); ConfigError before anything runs."""
    base = ["--config", config] if config else []
    for flag in ("--run.dir", "--run.name", "--run.resume"):
        if any(o == flag or o.startswith(flag + "=") for o in overrides):
            raise ConfigError(f"{flag} is set by the sweep for every combination (use --name or --dir)")
    combos = []
    for values in itertools.product(*(options for _, options in grid)):
        combo = list(zip((k for k, _ in grid), values))
        name = combo_name(combo)
        args = [*base, *overrides, *(a for k, v in combo for a in (f"--{k}", v)), "--run.dir", str(root / name)]
        combos.append((name, args, load_config(args)))  # a typo in a grid key or value: ConfigError here
    names = [name for name, _, _ in combos]
    if len(set(names)) < len(names):
        raise ConfigError("two combinations map to one directory name: give values that differ in letters or digits")
    return combos


def _logged(path: Path) -> set[str]:
    """The epochs a node's CSV holds (metrics.logged_epochs without importing torch: errors come in 0.2 s)."""
    if not path.is_file():
        return set()
    with path.open(newline="") as f:
        return {row.get("epoch") or "" for row in csv.DictReader(f)}


def finished(cfg: Config, nodes: int) -> bool:
    """Every node logged the planned last epoch."""
    return all(str(cfg.train.epochs) in _logged(cfg.out_dir / f"node{k}.csv") for k in range(nodes))


def started(cfg: Config) -> bool:
    """The run directory holds something: train.py only continues it with --run.resume."""
    return cfg.out_dir.is_dir() and any(cfg.out_dir.iterdir())


def run_combo(args: list[str], cfg: Config, nproc: int, log: Path) -> int:
    """One run to its end (continued where it has results); its output goes to `log`. The exit status."""
    if started(cfg):
        args = [*args, "--run.resume", "true"]
    launcher = [TRAIN] if cfg.sim.nodes else ["-m", "torch.distributed.run", "--standalone",
                                               "--nproc_per_node", str(nproc), TRAIN]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # n processes share the cores
    with log.open("a") as f:
        f.write(f"$ {' '.join([sys.executable, *launcher, *args])}\n")
        f.flush()
        return subprocess.run([sys.executable, *launcher, *args, "--log.progress", "false"], stdout=f,
                              stderr=subprocess.STDOUT, env=env).returncode


def _last_error(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1][:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2p.sweep", description=__doc__.splitlines()[0],
                                     allow_abbrev=False,
                                     epilog="Any other --section.field value is passed to every combination.")
    parser.add_argument("--config", help="TOML config shared by every combination")
    parser.add_argument("--grid", action="append", default=[], metavar="SECTION.FIELD=V1,V2",
                        help="a field and its values; several --grid make the product")
    parser.add_argument("--name", default="sweep", help="the sweep's directory: runs/<name>")
    parser.add_argument("--dir", type=Path, help="the sweep's directory (default runs/<name>)")
    parser.add_argument("--nproc", type=int, default=4, help="torchrun processes (nodes) per run without --sim.nodes")
    args, overrides = parser.parse_known_args(argv)
    root = args.dir or Path("runs") / args.name
    try:
        if not args.grid:
            raise ConfigError("give at least one --grid section.field=value1,value2")
        if args.nproc < 1:
            raise ConfigError("--nproc must be >= 1")
        combos = plan(args.config, parse_grid(args.grid), overrides, root)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    root.mkdir(parents=True, exist_ok=True)
    failed = []
    for i, (name, combo_args, cfg) in enumerate(combos, 1):
        nodes = cfg.sim.nodes or args.nproc
        head = f"[{i}/{len(combos)}] {name}:"
        if finished(cfg, nodes):
            print(f"{head} skipped ({cfg.train.epochs} epochs logged by every node)", flush=True)
            continue
        print(f"{head} {'resumed' if started(cfg) else 'started'}", flush=True)
        log, t0 = root / f"{name}.log", time.perf_counter()
        try:
            code = run_combo(combo_args, cfg, nodes, log)
        except KeyboardInterrupt:  # the run keeps its checkpoints: the same command continues the sweep
            print(f"{head} interrupted: run the same command again to continue", flush=True)
            return 130
        wall = time.perf_counter() - t0
        if code == 0 and finished(cfg, nodes):
            print(f"{head} done in {wall:.1f} s", flush=True)
        else:
            failed.append(name)
            print(f"{head} FAILED (exit {code}) after {wall:.1f} s: {_last_error(log)} (log: {log})", flush=True)
    try:
        rows, out = report([root])
        print(markdown(rows), end="")
        print(f"wrote {out / 'report'}.csv, .md, .png")
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(combos)} combinations failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
