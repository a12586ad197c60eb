# shellcheck shell=bash
# Sourced by the batch scripts in slurm/: run the training launcher so that a time limit or a
# preemption costs minutes, not the run.
#
#   run_requeueable children|step CMD...
#
# runs CMD in the background and traps USR1, TERM and INT. On a signal it asks the training
# processes to stop (they finish their optimizer step, save a checkpoint under
# <run.dir>/checkpoints/ and exit 75), waits for CMD to exit, then `scontrol requeue`s the job, which
# starts again from that checkpoint (train.resume=auto) with SLURM_RESTART_COUNT one higher.
#
# Where the signal goes, and why not simply to CMD:
#   children  CMD is `accelerate launch` on this node. Its children are the training processes, and
#             only they get the signal. The launcher itself must not: Python's default action for
#             USR1 is to exit, which would orphan the workers, and on TERM torchrun's agent forwards
#             TERM itself but SIGKILLs the workers 30 s later and exits with a traceback (accelerate
#             exposes no option to forward USR1). Grandchildren (data-loader workers) are left alone.
#   step      CMD is `srun`. srun forwards the signal to its step, and Slurm delivers it to every
#             process of the step on every node (checked on Slurm 22.05), so slurm/node_task.sh
#             starts `accelerate launch` with USR1 ignored and only the training processes act on it.
# Either way the launcher and its processes start with USR1 ignored (inherited across exec), so the
# launcher survives it; `vae-train` installs its own handler first thing (vae_dist/signals.py): a
# USR1 during its start-up stops it at once (exit 75, nothing to save), during training it saves
# after the step (exit 75), after the last step it lets the run finish (exit 0).
# Slurm sends TERM to every process of the job itself at a time limit or `scancel`; forwarding it
# again is harmless: the trainer acts on the first signal and ignores repeats.
#
# `scancel JOB` must still cancel: a TERM that arrives while Slurm already ends the job for a
# reason other than its time limit (JobState=COMPLETING, Reason=None) saves a checkpoint and is not
# requeued. Resume such a run by hand with the same RUN_DIR.

log() { echo "[$(date '+%F %T')] slurm: $*"; }
die() { echo "slurm: error: $*" >&2; exit 2; }

forward() {
  SIGNAL=$1
  log "got SIG$1: asking the training processes to finish their step, save a checkpoint and exit"
  if [[ $FORWARD_TO == children ]]; then
    pkill "-$1" -P "$CHILD" || log "no training process to signal yet (still starting?)"
  else
    kill "-$1" "$CHILD" 2>/dev/null || true
  fi
}

newest_checkpoint() {
  local dirs=("$RUN_DIR"/checkpoints/step-*/)
  [[ -d ${dirs[-1]} ]] && echo "${dirs[-1]%/}" || echo "none"
}

cancelled_by_user() {  # `scancel JOB`: COMPLETING with Reason=None; a time limit says Reason=TimeLimit
  local info
  info=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null) || return 1
  [[ $info != *JobState=RUNNING* && $info == *" Reason=None"* ]]
}

run_requeueable() {
  FORWARD_TO=$1
  shift
  SIGNAL=""
  log "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-$(hostname)}, run.dir $RUN_DIR"
  log "$*"
  if [[ $FORWARD_TO == children ]]; then
    (trap '' USR1 && exec "$@") &  # see above: USR1 ignored outside the trainer's own handler
  else
    "$@" &  # srun must keep its own USR1 handler to forward the signal
  fi
  CHILD=$!
  trap 'forward USR1' USR1
  trap 'forward TERM' TERM
  trap 'forward INT' INT
  # `wait` returns early whenever a trapped signal arrives; wait again until CMD has exited.
  while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD" || true; done
  local rc=0
  wait "$CHILD" || rc=$?  # CMD's exit status (bash keeps it)
  if [[ $rc == 0 ]]; then
    log "training finished"
    return 0
  fi
  if [[ -z $SIGNAL && $rc == 76 ]]; then
    # 76: a training process lost its peer (a node died or the network split, vae_dist/peers.py).
    # Slurm requeues a job whose node failed by itself once it notices (SlurmdTimeout); a partition
    # it never notices. Either way the run resumes from its newest checkpoint on the nodes Slurm gives.
    log "a training process lost its peer (exit 76); newest checkpoint: $(newest_checkpoint)"
    if [[ ${SLURM_RESTART_COUNT:-0} -ge ${MAX_PEER_REQUEUES:-3} ]]; then
      log "not requeueing: $SLURM_RESTART_COUNT restarts already (MAX_PEER_REQUEUES=${MAX_PEER_REQUEUES:-3})"
      return "$rc"
    fi
    log "requeueing job $SLURM_JOB_ID: it resumes from that checkpoint (train.resume=auto)"
    trap '' USR1 TERM INT
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed (Slurm may be requeueing the job for a failed node itself)"
    return 0
  fi
  if [[ -z $SIGNAL ]]; then
    log "training failed (exit $rc)"
    return "$rc"
  fi
  log "training stopped after SIG$SIGNAL (launcher exit $rc); newest checkpoint: $(newest_checkpoint)"
  if cancelled_by_user; then
    log "the job was cancelled: not requeueing. Resume with RUN_DIR=$RUN_DIR and the same script."
    return "$rc"
  fi
  log "requeueing job $SLURM_JOB_ID: it resumes from that checkpoint (train.resume=auto)"
  trap '' USR1 TERM INT  # the requeue ends this shell; nothing is left to forward
  scontrol requeue "$SLURM_JOB_ID"
}
