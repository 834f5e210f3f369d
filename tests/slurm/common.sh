# shellcheck shell=bash
# Helpers shared by start.sh and stop.sh (sourced, not executed).
#
# Everything this local cluster writes lives under one state directory
# ($PIPELINE_SLURM_DIR, default /var/lib/pipeline-slurm), except what the
# client tools and munge insist on finding at fixed places:
#   /etc/slurm/{slurm,slurmdbd,gres}.conf  (Slurm tools read them from there)
#   /etc/munge/munge.key, /run/munge, /var/log/munge  (munge's own defaults,
#   which Slurm's auth/munge plugin talks to)

# Daemons live in sbin; a non-login root shell may not have it on PATH.
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"

CLUSTER_NAME=pipeline-local
SLURM_ETC=/etc/slurm
DEFAULT_STATE_DIR=/var/lib/pipeline-slurm
# First line of every config file we write. We only ever overwrite or rely on
# files that carry it, so a real Slurm installation is never clobbered.
MARKER_PREFIX='# pipeline-local-slurm:'
MUNGE_PIDFILE=/run/munge/munged.pid
MUNGE_LOG=/var/log/munge/munged.log

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$(basename "$0"): must run as root: the local Slurm cluster's daemons are" \
             "system daemons (munged, mariadbd, slurmdbd, slurmctld, slurmd) configured" \
             "in /etc/slurm. Try: sudo $0" >&2
        exit 1
    fi
}

# take_lock: serialise start.sh/stop.sh runs (e.g. parallel test sessions),
# which could otherwise both decide a daemon is down and start it twice.
# The lock is held on fd 9 until the script exits.
take_lock() {
    # start.sh runs stop.sh while holding the lock: do not wait on ourselves.
    [ -z "${PIPELINE_SLURM_LOCK_HELD:-}" ] || return 0
    exec 9>/run/pipeline-slurm.lock
    if ! flock -w 120 9; then
        echo "$(basename "$0"): another start.sh/stop.sh held /run/pipeline-slurm.lock for 120 s" >&2
        exit 1
    fi
}

# set_paths DIR: derive every path of the local cluster from its state dir.
set_paths() {
    STATE_DIR=$1
    RUN_DIR=$STATE_DIR/run            # pid files of the slurm daemons
    LOG_DIR=$STATE_DIR/log            # all slurm + mariadb logs
    CTLD_DIR=$STATE_DIR/slurmctld     # StateSaveLocation
    SPOOL_DIR=$STATE_DIR/slurmd       # SlurmdSpoolDir
    DEV_DIR=$STATE_DIR/dev            # fake GPU character devices
    PRIV_DIR=$STATE_DIR/etc           # my.cnf, DB password (root only)
    DB_DATA=$STATE_DIR/mysql          # MariaDB datadir (owned by mysql)
    DB_RUN=$STATE_DIR/mysqld          # MariaDB socket + pid (owned by mysql)
    MYCNF=$PRIV_DIR/my.cnf
    DB_SOCKET=$DB_RUN/mysqld.sock
    DB_PIDFILE=$DB_RUN/mariadbd.pid
    DB_LOG=$LOG_DIR/mariadb.log
}

# installed_state_dir: the state dir recorded in the marker line of an
# installed /etc/slurm/slurm.conf written by start.sh (empty if none).
installed_state_dir() {
    local f=$SLURM_ETC/slurm.conf line
    [ -f "$f" ] || return 0
    line=$(head -n 1 "$f")
    case $line in
        "$MARKER_PREFIX"*state_dir=*) printf '%s\n' "${line##*state_dir=}" ;;
    esac
}

# pid_alive PIDFILE COMM: true if the pid file names a live process whose
# command name is COMM (guards against a stale file whose pid was reused).
pid_alive() {
    local pidfile=$1 comm=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

# stop_pidfile PIDFILE COMM: SIGTERM the daemon, wait up to 30 s, then
# SIGKILL; always remove the pid file (a stale one confuses later starts and,
# for Debian's default paths, breaks apt maintainer scripts).
stop_pidfile() {
    local pidfile=$1 comm=$2 pid i
    if pid_alive "$pidfile" "$comm"; then
        pid=$(tr -dc '0-9' <"$pidfile")
        echo "stopping $comm (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$comm (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    rm -f "$pidfile"
}
