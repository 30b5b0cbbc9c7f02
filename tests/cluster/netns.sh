#!/usr/bin/env bash
# Simulated home cluster for the tests: hosts as network namespaces on one machine.
#
#   netns.sh up PREFIX N     namespaces PREFIX-ctl (a bridge, 10.199.0.1: where mpiexec runs) and
#                            PREFIX-h0 .. PREFIX-h(N-1) (10.199.0.10+i), each joined to the bridge
#                            by a veth pair limited to 1 Gbit/s (tbf) in both directions
#   netns.sh down PREFIX     removes them all (idempotent)
#
# Nothing is attached to the root namespace or to a real interface: the traffic of the test
# stays inside the namespaces it created. Needs root.
set -euo pipefail
SUBNET=${NETNS_SUBNET:-10.199.0}
RATE=${NETNS_RATE:-1gbit}

up() {
    local p=$1 n=$2 ctl=$1-ctl
    ip netns add "$ctl"
    ip -n "$ctl" link set lo up
    ip -n "$ctl" link add br0 type bridge
    ip -n "$ctl" addr add "$SUBNET.1/24" dev br0
    ip -n "$ctl" link set br0 up
    for i in $(seq 0 $((n - 1))); do
        local ns=$p-h$i
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # veth pair created inside the host namespace, peer moved to the bridge namespace
        ip -n "$ns" link add eth0 type veth peer name "p$i" netns "$ctl"
        ip -n "$ns" addr add "$SUBNET.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ctl" link set "p$i" master br0
        ip -n "$ctl" link set "p$i" up
        ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$RATE" burst 64kb latency 5ms
        ip netns exec "$ctl" tc qdisc replace dev "p$i" root tbf rate "$RATE" burst 64kb latency 5ms
    done
}

down() {
    local p=$1
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$p-(ctl|h[0-9]+)$" || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns"
    done
}

case "${1:-}" in
    up) up "$2" "$3" ;;
    down) down "$2" ;;
    *) echo "usage: $0 up PREFIX N | down PREFIX" >&2; exit 2 ;;
esac
