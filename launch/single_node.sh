#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes with trainer.device=cpu): torchrun's standalone rendezvous.
#
#   NPROC=8 launch/single_node.sh parallel.ep_size=8 model=small
#   NPROC=2 launch/single_node.sh trainer.device=cpu parallel.ep_size=2      # gloo on a CPU
#
# Every argument is a Hydra override for moe-train. The global batch is data.batch_size * NPROC * trainer.grad_accum.
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec torchrun --standalone --nproc_per_node "$NPROC" -m moe.train "$@"
