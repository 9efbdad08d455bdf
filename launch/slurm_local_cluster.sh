#!/usr/bin/env bash
# A real one-node SLURM cluster on this host (Debian's slurm-wlm + munge), for
# tests/launch/test_slurm.py and for trying `twotower launch slurm` without a cluster.
#
# Usage (as root, on Linux; idempotent, so safe to run again):
#   bash launch/slurm_local_cluster.sh
# Installs slurm-wlm and munge with apt-get when missing, writes /etc/slurm/slurm.conf with this host
# as the only node (partition `debug`), starts munged, slurmctld and slurmd directly (containers
# and CI machines have no systemd), and waits until `sinfo` shows the node idle.
# Exit status 0: the cluster is up. Non-zero: the last line on stderr says why.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

say() { echo "slurm_local_cluster: $*" >&2; }
fail() {
    say "$*"
    exit 1
}

# Whether the pid file $1 names a live process called $2 (a stale file's pid may be reused).
running() { [[ -s $1 ]] && [[ $(cat "/proc/$(cat "$1")/comm" 2>/dev/null) == "$2" ]]; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || fail "slurm-wlm is not installed and there is no apt-get"
    say "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed (no network to the Debian mirror?)"
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
        fail "apt-get install slurm-wlm munge failed"
}

# Slurm and gloo both address the node by its short hostname, so it must resolve.
ensure_hostname_resolves() {
    local host=$1
    getent hosts "$host" >/dev/null || echo "127.0.0.1 $host" >>/etc/hosts
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force || fail "munged did not start: see /var/log/munge/munged.log"
    fi
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    fail "munge credentials do not round-trip: see /var/log/munge/munged.log"
}

# Writes slurm.conf; sets CONFIG_CHANGED=1 when it differs from what was there.
CONFIG_CHANGED=0
write_config() {
    local host=$1 node_line
    # `slurmd -C` reports this machine's real topology; a node configured larger than it is gets
    # drained by slurmctld, so use exactly what it sees.
    node_line=$(slurmd -C | head -n 1) || fail "slurmd -C could not read this machine's hardware"
    mkdir -p /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    local new
    new=$(
        cat <<EOF
# Written by launch/slurm_local_cluster.sh: a one-node test cluster on $host.
ClusterName=twotower-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups in containers: track processes by parent id, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
# Short kill wait and timeouts: tests requeue jobs and wait for them.
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    )
    if [[ -f $SLURM_CONF ]] && [[ "$(cat "$SLURM_CONF")" == "$new" ]]; then
        return
    fi
    printf '%s\n' "$new" >"$SLURM_CONF"
    CONFIG_CHANGED=1
}

stop_daemon() {
    local pid_file=$1 name=$2
    running "$pid_file" "$name" || return 0
    local pid
    pid=$(cat "$pid_file")
    kill "$pid"
    for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    fail "daemon $pid ($pid_file) did not stop"
}

start_slurm() {
    if [[ $CONFIG_CHANGED == 1 ]]; then
        stop_daemon /run/slurmd.pid slurmd
        stop_daemon /run/slurmctld.pid slurmctld
    fi
    if ! running /run/slurmctld.pid slurmctld; then
        slurmctld || fail "slurmctld did not start: see $LOG_DIR/slurmctld.log"
    fi
    for _ in $(seq 1 20); do
        scontrol ping 2>/dev/null | grep -q UP && break
        sleep 0.5
    done
    scontrol ping 2>/dev/null | grep -q UP || fail "slurmctld does not answer: see $LOG_DIR/slurmctld.log"
    if ! running /run/slurmd.pid slurmd; then
        slurmd || fail "slurmd did not start: see $LOG_DIR/slurmd.log"
    fi
}

wait_until_idle() {
    local host=$1 state=""
    for _ in $(seq 1 "$WAIT_S"); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -n 1)
        case $state in
        idle | mixed | allocated | completing) return ;;
        down* | drain* | fail*)
            # A node left down by an earlier configuration comes back once slurmd registers.
            scontrol update NodeName="$host" State=RESUME 2>/dev/null || true
            ;;
        esac
        sleep 1
    done
    fail "node $host is '${state:-unknown}' after ${WAIT_S}s, not idle: see $LOG_DIR/slurmd.log"
}

main() {
    [[ $(uname -s) == Linux ]] || fail "needs Linux"
    [[ $(id -u) -eq 0 ]] || fail "needs root (installs packages, starts daemons)"
    install_packages
    local host
    host=$(hostname -s)
    ensure_hostname_resolves "$host"
    start_munge
    write_config "$host"
    start_slurm
    wait_until_idle "$host"
    say "up: $(sinfo -h -o '%P %D nodes %c CPUs %T' | head -n 1)"
}

main "$@"
