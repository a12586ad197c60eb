#!/usr/bin/env bash
# A real single-node Slurm cluster on loopback, for tests/test_slurm.py (not a mock).
#
#   tests/slurm/cluster.sh install   # as root: apt-get install slurm-wlm munge (Debian 12: Slurm 22.05, ~7 s)
#   tests/slurm/cluster.sh up        # as root: write slurm.conf, start munged, slurmctld, slurmd; wait for an idle node
#   tests/slurm/cluster.sh status    # sinfo
#   tests/slurm/cluster.sh down      # stop the daemons by their pid files
#   SLURM_TEST_NODES=2 tests/slurm/cluster.sh up   # two nodes instead: one slurmd in each network namespace
#                                                  # of tests/cluster/nodes.sh (vaenode1, vaenode2), slurmctld
#                                                  # here on the bridge; `down` removes the nodes too
#
# Without systemd nothing starts the daemons or creates /run/munge, so this script does both.
# The timing settings make requeues fast: a requeued job restarts in ~20 s instead of ~3 min
# (AuthInfo=cred_expire is the floor on how soon a requeued job may start again).
# Environment (defaults): SLURM_TEST_STATE (/var/tmp/vae_dist-slurm: spool, state, logs, pid files),
# SLURM_CONF (/etc/slurm/slurm.conf; a file this script did not write is never overwritten).
set -euo pipefail

STATE=${SLURM_TEST_STATE:-/var/tmp/vae_dist-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by vae_dist tests/slurm/cluster.sh"
NODE=$(hostname -s)
NODES=${SLURM_TEST_NODES:-0}   # 0: this machine is the one node (loopback); N: namespace nodes vaenode1..N
NODES_SH=$(cd "$(dirname "$0")/.." && pwd)/cluster/nodes.sh
BRIDGE_ADDR=10.77.0.254        # this machine on the nodes' bridge (tests/cluster/nodes.sh)

die() { echo "cluster.sh: $*" >&2; exit 1; }

install() {
  [[ $(id -u) == 0 ]] || die "installing Slurm needs root (apt-get); run as root or install slurm-wlm and munge yourself."
  command -v apt-get >/dev/null || die "apt-get not found: this script installs Debian's slurm-wlm and munge packages."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it (set SLURM_CONF to another path)."
  fi
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # MiB, leave 10% to the system
  mkdir -p "$(dirname "$CONF")"
  local ctld_host=$NODE per_node="" node_lines
  node_lines="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP"
  if [[ $NODES -gt 0 ]]; then
    # Every node shares this machine's cores and memory, as namespaces do. %n keeps the daemons'
    # files apart (a shared pid file makes the second slurmd kill the first). A node that stops
    # answering is DOWN after SlurmdTimeout, and its job is requeued (JobRequeue=1, --requeue).
    ctld_host="$NODE($BRIDGE_ADDR)" per_node=-%n
    node_lines="SlurmdTimeout=10
NodeName=vaenode[1-$NODES] NodeAddr=10.77.0.[1-$NODES] CPUs=$cpus RealMemory=$((mem / NODES)) State=UNKNOWN
PartitionName=debug Nodes=vaenode[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  fi
  cat >"$CONF" <<EOF
$MARK
ClusterName=vae-dist-test
SlurmctldHost=$ctld_host
SlurmUser=root
AuthType=auth/munge
# cred_expire (s) bounds how soon a requeued job may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d$per_node
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd$per_node.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd$per_node.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups in containers: track processes by parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
MailProg=/bin/true
ReturnToService=2
# Seconds between SIGTERM and SIGKILL when a job ends; schedule every 5 s, not every 60 s.
KillWait=10
SchedulerParameters=bf_interval=5,sched_interval=5,batch_sched_delay=0
$node_lines
EOF
}

running() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start_munge() {
  if running munged; then return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  [[ -f /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  cp /run/munge/munged.pid "$STATE/munged.pid"
}

up() {
  [[ $(id -u) == 0 ]] || die "bringing up the test cluster needs root (munged as the munge user, slurmd as root)."
  command -v slurmctld >/dev/null || die "slurmctld not found: run '$0 install' first (Debian: slurm-wlm, munge)."
  mkdir -p "$STATE/ctld" "$STATE/d"
  running slurmctld || write_conf
  start_munge
  if running slurmctld; then
    echo "cluster.sh: already up ($STATE)"
  else
    SLURM_CONF=$CONF slurmctld -c -f "$CONF"  # -c: forget jobs of an earlier cluster
    if [[ $NODES -gt 0 ]]; then
      "$NODES_SH" up "$NODES"
      echo "$NODES" >"$STATE/nodes"
      for i in $(seq "$NODES"); do start_node_slurmd "vaenode$i"; done
    else
      SLURM_CONF=$CONF slurmd -f "$CONF"
    fi
  fi
  local want=$((NODES > 0 ? NODES : 1))
  for _ in $(seq 60); do  # 30 s
    if [[ $(SLURM_CONF=$CONF sinfo -h -N -o %t 2>/dev/null | grep -cx idle) -ge $want ]]; then
      SLURM_CONF=$CONF sinfo
      return
    fi
    sleep 0.5
  done
  tail -n 20 "$STATE"/slurmctld.log "$STATE"/slurmd*.log >&2 || true
  die "$want node(s) did not become idle within 30 s; see the logs above ($STATE)."
}

# slurmd in a node: it takes its node name from the hostname the node gives it.
start_node_slurmd() {
  [[ -d $STATE/d-$1 ]] || mkdir -p "$STATE/d-$1"
  SLURM_CONF=$CONF "$NODES_SH" run "$1" slurmd -f "$CONF"
}

down() {
  local name pid
  for pidfile in "$STATE"/slurmd*.pid "$STATE"/slurmctld.pid "$STATE"/munged.pid; do
    [[ -f $pidfile ]] || continue
    name=$(basename "$pidfile" .pid)
    pid=$(cat "$STATE/$name.pid")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      echo "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
  done
  if [[ -f $STATE/nodes ]]; then
    "$NODES_SH" down
    rm -f "$STATE/nodes"
  fi
}

case ${1:-} in
  install) install ;;
  up) up ;;
  down) down ;;
  start-node) start_node_slurmd "${2:?start-node needs a node name}" ;;  # a node back after a crash
  status) SLURM_CONF=$CONF sinfo ;;
  *) die "usage: $0 install|up|down|status|start-node NODE (SLURM_TEST_NODES=N: N namespace nodes)" ;;
esac
