#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster (munge, MariaDB, slurmdbd, slurmctld, slurmd) on
# localhost from Debian packages, for gradsim's integration tests and CI. No systemd needed.
#
# Usage:  slurm_scripts/cluster/start.sh          (as root, or a user with passwordless sudo)
#         source "${GRADSIM_SLURM_BASE:-/tmp/gradsim-slurm}/env.sh"   # optional, see below
#
# Environment:
#   GRADSIM_SLURM_BASE     base directory for config, state, logs, pid files, database
#                          (default /tmp/gradsim-slurm)
#   GRADSIM_SLURM_CPUS     CPUs the node advertises (default 4; more than the machine has is fine)
#   GRADSIM_SLURM_DB_PORT  TCP port of the private MariaDB on 127.0.0.1 (default 3306)
#
# Idempotent: daemons that are already running are left alone; one that died is started again.
# The config is also installed as /etc/slurm/slurm.conf when that file is absent or ours, so
# sbatch/squeue/sacct and submitit work without SLURM_CONF. Stop with stop.sh (same directory).
set -euo pipefail

# The package installs, munge and the daemons need root; CI runners usually have passwordless sudo.
if [[ $EUID -ne 0 ]]; then
    exec sudo --preserve-env=GRADSIM_SLURM_BASE,GRADSIM_SLURM_CPUS,GRADSIM_SLURM_DB_PORT \
        bash "$0" "$@"
fi

T0=$(date +%s%N)
BASE=${GRADSIM_SLURM_BASE:-/tmp/gradsim-slurm}
CPUS=${GRADSIM_SLURM_CPUS:-4}
DB_PORT=${GRADSIM_SLURM_DB_PORT:-3306}
CLUSTER=testcluster
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
# Marks the config files we write, so we only ever overwrite our own /etc/slurm/slurm.conf.
MARKER="# Written by gradsim slurm_scripts/cluster/start.sh"

CONF_DIR=$BASE/conf
LOG_DIR=$BASE/log
RUN_DIR=$BASE/run
STATE_DIR=$BASE/state
DB_DIR=$BASE/mariadb
DB_SOCK=$DB_DIR/mysqld.sock
# mariadbd writes its pid file after dropping to the mysql user, so it lives in the mysql-owned datadir.
DB_PID=$DB_DIR/mariadbd.pid
export SLURM_CONF=$CONF_DIR/slurm.conf   # slurmdbd finds slurmdbd.conf beside it

log() { printf '%s\n' "$*"; }
die() { printf 'start.sh: error: %s\n' "$*" >&2; exit 1; }
# elapsed T: seconds since T (from date +%s%N), with one decimal.
elapsed() { local ds=$((($(date +%s%N) - $1) / 100000000)); printf '%d.%d' $((ds / 10)) $((ds % 10)); }

# wait_for SECONDS DESCRIPTION LOGFILE COMMAND...: poll COMMAND every 0.2 s; on timeout show the log.
wait_for() {
    local timeout=$1 what=$2 logfile=$3; shift 3
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            printf 'start.sh: timed out after %ss waiting for %s\n' "$timeout" "$what" >&2
            [[ -f $logfile ]] && { echo "--- last lines of $logfile:" >&2; tail -n 20 "$logfile" >&2; }
            exit 1
        fi
        sleep 0.2
    done
}

