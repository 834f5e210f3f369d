#!/usr/bin/env bash
# Start (or confirm) a single-node Slurm cluster on localhost for the tests.
#
#   sudo tests/slurm/start.sh          # idempotent; a second run is a fast no-op
#
# What it does, in order:
#   1. installs Debian's munge, slurmctld, slurmd, slurm-client, slurmdbd and
#      mariadb-server if any is missing (nothing starts them: no systemd here);
#   2. writes /etc/slurm/{slurm,slurmdbd,gres}.conf from the node's real layout;
#   3. starts munged, mariadbd, slurmdbd, slurmctld and slurmd (each only if it
#      is not already running) and registers the cluster with slurmdbd;
#   4. waits (bounded) until sinfo shows the node idle.
# On any failure it exits non-zero and prints the tail of every daemon's log.
#
# Environment:
#   PIPELINE_SLURM_DIR      state/log/spool directory (default /var/lib/pipeline-slurm)
#   PIPELINE_SLURM_CPUS     CPUs to advertise (default 8, never fewer than real)
#   PIPELINE_SLURM_TIMEOUT  seconds to wait for each daemon / the node (default 60)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

require_root
take_lock

set_paths "${PIPELINE_SLURM_DIR:-$DEFAULT_STATE_DIR}"
WANT_CPUS=${PIPELINE_SLURM_CPUS:-8}
TIMEOUT=${PIPELINE_SLURM_TIMEOUT:-60}
HOST=$(hostname -s)
T0=$(date +%s.%N)

log() { echo "start.sh: $*"; }

show_logs() {
    local f
    for f in "$MUNGE_LOG" "$DB_LOG" "$LOG_DIR/slurmdbd.log" \
             "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        echo "----- last 25 lines of $f -----"
        if [ -f "$f" ]; then tail -n 25 "$f"; else echo "(missing)"; fi
    done
}

die() {
    {
        echo "start.sh: ERROR: $*"
        show_logs
        echo "start.sh: ERROR: $* (logs above; stop everything with tests/slurm/stop.sh)"
    } >&2
    exit 1
}

