#!/usr/bin/env bash
# A cluster of N "nodes" on one Linux machine, for the multi-node tests (tests/test_multinode.py).
# Each node is a network namespace with its own address, and every command run in it gets its own
# hostname and /etc/hosts view (a UTS and a mount namespace); a bridge joins the nodes and this
# machine. The filesystem is shared, as a cluster's shared filesystem is. As root:
#
#   tests/cluster/nodes.sh up 2           # vaenode1 (10.77.0.1), vaenode2 (10.77.0.2); bridge vaebr0 (10.77.0.254)
#   tests/cluster/nodes.sh run vaenode2 CMD ARGS...   # CMD on vaenode2: its hostname, address and /etc/hosts
#   tests/cluster/nodes.sh crash vaenode2   # kill -9 everything running in the node (a node that dies)
#   tests/cluster/nodes.sh cut vaenode2     # its link down, processes alive (a network partition)
#   tests/cluster/nodes.sh mend vaenode2    # its link up again
#   tests/cluster/nodes.sh status           # nodes, addresses, processes; exit 3 when none is up
#   tests/cluster/nodes.sh down             # kill every process in the nodes, remove every namespace and link
#
# `up` and `down` are idempotent, and `down` removes whatever of the cluster a failed run left.
# Only addresses inside VAE_NODES_NET (default 10.77.0, a /24 this script creates) are used.
# Environment: VAE_NODES_NET (10.77.0), VAE_NODES_STATE (/run/vae-nodes: the hosts file),
# VAE_NODES_HOSTS (for `run`: another file to see as /etc/hosts, e.g. one that lacks the nodes).
set -euo pipefail

NET=${VAE_NODES_NET:-10.77.0}
STATE=${VAE_NODES_STATE:-/run/vae-nodes}
BRIDGE=vaebr0
PREFIX=vaenode
HOST_ADDR=$NET.254                  # this machine on the bridge (a Slurm controller listens here)

die() { echo "nodes.sh: error: $*" >&2; exit 2; }
nodes() { ip netns list 2>/dev/null | awk -v p="^$PREFIX[0-9]+$" '$1 ~ p {print $1}' | sort -V; }
index() { [[ $1 =~ ^$PREFIX([0-9]+)$ ]] || die "$1 is not a node name ($PREFIX1, $PREFIX2, ...)."; echo "${BASH_REMATCH[1]}"; }
need_node() { ip netns list | awk '{print $1}' | grep -qx "$1" || die "node $1 is not up (tests/cluster/nodes.sh up N)."; }

up() {
  local n=${1:-2} i node
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 200 ]] || die "up takes a node count from 1 to 200, not '$n'."
  [[ $(id -u) == 0 ]] || die "network namespaces need root; run as root."
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr show dev "$BRIDGE" | grep -q "inet $HOST_ADDR/" || ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  mkdir -p "$STATE"
  {
    echo "127.0.0.1 localhost"
    echo "$HOST_ADDR $(hostname)"
    for ((i = 1; i <= n; i++)); do echo "$NET.$i $PREFIX$i"; done
  } >"$STATE/hosts"
  for ((i = 1; i <= n; i++)); do
    node=$PREFIX$i
    if ! ip netns list | awk '{print $1}' | grep -qx "$node"; then
      ip netns add "$node"
    fi
    if ! ip link show "vaeh$i" >/dev/null 2>&1; then
      ip -n "$node" link del eth0 2>/dev/null || true
      ip link add "vaeh$i" type veth peer name eth0 netns "$node"
      ip -n "$node" addr add "$NET.$i/24" dev eth0
    fi
    ip link set "vaeh$i" master "$BRIDGE"
    ip link set "vaeh$i" up
    ip -n "$node" link set lo up
    ip -n "$node" link set eth0 up
  done
}

down() {
  local node pids i
  for node in $(nodes); do
    # Everything started in the node: kill -9, then wait (bounded) until the namespace is empty.
    for i in $(seq 50); do
      pids=$(ip netns pids "$node" 2>/dev/null || true)
      [[ -n $pids ]] || break
      kill -9 $pids 2>/dev/null || true
      sleep 0.1
    done
    ip netns del "$node"
  done
  for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^vaeh[0-9]+$' || true); do
    ip link del "$link" 2>/dev/null || true
  done
  ! ip link show "$BRIDGE" >/dev/null 2>&1 || ip link del "$BRIDGE"
  rm -rf "$STATE"
}

status() {
  local node count=0
  for node in $(nodes); do
    count=$((count + 1))
    printf '%s %s processes=%s link=%s\n' "$node" "$NET.$(index "$node")" \
      "$(ip netns pids "$node" | wc -l)" "$(cat "/sys/class/net/vaeh$(index "$node")/operstate" 2>/dev/null || echo none)"
  done
  [[ $count -gt 0 ]] || { echo "no nodes are up"; exit 3; }
}

run() {
  local node=$1
  shift
  need_node "$node"
  [[ $# -gt 0 ]] || die "run $node needs a command to run."
  # nsenter (not `ip netns exec`, which remounts /sys and hides the cgroup mounts slurmd needs);
  # the node's hostname and /etc/hosts live in namespaces of the command's own.
  exec nsenter --net="/var/run/netns/$node" unshare --uts --mount -- \
    sh -c 'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"' "$node" "${VAE_NODES_HOSTS:-$STATE/hosts}" "$@"
}

crash() {
  local pids i
  need_node "$1"
  for i in $(seq 50); do
    pids=$(ip netns pids "$1")
    [[ -n $pids ]] || return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes in $1 survived kill -9 for 5 s: $(ip netns pids "$1" | tr '\n' ' ')"
}

link() {
  need_node "$1"
  ip link set "vaeh$(index "$1")" "$2"
}

case ${1:-} in
up) up "${2:-2}" ;;
down) down ;;
status) status ;;
run) shift; [[ $# -ge 1 ]] || die "run needs a node and a command."; run "$@" ;;
crash) crash "${2:?crash needs a node}" ;;
cut) link "${2:?cut needs a node}" down ;;
mend) link "${2:?mend needs a node}" up ;;
*) die "usage: nodes.sh up [N] | down | status | run NODE CMD... | crash NODE | cut NODE | mend NODE" ;;
esac
