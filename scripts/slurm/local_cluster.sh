#!/usr/bin/env bash
# A one-node Slurm on localhost, for the tests and for trying the launcher:
#   bash scripts/slurm/local_cluster.sh up       # prints: export SLURM_CONF=...
#   bash scripts/slurm/local_cluster.sh status
#   bash scripts/slurm/local_cluster.sh down
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/minitron-slurm): its own slurm.conf, state,
# spool and logs, its own munge key and socket, its own ports (LOCAL_SLURM_PORT, default 16817
# and the next one). It never reads or changes a system-wide Slurm or munge configuration, and
# refuses to start when its ports are taken (another cluster). Debian's packages (slurmctld,
# slurmd, slurm-client, munge; Slurm 22.05) are installed when missing and run as root; else it
# says what to install. A requeued job waits `cred_expire` (10 s here; Slurm's default 120 s)
# before it runs again.
set -euo pipefail
DIR=${LOCAL_SLURM_DIR:-/tmp/minitron-slurm}
PORT=${LOCAL_SLURM_PORT:-16817}
CONF=$DIR/slurm.conf
HOST=$(hostname -s)

need() {
  local missing=()
  for b in slurmctld slurmd sbatch scontrol munged; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "local_cluster: installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      slurmctld slurmd slurm-client munge) >&2
  else
    echo "local_cluster: missing ${missing[*]}; install Debian's slurmctld slurmd slurm-client" \
         "munge (as root: apt-get install slurmctld slurmd slurm-client munge)" >&2
    exit 2
  fi
}

port_free() {
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

up() {
  need
  export PATH="$PATH:/usr/sbin"
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  for p in "$PORT" $((PORT + 1)); do
    port_free "$p" || { echo "local_cluster: port $p is in use (another cluster?); set" \
                             "LOCAL_SLURM_PORT" >&2; exit 1; }
  done
  mkdir -p "$DIR"/{state,spool,log,munge}
  chmod 700 "$DIR/munge"
  [ -f "$DIR/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$DIR/munge/munge.key"; }
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed"
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))
  cat > "$CONF" <<EOF
# written by scripts/slurm/local_cluster.sh: a one-node test cluster in $DIR
ClusterName=minitron-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerParameters=defer_batch,sched_interval=2,bf_interval=2
MinJobAge=600
KillWait=30
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  for _ in $(seq 60); do
    if SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | grep -qE "^idle|^mixed|^allocated"; then
      echo "export SLURM_CONF=$CONF"
      return 0
    fi
    sleep 1
  done
  echo "local_cluster: the node did not come up; see $DIR/log/" >&2
  exit 1
}

down() {
  for f in slurmd slurmctld munge/munged; do
    if [ -f "$DIR/$f.pid" ]; then
      kill "$(cat "$DIR/$f.pid")" 2>/dev/null || true
      rm -f "$DIR/$f.pid"
    fi
  done
}

status() {
  export SLURM_CONF=$CONF
  scontrol ping && sinfo && squeue
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status  (LOCAL_SLURM_DIR=$DIR)" >&2; exit 2 ;;
esac