# wait_for DESCRIPTION CMD...: retry CMD (quietly) every 0.5 s for $TIMEOUT s.
wait_for() {
    local what=$1 deadline
    shift
    deadline=$(($(date +%s) + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.5
    done
}

# ---------------------------------------------------------------- 0. refuse
# Never overwrite a Slurm config we did not write (e.g. a real cluster's).
for f in slurm.conf slurmdbd.conf gres.conf; do
    [ -e "$SLURM_ETC/$f" ] || continue
    first=$(head -n 1 "$SLURM_ETC/$f")
    if [ "${first#"$MARKER_PREFIX"}" = "$first" ]; then
        echo "start.sh: $SLURM_ETC/$f exists and was not written by this script" \
             "(no '$MARKER_PREFIX' first line). Refusing to overwrite it;" \
             "move it away yourself if this machine is meant to run the local test cluster." >&2
        exit 1
    fi
done

# If a previous run used another state dir, stop that cluster first: its
# daemons hold the ports and their pid files are not where we would look.
OLD_DIR=$(installed_state_dir)
if [ -n "$OLD_DIR" ] && [ "$OLD_DIR" != "$STATE_DIR" ]; then
    log "the installed config uses state dir $OLD_DIR; stopping that cluster first"
    PIPELINE_SLURM_DIR=$OLD_DIR PIPELINE_SLURM_LOCK_HELD=1 "$HERE/stop.sh"
fi

# ---------------------------------------------------------------- 1. install
# Map a binary each package provides -> package; install only what is missing.
missing=()
for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sinfo:slurm-client \
            slurmdbd:slurmdbd mariadbd:mariadb-server; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get update first: package lists may be empty)"
    export DEBIAN_FRONTEND=noninteractive
    apt_log=$(mktemp)
    # Recommends are not needed (they pull in compression plugins, perl bits).
    if ! { apt-get update -qq &&
           apt-get install -y -qq --no-install-recommends \
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
               "${missing[@]}"; } >"$apt_log" 2>&1; then
        tail -n 40 "$apt_log" >&2
        echo "start.sh: ERROR: installing ${missing[*]} failed (apt output above)" >&2
        exit 1
    fi
    rm -f "$apt_log"
fi

# ---------------------------------------------------------------- 2. dirs, devices, configs
install -d -m 0755 "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$CTLD_DIR" "$SPOOL_DIR" "$DEV_DIR" "$SLURM_ETC"
install -d -m 0700 "$PRIV_DIR"
install -d -m 0750 -o mysql -g mysql "$DB_DATA" "$DB_RUN"
[ -e "$DB_LOG" ] || install -m 0640 -o mysql -g mysql /dev/null "$DB_LOG"

# Fake GPUs: slurmd accepts only character devices as gres File= (a regular
# file is rejected and CUDA_VISIBLE_DEVICES stays empty). Major 1 minor 3 is
# the same device as /dev/null, so nothing can misuse them.
for i in 0 1 2 3; do
    dev=$DEV_DIR/fakegpu$i
    if [ ! -c "$dev" ]; then
        rm -f "$dev"
        mknod -m 0666 "$dev" c 1 3 || die "mknod $dev failed"
    fi
done

# Node layout from the hardware. Keep the real sockets/threads but raise the
# core count so the node advertises >= PIPELINE_SLURM_CPUS CPUs: many trivial
# test jobs then run at once (slurmd accepts it thanks to config_overrides).
hw=$(slurmd -C 2>/dev/null) || die "'slurmd -C' failed"
hw=${hw%%$'\n'*}   # first line: NodeName=... CPUs=... RealMemory=...
hwval() { printf '%s\n' "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
BOARDS=$(hwval Boards); SOCKETS_PER_BOARD=$(hwval SocketsPerBoard)
CORES=$(hwval CoresPerSocket); THREADS=$(hwval ThreadsPerCore); MEM=$(hwval RealMemory)
[ -n "$SOCKETS_PER_BOARD" ] && [ -n "$CORES" ] && [ -n "$THREADS" ] && [ -n "$MEM" ] \
    || die "could not parse 'slurmd -C' output: $hw"
SOCKETS=$(( ${BOARDS:-1} * SOCKETS_PER_BOARD ))
PER_CORE=$(( SOCKETS * THREADS ))
WANT_CORES=$(( (WANT_CPUS + PER_CORE - 1) / PER_CORE ))
[ "$WANT_CORES" -gt "$CORES" ] && CORES=$WANT_CORES
CPUS=$(( SOCKETS * CORES * THREADS ))

# DB password for the slurm accounting user, made once and kept private.
if [ ! -s "$PRIV_DIR/dbpass" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=\n' >"$PRIV_DIR/dbpass")
fi
DB_PASS=$(cat "$PRIV_DIR/dbpass")

MARKER="$MARKER_PREFIX generated by tests/slurm/start.sh, do not edit; state_dir=$STATE_DIR"
NEW=$(mktemp -d)
trap 'rm -rf "$NEW"' EXIT

cat >"$NEW/slurm.conf" <<EOF
$MARKER
# Single-node test cluster. See tests/slurm/README.md.
ClusterName=$CLUSTER_NAME
# NodeAddr/SlurmctldHost address 127.0.0.1: works without any DNS for the name.
SlurmctldHost=$HOST(127.0.0.1)
# Everything runs as root: this is a throwaway cluster on a root-only test
# machine, and with SlurmUser=slurm slurmctld cannot manage its pid/state
# files reliably (it cannot remove its pid file, leaving stale ones behind).
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Short credential lifetime: a requeued job may restart after ~5 s instead of 120 s.
AuthInfo=cred_expire=5
CredType=cred/munge
MailProg=/bin/true

StateSaveLocation=$CTLD_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups on this machine (no systemd, no delegated cgroup tree).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30

# Accounting through slurmdbd + MariaDB, so sacct (and submitit) see job states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none

SchedulerType=sched/backfill
# Frequent scheduling passes keep test latency low on an otherwise idle node.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, each job would get all node memory and run alone.
DefMemPerCPU=1024
MaxArraySize=1001
MaxJobCount=20000
# Requeue must be allowed (scontrol requeue, submitit preemption/timeouts).
# RequeueExit is left unset on purpose: no exit code should requeue by itself.
JobRequeue=1
KillWait=5
MinJobAge=30
InactiveLimit=0
Waittime=0
ReturnToService=2
SlurmdTimeout=60

GresTypes=gpu
# Trust this file, not the hardware: advertises $CPUS CPUs (really fewer).
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST CPUs=$CPUS Sockets=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM Gres=gpu:rtx8000:2,gpu:v100:2 State=UNKNOWN
# Partition names do not restrict GPU types: ask with --gres=gpu:v100:1.
PartitionName=debug Nodes=$HOST Default=YES MaxTime=1-00:00:00 State=UP
PartitionName=rtx8000 Nodes=$HOST MaxTime=1-00:00:00 State=UP
PartitionName=v100 Nodes=$HOST MaxTime=1-00:00:00 State=UP
EOF

cat >"$NEW/gres.conf" <<EOF
$MARKER
# Fake GPUs: character devices (same as /dev/null), no NVML detection.
AutoDetect=off
NodeName=$HOST Name=gpu Type=rtx8000 File=$DEV_DIR/fakegpu[0-1]
NodeName=$HOST Name=gpu Type=v100 File=$DEV_DIR/fakegpu[2-3]
EOF

cat >"$NEW/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
# "localhost" is accepted regardless of the machine's name.
DbdHost=localhost
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
# Reached through the unix socket $DB_SOCKET (MariaDB has networking off);
# start.sh passes the socket path to slurmdbd in MYSQL_UNIX_PORT.
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

# MariaDB private to this cluster: own datadir, socket only, no TCP port.
cat >"$NEW/my.cnf" <<EOF
$MARKER
[mysqld]
user=mysql
datadir=$DB_DATA
socket=$DB_SOCKET
pid-file=$DB_PIDFILE
log-error=$DB_LOG
skip-networking
# Slurm's recommended values (avoid lock timeouts in upgrades/rollups). Its
# innodb_buffer_pool_size advice (4 GB) is left out on purpose: the default
# suffices for a test cluster; slurmdbd then logs a harmless warning about it.
innodb_log_file_size=64M
innodb_lock_wait_timeout=900

[client]
socket=$DB_SOCKET
user=root
EOF

# install_conf NAME DEST MODE: copy only if the content changed; report it.
changed=""
install_conf() {
    if ! cmp -s "$NEW/$1" "$2"; then
        install -m "$3" -o root -g root "$NEW/$1" "$2"
        changed="$changed $1"
    fi
}
install_conf slurm.conf "$SLURM_ETC/slurm.conf" 0644
install_conf gres.conf "$SLURM_ETC/gres.conf" 0644
# slurmdbd refuses a slurmdbd.conf readable by others (it holds the DB password).
install_conf slurmdbd.conf "$SLURM_ETC/slurmdbd.conf" 0600
install_conf my.cnf "$MYCNF" 0644

# A daemon still running with an outdated config is restarted below.
case $changed in *my.cnf*) stop_pidfile "$DB_PIDFILE" mariadbd ;; esac
case $changed in *slurmdbd.conf*) stop_pidfile "$RUN_DIR/slurmdbd.pid" slurmdbd ;; esac
case $changed in *slurm.conf*|*gres.conf*)
    stop_pidfile "$RUN_DIR/slurmd.pid" slurmd
    stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld ;;
