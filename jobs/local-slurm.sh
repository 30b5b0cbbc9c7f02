#!/usr/bin/env bash
# A one-node SLURM "cluster" on this machine, to try the job scripts (and for the tests).
#
#   sudo jobs/local-slurm.sh start     # installs slurmd slurmctld slurm-client munge if missing
#   export SLURM_CONF=/tmp/dllama-local-slurm/slurm.conf    # printed by start
#   sbatch --wait -n 2 jobs/infer.sbatch ...
#   sudo jobs/local-slurm.sh status | stop
#
# Needs root and Debian/Ubuntu; no systemd: munged runs as user munge, slurmctld and slurmd as
# root, with every state, spool, log and pid file under $LOCAL_SLURM_DIR (default
# /tmp/dllama-local-slurm). The node is `localhost` with 2 CPUs (LOCAL_SLURM_CPUS), one partition
# `debug` with OverSubscribe=YES, no accounting, MpiDefault=none (so job scripts must ask for
# `srun --mpi=pmi2` or use mpirun, as real clusters often require too).
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/dllama-local-slurm}
CONF=$DIR/slurm.conf
CPUS=${LOCAL_SLURM_CPUS:-2}
CTLD_PORT=${LOCAL_SLURM_PORT:-6817}
export SLURM_CONF=$CONF

die() { echo "error: $*" >&2; exit 1; }

install_packages() {
    local missing=()
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM and munge yourself"
    echo "local-slurm: installing slurmd slurmctld slurm-client munge (missing: ${missing[*]})" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmd slurmctld slurm-client munge >&2 \
        || die "apt-get install slurmd slurmctld slurm-client munge failed"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_ok && return 0
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --force
    touch "$DIR/munged.started-by-us"
    for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munged did not start (see /var/log/munge/munged.log)"
}

write_conf() {
    cat > "$CONF" <<EOF
# written by jobs/local-slurm.sh: a one-node test cluster
ClusterName=dllama-local
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    [ "$(id -u)" -eq 0 ] || die "run as root (it starts munged, slurmctld and slurmd)"
    install_packages
    mkdir -p "$DIR"/{state,spool,log,run}
    start_munge
    write_conf
    pid_alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld failed: see $DIR/log/slurmctld.log"
    pid_alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF" -N localhost || die "slurmd failed: see $DIR/log/slurmd.log"
    for _ in $(seq 150); do
        state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
        case "$state" in
            idle*|mixed*|allocated*)
                echo "local-slurm: node localhost is $state ($CPUS CPUs)" >&2
                echo "export SLURM_CONF=$CONF"
                return 0 ;;
        esac
        sleep 0.2
    done
    die "the node did not become idle (state '${state:-none}'): see $DIR/log/"
}

stop() {
    if [ -f "$CONF" ] && pid_alive "$DIR/run/slurmctld.pid"; then
        scancel --full --quiet --partition=debug 2>/dev/null || true
    fi
    for d in slurmd slurmctld; do
        if pid_alive "$DIR/run/$d.pid"; then
            pid=$(cat "$DIR/run/$d.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    if [ -f "$DIR/munged.started-by-us" ]; then
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
        rm -f "$DIR/munged.started-by-us"
    fi
    rm -rf "$DIR"
    echo "local-slurm: stopped" >&2
}

status() {
    [ -f "$CONF" ] || { echo "local-slurm: not started"; return 3; }
    for d in slurmctld slurmd; do
        if pid_alive "$DIR/run/$d.pid"; then echo "$d: running (pid $(cat "$DIR/run/$d.pid"))"
        else echo "$d: not running"; fi
    done
    munge_ok && echo "munge: ok" || echo "munge: not working"
    sinfo || true
    squeue || true
    echo "export SLURM_CONF=$CONF"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
