#!/usr/bin/env bash
# local_cluster.sh start|stop|status DIR
#
# A real single-node SLURM cluster (slurmctld + slurmd + slurmdbd/MariaDB accounting + munge) on
# this machine, without systemd, with every file it writes under DIR. See bench/slurm/README.md.
#
#   eval "$(bench/slurm/local_cluster.sh start /tmp/ehin-slurm)"   # stdout: export lines only
#   bench/slurm/local_cluster.sh status /tmp/ehin-slurm
#   bench/slurm/local_cluster.sh stop /tmp/ehin-slurm
#
# Exit codes: 0 ok; 1 a daemon failed to start / the node never became idle (log tails on stderr);
# 2 usage; 3 cannot run on this machine at all (not root, apt-get failed, packages missing).
# Environment knobs: EHIN_SLURM_START_TIMEOUT (s, default 90), EHIN_SLURM_PARTITION (default debug),
# EHIN_SLURM_DEF_MEM_PER_CPU (MB, default min(2048, RealMemory/CPUs)).
set -euo pipefail
# The daemons live in /usr/sbin, which a minimal PATH (cron, env -i, a non-login shell) leaves out.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

PACKAGES=(slurmctld slurmd slurmdbd slurm-client munge mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop goes in reverse
PARTITION="${EHIN_SLURM_PARTITION:-debug}"
CLUSTER_NAME="ehin"
START_TIMEOUT="${EHIN_SLURM_START_TIMEOUT:-90}"

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { local code="$1"; shift; printf '[local_cluster] ERROR: %s\n' "$*" >&2; exit "$code"; }

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
CMD="$1"
case "$CMD" in start|stop|status) ;; *) usage ;; esac
if [[ ! -d "$2" ]]; then
    case "$CMD" in
        start) mkdir -p -- "$2" 2>/dev/null || die 3 "cannot create $2" ;;
        stop) log "no cluster directory $2: nothing to stop"; exit 0 ;;
        status) echo "no cluster directory $2"; exit 1 ;;
    esac
fi
DIR="$(cd -- "$2" && pwd -P)"

ETC="$DIR/etc"; RUN="$DIR/run"; LOGD="$DIR/log"; SPOOL="$DIR/spool"
MUNGE_DIR="$DIR/munge"; MUNGE_SOCK_DIR="$DIR/munge/run"; MUNGE_SOCK="$MUNGE_SOCK_DIR/munge.socket.2"
DB_DIR="$DIR/mariadb"; DB_SOCK="$DB_DIR/run/mysqld.sock"
SLURM_CONF_FILE="$ETC/slurm.conf"
MARKER="EHIN_SLURM_DAEMON_DIR=$DIR"    # put in every daemon's environment; `stop` finds leftovers by it

# --------------------------------------------------------------------------- processes
pidfile() { echo "$RUN/$1.pid"; }

# has_marker PID: the process was started by this script for this DIR
has_marker() {
    local pid="$1"
    grep -qzxF -- "$MARKER" "/proc/$pid/environ" 2>/dev/null
}

# running NAME: prints the recorded pid when that process is alive and is ours
running() {
    local f pid
    f="$(pidfile "$1")"
    [[ -s "$f" ]] || return 1
    pid="$(cat "$f")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # guard against a recycled pid: it must carry this DIR's marker in its environment
    has_marker "$pid" || return 1
    echo "$pid"
}

# launch NAME LOGFILE CMD...: start CMD in the foreground mode of the daemon, detached from our
# stdio/session, record its pid
launch() {
    local name="$1" logfile="$2"; shift 2
    env "$MARKER" SLURM_CONF="$SLURM_CONF_FILE" setsid "$@" </dev/null >>"$logfile" 2>&1 9>&- &
    echo $! > "$(pidfile "$name")"
}