esac
[ -z "$changed" ] || log "config written:$changed"

# ---------------------------------------------------------------- 3. daemons
# Every daemon is started with "9>&-": fd 9 holds our lock (take_lock), and a
# daemon inheriting it would keep the lock for its whole lifetime.
# munged: Debian's package makes the key; create it if a previous purge lost it.
munge_ok() { munge -n -t 10 | unmunge; }
if ! munge_ok >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    # /run/munge is not recreated for us (no systemd-tmpfiles): munged needs it
    # owned by the munge user, which it runs as.
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge
    rm -f "$MUNGE_PIDFILE"
    log "starting munged"
    # --force: take over a socket left behind by a munged that died uncleanly
    # (munged still refuses if a live munged holds the socket's lock).
    runuser -u munge -- munged --force 9>&- || die "munged failed to start"
    wait_for "munged" munge_ok
fi

# mariadbd: initialise the private datadir once, then run it in the background.
db_ok() { mariadb-admin --defaults-file="$MYCNF" --connect-timeout=2 ping; }
if ! pid_alive "$DB_PIDFILE" mariadbd || ! db_ok >/dev/null 2>&1; then
    stop_pidfile "$DB_PIDFILE" mariadbd
    if [ ! -d "$DB_DATA/mysql" ]; then
        log "initialising MariaDB datadir $DB_DATA"
        mariadb-install-db --defaults-file="$MYCNF" --skip-test-db >>"$DB_LOG" 2>&1 9>&- \
            || die "mariadb-install-db failed"
    fi
    log "starting mariadbd"
    # mariadbd does not daemonize itself: detach it from this shell.
    setsid mariadbd --defaults-file="$MYCNF" </dev/null >>"$DB_LOG" 2>&1 9>&- &
    wait_for "mariadbd on $DB_SOCKET" db_ok
