"""`python -m p2p.report` and `python -m p2p.sweep` on real tiny runs: a simulated sweep that resumes an
interrupted combination and then skips both, a torchrun sweep of 2 nodes, and the report's numbers against
the nodes' CSVs; bad input is one line."""

import csv
import shutil
import sys
from pathlib import Path

import pytest

from distributed import csv_rows, launch
from p2p import report

pytestmark = pytest.mark.timeout(300)
QUICK = ["--config", "configs/quickstart.toml", "--data.samples_per_epoch", "64", "--log.tensorboard", "false",
         "--log.plots", "false"]
SWEEP = [sys.executable, "-m", "p2p.sweep", *QUICK, "--train.epochs", "2"]


def _table(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {r["run"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root/sim: dsgd and pdmm simulated (4 nodes, 2 epochs), pdmm interrupted after epoch 1 and resumed by the
    sweep; root/tr: dsgd under torchrun (2 nodes); root/unfinished: a copy of the interrupted pdmm run."""
    root = tmp_path_factory.mktemp("runs")
    pdmm = root / "sim" / "algorithm.name=pdmm"
    # a run stopped after epoch 1 of 2: on disk, a 1-epoch run whose config plans 2
    done = launch([sys.executable, "train.py", *QUICK, "--sim.nodes", "4", "--algorithm.name", "pdmm",
                   "--train.epochs", "1", "--run.dir", str(pdmm), "--log.progress", "false"], 200)
    assert done.returncode == 0, done.stderr[-3000:]
    config = pdmm / "config.toml"
    config.write_text(config.read_text().replace("epochs = 1\n", "epochs = 2\n"))
    shutil.copytree(pdmm, root / "unfinished", ignore=shutil.ignore_patterns("ckpt"))
    epoch1 = [csv_rows(pdmm / f"node{k}.csv")[0] for k in range(4)]

    first = launch([*SWEEP, "--grid", "algorithm.name=dsgd,pdmm", "--sim.nodes", "4", "--dir", str(root / "sim")], 250)
    again = launch([*SWEEP, "--grid", "algorithm.name=dsgd,pdmm", "--sim.nodes", "4", "--dir", str(root / "sim")], 100)
    torchrun = launch([*SWEEP, "--grid", "algorithm.name=dsgd", "--topology.name", "ring", "--nproc", "2",
                       "--dir", str(root / "tr")], 250)
    return {"root": root, "first": first, "again": again, "torchrun": torchrun, "epoch1": epoch1}


def test_sweep_resumes_an_unfinished_combination_then_skips_finished_ones(runs):
    first, again, sim = runs["first"], runs["again"], runs["root"] / "sim"
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stdout.splitlines()
    assert lines[0] == "[1/2] algorithm.name=dsgd: started"
    assert lines[1].startswith("[1/2] algorithm.name=dsgd: done in ") and lines[1].endswith(" s")
    assert lines[2] == "[2/2] algorithm.name=pdmm: resumed"
    assert lines[3].startswith("[2/2] algorithm.name=pdmm: done in ")
    for k in range(4):  # continued, not restarted: epoch 1 is the interrupted run's own row
        rows = csv_rows(sim / "algorithm.name=pdmm" / f"node{k}.csv")
        assert [r["epoch"] for r in rows] == [1, 2] and rows[0] == runs["epoch1"][k]
        assert rows[1]["bytes_sent"] == 2 * rows[0]["bytes_sent"] > 0
    assert "resumed from epoch 1" in (sim / "algorithm.name=pdmm.log").read_text()

    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.splitlines()[:2] == ["[1/2] algorithm.name=dsgd: skipped (2 epochs logged by every node)",
                                             "[2/2] algorithm.name=pdmm: skipped (2 epochs logged by every node)"]
    # and each sweep ended with the report of both runs
    assert set(_table(sim / "report.csv")) == {"algorithm.name=dsgd", "algorithm.name=pdmm"}
    assert (sim / "report.png").stat().st_size > 0


def _expected(run_dir: Path) -> dict[str, float]:
    """The report's numbers, straight from the nodes' last CSV rows."""
    last = [csv_rows(p)[-1] for p in sorted(run_dir.glob("node*.csv"))]
    accs = [r["test_acc"] for r in last]
    return {"nodes": len(last), "test_acc_mean": sum(accs) / len(accs), "test_acc_min": min(accs),
            "test_acc_max": max(accs), "avg_test_acc": last[0]["avg_test_acc"],
            "consensus_dist": last[0]["consensus_dist"],
            "mb_sent": sum(r["bytes_sent"] for r in last) / len(last) / 1e6, "wall_s": max(r["wall_s"] for r in last)}


def test_report_of_a_simulated_and_a_torchrun_run_equals_their_csvs(runs, tmp_path):
    assert runs["torchrun"].returncode == 0, runs["torchrun"].stderr[-3000:]
    sim, tr = runs["root"] / "sim" / "algorithm.name=dsgd", runs["root"] / "tr" / "algorithm.name=dsgd"
    done = launch([sys.executable, "-m", "p2p.report", str(sim), str(tr), "--out", str(tmp_path), "--name", "both"],
                  100)
    assert done.returncode == 0, done.stderr[-3000:]
    table = _table(tmp_path / "both.csv")
    assert set(table) == {"sim/algorithm.name=dsgd", "tr/algorithm.name=dsgd"}  # named below the common parent
    for name, run_dir, simulated in (("sim/algorithm.name=dsgd", sim, "True"), ("tr/algorithm.name=dsgd", tr, "False")):
        row, expected = table[name], _expected(run_dir)
        assert row["algorithm"] == "dsgd" and row["mode"] == "sync" and row["simulated"] == simulated
        assert row["epochs_done"] == row["epochs_planned"] == "2"
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), (name, key)
        assert 0 < float(row["mb_sent"]) and 0 <= float(row["test_acc_min"]) <= float(row["test_acc_max"]) <= 1
    assert table["sim/algorithm.name=dsgd"]["nodes"] == "4" and table["tr/algorithm.name=dsgd"]["nodes"] == "2"
    assert table["sim/algorithm.name=dsgd"]["topology"] == "ring4"
    assert table["tr/algorithm.name=dsgd"]["topology"] == "ring"
    md = (tmp_path / "both.md").read_text()
    assert md == done.stdout.split("wrote ")[0]  # printed as written
    assert "| tr/algorithm.name=dsgd | dsgd | ring | sync | 2 | 2/2 |" in md and "| 4 sim | 2/2 |" in md
    assert (tmp_path / "both.png").stat().st_size > 0


@pytest.mark.timeout(60)
def test_an_unfinished_run_is_marked(runs, tmp_path):
    rows, out = report.report([runs["root"] / "unfinished"], tmp_path, plots=False)
    (row,) = rows
    assert out == tmp_path and row["run"] == "unfinished" and row["algorithm"] == "pdmm"
    assert (row["epochs_done"], row["epochs_planned"]) == (1, 2)
    assert row["test_acc_mean"] == pytest.approx(sum(r["test_acc"] for r in runs["epoch1"]) / 4, rel=1e-12)
    assert "| 1/2 unfinished |" in (tmp_path / "report.md").read_text()


@pytest.mark.timeout(60)
def test_a_directory_of_runs_is_found_at_any_depth(runs, tmp_path):
    rows, out = report.report([runs["root"]], tmp_path, plots=False)
    assert [r["run"] for r in rows] == ["sim/algorithm.name=dsgd", "sim/algorithm.name=pdmm", "tr/algorithm.name=dsgd",
                                        "unfinished"]
    assert [r["epochs_done"] for r in rows] == [2, 2, 2, 1]


@pytest.mark.timeout(60)
def test_empty_network_columns_take_the_newest_value_and_network_csv_wins(runs, tmp_path):
    """An async run that evaluates the network only at some epochs, and network.csv written after training."""
    run_dir = tmp_path / "async"
    shutil.copytree(runs["root"] / "sim" / "algorithm.name=dsgd", run_dir, ignore=shutil.ignore_patterns("ckpt"))
    first = csv_rows(run_dir / "node0.csv")[0]
    accs = [csv_rows(p)[0]["test_acc"] for p in sorted(run_dir.glob("node*.csv"))]
    for path in run_dir.glob("node*.csv"):  # epoch 2 without the network's columns, nor the nodes' test
        with path.open() as f:
            rows = list(csv.DictReader(f))
        rows[1].update(consensus_dist="", avg_test_acc="", avg_test_loss="", test_acc="", test_loss="")
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    (row,), _ = report.report([run_dir], plots=False)
    assert row["avg_test_acc"] == first["avg_test_acc"] and row["avg_test_acc_epoch"] == 1
    assert row["consensus_dist"] == first["consensus_dist"]
    assert row["test_acc_mean"] == pytest.approx(sum(accs) / 4, rel=1e-12) and row["test_acc_mean_epoch"] == 1
    assert f"{first['avg_test_acc']:.3f} (epoch 1)" in (run_dir / "report.md").read_text()

    (run_dir / "network.csv").write_text("epoch,consensus_dist,avg_test_loss,avg_test_acc\n2,0.25,1.5,0.75\n")
    (row,), _ = report.report([run_dir], plots=True)
    assert (row["avg_test_acc"], row["avg_test_acc_epoch"], row["consensus_dist"]) == (0.75, 2, 0.25)
    assert (run_dir / "report.png").stat().st_size > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cmd, message", [
    (["p2p.sweep", "--grid", "algorithm.nam=dsgd,pdmm"],
     "error: --grid algorithm.nam=dsgd: unknown config key 'algorithm.nam' in the command line (did you mean 'name'?)"),
    (["p2p.sweep", "--grid", "algorithm.name=dsgd,pdmmm"],
     "error: --algorithm.name: unknown value 'pdmmm' (did you mean"),
    (["p2p.sweep", "--grid", "algorithm.name=dsgd", "--train.epoch", "2"],
     "error: unknown config key 'train.epoch' in the command line (did you mean 'epochs'?)"),
    (["p2p.report", "EMPTY"], "error: EMPTY holds no run (no directory with config.toml and node*.csv below it)"),
    (["p2p.report", "EMPTY/missing"], "error: EMPTY/missing does not exist"),
])
def test_bad_input_is_one_line_and_starts_nothing(cmd, message, tmp_path):
    cmd = [c.replace("EMPTY", str(tmp_path)) for c in cmd]
    done = launch([sys.executable, "-m", *cmd, *(["--dir", str(tmp_path / "sw")] if "p2p.sweep" in cmd else [])], 100)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith(message.replace("EMPTY", str(tmp_path)))
    assert not (tmp_path / "sw").exists()


@pytest.mark.timeout(150)
def test_a_failing_combination_is_reported_and_the_sweep_exits_non_zero(tmp_path):
    """An 8-node topology file on 4 simulated nodes passes config validation but fails at start-up."""
    done = launch([*SWEEP, "--grid", "topology.path=topologies/ring8.json", "--sim.nodes", "4",
                   "--dir", str(tmp_path / "sw")], 120)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "[1/1] topology.path=ring8: started"
    assert lines[1].startswith("[1/1] topology.path=ring8: FAILED (exit 2) after ")
    assert "error: topology topologies/ring8.json has 8 nodes but the world size is 4" in lines[1]
    assert f"(log: {tmp_path / 'sw' / 'topology.path=ring8.log'})" in lines[1]
    assert "1 of 1 combinations failed: topology.path=ring8" in done.stderr