# alive PIDFILE NAME: the pid file names a live process called NAME. The name guards against a
# recycled pid; the state against a dead daemon that a slow container init has not reaped yet.
alive() {
    local pid stat
    [[ -r $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }   # the fields after "(comm) "; the first is the state
    [[ ${stat:0:1} != Z ]]
}
pid_of() { tr -dc 0-9 <"$1"; }
report() { printf '%-10s pid %-7s %s\n' "$1" "$2" "$3"; }

install -d -m 0755 "$BASE" "$CONF_DIR" "$LOG_DIR" "$RUN_DIR" "$STATE_DIR/ctld" "$STATE_DIR/d"
# Serialise concurrent callers (e.g. parallel CI steps) so only one installs and starts each
# daemon. Every daemon is started with fd 9 closed (9>&-): one that inherited it would hold the
# lock forever.
exec 9>"$BASE/.start.lock"
flock -w 300 9 || die "another start.sh has held $BASE/.start.lock for 5 minutes"

# ---------------------------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    # Package postinst scripts try to start their services; policy-rc.d exiting 101 forbids that
    # (we start everything ourselves, from our own config). Keep a policy-rc.d that was already there.
    own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        own_policy=1
        trap 'if ((own_policy)); then rm -f /usr/sbin/policy-rc.d; fi' EXIT
    fi
    apt_log=$LOG_DIR/apt.log
    apt_update() { t=$(date +%s%N); apt-get update -q >>"$apt_log" 2>&1 || true; update_s=$(elapsed "$t"); }
    apt_install() { apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1; }
    update_s=0
    # Fresh images have no package lists and old lists point at superseded .debs: refresh them
    # when they are missing or more than a day old, and once more if the install still fails.
    if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 2>/dev/null) ]]; then
        apt_update
    fi
    t_install=$(date +%s%N)
    if ! apt_install; then
        apt_update
        t_install=$(date +%s%N)
        apt_install || { tail -n 30 "$apt_log" >&2; die "apt-get install failed (log: $apt_log)"; }
    fi
    if ((own_policy)); then rm -f /usr/sbin/policy-rc.d; own_policy=0; fi
    log "installed ${missing[*]} (apt-get update ${update_s}s, install $(elapsed "$t_install")s)"
fi

# ---------------------------------------------------------------------------------------------
# Directories and config
# ---------------------------------------------------------------------------------------------

# write_if_changed FILE MODE: replace FILE with stdin only when the content differs (so a warm
# re-run leaves mtimes alone); returns 0 when it changed.
write_if_changed() {
    local tmp; tmp=$(mktemp "$1.XXXXXX")
    cat >"$tmp"; chmod "$2" "$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
    mv -f "$tmp" "$1"
}

mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024) - 512}' /proc/meminfo)
slurm_conf_changed=0
write_if_changed "$CONF_DIR/slurm.conf" 0644 <<EOF && slurm_conf_changed=1
$MARKER
# base directory: $BASE
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job (submitit preemption/timeout) is eligible again only after cred_expire+1 s;
# the default 120 s would make every requeue take two minutes.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/d
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroup access needed (containers, CI runners).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Trust the node line below instead of the hardware, so the node can advertise more CPUs than the
# machine has and a few one-CPU test tasks run side by side.
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# Schedule every second instead of every minute: tests wait on it.
SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
KillWait=5
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.txt
JobAcctGatherType=jobacct_gather/linux
# sacct (which submitit polls to see a job finish) needs slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# One GPU gres with no device behind it (gres.conf: a count, no File): a --gres=gpu:1 job is accepted and
# scheduled like on a GPU cluster, and gradsim's task then finds no CUDA device and says so (the tests' GPU path).
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

write_if_changed "$CONF_DIR/gres.conf" 0644 <<EOF && slurm_conf_changed=1
$MARKER
NodeName=localhost Name=gpu File=/dev/null Count=1
EOF

