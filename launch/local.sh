#!/usr/bin/env bash
# Runs flowjax as N processes on this machine joined by JAX's distributed runtime: each with its own
# CPU devices (collectives over gloo; the multi-host code path without a cluster), or each with one
# GPU (process i sees GPU i; collectives over NCCL).
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS -- --config=FILE[:ARG] --workdir=DIR [--config.x=y ...]
#   launch/local.sh 2 4 -- --config=experiments/toy2d_reflow.py:runlocal --workdir=runs/two-processes
#   launch/local.sh 4 gpu -- --config=experiments/rf_cifar.py --workdir=runs/rf_cifar
#
# On a host with several GPUs, one process per GPU is the fast way: a single process driving them
# all launches every GPU's kernels from one thread and scales 2.4x on 4 H100s, one process per GPU
# 3.96x (benchmarks/RESULTS.md).
#
# Everything after `--` goes to `python -m flowjax.main` unchanged. Process i logs to
# <workdir>/logs/process_<i>.log, appended to by a rerun (LOG_DIR=... puts the logs elsewhere; a
# bucket workdir needs it); process 0's log is also shown here. When a process fails, the others
# are stopped and the script exits with the failed process's status. Python: $PYTHON, else the
# repository's .venv/bin/python, else python3.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS|gpu -- --config=FILE --workdir=DIR [flowjax.main flags]" >&2
  echo "launch/local.sh: error: $1" >&2
  exit 2
}

[[ $# -ge 3 ]] || usage "expected NUM_PROCESSES, DEVICES_PER_PROCESS, -- and the flowjax.main flags"
num_processes=$1
devices=$2
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || usage "NUM_PROCESSES=$num_processes: expected an integer >= 1"
[[ $devices == gpu || $devices =~ ^[1-9][0-9]*$ ]] ||
  usage "DEVICES_PER_PROCESS=$devices: expected an integer >= 1 (CPU devices) or gpu (one GPU per process)"
[[ $3 == -- ]] || usage "expected -- after DEVICES_PER_PROCESS, got $3"
shift 3

workdir=$(workdir_flag "$@")
[[ -n $workdir ]] || usage "--workdir is required (process logs go to <workdir>/logs)"
if [[ -z ${LOG_DIR:-} && $workdir == *://* ]]; then
  usage "--workdir=$workdir is a bucket path: set LOG_DIR to a local directory for the process logs"
fi
log_dir=${LOG_DIR:-$workdir/logs}
mkdir -p "$log_dir"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=$(flowjax_python "$root")
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')

# This script decides the device count: drop any --xla_force_host_platform_device_count already set.
xla_flags=
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices"

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do [[ $pid == done ]] || kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 20); do  # 10 s to exit cleanly, then killed
    local alive=0
    for pid in "${pids[@]}"; do [[ $pid != done ]] && kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 1 ]] || return 0
    sleep 0.5
  done
  for pid in "${pids[@]}"; do [[ $pid == done ]] || kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  log=$log_dir/process_$i.log
  if [[ $devices == gpu ]]; then
    platform=(CUDA_VISIBLE_DEVICES="$i")
  else
    platform=(JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags")
  fi
  run=(env PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "${platform[@]}"
       JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$i"
       "$python" -m flowjax.main "$@")
  if [[ $i == 0 ]]; then
    "${run[@]}" > >(tee -a "$log") 2>&1 &
  else
    "${run[@]}" >>"$log" 2>&1 &
  fi
  pids+=($!)
done
if [[ $devices == gpu ]]; then each="one GPU each"; else each="$devices CPU devices each"; fi
echo "launch/local.sh: $num_processes processes, $each, coordinator localhost:$port, logs in $log_dir" >&2

status=0
running=$num_processes
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ $pid == done ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0
    wait "$pid" || rc=$?
    pids[i]=done
    running=$((running - 1))
    if [[ $rc != 0 ]]; then
      status=$rc
      echo "launch/local.sh: process $i exited with status $rc (log: $log_dir/process_$i.log); stopping the others" >&2
      stop_all
      break 2
    fi
  done
  if ((running > 0)); then sleep 0.5; fi
done
wait  # the tee of process 0's log
exit "$status"
