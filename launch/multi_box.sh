#!/usr/bin/env bash
# Train on several machines started by hand: run this once on every machine, same settings,
# MACHINE_RANK 0 on the machine whose address is MAIN_IP (the rendezvous host).
#
#   MAIN_IP=10.0.0.1 NUM_MACHINES=2 MACHINE_RANK=0 launch/multi_box.sh data.root=/shared/data   # on 10.0.0.1
#   MAIN_IP=10.0.0.1 NUM_MACHINES=2 MACHINE_RANK=1 launch/multi_box.sh data.root=/shared/data   # on the other
#   DRY_RUN=1 ... launch/multi_box.sh                                # print the command, run nothing
#
# Every machine needs the repository and data.root at the same path (or its own copy) and must reach
# MAIN_IP:MAIN_PORT; run.dir should be on a shared filesystem so a restart finds the checkpoints.
# Arguments are config overrides (section.key=value). Also the per-node launcher of
# slurm/train_multi_node.sbatch (through slurm/node_task.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -n ${VIRTUAL_ENV:-} || ! -x .venv/bin/accelerate ]] || PATH=$PWD/.venv/bin:$PATH
die() { echo "multi_box.sh: error: $*" >&2; exit 2; }

CONFIG=${CONFIG:-configs/mnist.yaml}  # experiment YAML
NUM_MACHINES=${NUM_MACHINES:-}        # required: machines taking part
MACHINE_RANK=${MACHINE_RANK:-}        # required: 0 on the MAIN_IP machine, 1 .. NUM_MACHINES-1 on the others
MAIN_IP=${MAIN_IP:-}                  # required: address of the MACHINE_RANK=0 machine that every machine reaches
MAIN_PORT=${MAIN_PORT:-29500}         # rendezvous TCP port on MAIN_IP
JOIN_TIMEOUT_S=${JOIN_TIMEOUT_S:-600} # seconds every machine waits for all NUM_MACHINES to join, then exits 2
# Every missing setting in one sentence, as the other checks: exit 2, nothing started.
missing=()
[[ -n $NUM_MACHINES ]] || missing+=("NUM_MACHINES (the number of machines taking part)")
[[ -n $MACHINE_RANK ]] || missing+=("MACHINE_RANK (0 on the MAIN_IP machine, 1 .. NUM_MACHINES-1 on the others)")
[[ -n $MAIN_IP ]] || missing+=("MAIN_IP (the address of the MACHINE_RANK=0 machine, reachable from every machine)")
if [[ ${#missing[@]} -gt 0 ]]; then
  list=$(printf '%s, ' "${missing[@]}")
  die "set ${list%, } on every machine, e.g. MAIN_IP=10.0.0.1 NUM_MACHINES=2 MACHINE_RANK=0 launch/multi_box.sh."
fi
[[ $NUM_MACHINES =~ ^[0-9]+$ && $NUM_MACHINES -ge 1 ]] || die "NUM_MACHINES=$NUM_MACHINES is not a number of machines (1 or more)."
[[ $MACHINE_RANK =~ ^[0-9]+$ ]] || die "MACHINE_RANK=$MACHINE_RANK is not a rank: 0 .. $((NUM_MACHINES - 1))."
[[ $JOIN_TIMEOUT_S =~ ^[0-9]+$ && $JOIN_TIMEOUT_S -ge 1 ]] || die "JOIN_TIMEOUT_S=$JOIN_TIMEOUT_S is not a number of seconds (1 or more)."
CPU=${CPU:-0}                         # 1: CPU processes in a gloo group, GPUs hidden
if [[ $CPU == 1 ]]; then
  export CUDA_VISIBLE_DEVICES=""
  GPUS=${GPUS:-2}                     # processes per machine: CPU processes here
else
  GPUS=${GPUS:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)}  # processes per machine: one per GPU
fi
RUN_DIR=${RUN_DIR:-}                  # run.dir override; empty: the config's run.dir

[[ $GPUS =~ ^[0-9]+$ ]] || die "GPUS=$GPUS is not a number of processes per machine: set GPUS=N (N >= 1)."
if [[ $GPUS -lt 1 ]]; then
  [[ ${DRY_RUN:-0} == 1 ]] || die "no GPU found (nvidia-smi): set GPUS=N, or CPU=1 for CPU processes."
  # A dry run shows the command anyway (on a GPU machine it takes one process per GPU).
  echo "multi_box.sh: no GPU found (nvidia-smi); the command below is for GPUS=8 per machine, set GPUS=N for another count." >&2
  GPUS=8
fi
[[ $MACHINE_RANK -ge 0 && $MACHINE_RANK -lt $NUM_MACHINES ]] ||
  die "MACHINE_RANK=$MACHINE_RANK is outside 0 .. $((NUM_MACHINES - 1)) (NUM_MACHINES=$NUM_MACHINES)."
if [[ $NUM_MACHINES -gt 1 && ($MAIN_IP == localhost || $MAIN_IP == 127.* || $MAIN_IP == ::1) ]]; then
  die "MAIN_IP=$MAIN_IP is a loopback address, so each of the $NUM_MACHINES machines would wait for the others on itself and the job would hang. Set MAIN_IP to the rank-0 machine's address on the cluster network."
fi
if [[ $(( NUM_MACHINES * GPUS )) -lt 2 ]]; then
  die "$NUM_MACHINES machine(s) x $GPUS process(es) is one process: use launch/single_box.sh."
fi

# c10d: torchrun's rendezvous through a TCP store on MAIN_IP:MAIN_PORT; it waits for all
# NUM_MACHINES machines, JOIN_TIMEOUT_S at most. Under c10d MACHINE_RANK does not order the ranks
# (torchrun: "node_rank is only used for static rdzv_backend"): process rank 0, which writes the
# checkpoints, may run on any machine, so run.dir must be on a filesystem every machine sees.
# vae_dist.cli.machines is `accelerate launch` plus what several machines need: the rendezvous host and
# the network interface found from MAIN_IP, a join that counts the machines, and the training
# processes' own exit code (76: a peer stopped answering) instead of a launcher traceback.
cmd=(python -m vae_dist.cli.machines --multi_gpu
  --num_processes "$(( NUM_MACHINES * GPUS ))"  # over all machines
  --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
  --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" --rdzv_backend c10d
  --rdzv_conf "join_timeout=$JOIN_TIMEOUT_S"
  --mixed_precision no --dynamo_backend no  # precision: train.precision (see launch/single_box.sh)
  vae_dist/train.py --config "$CONFIG")
[[ -z $RUN_DIR ]] || cmd+=("run.dir=$RUN_DIR")
cmd+=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
