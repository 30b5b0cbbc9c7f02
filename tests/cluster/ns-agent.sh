#!/usr/bin/env bash
# MPICH's "ssh" for the namespace cluster: mpiexec -launcher ssh -launcher-exec ns-agent.sh runs
# `ns-agent.sh [ssh options] HOST COMMAND...`. The command runs in namespace HOST with its own
# hostname (what MPI_Get_processor_name reports) and its own mount namespace, where
# $NS_HOSTDIR/HOST is bound at $NS_MOUNT: each "host" sees only its own disk's files there.
set -euo pipefail
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done   # ssh options such as -x
host=$1; shift
[ -n "${NS_AGENT_LOG:-}" ] && echo "$host: $*" >> "$NS_AGENT_LOG"
exec ip netns exec "$host" unshare --mount --uts sh -c '
    hostname "$1"
    if [ -n "$2" ]; then mount --bind "$2/$1" "$3"; fi
    shift 3
    exec sh -c "$*"' ns-agent "$host" "${NS_HOSTDIR:-}" "${NS_MOUNT:-}" "$@"
