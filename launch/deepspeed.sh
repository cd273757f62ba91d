#!/usr/bin/env bash
# Training on the nodes of a hostfile with the DeepSpeed launcher, started once from one node.
#
#   launch/deepspeed.sh launch/hostfile.example configs/train/kosmos1.yaml runs/kosmos1
#
# The hostfile lists one node per line with its GPU count: `node1 slots=8` (see hostfile.example).
# Environment:
#   MASTER_ADDR   address of the first node as the others see it (default: first host of the hostfile)
#   MASTER_PORT   a free TCP port there (default 29500)
# The launcher reaches every node with passwordless ssh (pdsh) and starts the same command there,
# so every node needs the repository at the same path (this script's working directory), the same
# Python environment, and the run folder and corpora on a shared filesystem. Variables the remote
# processes need (NCCL_*, PYTHONPATH, ...) go into a `.deepspeed_env` file (KEY=VALUE lines) in the
# working directory or $HOME; DeepSpeed exports them on every node.
#
# Pre-emption: SIGUSR1 or SIGTERM sent to the training processes makes them checkpoint at the next
# step and exit 0; run the same command again to resume.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 HOSTFILE CONFIG RUN_DIR [key=value ...]" >&2
  exit 2
fi
hostfile=$1 config=$2 run_dir=$3
shift 3
first_host=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")

exec deepspeed \
  --hostfile "$hostfile" \
  --master_addr "${MASTER_ADDR:-$first_host}" \
  --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank \
  --module kosmos train --config "$config" --run-dir "$run_dir" "$@"
