#!/usr/bin/env bash
# A real one-node Slurm on localhost for the tests (CI, or a developer's
# Debian/Ubuntu machine where you are root).
#
#   bash .ci/slurm.sh start    install slurm-wlm + munge (apt-get), write the
#                              configuration, start munged, slurmctld, slurmd
#                              and wait until the node is idle
#   bash .ci/slurm.sh stop     stop the daemons this script started
#   bash .ci/slurm.sh status   sinfo / squeue
#
# No systemd, no cgroups, no accounting database: proctrack/linuxproc,
# task/none, accounting_storage/none. Snakemake's slurm plugin must then poll
# with squeue (profiles/slurm sets slurm-status-command: squeue); MinJobAge is
# kept long so finished jobs stay visible to squeue.
# Two fake GPUs (character devices made with mknod, gres.conf with
# AutoDetect=off) let jobs ask for --gpus=N / --gres=gpu:N: each job gets its
# own CUDA_VISIBLE_DEVICES; no CUDA is behind them.
set -euo pipefail

ETC=${SLURM_CONF_DIR:-/etc/slurm}
STATE=${SLURM_CI_STATE:-/var/lib/slurm-ci}
GPU_DIR=$STATE/gpus
NUM_GPUS=${SLURM_CI_GPUS:-2}
LOGDIR=/var/log/slurm-ci

as_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo ".ci/slurm.sh must run as root (it installs packages and starts daemons)" >&2
    exit 1
  fi
}

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local host cpus mem_mb real_mb def_mem
  host=$(hostname -s)
  cpus=$(nproc --all)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  real_mb=$((mem_mb * 9 / 10))   # a little under the machine's (slurmd refuses more)
  def_mem=$((real_mb / cpus / 4)) # without DefMemPerCPU one job takes all memory
  [ "$def_mem" -ge 256 ] || def_mem=256
  mkdir -p "$ETC" "$STATE/ctld" "$STATE/d" "$GPU_DIR" "$LOGDIR"
  local files=""
  for ((i = 0; i < NUM_GPUS; i++)); do
    [ -c "$GPU_DIR/gpu$i" ] || mknod "$GPU_DIR/gpu$i" c 195 "$i"
  done
  local old_conf=""
  [ -f "$ETC/slurm.conf" ] && old_conf=$(cat "$ETC/slurm.conf" "$ETC/gres.conf" 2>/dev/null || true)
  cat >"$ETC/slurm.conf" <<EOF
# written by .ci/slurm.sh: one node on localhost, no accounting, no cgroups
ClusterName=ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# finished jobs stay visible to squeue (the status command without slurmdbd)
MinJobAge=3600
# seconds between SIGTERM and SIGKILL on scancel/time limit: time to checkpoint
KillWait=30
InactiveLimit=0
Waittime=0
GresTypes=gpu
DefMemPerCPU=$def_mem
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb Gres=gpu:$NUM_GPUS State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
# not the default: the tests install the site profile with --partition ci and
# check every job ran there (the profile's partition really reached sbatch)
PartitionName=ci Nodes=$host Default=NO MaxTime=INFINITE State=UP
EOF
  {
    echo "# written by .ci/slurm.sh: fake GPUs (mknod character devices)"
    echo "AutoDetect=off"
    for ((i = 0; i < NUM_GPUS; i++)); do
      echo "NodeName=$host Name=gpu File=$GPU_DIR/gpu$i"
    done
  } >"$ETC/gres.conf"
  if [ "$old_conf" != "$(cat "$ETC/slurm.conf" "$ETC/gres.conf")" ]; then
    # a changed configuration needs fresh daemons
    stop_pidfile "$STATE/slurmd.pid" slurmd
    stop_pidfile "$STATE/slurmctld.pid" slurmctld
  fi
}

start_munge() {
  if [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    return
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "slurm: munged does not answer" >&2
  return 1
}

start_slurm() {
  if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    :
  else
    slurmctld -i || { # -i: ignore errors in state left by an earlier run
      echo "slurm: slurmctld failed to start" >&2
      tail -n 20 "$LOGDIR/slurmctld.log" >&2
      return 1
    }
  fi
  if [ -f "$STATE/slurmd.pid" ] && kill -0 "$(cat "$STATE/slurmd.pid")" 2>/dev/null; then
    :
  else
    slurmd || {
      echo "slurm: slurmd failed to start" >&2
      tail -n 20 "$LOGDIR/slurmd.log" >&2
      return 1
    }
  fi
}

wait_idle() {
  local host state
  host=$(hostname -s)
  for _ in $(seq 1 60); do
    state=$(sinfo -h -N -n "$host" -o '%t' 2>/dev/null | head -n 1 || true)
    case "$state" in
      idle | mix | alloc)
        echo "slurm: node $host is $state"
        sinfo -N -o '%N %P %t %c %m %G'
        return 0
        ;;
      down* | drain* | inval*)
        scontrol update nodename="$host" state=resume 2>/dev/null || true
        ;;
    esac
    sleep 1
  done
  echo "slurm: node $host did not become idle (state: ${state:-none})" >&2
  tail -n 30 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
  return 1
}

stop_pidfile() {
  local file=$1 name=$2 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 20); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "slurm: stopped $name ($pid)"
  fi
  rm -f "$file"
}

stop() {
  # cancel what is left so no job outlives the run
  if command -v scancel >/dev/null && [ -f "$STATE/slurmctld.pid" ]; then
    scancel --user="$(id -un)" 2>/dev/null || true
  fi
  stop_pidfile "$STATE/slurmd.pid" slurmd
  stop_pidfile "$STATE/slurmctld.pid" slurmctld
  stop_pidfile /run/munge/munged.pid munged
}

case "${1:-start}" in
  start)
    as_root
    t0=$(date +%s)
    install_packages
    write_config
    start_munge
    start_slurm
    wait_idle
    echo "slurm: up in $(($(date +%s) - t0)) s"
    ;;
  stop)
    as_root
    stop
    ;;
  status)
    sinfo -N -o '%N %P %t %c %m %G'
    squeue
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
