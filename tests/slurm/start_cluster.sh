#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the SLURM tests (tests/test_slurm.py):
# munged, MariaDB, slurmdbd (so `sacct` works), slurmctld and slurmd, all as root, all state,
# logs, sockets and config under one folder. The system's munged or MariaDB, if any, are left
# alone (private sockets, ports from SIMLM_SLURM_PORT_BASE). The one thing written outside the
# folder is the symlink /etc/slurm/slurm.conf -> <folder>/slurm.conf: the executor's job step
# (snakemake-executor-plugin-slurm-jobstep 0.6) drops SLURM_CONF from the environment of the
# `srun` it runs inside each job, so that srun only finds the config at the compiled-in path.
# A machine that already has its own /etc/slurm/slurm.conf is refused (exit 77), never altered.
#
#   sudo tests/slurm/start_cluster.sh          # idempotent: does nothing if already up
#   source "${SIMLM_SLURM_DIR:-/tmp/simlm-slurm}/env.sh"   # exports SLURM_CONF for sinfo/sbatch/...
#   sudo tests/slurm/stop_cluster.sh           # stops the daemons and deletes the folder
#
# Environment:
#   SIMLM_SLURM_DIR        state folder (default /tmp/simlm-slurm)
#   SIMLM_SLURM_PORT_BASE  slurmctld port; slurmd, slurmdbd and MariaDB use the next three (16817)
#   SIMLM_SLURM_FAKE_GPUS  stand-in GPUs the node advertises, for --gpus submissions (2, >= 1)
#   SIMLM_SLURM_NO_INSTALL set to 1 to never run apt-get (exit 77 if packages are missing)
# Exit status: 0 cluster up; 77 this machine cannot host it (not root, packages missing and not
# installable); anything else: a start-up failure (logs under $SIMLM_SLURM_DIR/log).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SIMLM_SLURM_DIR:-/tmp/simlm-slurm}"
PORT_BASE="${SIMLM_SLURM_PORT_BASE:-16817}"
FAKE_GPUS="${SIMLM_SLURM_FAKE_GPUS:-2}"
CTLD_PORT=$PORT_BASE
SLURMD_PORT=$((PORT_BASE + 1))
DBD_PORT=$((PORT_BASE + 2))
DB_PORT=$((PORT_BASE + 3))
export SLURM_CONF="$STATE/slurm.conf"