# wait_gone PID TIMEOUT_S
wait_gone() {
    local pid="$1" t="$2" i
    for ((i = 0; i < t * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        # a zombie child of ours counts as gone
        [[ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" == "Z" ]] && return 0
        sleep 0.1
    done
    return 1
}

kill_pid() {   # kill_pid PID LABEL: TERM, wait, KILL, wait
    local pid="$1" label="$2"
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_gone "$pid" 20; then
        log "$label (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || log "$label (pid $pid) still present after SIGKILL"
    fi
}

# our own pid and our ancestors: never to be killed by the sweeps below
self_and_ancestors() {
    local pid=$BASHPID
    while [[ -n "$pid" && "$pid" != 0 ]]; do
        echo "$pid"
        pid="$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null)"
        [[ "$pid" == 1 ]] && break
    done
    echo "$$"
}

# processes left behind by this cluster once its daemons are gone: those carrying our marker
# (slurmstepd, forked by slurmd) and job processes (their environment names this cluster's
# SLURM_CONF and a SLURM_JOB_ID), e.g. after slurmd crashed or was killed with jobs running
leftover_pids() {
    local p pid keep
    keep=" $(self_and_ancestors | tr '\n' ' ') "
    for p in /proc/[0-9]*; do
        pid="${p#/proc/}"
        [[ "$keep" == *" $pid "* ]] && continue
        if has_marker "$pid"; then echo "$pid"; continue; fi
        if grep -qzxF -- "SLURM_CONF=$SLURM_CONF_FILE" "$p/environ" 2>/dev/null \
            && grep -qz '^SLURM_JOB_ID=' "$p/environ" 2>/dev/null; then
            echo "$pid"
        fi
    done
    return 0
}

tail_logs() {
    local d f
    for d in "${DAEMONS[@]}"; do
        f="$LOGD/$d.log"
        [[ -s "$f" ]] || f="$LOGD/$d.stdout.log"     # what it printed before its log file opened
        [[ -s "$f" ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 15 "$f" >&2 || true
    done
}

# --------------------------------------------------------------------------- install
pkg_installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

ensure_packages() {
    local missing=() p
    command -v dpkg-query >/dev/null || die 3 "not a Debian system (no dpkg-query): cannot install ${PACKAGES[*]}"
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ "$(id -u)" -eq 0 ]] || die 3 "packages missing (${missing[*]}) and not root: cannot apt-get install"
    command -v apt-get >/dev/null || die 3 "packages missing (${missing[*]}) and no apt-get"
    log "installing ${missing[*]} (apt-get update + install)"
    local t0=$SECONDS made_policy=0
    # keep the packages' maintainer scripts from starting system-wide daemons (no systemd here:
    # invoke-rc.d would run the SysV scripts); only when the machine has no policy of its own
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    local rc=0
    { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}" >&2; } || rc=$?
    [[ $made_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    [[ $rc -eq 0 ]] || die 3 "apt-get install ${PACKAGES[*]} failed (exit $rc)"
    for p in "${PACKAGES[@]}"; do pkg_installed "$p" || die 3 "package $p still not installed after apt-get"; done
    log "installed in $((SECONDS - t0)) s"
}

# --------------------------------------------------------------------------- config (once per DIR)
free_port() {   # a TCP port on 127.0.0.1 nobody listens on, not in the argument list
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 30000))
        [[ " $* " == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
    done
    die 1 "no free TCP port found"
}

plugin_dir() {
    local so
    so="$(dpkg -L slurm-wlm-basic-plugins 2>/dev/null | grep '/auth_munge\.so$' | head -n1)"
    [[ -n "$so" ]] || die 3 "cannot locate Slurm's plugin dir (auth_munge.so) via dpkg -L slurm-wlm-basic-plugins"
    dirname "$so"
}

write_config() {
    [[ -s "$SLURM_CONF_FILE" && -s "$ETC/slurmdbd.conf" && -s "$ETC/cluster.env" ]] && return 0
    log "writing configuration under $DIR"
    local node cpus mem topo defmem pdir
    node="$(hostname -s)"
    # slurmd -C: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    read -r cpus mem topo < <(slurmd -C | awk '/^NodeName=/ {
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        print v["CPUs"], v["RealMemory"], "Boards=" v["Boards"] " SocketsPerBoard=" v["SocketsPerBoard"] \
              " CoresPerSocket=" v["CoresPerSocket"] " ThreadsPerCore=" v["ThreadsPerCore"] }')
    [[ "$cpus" =~ ^[0-9]+$ && "$mem" =~ ^[0-9]+$ ]] || die 1 "could not read CPUs/RealMemory from 'slurmd -C'"
    [[ "$topo" =~ Boards=[0-9]+\ SocketsPerBoard=[0-9]+\ CoresPerSocket=[0-9]+\ ThreadsPerCore=[0-9]+$ ]] || topo=""
    defmem="${EHIN_SLURM_DEF_MEM_PER_CPU:-$(( mem / cpus < 2048 ? mem / cpus : 2048 ))}"
    pdir="$(plugin_dir)"
    local p_ctld p_d p_dbd p_db dbpass
    p_ctld="$(free_port)"; p_d="$(free_port "$p_ctld")"; p_dbd="$(free_port "$p_ctld" "$p_d")"
    p_db="$(free_port "$p_ctld" "$p_d" "$p_dbd")"
    dbpass="$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"

    cat > "$ETC/cluster.env" <<EOF
NODE=$node
CPUS=$cpus
REAL_MEMORY=$mem
DEF_MEM_PER_CPU=$defmem
PARTITION=$PARTITION
CLUSTER_NAME=$CLUSTER_NAME
SLURMCTLD_PORT=$p_ctld
SLURMD_PORT=$p_d
SLURMDBD_PORT=$p_dbd
MARIADB_PORT=$p_db
PLUGIN_DIR=$pdir
EOF
    umask 077
    cat > "$ETC/slurmdbd.conf" <<EOF
# generated by bench/slurm/local_cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$p_dbd
SlurmUser=root
PluginDir=$pdir
LogFile=$LOGD/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$p_db
StorageUser=slurm
StoragePass=$dbpass
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    umask 022
    cat > "$SLURM_CONF_FILE" <<EOF
# generated by bench/slurm/local_cluster.sh: single node, everything under $DIR
ClusterName=$CLUSTER_NAME
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$p_ctld
SlurmdPort=$p_d
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
CredType=cred/munge
PluginDir=$pdir
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$DIR/tmp
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
ReturnToService=2
InactiveLimit=0
KillWait=3
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
# accounting: slurmdbd + MariaDB (submitit reads job states only through sacct)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$p_dbd
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus $topo RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

load_cluster_env() {
    # shellcheck disable=SC1091
    source "$ETC/cluster.env"
}

print_env() {
    # stdout: only lines a shell can eval
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
    echo "export EHIN_SLURM_DIR=$DIR"
    echo "export EHIN_SLURM_PARTITION=$PARTITION"
}

write_env_file() {
    print_env > "$DIR/env.sh"
}

# --------------------------------------------------------------------------- daemons
start_munged() {
    if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
        (umask 077; head -c 1024 /dev/urandom > "$MUNGE_DIR/munge.key")
    fi
    chmod 700 "$MUNGE_DIR/lib"; chmod 600 "$MUNGE_DIR/munge.key"
    chmod 755 "$MUNGE_SOCK_DIR"     # munged refuses a socket dir it deems insecure; 0755 works
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    launch munged "$LOGD/munged.stdout.log" munged -F \
        --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$RUN/munged.daemon.pid" --log-file="$LOGD/munged.log" \
        --seed-file="$MUNGE_DIR/lib/munged.seed"
    wait_for munged munge_ok || die_start "munged did not come up on $MUNGE_SOCK"
}

# shellcheck disable=SC2120
db_client() { mariadb --no-defaults --protocol=socket --socket="$DB_SOCK" -uroot "$@"; }

start_mariadbd() {
    local first=0
    if [[ ! -d "$DB_DIR/data/mysql" ]]; then
        first=1
        log "initialising MariaDB datadir $DB_DIR/data"
        rm -rf "$DB_DIR/data"; mkdir -p "$DB_DIR/data"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$LOGD/mariadb-install-db.log" 2>&1 \
            || { tail -n 30 "$LOGD/mariadb-install-db.log" >&2; die 1 "mariadb-install-db failed"; }
    fi
    launch mariadbd "$LOGD/mariadbd.stdout.log" mariadbd --no-defaults --user=root \
        --datadir="$DB_DIR/data" --socket="$DB_SOCK" --port="$MARIADB_PORT" --bind-address=127.0.0.1 \
        --pid-file="$RUN/mariadbd.daemon.pid" --log-error="$LOGD/mariadbd.log" --tmpdir="$DB_DIR/tmp" \
        --skip-name-resolve --performance-schema=OFF --innodb-buffer-pool-size=64M \
        --innodb-lock-wait-timeout=900 --max-connections=50
    wait_for mariadbd mariadb-admin --no-defaults --protocol=socket --socket="$DB_SOCK" -uroot ping \
        || die_start "mariadbd did not answer on $DB_SOCK"
    if [[ $first -eq 1 || ! -e "$DB_DIR/.slurm_user_created" ]]; then
        local pass
        pass="$(sed -n 's/^StoragePass=//p' "$ETC/slurmdbd.conf")"
        db_client <<EOF || die_start "could not create the slurm database user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
        touch "$DB_DIR/.slurm_user_created"
    fi
}

start_slurmdbd() {
    launch slurmdbd "$LOGD/slurmdbd.stdout.log" slurmdbd -D
    # sacctmgr talks to slurmdbd directly: it answering means slurmdbd is up (the first start
    # creates the tables, a few seconds)
    wait_for slurmdbd sacctmgr -n -P list cluster || die_start "slurmdbd did not answer sacctmgr"
    if [[ ! -e "$DIR/.cluster_added" ]]; then
        local clusters
        clusters="$(sacctmgr -n -P list cluster format=cluster)" || die_start "sacctmgr list cluster failed"
        if ! grep -qx -- "$CLUSTER_NAME" <<<"$clusters"; then
            sacctmgr -i add cluster "$CLUSTER_NAME" >&2 || die_start "sacctmgr add cluster failed"
        fi
        touch "$DIR/.cluster_added"
    fi
}

start_slurmctld() {
    launch slurmctld "$LOGD/slurmctld.stdout.log" slurmctld -D -f "$SLURM_CONF_FILE"
    wait_for slurmctld ctld_up || die_start "slurmctld did not answer 'scontrol ping'"
}

start_slurmd() {
    launch slurmd "$LOGD/slurmd.stdout.log" slurmd -D -f "$SLURM_CONF_FILE"
}

# wait_for NAME CMD...: until CMD succeeds (0) or daemon NAME exits / START_TIMEOUT passes (1)
wait_for() {
    local name="$1" t0=$SECONDS; shift
    while (( SECONDS - t0 < START_TIMEOUT )); do
        "$@" >/dev/null 2>&1 && return 0
        running "$name" >/dev/null || { log "$name exited"; return 1; }
        sleep 0.1
    done
    log "$name: no answer after ${START_TIMEOUT}s"
    return 1
}

munge_ok() { local cred; cred="$(munge -n -S "$MUNGE_SOCK")" && unmunge -S "$MUNGE_SOCK" <<<"$cred"; }
ctld_up() { local out; out="$(scontrol ping 2>/dev/null)" && [[ "$out" == *"is UP"* ]]; }

die_start() {
    tail_logs
    die 1 "$* (logs in $LOGD; run '$0 stop $DIR' to clean up)"
}

wait_idle() {
    local t0=$SECONDS state=""
    while (( SECONDS - t0 < START_TIMEOUT )); do
        state="$(sinfo -h -N -p "$PARTITION" -o '%T' 2>/dev/null || true)"
        state="${state%%$'\n'*}"
        case "$state" in
            idle|mixed|allocated|completing) return 0 ;;
        esac
        local d
        for d in "${DAEMONS[@]}"; do running "$d" >/dev/null || die_start "$d exited during start-up"; done
        sleep 0.2
    done
    die_start "node not idle after ${START_TIMEOUT}s (sinfo state: '${state:-none}', reason: '$(sinfo -h -N -o %E 2>/dev/null || true)')"
}

# --------------------------------------------------------------------------- commands
do_start() {
    [[ "$(id -u)" -eq 0 ]] || die 3 "must run as root (the daemons run as root; no systemd is used)"
    ensure_packages
    (( ${#MUNGE_SOCK} < 100 )) || die 3 "DIR too long for a unix socket path: $MUNGE_SOCK"
    mkdir -p "$ETC" "$RUN" "$LOGD" "$SPOOL/slurmctld" "$SPOOL/slurmd" "$DIR/tmp" \
        "$MUNGE_DIR/lib" "$MUNGE_SOCK_DIR" "$DB_DIR/run" "$DB_DIR/tmp"
    chmod 755 "$DIR"
    exec 9>"$RUN/start.lock"
    flock -w 300 9 || die 1 "another start/stop holds $RUN/start.lock"
    write_config
    load_cluster_env
    export SLURM_CONF="$SLURM_CONF_FILE"
    local t0=$SECONDS d pid started=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(running "$d")"; then
            log "$d already running (pid $pid)"
        else
            log "starting $d"
            "start_$d"
            started=1
        fi
    done
    wait_idle
    write_env_file
    if [[ $started -eq 1 ]]; then
        log "cluster up in $((SECONDS - t0)) s: node $NODE, $CPUS CPUs, ${REAL_MEMORY} MB, partition $PARTITION"
    else
        log "cluster already up: node $NODE, partition $PARTITION"
    fi
    print_env
}

do_stop() {
    [[ -d "$RUN" ]] || { log "nothing recorded under $DIR"; return 0; }
    exec 9>"$RUN/start.lock"
    flock -w 300 9 || die 1 "another start/stop holds $RUN/start.lock"
    export SLURM_CONF="$SLURM_CONF_FILE"
    local pid d i
    # cancel jobs first, so no job processes outlive the daemons
    if running slurmctld >/dev/null && [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        log "cancelling queued/running jobs"
        scancel --full -u root >/dev/null 2>&1 || true
        for ((i = 0; i < 150; i++)); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 0.2
        done
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d="${DAEMONS[$i]}"
        if pid="$(running "$d")"; then
            log "stopping $d (pid $pid)"
            kill_pid "$pid" "$d"
        fi
        rm -f "$(pidfile "$d")"
    done
    # whatever the cluster left behind (slurmstepd and its job processes when slurmd died with
    # jobs running): SIGKILL, as slurmstepd ignores SIGTERM
    local left
    left="$(leftover_pids)"
    if [[ -n "$left" ]]; then
        for pid in $left; do
            log "killing leftover pid $pid: $({ tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null | cut -c1-70)"
            kill -KILL "$pid" 2>/dev/null || true
        done
        for pid in $left; do wait_gone "$pid" 10 || log "pid $pid still present after SIGKILL"; done
    fi
    rm -f "$MUNGE_SOCK" "$DB_SOCK"
    log "stopped"
}

do_status() {
    local d pid rc=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(running "$d")"; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=1; fi
    done
    if [[ -s "$SLURM_CONF_FILE" ]] && running slurmctld >/dev/null; then
        export SLURM_CONF="$SLURM_CONF_FILE"
        echo "SLURM_CONF=$SLURM_CONF_FILE"
        sinfo || rc=1
    fi
    return $rc
}

case "$CMD" in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
esac
