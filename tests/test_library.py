"""The public API (`import p2p`) in a user's own loop, on real gloo processes: torch's conventions (schedulers,
autocast, GradScaler, accumulation, state_dict resume, a wrapped torch optimizer), parity with train.py through
the examples, and one line for every misuse."""

from __future__ import annotations

import importlib.util
import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import p2p
from distributed import ROOT, csv_rows, launch, run_ranks
from p2p.comm import Comm, Env
from p2p.config import CommConfig, ConfigError
from p2p.network import Network
from p2p.topology import Topology, generate

pytestmark = pytest.mark.timeout(240)
N, IN, CLASSES, BATCH = 4, 6, 3, 16


def _model(hidden: int = 8) -> nn.Module:
    torch.manual_seed(0)  # every node starts from the same weights
    return nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES))


def _batch(rank: int, step: int, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Node `rank`'s minibatch of `step`: the same on a resumed run; classes separable by the first features."""
    gen = torch.Generator().manual_seed(1000 * rank + step)
    y = torch.randint(0, CLASSES, (size,), generator=gen)
    x = torch.randn(size, IN, generator=gen)
    x[torch.arange(size), y] += 2.0
    return x, y


def _net(comm) -> Network:
    return Network(comm, generate("ring", comm.world_size), started=True)


def _train(model, opt, rank: int, steps: range, sched=None, accumulate: int = 1) -> list[float]:
    losses = []
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(accumulate), y.chunk(accumulate)):  # several backward passes per step()
            loss = F.cross_entropy(model(xs), ys) / accumulate
            loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(F.cross_entropy(model(x), y).item())
    return losses


# --- checks that need the network: one spawn of N processes ------------------------------------------------------