say() { echo "[start_cluster] $*"; }
cannot() { echo "[start_cluster] SKIP: $*" >&2; exit 77; }
die() {
    echo "[start_cluster] ERROR: $*" >&2
    for f in "$STATE"/log/*.log; do
        [ -s "$f" ] && { echo "--- $f (tail)" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}

# wait_for SECONDS COMMAND...: retry COMMAND every 0.5 s until it succeeds.
wait_for() {
    local limit=$1; shift
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -ge $end ] && return 1
        sleep 0.5
    done
}

[ "$(id -u)" = 0 ] || cannot "needs root (daemons run as root, packages come from apt)"

# ---------------------------------------------------------------------------------------------
# 1. Packages (Debian: slurm-wlm 22.05 + slurmdbd + munge + MariaDB), only when missing.
BINARIES=(munged munge slurmctld slurmd slurmdbd sbatch squeue sacct sacctmgr sinfo scontrol srun
          mariadbd mariadb-install-db mariadb)
missing=()
for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "${SIMLM_SLURM_NO_INSTALL:-0}" = 1 ] && cannot "missing ${missing[*]} and SIMLM_SLURM_NO_INSTALL=1"
    command -v apt-get >/dev/null 2>&1 || cannot "missing ${missing[*]} and no apt-get to install them"
    say "installing slurm-wlm slurmdbd munge mariadb-server (missing: ${missing[*]})"
    # Keep the packages' maintainer scripts from starting the system-wide daemons: we run our
    # own. Only a policy-rc.d we create is removed again; an existing one is left untouched.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\n# temporary, tests/slurm/start_cluster.sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    install_ok=1
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends slurm-wlm slurmdbd munge mariadb-server mariadb-client; } \
        > /tmp/simlm-slurm-apt.log 2>&1 || install_ok=0
    [ $created_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ $install_ok = 1 ] || { tail -n 20 /tmp/simlm-slurm-apt.log >&2; cannot "apt-get install failed (log: /tmp/simlm-slurm-apt.log)"; }
fi
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------------------------------------
# 2. Already up? Then nothing to do. A half-started or stale folder is cleaned first.
if [ -f "$STATE/.simlm-slurm" ]; then
    if timeout 10 sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated|completing)'; then
        say "already running (state in $STATE)"
        sinfo
        exit 0
    fi
    say "stale state in $STATE: stopping leftovers and starting afresh"
    "$HERE/stop_cluster.sh"
fi
if [ -e "$STATE" ]; then
    [ -f "$STATE/.simlm-slurm" ] || die "$STATE exists and was not made by this script; set SIMLM_SLURM_DIR"
fi
SYSTEM_CONF=/etc/slurm/slurm.conf
if [ -e "$SYSTEM_CONF" ] || [ -L "$SYSTEM_CONF" ]; then
    [ "$(readlink "$SYSTEM_CONF" 2>/dev/null)" = "$STATE/slurm.conf" ] \
        || cannot "$SYSTEM_CONF exists and is not this test cluster's: this machine has its own SLURM"
fi

mkdir -p "$STATE"/{munge,ctld,slurmd,run,log,mysql}
chmod 755 "$STATE" "$STATE/munge"   # munged wants its socket reachable by all
touch "$STATE/.simlm-slurm"

# ---------------------------------------------------------------------------------------------
# 3. Config files from the templates beside this script.
read -r CPUS BOARDS SOCKETS CORES THREADS REAL_MEM < <(
    slurmd -C | head -n 1 | tr ' ' '\n' | awk -F= '
        {v[$1] = $2}
        END {print v["CPUs"], v["Boards"], v["SocketsPerBoard"], v["CoresPerSocket"],
                   v["ThreadsPerCore"], v["RealMemory"]}')
[ -n "${REAL_MEM:-}" ] || die "could not read the node's hardware from 'slurmd -C'"
MEM_MB=$((REAL_MEM * 9 / 10))          # a margin, so the node is never drained for low memory
DB_PASS="$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

render() {  # render TEMPLATE OUTPUT
    sed -e "s|@STATE@|$STATE|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
        -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@CPUS@|$CPUS|g" -e "s|@BOARDS@|$BOARDS|g" -e "s|@SOCKETS@|$SOCKETS|g" \
        -e "s|@CORES@|$CORES|g" -e "s|@THREADS@|$THREADS|g" -e "s|@MEM_MB@|$MEM_MB|g" \
        -e "s|@FAKE_GPUS@|$FAKE_GPUS|g" -e "s|@LAST_GPU@|$LAST_GPU|g" "$1" > "$2"
}
LAST_GPU=$((FAKE_GPUS - 1))
mkdir -p "$STATE/fakegpu"
for i in $(seq 0 "$LAST_GPU"); do   # /dev/null's device numbers; a plain file if mknod is refused
    mknod "$STATE/fakegpu/gpu$i" c 1 3 2>/dev/null || touch "$STATE/fakegpu/gpu$i"
done
render "$HERE/slurm.conf.in" "$STATE/slurm.conf"
render "$HERE/gres.conf.in" "$STATE/gres.conf"
render "$HERE/slurmdbd.conf.in" "$STATE/slurmdbd.conf"
chmod 600 "$STATE/slurmdbd.conf"       # slurmdbd refuses a config others can read
printf 'export SLURM_CONF=%q\n' "$STATE/slurm.conf" > "$STATE/env.sh"
mkdir -p "$(dirname "$SYSTEM_CONF")"
ln -sfn "$STATE/slurm.conf" "$SYSTEM_CONF"

# ---------------------------------------------------------------------------------------------
# 4. munge: a private key and socket.
MUNGE_SOCKET="$STATE/munge/munge.socket"
dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$STATE/munge/munge.key"
munged --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed" || die "munged did not start"
wait_for 20 sh -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'" || die "munge does not answer"
say "munged up"

# ---------------------------------------------------------------------------------------------
# 5. MariaDB for slurmdbd (its only storage back end), on 127.0.0.1:$DB_PORT.
DB_SOCKET="$STATE/run/mariadb.sock"
mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
    --auth-root-authentication-method=socket > "$STATE/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
setsid mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$DB_SOCKET" \
    --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$STATE/run/mariadbd.pid" \
    --log-error="$STATE/log/mariadb.log" --skip-log-bin --innodb-buffer-pool-size=256M \
    --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 --max-connections=50 \
    < /dev/null > /dev/null 2>&1 &
wait_for 60 mariadb --no-defaults -S "$DB_SOCKET" -u root -e "SELECT 1" || die "MariaDB did not start"
mariadb --no-defaults -S "$DB_SOCKET" -u root <<SQL || die "could not create the slurm DB user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
say "MariaDB up on 127.0.0.1:$DB_PORT"

# ---------------------------------------------------------------------------------------------
# 6. slurmdbd, then the cluster, an account for the tests, and root's association to it.
slurmdbd || die "slurmdbd did not start"
wait_for 60 sacctmgr -n list cluster || die "slurmdbd does not answer"
sacctmgr -i add cluster simlm > /dev/null
sacctmgr -i add account simlm Cluster=simlm Description="simlm-pipeline tests" Organization=simlm > /dev/null
sacctmgr -i add user root Account=simlm Cluster=simlm > /dev/null
say "slurmdbd up on port $DBD_PORT"

# ---------------------------------------------------------------------------------------------
# 7. slurmctld and slurmd; wait for the node to be idle.
slurmctld || die "slurmctld did not start"
wait_for 30 scontrol ping || die "slurmctld does not answer"
slurmd -N localhost || die "slurmd did not start"
node_ready() { sinfo -h -N -n localhost -o %T | grep -Eq '^(idle|mixed|allocated)$'; }
end=$((SECONDS + 60))
until node_ready; do
    state="$(sinfo -h -N -n localhost -o %T 2>/dev/null || true)"
    case "$state" in
        down*|drain*|unknown*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    [ $SECONDS -ge $end ] && die "node not idle after 60 s (state: ${state:-?})"
    sleep 1
done
say "cluster up: state in $STATE; run 'source $STATE/env.sh' to use it"
sinfo
