#!/usr/bin/env bash
# Training on one or several nodes with torchrun's c10d rendezvous. Run the same command on every
# node (by hand, with pdsh/clush, or from a scheduler); the ranks find each other through the
# rendezvous host.
#
#   NNODES=2 GPUS_PER_NODE=8 MASTER_ADDR=node1 launch/torchrun.sh configs/train/kosmos1.yaml runs/kosmos1
#
# Environment:
#   NNODES          number of nodes (default 1)
#   GPUS_PER_NODE   training processes per node: GPUs, or 1-2 on a CPU-only machine (default: the
#                   number of visible GPUs, else 1)
#   MASTER_ADDR     a host every node can reach that runs the rendezvous (default 127.0.0.1)
#   MASTER_PORT     its TCP port (default 29500)
#   RDZV_ID         a name shared by the nodes of one job (default kosmos)
# Every node needs the repository at the same path with the same Python environment (`kosmos` on
# PATH), and the run folder and corpora on a shared filesystem. NCCL is used on GPUs, gloo on CPU.
#
# Pre-emption: SIGUSR1 or SIGTERM sent to the training processes makes them checkpoint at the next
# step and exit 0; run the same command again to resume. (torchrun itself forwards a SIGTERM it
# receives to the training processes, but kills them 30 s later: signal the workers directly when a
# checkpoint takes longer.)
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG RUN_DIR [key=value ...]" >&2
  exit 2
fi
config=$1 run_dir=$2
shift 2

gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
(( gpus > 0 )) || gpus=1

exec torchrun \
  --nnodes "${NNODES:-1}" \
  --nproc_per_node "${GPUS_PER_NODE:-$gpus}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_id "${RDZV_ID:-kosmos}" \
  -m kosmos train --config "$config" --run-dir "$run_dir" "$@"
