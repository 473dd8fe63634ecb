#!/usr/bin/env bash
# A one-node Slurm on this machine, for trying the job scripts and for CI.
#
#   sudo slurm/local-cluster.sh start    # install if missing, configure, start
#   slurm/local-cluster.sh status        # daemons and node state (exit 3: down)
#   sudo slurm/local-cluster.sh stop
#
# It uses Debian's packages (slurm-wlm 22.05 and munge on Debian 12) and
# installs them with apt-get when they are missing. The node is this machine
# under its short hostname, with the CPUs `slurmd -C` finds and the memory
# `free -m` reports less a margin; one partition, "debug". There is no
# systemd here, so the daemons run as plain background processes; there are
# no cgroups either (proctrack/linuxproc, task/none, no cgroup.conf), so a
# job's CPU and memory limits are not enforced. Jobs may run more tasks than
# CPUs with `--overcommit`. MPICH-family MPIs start with `srun --mpi=pmi2`.
#
# `start` is idempotent: it rewrites /etc/slurm/slurm.conf only when the
# wanted contents differ, restarts the daemons only then, and returns once
# `sinfo` shows the node ready for jobs. It refuses to touch a slurm.conf it
# did not write (set LOCAL_SLURM_FORCE=1 to replace it).
set -euo pipefail

readonly CONF=/etc/slurm/slurm.conf
readonly MARKER="# Written by clip21mpi slurm/local-cluster.sh"
readonly LOG_DIR=/var/log/slurm
readonly MEMORY_MARGIN_MB=512
readonly WAIT_SECONDS=${LOCAL_SLURM_WAIT:-60}
readonly PARTITION=debug

say() { printf 'local-cluster: %s\n' "$*"; }
die() {
    printf 'local-cluster: error: %s\n' "$*" >&2
    exit 1
}

need_root() {
    [[ $(id -u) -eq 0 ]] || die "'$1' needs root (it writes $CONF and starts daemons); run it with sudo"
}

# Whether process $1 exists and is not a zombie.
running() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]
}

# The pid in a pid file, if that process runs and has the expected name.
alive_pid() {
    local pidfile=$1 name=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] && running "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || return 1
    echo "$pid"
}

