#!/bin/bash
# A one-node Slurm cluster on this machine for the Slurm tests (Debian's slurm-wlm + munge), with
# two fake GPUs (gres gpu:2) so GPU requests are scheduled without a GPU. Needs root.
# Usage: slurm-cluster.sh start [STATE_DIR] | stop [STATE_DIR]
# `start` installs slurm-wlm and munge with apt-get when they are missing.
set -u
cmd=${1:-start}; D=${2:-/tmp/nnflow-slurm}; H=$(hostname -s)
stop() {
  for p in slurmd slurmctld; do
    [ -f "$D/$p.pid" ] && kill "$(cat "$D/$p.pid")" 2>/dev/null; rm -f "$D/$p.pid"
  done
  [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null
  return 0
}
if [ "$cmd" = stop ]; then stop; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "slurm-cluster.sh: needs root" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$D.apt.log" 2>&1 \
    || { echo "slurm-cluster.sh: cannot install slurm-wlm and munge (see $D.apt.log)" >&2; exit 1; }
fi
mkdir -p "$D"
stop
mkdir -p /var/spool/slurmctld /var/spool/slurmd /run/munge /run/slurm /var/log/slurm /etc/slurm
chown slurm:slurm /var/spool/slurmctld /run/slurm /var/log/slurm; chown munge:munge /run/munge
[ -e /dev/fakegpu0 ] || { mknod /dev/fakegpu0 c 1 3; mknod /dev/fakegpu1 c 1 3; }
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=nnflowtest
GresTypes=gpu
SlurmctldHost=$H
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
NodeName=$H CPUs=$(nproc) RealMemory=2000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
echo "NodeName=$H Name=gpu File=/dev/fakegpu[0-1]" > /etc/slurm/gres.conf
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
runuser -u munge -- /usr/sbin/munged > "$D/munged.out" 2>&1   # daemonizes; pid in /run/munge/munged.pid
sleep 0.5
/usr/sbin/slurmctld -D > "$D/slurmctld.out" 2>&1 & echo $! > "$D/slurmctld.pid"
/usr/sbin/slurmd -D > "$D/slurmd.out" 2>&1 & echo $! > "$D/slurmd.pid"
for i in $(seq 1 80); do
  s=$(sinfo -h -o %T 2>/dev/null)
  [ "$s" = idle ] && { echo "slurm up: node $H idle"; exit 0; }
  case "$s" in drain*|inval*) scontrol update nodename="$H" state=resume 2>/dev/null;; esac
  sleep 0.25
done
echo "slurm did not come up; see $D/*.out and /var/log/slurm/" >&2; exit 1
