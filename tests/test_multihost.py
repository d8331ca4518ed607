"""Several hosts for real: torchrun's c10d rendezvous between separate launches, and two Linux network
namespaces joined by a veth pair standing for two machines, each running `launch/multihost.sh`.

The namespaces live only as long as their test, are named after this process, and hold the only
interfaces with the addresses 10.77.0.1 and 10.77.0.2: no traffic leaves them. Creating them needs
root and iproute2, so elsewhere that test is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2p.comm import free_port
from p2p.config import config_lines, load_config
from p2p.topology import build_topology
from test_faults import ENV, QUICK, TORCHRUN, epochs, kill_all, start, wait_for, worker_pids

IP = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
ADDRS = ("10.77.0.1", "10.77.0.2")


def test_the_compared_config_holds_the_topology_files_content(tmp_path):
    """Two hosts with a topology file of the same path but other edges must differ; other spellings of one graph not."""
    path = tmp_path / "topo.json"
    lines = []
    for text in ('{"n": 4, "edges": [[0, 1], [1, 2], [2, 3], [0, 3]]}', '{"n": 4, "edges": [[0, 1], [1, 2], [2, 3]]}',
                 '{"edges": [[3, 0], [2, 3], [1, 2], [0, 1]], "n": 4}'):
        path.write_text(text)
        cfg = load_config(["--topology.path", str(path)])
        lines.append(config_lines(cfg) + [build_topology(cfg.topology, 4).fingerprint()])
    assert lines[0] != lines[1] and lines[0] == lines[2]
    assert [ln for ln in lines[1] if ln not in lines[0]][0].startswith("topology graph = 4 nodes, 3 edges, sha256 ")
    cfg = load_config(["--data.root", "/elsewhere", "--data.workers", "4"])  # host-local fields are not compared
    assert config_lines(cfg) == config_lines(load_config([]))


@pytest.mark.timeout(240)
def test_hosts_with_different_configs_stop_naming_the_field(tmp_path):
    """Two `torchrun --nnodes 2` launches, as on two hosts, one with another --algorithm.lr: both stop at once."""
    endpoint, run = f"127.0.0.1:{free_port()}", tmp_path / "run"
    procs = [start([*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    endpoint, "--rdzv-id", "mismatch", *QUICK, "--run.dir", str(run), "--topology.path=",
                    "--algorithm.lr", lr], tmp_path / f"host{i}.log")
             for i, lr in enumerate(("0.1", "0.2"))]
    try:
        codes = [p.wait(timeout=200) for p in procs]
    finally:
        kill_all(procs)
    assert all(c != 0 for c in codes), codes
    for i in range(2):
        text = (tmp_path / f"host{i}.log").read_text()
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, text[-3000:]
        m = re.fullmatch(r"error: nodes were launched with different configs: algorithm.lr is (\S+) on node 0 but "
                         r"(\S+) on node 1; launch every host with the same command and files", errors[0])
        assert m and {m[1], m[2]} == {"0.1", "0.2"}, errors
        assert re.search(r"exitcode\s*: 2 ", text), text[-3000:]
    assert not run.exists()  # decided before anything was written


@pytest.fixture
def hosts():
    """Two network namespaces `p2p<pid>a`, `p2p<pid>b`, joined by a veth pair of the same names with the
    addresses ADDRS; removed whatever happens to the test."""
    if os.geteuid() != 0 or IP is None:
        pytest.skip("two hosts as network namespaces need root and iproute2's `ip`")
    names = [f"p2p{os.getpid()}{h}" for h in "ab"]

    def ip(*args: str) -> None:
        subprocess.run([IP, *args], check=True, capture_output=True, text=True, timeout=30)

    try:
        try:
            for ns in names:
                ip("netns", "add", ns)
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
        ip("link", "add", names[0], "type", "veth", "peer", "name", names[1])
        for ns, addr in zip(names, ADDRS):
            ip("link", "set", ns, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns)
            ip("-n", ns, "link", "set", ns, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:  # deleting a namespace deletes the veth end inside it, and so the pair
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run([IP, "link", "del", names[0]], capture_output=True, timeout=30)  # if it never moved


def multihost(ns: str, addr: str, rdzv_id: str, args: list[str], log: Path) -> subprocess.Popen:
    """`launch/multihost.sh` on the "host" `ns`: 2 nodes, the rendezvous on the first host's address."""
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "NNODES": "2", "NPROC": "2",
           "RDZV_ENDPOINT": f"{ADDRS[0]}:29400", "RDZV_ID": rdzv_id, "MAX_RESTARTS": "0", "LOCAL_ADDR": addr,
           "GLOO_SOCKET_IFNAME": ns}
    return start([IP, "netns", "exec", ns, "launch/multihost.sh", *args], log, env)


