#!/usr/bin/env bash
# A single-node SLURM on this machine, without systemd (Debian/Ubuntu slurm-wlm + munge), to try
# kneebatch's cluster path and to test it. Needs root (SlurmUser=root).
#
#   apt-get install -y slurm-wlm munge
#   cluster/local-slurm.sh start DIR    # prints the line to eval: export SLURM_CONF=DIR/slurm.conf
#   cluster/local-slurm.sh stop DIR
#
# DIR holds the configuration, state, spool, logs and PID files; ports come from
# $SLURM_LOCAL_PORT (slurmctld; slurmd takes the next one), default 6817.
set -euo pipefail
cmd=${1:-}; dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop DIR" >&2; exit 2
fi
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)

stop() {
  for name in slurmd slurmctld; do
    if [[ -f "$dir/$name.pid" ]]; then kill "$(cat "$dir/$name.pid")" 2>/dev/null || true; fi
  done
  if [[ -f "$dir/munged.started" ]]; then pkill -x munged 2>/dev/null || true; rm -f "$dir/munged.started"; fi
  for name in slurmd slurmctld; do  # gone before the state is reused
    for _ in $(seq 50); do
      [[ -f "$dir/$name.pid" ]] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$dir/$name.pid"
  done
}

start() {
  for exe in slurmctld slurmd sinfo sbatch munged; do
    command -v "$exe" >/dev/null || [[ -x "/usr/sbin/$exe" ]] || { echo "$exe not found: apt-get install -y slurm-wlm munge" >&2; exit 3; }
  done
  [[ "$(id -u)" == 0 ]] || { echo "the local SLURM runs its daemons as root" >&2; exit 3; }
  port=${SLURM_LOCAL_PORT:-6817}
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=kneebatch-local
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=sched_interval=1
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$dir/munged.started"
  fi
  export SLURM_CONF="$dir/slurm.conf"
  /usr/sbin/slurmctld -f "$SLURM_CONF"
  /usr/sbin/slurmd -f "$SLURM_CONF" -N localhost
  for _ in $(seq 300); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    if [[ "$state" == idle* ]]; then echo "export SLURM_CONF=$SLURM_CONF"; return 0; fi
    sleep 0.1
  done
  echo "SLURM did not come up (node state: ${state:-none}); logs in $dir/log" >&2
  stop; exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
