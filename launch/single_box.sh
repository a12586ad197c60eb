#!/usr/bin/env bash
# Train on one machine with all its GPUs (or, with CPU=1, several CPU processes in a gloo group).
#
#   launch/single_box.sh data.root=../shared/data                      # every visible GPU
#   GPUS=4 CONFIG=configs/mnist.yaml launch/single_box.sh train.epochs=10
#   CPU=1 GPUS=2 launch/single_box.sh data.root=../shared/data       # 2 CPU processes (gloo)
#   DRY_RUN=1 launch/single_box.sh                                   # print the command, run nothing (any machine)
#
# Arguments are config overrides (section.key=value). Paths are relative to the repository root.
# Also the launcher of slurm/train_single_node.sbatch.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repository's .venv (made by `make`) unless a virtual environment is active.
[[ -n ${VIRTUAL_ENV:-} || ! -x .venv/bin/accelerate ]] || PATH=$PWD/.venv/bin:$PATH

die() { echo "single_box.sh: error: $*" >&2; exit 2; }

CONFIG=${CONFIG:-configs/mnist.yaml}  # experiment YAML
CPU=${CPU:-0}                         # 1: CPU processes in a gloo group, GPUs hidden
if [[ $CPU == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""      # the trainer picks the CPU when torch sees no GPU
  GPUS=${GPUS:-2}                     # processes: CPU processes here
else
  GPUS=${GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)}  # processes: one per GPU
fi
[[ $GPUS =~ ^[0-9]+$ ]] || die "GPUS=$GPUS is not a number of processes: set GPUS=N (N >= 1)."
if [[ $GPUS -lt 1 ]]; then
  [[ ${DRY_RUN:-0} == 1 ]] || die "no GPU found (nvidia-smi): set GPUS=N, or CPU=1 for CPU processes."
  # A dry run shows the command anyway (on a GPU machine it takes one process per GPU).
  echo "single_box.sh: no GPU found (nvidia-smi); the command below is for GPUS=8, set GPUS=N for another count." >&2
  GPUS=8
fi
MAIN_PORT=${MAIN_PORT:-29500}         # rendezvous TCP port on this machine
RUN_DIR=${RUN_DIR:-}                  # run.dir override; empty: the config's run.dir

cmd=(accelerate launch)
# --multi_gpu is accelerate's torchrun path: N processes, NCCL on GPUs, gloo when torch sees no GPU
# (accelerate's --cpu starts a single process). accelerate refuses --multi_gpu with one process.
[[ $GPUS == 1 ]] || cmd+=(--multi_gpu)
# Precision comes from train.precision: the trainer hands it to Accelerator, which then ignores the
# launcher's --mixed_precision; "no" here only keeps accelerate from warning about a default.
cmd+=(--num_processes "$GPUS" --num_machines 1 --main_process_port "$MAIN_PORT"
  --mixed_precision no --dynamo_backend no vae_dist/train.py --config "$CONFIG")
[[ -z $RUN_DIR ]] || cmd+=("run.dir=$RUN_DIR")
cmd+=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
