#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for tests/test_slurm.py (and for trying the
# sbatch/ scripts without a real cluster).
#
#   sudo bash tests/slurm_cluster.sh start    # install (apt) if missing, configure, start, wait idle
#   sudo bash tests/slurm_cluster.sh status   # daemons + sinfo
#   sudo bash tests/slurm_cluster.sh stop     # stop slurmd, slurmctld and munged
#
# Debian/Ubuntu only (packages slurm-wlm and munge). Every command is idempotent. The daemons
# run as root (SlurmUser=root), with proctrack/linuxproc and task/none: no cgroups, so it works
# in containers. The config goes to /etc/slurm/slurm.conf (Debian's default path, so sbatch/srun
# need no SLURM_CONF); an existing slurm.conf that this script did not write is never touched.
# Logs: /var/log/slurm/{slurmctld,slurmd}.log.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# written by kerasfrac tests/slurm_cluster.sh"
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
WAIT_S=${SLURM_CLUSTER_WAIT_S:-60}

say() { echo "slurm_cluster: $*"; }
die() {
    echo "slurm_cluster: error: $*" >&2
    exit 1
}

need_root() {
    [[ $EUID -eq 0 ]] || die "must run as root (the daemons run as root): sudo bash $0 $*"
}

node_name() { hostname -s; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get: install Slurm and munge yourself"
    say "installing slurm-wlm and munge (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

munge_key() {
    local key=/etc/munge/munge.key
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [[ ! -s $key ]]; then
        say "creating $key"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force
        else
            dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        fi
    fi
    chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 "$key"
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching it"
    fi
    local node cpus mem_mb
    node=$(node_name)
    cpus=$(nproc)
    # RealMemory a bit under what is available now: a node that reports less than its configured
    # RealMemory is drained ("Low RealMemory").
    mem_mb=$(awk '/^MemAvailable:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    cat >"$CONF.tmp" <<EOF
$MARKER
# One-node test cluster: daemons as root, no cgroups, no accounting database.
ClusterName=kerasfrac-test
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Short timeouts: tests wait for jobs, and a stopped slurmd should not hang anything long.
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=10
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    # Keep the old file (and a running cluster's view) when nothing but RealMemory would change.
    if [[ -e $CONF ]] && diff -q <(grep -v RealMemory "$CONF") <(grep -v RealMemory "$CONF.tmp") >/dev/null; then
        rm -f "$CONF.tmp"
    else
        mv "$CONF.tmp" "$CONF"
        say "wrote $CONF (node $node, $cpus CPUs, ${mem_mb} MB)"
    fi
}

start_daemons() {
    if ! alive "$MUNGE_PID"; then
        say "starting munged"
        runuser -u munge -- /usr/sbin/munged
    fi
    munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"
    if ! alive "$CTLD_PID"; then
        say "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! alive "$SLURMD_PID"; then
        say "starting slurmd"
        /usr/sbin/slurmd
    fi
}

wait_idle() {
    local node state i
    node=$(node_name)
    for ((i = 0; i < WAIT_S; i++)); do
        state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
        case $state in
        idle | mix | alloc)
            say "node $node is $state"
            return 0
            ;;
        down* | drain* | drng* | fail*)
            scontrol update nodename="$node" state=resume 2>/dev/null || true
            ;;
        esac
        sleep 1
    done
    sinfo -N -l >&2 || true
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $node not idle after ${WAIT_S}s (state: ${state:-no answer})"
}

start() {
    need_root start
    install_packages
    munge_key
    write_conf
    start_daemons
    wait_idle
}

stop_pidfile() {
    local name=$1 pidfile=$2 pid i
    alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    say "stopping $name (pid $pid)"
    kill -TERM "$pid"
    for ((i = 0; i < 20; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    need_root stop
    stop_pidfile slurmd "$SLURMD_PID"
    stop_pidfile slurmctld "$CTLD_PID"
    stop_pidfile munged "$MUNGE_PID"
}

status() {
    local name pidfile rc=0
    for name in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        pidfile=${name#*:}
        if alive "$pidfile"; then
            say "${name%%:*} running (pid $(cat "$pidfile"))"
        else
            say "${name%%:*} not running"
            rc=1
        fi
    done
    if ((rc == 0)); then sinfo -N -l; fi
    return $rc
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
