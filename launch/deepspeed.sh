#!/usr/bin/env bash
# Training with the DeepSpeed launcher, started once: on this node's GPUs, or on the nodes of a hostfile.
#
#   launch/deepspeed.sh configs/train/kosmos1.yaml runs/kosmos1                    # this node, all its GPUs
#   NUM_GPUS=2 launch/deepspeed.sh configs/train/tiny.yaml runs/tiny                # this node, 2 GPUs
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/train/kosmos1.yaml runs/kosmos1
#
# Environment:
#   HOSTFILE      nodes to train on, one per line with its GPU count: `node1 slots=8` (see
#                 hostfile.example); unset: this node alone, with no ssh
#   NUM_GPUS      GPUs of this node to use when there is no hostfile (default: all)
#   MASTER_ADDR   address of the first node as the others see it (default: first host of the hostfile)
#   MASTER_PORT   a free TCP port there (default 29500)
# With a hostfile the launcher reaches every node with passwordless ssh (pdsh) and starts the same
# command there, so every node needs the repository at the same path (this script's working
# directory), the same Python environment, and the run folder and corpora on a shared filesystem.
# Variables the remote processes need (NCCL_*, PYTHONPATH, ...) go into a `.deepspeed_env` file
# (KEY=VALUE lines) in the working directory or $HOME; DeepSpeed exports them on every node.
#
# Pre-emption: SIGUSR1 or SIGTERM sent to the training processes makes them checkpoint at the next
# step and exit 0; run the same command again to resume.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: [HOSTFILE=FILE] [NUM_GPUS=N] $0 CONFIG RUN_DIR [key=value ...]" >&2
  exit 2
fi
config=$1 run_dir=$2
shift 2

if [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "$0: HOSTFILE $HOSTFILE does not exist" >&2
    exit 2
  fi
  first_host=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")
  where=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-$first_host}")
else
  # No hostfile: the launcher starts the ranks on this node itself, without ssh.
  where=(--master_addr "${MASTER_ADDR:-127.0.0.1}")
  if [[ -n "${NUM_GPUS:-}" ]]; then
    where+=(--num_gpus "$NUM_GPUS")
  fi
fi

exec deepspeed "${where[@]}" \
  --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank \
  --module kosmos train --config "$config" --run-dir "$run_dir" "$@"
