#!/usr/bin/env bash
# start-sge.sh - single-node Son of Grid Engine 8.1.9 (Debian 12 gridengine-* packages) for hpcq's tests, no systemd.
#   start-sge.sh [start|stop|status]
# Gives a working qsub/qstat/qdel/qacct (SGE syntax: #$ directives, -pe smp N, -t 1-N).
# NOTE: gridengine-client conflicts with slurm-wlm-torque (both ship qsub); it does NOT conflict with
# slurm-client, so this can run next to start-slurm.sh.
set -euo pipefail
ACTION=${1:-start}
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
export SGE_EXECD_PIDFILE=/var/run/gridengine/execd.pid
QM_PID=/var/spool/gridengine/qmaster/qmaster.pid
WORK=${SGE_CI_STATE:-${TMPDIR:-/tmp}/hpcq-sge}
H=$(hostname)
log() { printf '[start-sge %(%H:%M:%S)T] %s\n' -1 "$*"; }
alive() { [[ -s $1 ]] && [[ -d /proc/$(<"$1") ]]; }

do_install() {
  dpkg-query -W -f='${Status}' gridengine-exec 2>/dev/null | grep -q 'ok installed' && return 0
  log "installing gridengine-master gridengine-exec gridengine-client"
  local tmp_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; tmp_policy=1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # postinst of gridengine-master runs init_cluster (SGE_ROOT=/var/lib/gridengine, cell default)
  apt-get install -y -qq --no-install-recommends gridengine-master gridengine-exec gridengine-client >/dev/null
  [[ $tmp_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
  return 0
}

do_start() {
  do_install
  mkdir -p "$WORK" /var/run/gridengine /var/spool/gridengine/execd
  chown sgeadmin:sgeadmin /var/run/gridengine /var/spool/gridengine/execd
  getent hosts "$H" >/dev/null || { log "adding $H to /etc/hosts"; echo "127.0.0.1 $H" >> /etc/hosts; }
  # qmaster sees loopback clients as "localhost" while clients call themselves $(hostname):
  # without this alias every command fails with "commlib error: access denied".
  echo "$H localhost" > $SGE_ROOT/$SGE_CELL/common/host_aliases
  chown sgeadmin:sgeadmin $SGE_ROOT/$SGE_CELL/common/host_aliases
  if ! alive $QM_PID; then log "starting sge_qmaster"; /usr/sbin/sge_qmaster </dev/null >/dev/null 2>&1; fi
  local i; for i in $(seq 1 40); do qconf -sh >/dev/null 2>&1 && break; sleep 0.5; done
  # qconf -m* opens $EDITOR: use sed scripts as the "editor".
  # root may submit (default min_uid/min_gid 1000); fast scheduling for tests
  printf '#!/bin/sh\nsed -i -e "s/^min_uid .*/min_uid 0/" -e "s/^min_gid .*/min_gid 0/" "$1"\n' > "$WORK/ed1.sh"
  printf '#!/bin/sh\nsed -i -e "s/^schedule_interval .*/schedule_interval 0:0:1/" -e "s/^flush_submit_sec .*/flush_submit_sec 1/" -e "s/^flush_finish_sec .*/flush_finish_sec 1/" "$1"\n' > "$WORK/ed2.sh"
  chmod +x "$WORK"/ed*.sh
  EDITOR="$WORK/ed1.sh" qconf -mconf global >/dev/null 2>&1 || true
  EDITOR="$WORK/ed2.sh" qconf -msconf >/dev/null 2>&1 || true
  qconf -ss | grep -qx "$H" || qconf -as "$H" >/dev/null
  qconf -shgrpl 2>/dev/null | grep -qx '@allhosts' || { printf 'group_name @allhosts\nhostlist %s\n' "$H" > "$WORK/hg"; qconf -Ahgrp "$WORK/hg" >/dev/null; }
  qconf -spl 2>/dev/null | grep -qx smp || { printf 'pe_name smp\nslots 999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args /bin/true\nstop_proc_args /bin/true\nallocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n' > "$WORK/pe"; qconf -Ap "$WORK/pe" >/dev/null; }
  if ! qconf -sql 2>/dev/null | grep -qx all.q; then
    cat > "$WORK/q" <<EOF
qname                 all.q
hostlist              @allhosts
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               smp
rerun                 FALSE
slots                 $(nproc)
tmpdir                /tmp
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
    qconf -Aq "$WORK/q" >/dev/null
  fi
  # execd only after the global config change (it caches min_uid/min_gid at start)
  if ! alive $SGE_EXECD_PIDFILE; then log "starting sge_execd"; /usr/sbin/sge_execd </dev/null >/dev/null 2>&1; fi
  for i in $(seq 1 60); do
    st=$(qstat -f -q all.q 2>/dev/null | awk -v q="all.q@$H" '$1==q {print ($6==""?"ok":$6)}')
    [[ $st == ok ]] && { log "queue all.q@$H ready ($(nproc) slots)"; return 0; }
    sleep 0.5
  done
  log "queue not ready: $(qstat -f 2>&1 | tail -3)"; return 1
}

do_stop() {
  local f p
  for f in $SGE_EXECD_PIDFILE $QM_PID; do
    if alive "$f"; then p=$(<"$f"); log "stopping pid $p ($(cat /proc/$p/comm))"; kill "$p"
      for i in $(seq 1 50); do [[ -d /proc/$p ]] || break; sleep 0.2; done
      [[ -d /proc/$p ]] && kill -9 "$p"
    fi
  done
  log stopped
}

case $ACTION in
  start) do_start ;;
  stop) do_stop ;;
  status) alive $QM_PID && echo "qmaster $(<$QM_PID)"; alive $SGE_EXECD_PIDFILE && echo "execd $(<$SGE_EXECD_PIDFILE)"; qstat -f 2>/dev/null || true ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
