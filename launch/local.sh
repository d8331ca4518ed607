#!/usr/bin/env bash
# One host: NPROC nodes (one per GPU with NCCL, else CPU processes with gloo).
#   NPROC=8 CONFIG=configs/quickstart.toml launch/local.sh --algorithm.name pdmm
# Extra arguments go to train.py as config overrides.
set -euo pipefail
# Each torchrun restart needs a fresh rendezvous store, or restarted workers read the dead ones'
# addresses (pytorch/pytorch#135712); train.py refuses --max-restarts without this.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
NPROC=${NPROC:-4}
CONFIG=${CONFIG:-configs/quickstart.toml}
MAX_RESTARTS=${MAX_RESTARTS:-0}
exec torchrun --standalone --nproc_per_node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    train.py --config "$CONFIG" "$@"