def _bf16(comm) -> dict:
    """dsgd under CPU bf16 autocast: the parameters, gradients and messages stay fp32; the loss falls."""
    net = _net(comm)
    model = _model()
    opt = p2p.DecentralizedOptimizer(model.parameters(), net, "dsgd", lr=0.2, momentum=0.9)
    losses = []
    for step in range(60):
        x, y = _batch(comm.rank, step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    opt.finish()
    return {"first": losses[0], "last": sum(losses[-5:]) / 5, "out_dtype": str(out.dtype),
            "w_dtype": str(opt.flat.w.dtype), "consensus": p2p.consensus_distance(model, net)}


def _grad_scaler(comm, algorithm: str) -> dict:
    """Node 1's gradients are infinite at step 3: GradScaler skips its local update (allreduce: everyone's), the
    exchanges stay in step on every node, and the run goes on."""
    net = _net(comm)
    model = _model()
    opt = p2p.DecentralizedOptimizer(model.parameters(), net, algorithm, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    unchanged = []
    for step in range(8):
        x, y = _batch(comm.rank, step)
        loss = F.cross_entropy(model(x), y)
        if step == 3 and comm.rank == 1:
            loss = loss * float("inf")
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = opt.flat.w.clone()
        scaler.step(opt)
        scaler.update()
        unchanged.append(torch.equal(before, opt.flat.w))
    opt.finish()
    return {"unchanged": unchanged, "scale": scaler.get_scale(), "round": opt.transport.round,
            "completed": dict(opt.transport.completed), "finite": bool(torch.isfinite(opt.flat.w).all())}


def _accumulation(comm) -> dict:
    """Two backward passes of half batches per step() make the steps of one full batch."""
    net = _net(comm)
    whole, halves = _model(), _model()
    opt_whole = p2p.DecentralizedOptimizer(whole.parameters(), net, "pdmm", lr=0.1, momentum=0.9)
    opt_halves = p2p.DecentralizedOptimizer(halves.parameters(), net, "pdmm", lr=0.1, momentum=0.9)
    _train(whole, opt_whole, comm.rank, range(10))
    _train(halves, opt_halves, comm.rank, range(10), accumulate=2)
    return {"diff": (opt_whole.flat.w - opt_halves.flat.w).abs().max().item(),
            "moved": (opt_whole.flat.w - torch.cat([p.reshape(-1) for p in _model().parameters()])).abs().max().item()}


def _wrapped_adam(comm) -> dict:
    """dsgd wrapping the user's own torch.optim.Adam (two param groups, a StepLR on the decentralized optimizer)
    equals dsgd with optimizer="adam" when the groups share one lr; the scheduler drives the inner groups."""
    net = _net(comm)
    builtin, wrapped = _model(), _model()
    opt_builtin = p2p.DecentralizedOptimizer(builtin.parameters(), net, "dsgd", optimizer="adam", lr=0.05)
    groups = [{"params": [p for n, p in wrapped.named_parameters() if n.endswith("weight")]},
              {"params": [p for n, p in wrapped.named_parameters() if n.endswith("bias")]}]
    inner = torch.optim.Adam(groups, lr=0.05)
    opt_wrapped = p2p.DecentralizedOptimizer(wrapped.parameters(), net, "dsgd", optimizer=inner)
    sched_builtin = torch.optim.lr_scheduler.StepLR(opt_builtin, step_size=6, gamma=0.5)
    sched_wrapped = torch.optim.lr_scheduler.StepLR(opt_wrapped, step_size=6, gamma=0.5)
    losses = _train(builtin, opt_builtin, comm.rank, range(16), sched_builtin)
    _train(wrapped, opt_wrapped, comm.rank, range(16), sched_wrapped)
    return {"diff": (opt_builtin.flat.w - opt_wrapped.flat.w).abs().max().item(), "losses": losses,
            "inner_lrs": [g["lr"] for g in inner.param_groups], "builtin_lr": opt_builtin.param_groups[0]["lr"]}


def _different_shapes(comm) -> str:
    model = _model(hidden=8 if comm.rank != 2 else 9)
    try:
        p2p.DecentralizedOptimizer(model.parameters(), _net(comm), "dsgd")
    except ConfigError as e:
        return str(e)
    return ""


def _network_checks(comm) -> dict:
    return {"bf16": _bf16(comm), "scaler_pdmm": _grad_scaler(comm, "pdmm"),
            "scaler_allreduce": _grad_scaler(comm, "allreduce"), "accumulation": _accumulation(comm),
            "wrapped": _wrapped_adam(comm), "shapes": _different_shapes(comm)}


@pytest.fixture(scope="module")
def checks() -> list[dict]:
    return run_ranks(_network_checks, N, timeout=200)


def test_bf16_autocast_learns(checks):
    for node in checks:
        r = node["bf16"]
        assert r["out_dtype"] == "torch.bfloat16" and r["w_dtype"] == "torch.float32"
        assert r["last"] < 0.5 * r["first"], r
        assert r["consensus"] < 0.1, r


def test_grad_scaler_skips_the_update_but_not_the_exchange(checks):
    pdmm = [node["scaler_pdmm"] for node in checks]
    # pdmm's exchange changes duals only, so a skipped local update leaves w exactly as it was
    assert pdmm[1]["unchanged"] == [False, False, False, True, False, False, False, False]
    assert all(not any(r["unchanged"]) for k, r in enumerate(pdmm) if k != 1)
    assert pdmm[1]["scale"] == 2.0 ** 7 and pdmm[0]["scale"] == 2.0 ** 8
    allreduce = [node["scaler_allreduce"] for node in checks]
    for r in allreduce:  # allreduce averages the gradients first: the infinity reaches every node, all skip
        assert r["unchanged"] == [False, False, False, True, False, False, False, False]
    for r in pdmm + allreduce:  # every node made every exchange: nobody is a round behind, nothing half-sent
        assert r["round"] == 8 and r["finite"]
    assert all(set(r["completed"].values()) == {8} for r in pdmm)


def test_gradient_accumulation_equals_the_whole_batch(checks):
    for node in checks:
        r = node["accumulation"]
        assert r["diff"] < 1e-6 and r["moved"] > 1e-2, r


def test_a_wrapped_torch_optimizer_and_a_scheduler(checks):
    for node in checks:
        r = node["wrapped"]
        assert r["diff"] < 1e-6, r
        assert r["inner_lrs"] == [0.05 * 0.5 ** 2] * 2 and r["builtin_lr"] == 0.05 * 0.5 ** 2
        assert sum(r["losses"][-4:]) < 0.8 * sum(r["losses"][:4]), r["losses"]


def test_different_parameter_shapes_on_different_ranks_is_one_line(checks):
    for node in checks:
        assert "parameters" in node["shapes"] and "node 2" in node["shapes"] and "\n" not in node["shapes"]


# --- a user's checkpoint, killed and resumed ----------------------------------------------------------------------


def _resumable(comm, mode: str, steps: range, load: str, save: str) -> list[float]:
    net = _net(comm)
    model = _model()
    opt = p2p.DecentralizedOptimizer(model.parameters(), net, "pdmm", mode=mode, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    if load:
        state = torch.load(f"{load}{comm.rank}.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    losses = _train(model, opt, comm.rank, steps, sched)
    if save:
        buf = io.BytesIO()  # the user's own checkpoint: model, optimizer, scheduler
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
        Path(f"{save}{comm.rank}.pt").write_bytes(buf.getvalue())
    return losses


@pytest.mark.parametrize("mode", ["sync", "overlap"])
def test_a_user_checkpoint_resumes_exactly(tmp_path, mode):
    prefix = str(tmp_path / "node")
    whole = run_ranks(_resumable, N, mode, range(14), "", "")
    first = run_ranks(_resumable, N, mode, range(6), "", prefix)  # these processes end here
    second = run_ranks(_resumable, N, mode, range(6, 14), prefix, "")
    for k in range(N):
        assert first[k] + second[k] == whole[k], k  # bit for bit
    assert whole[0][-1] < whole[0][0]


# --- misuse is one line, before any communication (in-process: a network of one that never joins) --------------


def _lonely_net() -> Network:
    return Network(Comm(Env(0, 1, 0, 1), torch.device("cpu"), "gloo", CommConfig()), Topology(1, ()))


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("make,match", [
    (lambda m, net: p2p.DecentralizedOptimizer(m.parameters(), net, "allreduce", mode="async"),
     r"^mode async does not fit algorithm allreduce"),
    (lambda m, net: p2p.DecentralizedOptimizer(m.parameters(), net, "pdmm", lrr=0.1), r"unknown keyword 'lrr'.*'lr'"),
    (lambda m, net: p2p.DecentralizedOptimizer(m.parameters(), net, "dsgd", lr=-1.0), r"^lr must be > 0"),
    (lambda m, net: p2p.DecentralizedOptimizer(m.parameters(), net, "dsgd", wire_dtype="fp16"),
     r"^wire_dtype: unknown value 'fp16'.*choose one of fp32, bf16"),
    (lambda m, net: p2p.DecentralizedOptimizer(m.parameters(), net, "pdmm", timeout_s=3), r"p2p.init's"),
    (lambda m, net: p2p.DecentralizedOptimizer(m.parameters(), net, "pdmm",
                                               optimizer=torch.optim.RAdam(m.parameters())), r"pdmm's local step"),
    (lambda m, net: p2p.DecentralizedOptimizer(m.parameters(), net, "dsgd",
                                               optimizer=torch.optim.RAdam(list(m.parameters())[:2])),
     r"exactly the trainable parameters"),
    (lambda m, net: p2p.DecentralizedOptimizer([{"params": [m[0].weight]}, {"params": [m[0].bias]}], net),
     r"one parameter group"),
    (lambda m, net: p2p.DecentralizedOptimizer(m[0].double().parameters(), net), None),  # one dtype: fine
    (lambda m, net: p2p.DecentralizedOptimizer([m[0].weight, m[2].weight.double()], net), r"one dtype and device"),
    (lambda m, net: p2p.DecentralizedOptimizer(m.to("meta").parameters(), net), r"are on meta but this node's"),
    (lambda m, net: p2p.DecentralizedOptimizer([], net), r"no trainable parameters"),
])
def test_misuse_is_one_line(make, match):
    net = _lonely_net()
    if match is None:
        make(_model(), net)
        return
    with pytest.raises(ConfigError) as e:
        make(_model(), net)
    assert re.search(match, _one_line(e)), str(e.value)


def test_step_after_finish_and_a_topology_of_another_size():
    model = _model()
    opt = p2p.DecentralizedOptimizer(model.parameters(), _lonely_net(), "local", lr=0.1)
    _train(model, opt, 0, range(2))
    opt.finish()
    with pytest.raises(RuntimeError) as e:
        opt.step()
    assert "after finish()" in _one_line(e)
    comm = Comm(Env(0, 1, 0, 1), torch.device("cpu"), "gloo", CommConfig())
    with pytest.raises(ConfigError) as e:
        Network(comm, generate("ring", 4))
    assert "has 4 nodes but the world size is 1" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        p2p.init(topology=str(ROOT / "topologies/ring8.json"))  # a plain process is a network of one
    assert "has 8 nodes but the world size is 1" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        p2p.init(topology="rnig")
    assert "neither a file nor a generator" in _one_line(e)


# --- the examples, as users run them ------------------------------------------------------------------------------


def _example_losses(stdout: str) -> dict[int, list[float]]:
    losses: dict[int, list[float]] = {}
    for rank, epoch, loss in re.findall(r"node (\d+) epoch (\d+) train loss ([\d.]+)", stdout):
        losses.setdefault(int(rank), []).append(float(loss))
    return losses


@pytest.mark.parametrize("algorithm", ["dsgd", "pdmm"])
def test_own_loop_equals_train_py(tmp_path, algorithm):
    """examples/own_loop.py (the user's loop, StepLR included) and train.py with the same settings: the same
    per-node losses, so the library and the trainer are one thing."""
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "4"]
    example = launch([*torchrun, "examples/own_loop.py", "--epochs", "3", "--algorithm", algorithm], timeout=180)
    assert example.returncode == 0, example.stderr[-2000:]
    trainer = launch([*torchrun, "train.py", "--config", "configs/quickstart.toml", "--train.epochs", "3",
                      "--algorithm.name", algorithm, "--train.scheduler", "step", "--train.step_size", "100",
                      "--run.dir", str(tmp_path / "run"), "--log.progress", "false", "--log.plots", "false"],
                     timeout=180)
    assert trainer.returncode == 0, trainer.stderr[-2000:]
    ours = _example_losses(example.stdout)
    for k in range(4):
        theirs = [row["train_loss"] for row in csv_rows(tmp_path / "run" / f"node{k}.csv")]
        assert len(ours[k]) == len(theirs) == 3
        assert max(abs(a - b) for a, b in zip(ours[k], theirs)) < 1e-6, (k, ours[k], theirs)
    averaged = re.findall(r"averaged model ([\d.]+)", example.stdout)
    assert len(set(averaged)) == 1
    assert abs(float(averaged[0]) - csv_rows(tmp_path / "run" / "node0.csv")[-1]["avg_test_acc"]) < 1e-4


def test_seed_loop_learns_in_async():
    result = launch(["torchrun", "--standalone", "--nproc_per_node", "4", "examples/seed_loop.py"], timeout=200)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.findall(r"node \d: last loss [\d.]+, test accuracy ([\d.]+), averaged model ([\d.]+)", result.stdout)
    assert len(found) == 4
    assert all(float(own) > 0.5 for own, _ in found) and float(found[0][1]) > 0.6, found  # 10 classes: chance 0.1


@pytest.mark.parametrize("launcher", ["torchrun", "sim"])
def test_your_model_and_data_in_train_py(tmp_path, launcher):
    args = ["train.py", "--config", "configs/quickstart.toml", "--model.name", "examples.my_model.nets:build",
            "--data.name", "examples.my_model.data:load", "--train.epochs", "4", "--run.dir", str(tmp_path / "run"),
            "--log.progress", "false", "--log.plots", "false"]
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "4", *args] if launcher == "torchrun" else \
        ["python", *args, "--sim.nodes", "4"]
    result = launch(cmd, timeout=200)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [csv_rows(tmp_path / "run" / f"node{k}.csv") for k in range(4)]
    assert all(r[-1]["train_loss"] < 0.6 * r[0]["train_loss"] for r in rows)
    assert rows[0][-1]["avg_test_acc"] > 0.9 and rows[0][-1]["consensus_dist"] < 0.1


class BatchNormNet(nn.Module):
    """For the simulator's refusal: BatchNorm updates running statistics in place."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)


def bn_model(cfg, in_shape, num_classes):
    return BatchNormNet()


def not_a_model(cfg, in_shape, num_classes):
    return "a string"


def bad_labels(cfg):
    from torch.utils.data import TensorDataset
    return TensorDataset(torch.randn(20, 3), torch.rand(20)), TensorDataset(torch.randn(5, 3), torch.rand(5))


@pytest.mark.parametrize("argv,match", [
    (["--model.name", "no_such_pkg.nets:build"], r"no module named 'no_such_pkg'"),
    (["--model.name", "test_library:nothing"], r"has no attribute 'nothing'"),
    (["--model.name", "test_library:N"], r"not a callable"),
    (["--model.name", "test_library:not_a_model"], r"not a torch.nn.Module"),
    (["--model.name", "my model"], r"unknown value"),
    (["--model.name", "pkg:build()"], r"an import path is module:callable"),
    (["--data.name", "test_library:bad_labels", "--model.name", "logistic"], r"must be class indices"),
    (["--model.name", "test_library:bn_model", "--sim.nodes", "4"], r"BatchNorm layers .* use GroupNorm"),
])
def test_a_bad_model_or_data_path_is_one_line(tmp_path, capsys, argv, match):
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    code = train.main(["--config", str(ROOT / "configs/quickstart.toml"), "--run.dir", str(tmp_path / "run"),
                       "--train.epochs", "1", "--log.progress", "false", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(match, err[0]), err


def test_model_zero_grad_and_replaced_grads_are_repaired():
    """A user's model.zero_grad() (set_to_none) or a replaced .grad: step() still reads the new gradients."""
    ws = []
    for use_model_zero_grad in (False, True):
        model = _model()
        opt = p2p.DecentralizedOptimizer(model.parameters(), _lonely_net(), "local", lr=0.1, momentum=0.9)
        for step in range(3):
            x, y = _batch(0, step)
            model.zero_grad() if use_model_zero_grad else opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        ws.append(opt.flat.w.clone())
    assert torch.equal(ws[0], ws[1]) and not torch.equal(ws[0], torch.cat([p.reshape(-1) for p in _model().parameters()]))
