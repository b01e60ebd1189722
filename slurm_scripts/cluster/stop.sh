#!/usr/bin/env bash
# Stop the single-node Slurm cluster that start.sh brought up: only the daemons it started, found
# by the pid files under the base directory (never by process name), newest first.
#
# Usage:  slurm_scripts/cluster/stop.sh [--purge | DAEMON...]
#   --purge   also delete the base directory (job state, accounting database, logs, config) and
#             our /etc/slurm/slurm.conf; the next start.sh starts from nothing (job ids restart at 1).
#   DAEMON    stop only these (slurmd slurmctld slurmdbd mariadbd munged); start.sh uses this to
#             restart slurmctld and slurmd when the node definition changed.
# Environment: GRADSIM_SLURM_BASE (default /tmp/gradsim-slurm), as for start.sh.
#
# Jobs that are still running keep running under their slurmstepd (that is how Slurm survives a
# slurmd restart); cancel them first if that matters.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
    exec sudo --preserve-env=GRADSIM_SLURM_BASE bash "$0" "$@"
fi

# Reverse of the start order: compute node, controller, accounting, database, auth.
ALL=(slurmd slurmctld slurmdbd mariadbd munged)
purge=0
selected=()
for arg in "$@"; do
    case "$arg" in
        --purge) purge=1 ;;
        slurmd | slurmctld | slurmdbd | mariadbd | munged) selected+=("$arg") ;;
        *) echo "usage: $0 [--purge | DAEMON...]  (DAEMON: ${ALL[*]})" >&2; exit 2 ;;
    esac
done
if ((purge && ${#selected[@]})); then
    echo "$0: --purge stops everything; it takes no daemon names" >&2; exit 2
fi

BASE=${GRADSIM_SLURM_BASE:-/tmp/gradsim-slurm}
MARKER="# Written by gradsim slurm_scripts/cluster/start.sh"
TERM_TIMEOUT=${GRADSIM_SLURM_STOP_TIMEOUT:-20}   # seconds between SIGTERM and SIGKILL

# running PID: the process exists and is not a zombie. Daemons are children of init, and an init
# that reaps slowly (a container's) would otherwise make every stop wait for it.
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }                         # the fields after "(comm) "; the first is the state
    [[ ${stat:0:1} != Z ]]
}

# stop_daemon NAME PIDFILE: SIGTERM the process named in PIDFILE if it is still NAME (a recycled
# pid belongs to someone else), SIGKILL it if it outlives TERM_TIMEOUT, then drop the pid file.
stop_daemon() {
    local name=$1 pidfile=$2 pid i
    if [[ ! -r $pidfile ]]; then
        printf '%-10s not running (no pid file)\n' "$name"; return
    fi
    pid=$(tr -dc 0-9 <"$pidfile")
    if [[ -z $pid || ! -r /proc/$pid/comm || $(cat "/proc/$pid/comm") != "$name" ]]; then
        printf '%-10s not running (stale pid file)\n' "$name"; rm -f "$pidfile"; return
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TERM_TIMEOUT * 10; i++)); do
        running "$pid" || break
        sleep 0.1
    done
    if running "$pid"; then
        kill -KILL "$pid" 2>/dev/null || true
        printf '%-10s pid %-7s killed (ignored SIGTERM for %ss)\n' "$name" "$pid" "$TERM_TIMEOUT"
    else
        printf '%-10s pid %-7s stopped\n' "$name" "$pid"
    fi
    rm -f "$pidfile"
}

if [[ -d $BASE ]]; then
    for name in "${ALL[@]}"; do
        if ((${#selected[@]})) && [[ " ${selected[*]} " != *" $name "* ]]; then continue; fi
        case $name in
            # mariadbd writes its pid file into its own (mysql-owned) datadir.
            mariadbd) pidfile=$BASE/mariadb/mariadbd.pid ;;
            # munged.pid exists only when start.sh started munged itself, not when it found a
            # system munged already running.
            *) pidfile=$BASE/run/$name.pid ;;
        esac
        stop_daemon "$name" "$pidfile"
    done
else
    echo "nothing to stop: $BASE does not exist"
fi

if ((purge)); then
    # Refuse anything that is not plainly our base directory.
    if [[ -z $BASE || $BASE == / || ! -d $BASE ]]; then
        echo "nothing to purge at '$BASE'"
    elif [[ -e $BASE/conf/slurm.conf ]] && ! grep -qxF "$MARKER" "$BASE/conf/slurm.conf"; then
        echo "refusing to purge $BASE: its conf/slurm.conf was not written by start.sh" >&2; exit 1
    else
        rm -rf -- "$BASE"
        echo "purged $BASE"
    fi
    # Our copy in /etc/slurm points at the base we just removed.
    if [[ -f /etc/slurm/slurm.conf ]] && grep -qxF "$MARKER" /etc/slurm/slurm.conf \
        && grep -qxF "# base directory: $BASE" /etc/slurm/slurm.conf; then
        rm -f /etc/slurm/slurm.conf
        echo "removed /etc/slurm/slurm.conf"
    fi
fi