# The database password is made once and kept, so re-runs match the user already in MariaDB.
[[ -s $CONF_DIR/dbpass ]] || (umask 077; head -c 24 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$CONF_DIR/dbpass")
db_pass=$(cat "$CONF_DIR/dbpass")
# slurmdbd refuses a config that is not 0600 and owned by SlurmUser (root).
write_if_changed "$CONF_DIR/slurmdbd.conf" 0600 <<EOF || true
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$RUN_DIR/slurmdbd.pid
EOF

write_if_changed "$BASE/env.sh" 0644 <<EOF || true
# Source this to point Slurm clients at the gradsim test cluster (start.sh writes it).
export GRADSIM_SLURM_BASE=$BASE
export SLURM_CONF=$CONF_DIR/slurm.conf
EOF

# Plain sbatch/sacct (and submitit, which calls them) read /etc/slurm/slurm.conf; take that path
# only when it is free or ours, never over someone else's cluster config.
if [[ ! -e /etc/slurm/slurm.conf ]] || grep -qxF "$MARKER" /etc/slurm/slurm.conf; then
    install -d -m 0755 /etc/slurm
    write_if_changed /etc/slurm/slurm.conf 0644 <"$CONF_DIR/slurm.conf" || true
    write_if_changed /etc/slurm/gres.conf 0644 <"$CONF_DIR/gres.conf" || true
else
    log "note: /etc/slurm/slurm.conf belongs to another setup; use 'source $BASE/env.sh' to reach this cluster"
fi

# ---------------------------------------------------------------------------------------------
# munge: one system-wide instance (clients use the default socket). If someone else's munged is
# already answering we use it and record no pid file, so stop.sh leaves it alone.
# ---------------------------------------------------------------------------------------------
if alive "$RUN_DIR/munged.pid" munged; then
    report munged "$(pid_of "$RUN_DIR/munged.pid")" "already running"
elif munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    report munged "-" "system instance already running (not managed by these scripts)"
else
    if [[ ! -s /etc/munge/munge.key ]]; then
        # Normally made by the package's postinst; make one if it is missing.
        (umask 077; head -c 1024 /dev/urandom >/etc/munge/munge.key)
        chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    # munged writes its pid file as the munge user, so let it use its own directory and copy it.
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid </dev/null 9>&-
    wait_for 10 "munged" /var/log/munge/munged.log test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid"
    wait_for 10 "munge to answer" /var/log/munge/munged.log bash -c 'munge -n | unmunge'
    report munged "$(pid_of "$RUN_DIR/munged.pid")" "started"
fi

# ---------------------------------------------------------------------------------------------
# MariaDB: a private instance (own datadir, no system config) that only slurmdbd uses.
# ---------------------------------------------------------------------------------------------
if alive "$DB_PID" mariadbd; then
    report mariadbd "$(pid_of "$DB_PID")" "already running"
else
    if [[ ! -d $DB_DIR/mysql ]]; then
        rm -rf "$DB_DIR"
        install -d -o mysql -g mysql -m 0750 "$DB_DIR"
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR" --skip-test-db \
            >"$LOG_DIR/mariadb-install-db.log" 2>&1 || { tail -n 20 "$LOG_DIR/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
    fi
    # mariadbd opens its error log as the mysql user.
    touch "$LOG_DIR/mariadbd.err"; chown mysql:mysql "$LOG_DIR/mariadbd.err"
    # setsid -f: fully detached, so the CI step that ran start.sh can end while it keeps running.
    # The InnoDB values are the ones slurmdbd asks for (it logs an error otherwise); the buffer
    # pool is only touched as it fills, so 1G costs little memory on a test cluster.
    setsid -f mariadbd --no-defaults --user=mysql --datadir="$DB_DIR" --socket="$DB_SOCK" \
        --pid-file="$DB_PID" --bind-address=127.0.0.1 --port="$DB_PORT" --skip-name-resolve \
        --innodb-buffer-pool-size=1G --innodb-lock-wait-timeout=900 \
        --log-error="$LOG_DIR/mariadbd.err" </dev/null >>"$LOG_DIR/mariadbd.out" 2>&1 9>&-
    wait_for 30 "mariadbd" "$LOG_DIR/mariadbd.err" mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping
    wait_for 5 "mariadbd pid file" "$LOG_DIR/mariadbd.err" test -s "$DB_PID"
    report mariadbd "$(pid_of "$DB_PID")" "started"
fi
# Idempotent, and re-asserts the password in case conf/ was wiped while the datadir was kept.
# OS root logs in as the database root over the socket (unix_socket authentication).
mariadb --no-defaults --socket="$DB_SOCK" -u root <<EOF
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
EOF

# ---------------------------------------------------------------------------------------------
# slurmdbd, slurmctld, slurmd: they daemonise themselves and write the pid files named in the
# config. No `sacctmgr add cluster` is needed: slurmctld (22.05) adds its cluster to the database
# when it first registers with slurmdbd; the root account and user come with it.
# ---------------------------------------------------------------------------------------------
if alive "$RUN_DIR/slurmdbd.pid" slurmdbd; then
    report slurmdbd "$(pid_of "$RUN_DIR/slurmdbd.pid")" "already running"
else
    rm -f "$RUN_DIR/slurmdbd.pid"
    slurmdbd </dev/null 9>&-
    wait_for 30 "slurmdbd" "$LOG_DIR/slurmdbd.log" sacctmgr -n show cluster
    report slurmdbd "$(pid_of "$RUN_DIR/slurmdbd.pid")" "started"
fi

# A changed slurm.conf or gres.conf (another GRADSIM_SLURM_CPUS, base or memory, the GPU gres) reaches running
# daemons by a restart: a reconfigure accepts node definition changes without applying them (a new Gres stays
# "(null)" until slurmctld and slurmd restart). Job state survives in StateSaveLocation.
if ((slurm_conf_changed)) && alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    log "slurm.conf changed: restarting slurmctld and slurmd"
    bash "$(dirname "${BASH_SOURCE[0]}")/stop.sh" slurmd slurmctld
fi

if alive "$RUN_DIR/slurmctld.pid" slurmctld; then
    report slurmctld "$(pid_of "$RUN_DIR/slurmctld.pid")" "already running"
else
    rm -f "$RUN_DIR/slurmctld.pid"
    slurmctld </dev/null 9>&-
    wait_for 30 "slurmctld (scontrol ping UP)" "$LOG_DIR/slurmctld.log" \
        bash -c 'scontrol ping | grep -q "is UP"'
    report slurmctld "$(pid_of "$RUN_DIR/slurmctld.pid")" "started"
fi

if alive "$RUN_DIR/slurmd.pid" slurmd; then
    report slurmd "$(pid_of "$RUN_DIR/slurmd.pid")" "already running"
else
    rm -f "$RUN_DIR/slurmd.pid"
    # -N: the node is called localhost whatever the machine's hostname is.
    slurmd -N localhost </dev/null 9>&-
    wait_for 10 "slurmd pid file" "$LOG_DIR/slurmd.log" test -s "$RUN_DIR/slurmd.pid"
    report slurmd "$(pid_of "$RUN_DIR/slurmd.pid")" "started"
fi

# ---------------------------------------------------------------------------------------------
# Ready when the node takes jobs and sacct answers. Busy states count: a warm re-run may find jobs.
# ---------------------------------------------------------------------------------------------
# A node drained under an earlier config (e.g. registered before the GPU gres existed) is put back in service.
node_ready() {
    local state; state=$(sinfo -h -N -n localhost -o %T)
    if [[ $state == drain* || $state == inval* ]]; then scontrol update nodename=localhost state=resume >/dev/null 2>&1; fi
    grep -qxE 'idle|mixed|allocated|completing' <<<"$state"
}
wait_for 30 "node localhost to be idle" "$LOG_DIR/slurmd.log" node_ready
wait_for 15 "slurmctld to register $CLUSTER with slurmdbd" "$LOG_DIR/slurmctld.log" \
    bash -c "sacctmgr -n -P show cluster $CLUSTER format=cluster | grep -qx $CLUSTER"
wait_for 15 "sacct to answer" "$LOG_DIR/slurmdbd.log" sacct -n -X -S now-1minutes

log "slurm cluster up: cluster=$CLUSTER node=localhost cpus=$CPUS mem=${mem_mb}M partition=debug" \
    "base=$BASE SLURM_CONF=$SLURM_CONF ($(elapsed "$T0")s)"