# Install what is missing; succeed (0) when something was installed.
install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null || missing+=(slurm-wlm)
    # Slurm's pmix plugin (srun --mpi=pmix, for Open MPI) loads libpmix.so,
    # which only the -dev package provides.
    dpkg-query -W -f='${Status}' libpmix-dev 2>/dev/null | grep -q 'ok installed' \
        || missing+=(libpmix-dev)
    ((${#missing[@]})) || return 1
    command -v apt-get >/dev/null \
        || die "${missing[*]} missing and no apt-get: install Slurm and munge by hand"
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating the munge key"
        runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key \
            || die "mungekey could not create /etc/munge/munge.key"
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    if ! alive_pid /run/munge/munged.pid munged >/dev/null; then
        say "starting munged"
        runuser -u munge -- /usr/sbin/munged \
            || die "munged did not start; see /var/log/munge/munged.log"
    fi
    munge -n | unmunge >/dev/null 2>&1 \
        || die "munge cannot encode and decode a credential; see /var/log/munge/munged.log"
}

# The slurm.conf this machine should have, on stdout.
wanted_config() {
    local host cpus hw total_mb memory_mb
    host=$(hostname -s)
    [[ -n $host ]] || die "'hostname -s' is empty: give the machine a hostname"
    # NodeName=... CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ...
    hw=$(slurmd -C | head -n 1) || die "'slurmd -C' failed: cannot read this node's CPUs"
    cpus=$(sed -n 's/.*\(CPUs=[0-9]* .*ThreadsPerCore=[0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus ]] || die "cannot parse the CPU layout from 'slurmd -C': $hw"
    total_mb=$(free -m | awk '/^Mem:/ {print $2}')
    memory_mb=$((total_mb - MEMORY_MARGIN_MB))
    ((memory_mb > 0)) || die "only ${total_mb} MB of memory: too little for a node"
    cat <<EOF
$MARKER start; edit that script, not this file.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it starts again (120 by
# default); short here, so that tests of requeueing jobs are quick.
AuthInfo=cred_expire=10
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: track processes by parent pid, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# As on most clusters, srun starts no PMI unless asked (--mpi=pmi2, pmix).
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 $cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

# Write slurm.conf when it differs; succeed (0) when it changed.
write_config() {
    local wanted
    # Called as `write_config && ...`, where bash ignores errexit: check here.
    wanted=$(wanted_config) || exit 1
    if [[ -e $CONF ]]; then
        if ! grep -qF "$MARKER" "$CONF" && [[ ${LOCAL_SLURM_FORCE:-0} != 1 ]]; then
            die "$CONF exists and was not written by this script; move it away or set LOCAL_SLURM_FORCE=1 to replace it"
        fi
        [[ $(<"$CONF") == "$wanted" ]] && return 1
    fi
    say "writing $CONF"
    printf '%s\n' "$wanted" >"$CONF"
}

stop_daemon() {
    local pidfile=$1 name=$2 pid
    pid=$(alive_pid "$pidfile" "$name") || return 0
    say "stopping $name (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 50); do
        running "$pid" || return 0
        sleep 0.2
    done
    say "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 25); do
        running "$pid" || return 0
        sleep 0.2
    done
    die "$name (pid $pid) is still alive after SIGKILL"
}

start_daemon() {
    local pidfile=$1 name=$2
    alive_pid "$pidfile" "$name" >/dev/null && return 0
    say "starting $name"
    "/usr/sbin/$name" || die "$name did not start; see $LOG_DIR/$name.log"
    for _ in $(seq 50); do
        alive_pid "$pidfile" "$name" >/dev/null && return 0
        sleep 0.2
    done
    tail -n 20 "$LOG_DIR/$name.log" >&2 || true
    die "$name exited after starting; the end of $LOG_DIR/$name.log is above"
}

# The node's state as sinfo prints it (idle, mixed, down*, drained, ...).
node_state() {
    sinfo --noheader --nodes="$(hostname -s)" --format=%T 2>/dev/null | head -n 1
}

wait_until_ready() {
    local state="" resumed=0
    for _ in $(seq $((WAIT_SECONDS * 2))); do
        state=$(node_state) || true
        case $state in
            idle | mixed | allocated | completing)
                say "node $(hostname -s) is $state; partition '$PARTITION' takes jobs"
                return 0
                ;;
            down* | drain* | fail*)
                # Left down or drained by an earlier run of the daemons.
                if ((!resumed)); then
                    scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true
                    resumed=1
                fi
                ;;
        esac
        sleep 0.5
    done
    tail -n 10 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $(hostname -s) not ready after ${WAIT_SECONDS} s (sinfo says '${state:-nothing}'); the ends of the logs are above"
}

cmd_start() {
    local changed=0
    need_root start
    install_packages && changed=1
    start_munge
    install -d -m 0755 "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    write_config && changed=1
    if ((changed)); then
        stop_daemon /run/slurmd.pid slurmd
        stop_daemon /run/slurmctld.pid slurmctld
    fi
    start_daemon /run/slurmctld.pid slurmctld
    start_daemon /run/slurmd.pid slurmd
    wait_until_ready
}

cmd_stop() {
    need_root stop
    stop_daemon /run/slurmd.pid slurmd
    stop_daemon /run/slurmctld.pid slurmctld
    if alive_pid /run/munge/munged.pid munged >/dev/null; then
        say "stopping munged"
        munged --stop >/dev/null || die "munged did not stop"
    fi
}

cmd_status() {
    local down=0 name pidfile pid state
    for pair in munged:/run/munge/munged.pid slurmctld:/run/slurmctld.pid \
        slurmd:/run/slurmd.pid; do
        name=${pair%%:*} pidfile=${pair#*:}
        if pid=$(alive_pid "$pidfile" "$name"); then
            say "$name running (pid $pid)"
        else
            say "$name not running"
            down=1
        fi
    done
    if ((!down)); then
        state=$(node_state) || true
        say "node $(hostname -s): ${state:-unknown}"
        [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || down=1
    fi
    return $((down ? 3 : 0))
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