fi
# Idempotent: database and user for slurmdbd (root logs in through the socket).
mariadb --defaults-file="$MYCNF" <<EOF || die "creating the accounting database failed"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF

# slurmdbd: the MySQL client library takes the socket path from MYSQL_UNIX_PORT.
dbd_ok() { timeout 10 sacctmgr -n -P list cluster format=cluster; }
if ! pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then
    rm -f "$RUN_DIR/slurmdbd.pid"
    log "starting slurmdbd"
    MYSQL_UNIX_PORT=$DB_SOCKET slurmdbd 9>&- || die "slurmdbd failed to start"
    wait_for "slurmdbd" dbd_ok
fi
# Register the cluster before slurmctld first connects, so its jobs are recorded.
clusters=$(dbd_ok 2>/dev/null) || die "slurmdbd does not answer sacctmgr"
if ! printf '%s\n' "$clusters" | grep -qx "$CLUSTER_NAME"; then
    log "registering cluster $CLUSTER_NAME in slurmdbd"
    timeout 20 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null \
        || die "sacctmgr add cluster $CLUSTER_NAME failed"
fi

ctld_ok() { scontrol ping | grep -q 'is UP'; }
if ! pid_alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    rm -f "$RUN_DIR/slurmctld.pid"
    log "starting slurmctld"
    slurmctld 9>&- || die "slurmctld failed to start"
    wait_for "slurmctld" ctld_ok
fi

if ! pid_alive "$RUN_DIR/slurmd.pid" slurmd; then
    rm -f "$RUN_DIR/slurmd.pid"
    log "starting slurmd -N $HOST"
    slurmd -N "$HOST" 9>&- || die "slurmd failed to start"
fi

# ---------------------------------------------------------------- 4. node ready
# idle when empty; mixed/allocated/completing if jobs survived a restart.
node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | awk 'NR == 1'; }
node_ok() { case $(node_state) in idle|mixed|allocated|completing) return 0 ;; esac; return 1; }
deadline=$(($(date +%s) + TIMEOUT))
until node_ok; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        scontrol show node "$HOST" >&2 || true
        die "node $HOST is '$(node_state)' (reason: $(sinfo -h -N -n "$HOST" -o '%E' | awk 'NR == 1')), not idle after ${TIMEOUT}s"
    fi
    sleep 0.5
done

log "cluster $CLUSTER_NAME up: node $HOST $(node_state), $CPUS CPUs advertised," \
    "4 fake GPUs; logs in $LOG_DIR ($(awk -v t0="$T0" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }') s)"
sinfo
