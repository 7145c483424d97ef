#!/usr/bin/env bash
# Stop the one-node test cluster started by start_cluster.sh and delete its state folder:
# cancels its jobs, stops slurmd, slurmctld, slurmdbd, MariaDB and munged by the pids they wrote
# under the folder (no other process is touched), removes its /etc/slurm/slurm.conf link.
# SIMLM_SLURM_KEEP=1 keeps the folder (logs).
set -uo pipefail

STATE="${SIMLM_SLURM_DIR:-/tmp/simlm-slurm}"
export SLURM_CONF="$STATE/slurm.conf"
export PATH="$PATH:/usr/sbin:/sbin"
say() { echo "[stop_cluster] $*"; }

if [ ! -f "$STATE/.simlm-slurm" ]; then
    say "nothing to stop ($STATE is not a test cluster folder)"
    exit 0
fi

pid_of() {  # pid_of NAME: the pid recorded in $STATE/run/NAME.pid if that process is alive
    local f="$STATE/run/$1.pid" pid
    [ -s "$f" ] || return 1
    pid="$(tr -dc '0-9' < "$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop() {  # stop NAME: TERM, wait up to 20 s, then KILL
    local pid
    pid="$(pid_of "$1")" || return 0
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || { say "$1 ($pid) stopped"; return 0; }
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null
    say "$1 ($pid) killed"
}

# Cancel this cluster's jobs so that their slurmstepd/job processes end with them.
if pid_of slurmctld > /dev/null; then
    scancel --full --user=root > /dev/null 2>&1 || true
    for _ in $(seq 40); do
        [ -z "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi

for daemon in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$daemon"
done

# The config link start_cluster.sh made (only if it still points into our folder).
if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$STATE/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
    rmdir /etc/slurm 2>/dev/null || true
fi

if [ "${SIMLM_SLURM_KEEP:-0}" = 1 ]; then
    say "kept $STATE"
else
    rm -rf -- "$STATE"
    say "removed $STATE"
fi