def veth_bytes(ns: str) -> int:
    out = subprocess.run([IP, "-n", ns, "-j", "-s", "link", "show", "dev", ns], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return json.loads(out)[0]["stats64"]["tx"]["bytes"]


@pytest.mark.timeout(300)
def test_two_hosts_train_and_a_relaunch_continues_after_one_dies(hosts, tmp_path):
    """The quickstart's 4-node ring over 2 "hosts" of 2 nodes. Host b's workers are killed after every node has
    checkpointed epoch 1; both hosts are relaunched with the same command (multihost.sh passes --run.resume)
    and train to the end from the last common checkpoint, each epoch once in every CSV."""
    run, epochs_total = tmp_path / "run", 4
    args = ["--run.dir", str(run), "--train.epochs", str(epochs_total), "--data.samples_per_epoch", "3200",
            "--log.progress", "false", "--log.plots", "false", "--comm.timeout_s", "30"]
    t0 = time.monotonic()
    procs = [multihost(ns, addr, "first", args, tmp_path / f"first_{ns[-1]}.log") for ns, addr in zip(hosts, ADDRS)]
    try:
        wait_for(lambda: all((run / "ckpt" / f"node{r}_epoch1.pt").exists() for r in range(4)), procs, 120,
                 "epoch 1 checkpoints on every node")
        workers = worker_pids(procs[1])
        assert len(workers) == 2, workers
        for pid in workers.values():
            os.kill(pid, signal.SIGKILL)  # host b's workers only: its agent and host a carry on until they fail
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        kill_all(procs)
    assert all(c != 0 for c in codes), codes
    logged = [epochs(run, r) for r in range(4)]
    assert all(e and e[-1] < epochs_total for e in logged), logged  # killed mid-run
    saved = [{int(p.stem.split("epoch")[1]) for p in (run / "ckpt").glob(f"node{r}_epoch*.pt")} for r in range(4)]
    common = max(set.intersection(*saved))

    sent_before = veth_bytes(hosts[1])
    procs = [multihost(ns, addr, "again", args, tmp_path / f"again_{ns[-1]}.log") for ns, addr in zip(hosts, ADDRS)]
    try:
        codes = [p.wait(timeout=150) for p in procs]
    finally:
        kill_all(procs)
    seconds = time.monotonic() - t0
    logs = "".join((tmp_path / f"again_{ns[-1]}.log").read_text() for ns in hosts)
    assert codes == [0, 0], logs[-4000:]
    assert f"resumed from epoch {common} " in logs and "4 nodes, dsgd on cpu (gloo)" in logs, logs[-4000:]
    for r in range(4):
        assert epochs(run, r) == list(range(1, epochs_total + 1)), (r, epochs(run, r))
    assert veth_bytes(hosts[1]) - sent_before > 1e6  # the ring's edges 1-2 and 3-0 crossed the veth pair
    print(f"\nnamespace test: {seconds:.1f}s for both launches; killed with epochs {logged} logged, "
          f"relaunch resumed from epoch {common}")
