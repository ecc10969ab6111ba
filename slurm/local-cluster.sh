#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian's slurm-wlm and munge), for the tests and
# for trying the sbatch scripts without a cluster. Run as root; everything lives in DIR.
#
#   eval "$(slurm/local-cluster.sh start [DIR])"   # installs if needed; prints export SLURM_CONF=...
#   slurm/local-cluster.sh stop [DIR]              # cancels the jobs, stops the daemons
#
# DIR defaults to /tmp/splitwiser-slurm. SLURM_LOCAL_GPUS=N declares N fake GPUs (GRES backed by
# /dev/null) so that the scripts' --gres=gpu:1 schedules on a machine without one. Two partitions hold
# the node: debug (the default) and cpu, for trying a CPU partition's command line (--gres=none --partition=cpu).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
cmd=${1:-start}
DIR=$(realpath -m "${2:-/tmp/splitwiser-slurm}")
CONF=$DIR/slurm.conf
NODE=$(hostname -s); NODE=${NODE%%.*}
GPUS=${SLURM_LOCAL_GPUS:-0}
say() { echo "local-cluster: $*" >&2; }

# pid from a pid file, if that process is alive and was started with our DIR
our_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DIR" && echo "$pid"
}

stop() {
  if our_pid "$DIR/run/slurmctld.pid" >/dev/null; then
    SLURM_CONF=$CONF scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 20); do [ -z "$(SLURM_CONF=$CONF squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  local f pid
  for f in slurmd slurmctld munged; do
    pid=$(our_pid "$DIR/run/$f.pid") || continue
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -f "$DIR"/run/*.pid
}

start() {
  [ "$(id -u)" = 0 ] || { say "run as root"; exit 1; }
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurm-wlm and munge"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >&2 ||
      { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends slurm-wlm munge >&2; }
  fi
  stop
  mkdir -p "$DIR"/{state,spool,log,run}
  chmod 755 "$DIR"
  [ -s "$DIR/munge.key" ] || mungekey --create --keyfile="$DIR/munge.key" >&2
  chmod 600 "$DIR/munge.key"
  local gres="" cpus mem
  if [ "$GPUS" -gt 0 ]; then
    gres=" Gres=gpu:$GPUS"
    mkdir -p "$DIR/dev"
    for ((i = 0; i < GPUS; i++)); do ln -sf /dev/null "$DIR/dev/gpu$i"; done
    echo "NodeName=$NODE Name=gpu File=$DIR/dev/gpu[0-$((GPUS - 1))]" >"$DIR/gres.conf"
  fi
  cpus=$(nproc)
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat >"$CONF" <<EOF
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it starts again (default 120 s)
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# no systemd or cgroups in a container: track job processes through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
MailProg=/bin/true
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem$gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=cpu Nodes=ALL MaxTime=INFINITE State=UP
EOF
  munged --socket="$DIR/munge.socket" --key-file="$DIR/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed" --force 2>/dev/null
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N "$NODE"
  for _ in $(seq 120); do  # the node, as one partition lists it (sinfo -N: a line per partition)
    [ "$(SLURM_CONF=$CONF sinfo -h -N -p debug -o %T 2>/dev/null)" = idle ] &&
      { echo "export SLURM_CONF=$CONF"; return; }
    grep -qs "fatal:" "$DIR"/log/slurm*.log && break  # a daemon gave up: waiting longer cannot help
    sleep 0.5
  done
  say "the node did not become idle; logs in $DIR/log"
  tail -n 20 "$DIR"/log/*.log >&2
  stop
  exit 1
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [DIR]" >&2; exit 2 ;;
esac
