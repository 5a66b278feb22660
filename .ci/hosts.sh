#!/usr/bin/env bash
# A second Docker host and a Docker registry on this machine, for the many-hosts tests.
#
#   bash .ci/hosts.sh [up]     # idempotent: reuses a running engine/registry
#   bash .ci/hosts.sh down     # stops both and takes back the iptables rules
#   bash .ci/hosts.sh status
#
# Host B is a second dockerd with its own bridge, socket, data root, exec root and pidfile.
# It runs with --iptables=false: a dockerd that manages iptables flushes the chains the
# first engine shares (DOCKER, DOCKER-ISOLATION-*) when it starts, which can cut the first
# engine's build containers off. Its bridge gets just what builds need instead.
#
# The tests find both through PFBUILD_TEST_HOST_B (DOCKER_HOST syntax) and
# PFBUILD_TEST_REGISTRY (host:port); the defaults below are the ones tests/conftest.py uses.
set -euo pipefail

HOSTB_DIR="${PFBUILD_HOSTB_DIR:-/tmp/pfbuild-hostb}"
HOSTB_SOCK="$HOSTB_DIR/docker.sock"
HOSTB_URL="unix://$HOSTB_SOCK"
BRIDGE="${PFBUILD_HOSTB_BRIDGE:-br-b}"
SUBNET="${PFBUILD_HOSTB_SUBNET:-172.30.0.0/16}"
BRIDGE_IP="${SUBNET%.*}.1/${SUBNET#*/}"   # 172.30.0.0/16 -> 172.30.0.1/16
REG_ADDR="${PFBUILD_TEST_REGISTRY:-127.0.0.1:5055}"
REG_DIR="${PFBUILD_REGISTRY_DIR:-/tmp/pfbuild-registry}"
BASE_IMAGE="${PFBUILD_BASE_IMAGE:-python:3.11-slim}"

# iptables rules for host B's bridge, each as the arguments after -I/-D/-C
rules=(
  "-t nat POSTROUTING -s $SUBNET ! -o $BRIDGE -j MASQUERADE"
  "FORWARD -i $BRIDGE -j ACCEPT"
  "FORWARD -o $BRIDGE -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
)

rule() { # rule ACTION "[-t TABLE] CHAIN ARGS..."
  local action=$1; set -- $2
  local table=()
  if [[ $1 == -t ]]; then table=(-t "$2"); shift 2; fi
  local chain=$1; shift
  case $action in
    add) iptables "${table[@]}" -C "$chain" "$@" 2>/dev/null || iptables "${table[@]}" -I "$chain" 1 "$@" ;;
    del) while iptables "${table[@]}" -C "$chain" "$@" 2>/dev/null; do iptables "${table[@]}" -D "$chain" "$@"; done ;;
  esac
}

hostb_up() { DOCKER_HOST="$HOSTB_URL" docker info >/dev/null 2>&1; }
registry_up() { curl -fsS "http://$REG_ADDR/v2/" >/dev/null 2>&1; }

up() {
  local need=()
  command -v docker-registry >/dev/null || need+=(docker-registry)
  command -v curl >/dev/null || need+=(curl)
  command -v iptables >/dev/null || need+=(iptables)
  if ((${#need[@]})); then
    echo "hosts: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi

  # --- the registry: filesystem storage, delete enabled, plain HTTP on loopback ---------
  if ! registry_up; then
    mkdir -p "$REG_DIR/data"
    cat >"$REG_DIR/config.yml" <<EOF
# written by pfbuild's .ci/hosts.sh: a test registry on loopback, no auth, no TLS
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $REG_DIR/data}
  delete: {enabled: true}
http: {addr: $REG_ADDR}
EOF
    echo "hosts: starting docker-registry on $REG_ADDR (log: $REG_DIR/log)"
    setsid docker-registry serve "$REG_DIR/config.yml" >"$REG_DIR/log" 2>&1 </dev/null &
    echo $! >"$REG_DIR/pid"
    for _ in $(seq 1 40); do registry_up && break; sleep 0.25; done
    registry_up || { tail -20 "$REG_DIR/log"; echo "hosts: the registry did not start"; exit 1; }
  fi

  # --- host B: a second dockerd -------------------------------------------------------
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_IP" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  for r in "${rules[@]}"; do rule add "$r"; done
  echo 1 >/proc/sys/net/ipv4/ip_forward  # any dockerd sets it; host B runs without iptables
  if ! hostb_up; then
    mkdir -p "$HOSTB_DIR/data" "$HOSTB_DIR/exec"
    echo "hosts: starting host B's dockerd on $HOSTB_URL (log: $HOSTB_DIR/dockerd.log)"
    setsid dockerd -H "$HOSTB_URL" --data-root "$HOSTB_DIR/data" --exec-root "$HOSTB_DIR/exec" \
      --pidfile "$HOSTB_DIR/docker.pid" -b "$BRIDGE" --iptables=false \
      >"$HOSTB_DIR/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 60); do hostb_up && break; sleep 1; done
    hostb_up || { tail -20 "$HOSTB_DIR/dockerd.log"; echo "hosts: host B did not start"; exit 1; }
  fi
  # its image store starts empty: seed the base image from the first engine
  if ! DOCKER_HOST="$HOSTB_URL" docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "hosts: copying $BASE_IMAGE to host B"
    docker save "$BASE_IMAGE" | DOCKER_HOST="$HOSTB_URL" docker load -q >/dev/null
  fi
  echo "hosts: ready (host B: $HOSTB_URL, registry: $REG_ADDR)"
}

down() {
  if [[ -f "$HOSTB_DIR/docker.pid" ]] && kill "$(cat "$HOSTB_DIR/docker.pid")" 2>/dev/null; then
    for _ in $(seq 1 30); do hostb_up || break; sleep 1; done
  fi
  for r in "${rules[@]}"; do rule del "$r"; done
  if [[ -f "$REG_DIR/pid" ]] && kill "$(cat "$REG_DIR/pid")" 2>/dev/null; then rm -f "$REG_DIR/pid"; fi
  echo "hosts: stopped (host B's data stays in $HOSTB_DIR, the registry's in $REG_DIR)"
}

status() {
  hostb_up && echo "host B: up ($HOSTB_URL)" || echo "host B: down"
  registry_up && echo "registry: up ($REG_ADDR)" || echo "registry: down"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 [up|down|status]" >&2; exit 2 ;;
esac
