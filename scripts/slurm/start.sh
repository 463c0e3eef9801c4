#!/usr/bin/env bash
# A one-node Slurm cluster on loopback for the `--backend slurm` tests (CI, a developer
# machine where you are root): installs Debian's slurm-wlm and munge when missing, writes
# /etc/slurm/slurm.conf for this machine (its real CPU count and memory, from slurmd -C),
# starts munged, slurmctld and slurmd, and waits until sinfo shows the node idle.
# Idempotent: a cluster that is already up is left alone. Slurm 22.05 (bookworm) starts
# in a few seconds. Prints `slurm: ready (...)` on success; exits non-zero otherwise.
set -euo pipefail

log() { echo "[slurm] $*" >&2; }
if [[ $(id -u) -ne 0 ]]; then
  log "needs root (installs packages, writes /etc/slurm, starts daemons)"
  exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

node_idle() {
  sinfo -h -N -o '%T' 2>/dev/null | grep -qx 'idle\|mixed\|allocated'
}
if munge -n >/dev/null 2>&1 && pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && node_idle; then
  echo "slurm: ready (already running)"
  exit 0
fi

# ---- munge: the authentication every Slurm message carries -----------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating a munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
# Judge munged by its answer, not by pgrep: a killed one can linger as a zombie.
if ! munge -n >/dev/null 2>&1; then
  rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { log "munged does not answer"; exit 1; }

# ---- slurm.conf: one node on 127.0.0.1 --------------------------------------------------
node=$(hostname -s)
# slurmd -C prints this machine as a NodeName line: CPUs, sockets, cores, RealMemory.
hw=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //')
mem=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$hw")
# Leave the operating system some room, as real clusters do.
hw=$(sed -E "s/RealMemory=[0-9]+/RealMemory=$((mem * 9 / 10))/" <<<"$hw")
mkdir -p /etc/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
cat >/etc/slurm/slurm.conf <<EOF
# Written by scripts/slurm/start.sh: a one-node test cluster on loopback.
ClusterName=lora-train-ci
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups: containers and CI sandboxes rarely let us have them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# No slurmdbd: finished jobs are read back with sacct -c from this file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
# A job whose dependency can never be met is cancelled instead of pending forever.
SchedulerParameters=kill_invalid_depend
# Short periods: tests wait on these.
SchedulerTimeSlice=5
MessageTimeout=10
KillWait=30
MinJobAge=300
NodeName=${node} NodeAddr=127.0.0.1 ${hw} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

# ---- daemons ----------------------------------------------------------------------------
pkill_pidfile() {
  local f=$1 name=$2 pid
  [[ -s $f ]] || return 0
  pid=$(cat "$f")
  # Only if that pid is still the daemon: a stale file may name a reused pid.
  if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
    kill "$pid" 2>/dev/null || true
  fi
}
# A half-started earlier attempt (say, a stale daemon from an older config) goes first.
pkill_pidfile /run/slurmd.pid slurmd
pkill_pidfile /run/slurmctld.pid slurmctld
sleep 0.5
t0=$(date +%s.%N)
# -c: a test cluster starts with no jobs of an earlier run (its state files are kept
# across machine restarts, its processes are not).
slurmctld -c
slurmd
for _ in $(seq 300); do
  if node_idle; then
    break
  fi
  state=$(sinfo -h -N -o '%T' 2>/dev/null || true)
  if [[ $state == down* || $state == drain* ]]; then
    scontrol update nodename="$node" state=resume 2>/dev/null || true
  fi
  sleep 0.1
done
if ! node_idle; then
  log "the node did not come up; sinfo says: $(sinfo -N 2>&1 | tail -1)"
  tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
  exit 1
fi
echo "slurm: ready ($(sinfo -h -N -o '%N %T %c CPUs %m MB') in $(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo '?') s)"
