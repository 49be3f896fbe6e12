#!/usr/bin/env bash
# Several nodes: run this same command on every node (rendezvous through a c10d store on the first node).
#
#   # on each of 2 nodes (8 GPUs each); RDZV_HOST is the first node's address, reachable from all nodes
#   NNODES=2 NPROC=8 RDZV_HOST=node001 RDZV_ID=run42 launch/multi_node.sh parallel.ep_size=8 model=small
#
# ep_size should not exceed NPROC: an EP group then stays inside one node (NVLink), and only the data-parallel
# all-reduce crosses nodes. torchrun stops every worker on every node when one fails.
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_HOST:?set RDZV_HOST to the host name or address of the first node}"
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
RDZV_PORT="${RDZV_PORT:-29500}"
RDZV_ID="${RDZV_ID:-moe-$(date +%s)}"   # must be the same string on every node: set it explicitly
exec torchrun \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$RDZV_ID" \
  --max_restarts 0 \
  -m moe.train "$@"
