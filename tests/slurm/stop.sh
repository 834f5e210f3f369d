#!/usr/bin/env bash
# Stop the local test cluster started by start.sh. Idempotent.
#
#   sudo tests/slurm/stop.sh
#
# Stops slurmd and slurmctld, then slurmdbd, then mariadbd and munged (so
# nothing loses a peer it still needs mid-shutdown) and removes their pid files: a stale
# pid file makes a later start think a daemon is up, and for Debian's default
# paths breaks apt's maintainer scripts. State (job records, accounting DB,
# logs) stays in the state dir, so start.sh brings the same cluster back.
# Jobs still running are not cancelled here; slurmctld requeues or fails them
# at the next start.
#
# The state dir is $PIPELINE_SLURM_DIR if set, else the one recorded in the
# installed /etc/slurm/slurm.conf, else /var/lib/pipeline-slurm.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

require_root
take_lock

dir=${PIPELINE_SLURM_DIR:-$(installed_state_dir)}
set_paths "${dir:-$DEFAULT_STATE_DIR}"

# Each daemon takes 1-3 s to exit, so independent ones stop in parallel:
# slurmctld and slurmd first (slurmctld still flushes job records to
# slurmdbd), then slurmdbd (still needs MariaDB and munge), then the rest.
stop_pidfile "$RUN_DIR/slurmd.pid" slurmd &
stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld &
wait
stop_pidfile "$RUN_DIR/slurmdbd.pid" slurmdbd
stop_pidfile "$DB_PIDFILE" mariadbd &
stop_pidfile "$MUNGE_PIDFILE" munged &
wait
rm -f "$DB_SOCKET"

echo "stop.sh: local Slurm cluster stopped (state kept in $STATE_DIR)"
