#!/usr/bin/env bash
# One task per node, started by `srun` in slurm/train_multi_node.sbatch: maps this task's Slurm
# variables onto launch/multi_box.sh, which runs `accelerate launch` for this node.
# Arguments are config overrides (section.key=value), passed through.
#
# SLURM_NODEID is read here, on each node, so no quoting can turn it into the batch node's 0.
# Started without srun (or with more than one task per node) every node would claim machine rank 0
# and the rendezvous would hang; that is refused below.
set -euo pipefail
die() { echo "node_task.sh: error: $*" >&2; exit 2; }

[[ -n ${SLURM_STEP_ID:-} ]] ||
  die "not inside a job step: start this script with srun (one task per node), not from the batch shell."
[[ ${SLURM_NTASKS:-} == "${SLURM_NNODES:-}" ]] ||
  die "srun started ${SLURM_NTASKS:-?} tasks on ${SLURM_NNODES:-?} nodes; it must start one per node (srun --ntasks-per-node=1)."

export NUM_MACHINES=$SLURM_NNODES MACHINE_RANK=$SLURM_NODEID
# Slurm delivers a signal sent to the step to every process in it (see slurm/requeue.sh): the
# launcher ignores USR1 (inherited across exec) so it survives; the training processes install
# their own handler for it.
trap '' USR1
exec "$(dirname "$0")/../launch/multi_box.sh" "$@"
