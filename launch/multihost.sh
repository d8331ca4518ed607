#!/usr/bin/env bash
# Several hosts: run this same command on every host (same RDZV_ENDPOINT and RDZV_ID).
#   RDZV_ENDPOINT=10.0.0.1:29500 NNODES=2 NPROC=4 launch/multihost.sh --run.name big
# Ranks are numbered host by host; the topology file needs NNODES*NPROC nodes.
# Always --run.resume: relaunching the same command continues the run from the newest checkpoint every
# node has; on a new directory it starts at epoch 0, and it never trains over results it cannot continue.
# LOCAL_ADDR: this host's address as the other hosts reach it (default: its hostname); on hosts with
# several interfaces also set GLOO_SOCKET_IFNAME (gloo) or NCCL_SOCKET_IFNAME (NCCL) to that interface.
# torch.distributed has no authentication: keep RDZV_ENDPOINT on a trusted network.
set -euo pipefail
# Each torchrun restart needs a fresh rendezvous store, or restarted workers read the dead ones'
# addresses (pytorch/pytorch#135712); train.py refuses --max-restarts without this.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
NNODES=${NNODES:-2}
NPROC=${NPROC:-4}
RDZV_ENDPOINT=${RDZV_ENDPOINT:?set RDZV_ENDPOINT=HOST:PORT of one of the hosts}
RDZV_ID=${RDZV_ID:-p2p}
MAX_RESTARTS=${MAX_RESTARTS:-3}
CONFIG=${CONFIG:-configs/quickstart.toml}
ADDR=()
if [ -n "${LOCAL_ADDR:-}" ]; then
    ADDR=(--local-addr "$LOCAL_ADDR")
    # torchrun serves the rendezvous where RDZV_ENDPOINT is one of the hostname's addresses; another
    # interface's address must say that it is this host
    if [ "$LOCAL_ADDR" = "${RDZV_ENDPOINT%:*}" ]; then
        ADDR+=(--rdzv-conf is_host=1)
    fi
fi
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" "${ADDR[@]}" \
    --max-restarts "$MAX_RESTARTS" \
    train.py --config "$CONFIG" --run.resume "$@"
