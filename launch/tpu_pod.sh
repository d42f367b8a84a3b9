#!/usr/bin/env bash
# Runs flowjax on every worker of a Cloud TPU pod (a multi-host TPU VM).
#
#   launch/tpu_pod.sh [--dry-run] -- --config=FILE[:ARG] --workdir=gs://BUCKET/RUN [--config.x=y ...]
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     launch/tpu_pod.sh -- --config=experiments/rf_cifar.py --workdir=gs://my-bucket/rf_cifar
#
# Run it from the repository root, with gcloud logged in. Steps:
#   1. reuse the TPU VM $TPU_NAME, or create it (ACCELERATOR_TYPE, RUNTIME_VERSION; SPOT=1 for spot);
#   2. copy the committed tree (git archive HEAD) to every worker, into ~/$REMOTE_DIR;
#   3. install it on every worker into ~/$REMOTE_DIR/.venv, a Python 3.12 made by uv (the TPU
#      images ship an older Python): pip install -e . plus $JAX_PACKAGE (jax[tpu]);
#   4. start `python -m flowjax.main <flags>` on all workers at once, in the background.
# flowjax calls jax.distributed.initialize() (FLOWJAX_DISTRIBUTED=1), which finds the other
# workers itself. The workdir must be a gs:// bucket: every worker reads and writes it; only
# process 0 writes metrics and reports. Each worker logs to ~/$REMOTE_DIR-logs/<run>.log on its own
# disk (<run>: the launch time); the script prints the commands that follow them. --dry-run prints
# every gcloud command instead of running it.
#
# Variables: TPU_NAME (flowjax), ZONE (us-central2-b), ACCELERATOR_TYPE (v4-32),
# RUNTIME_VERSION (tpu-ubuntu2204-base), PROJECT (gcloud's default), SPOT (0),
# REMOTE_DIR (flowjax), JAX_PACKAGE (jax[tpu]).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  echo "usage: launch/tpu_pod.sh [--dry-run] -- --config=FILE --workdir=gs://BUCKET/RUN [flowjax.main flags]" >&2
  echo "launch/tpu_pod.sh: error: $1" >&2
  exit 2
}

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
[[ ${1:-} == -- ]] || usage "expected -- before the flowjax.main flags"
shift
[[ $# -gt 0 ]] || usage "no flowjax.main flags after --"

workdir=$(workdir_flag "$@")
[[ $workdir == gs://* ]] || usage "--workdir=${workdir:-<missing>}: expected a gs:// bucket path (every worker of the pod writes there)"

tpu_name=${TPU_NAME:-flowjax}
zone=${ZONE:-us-central2-b}
accelerator_type=${ACCELERATOR_TYPE:-v4-32}
runtime_version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
remote_dir=${REMOTE_DIR:-flowjax}
jax_package=${JAX_PACKAGE:-jax[tpu]}
[[ $remote_dir =~ ^[A-Za-z0-9._/-]+$ ]] || usage "REMOTE_DIR=$remote_dir: expected a relative path of letters, digits, . _ - /"
where=(--zone="$zone")
[[ -z ${PROJECT:-} ]] || where+=(--project="$PROJECT")

quoted() {  # the arguments as one shell line, single-quoting those that need it
  local arg quote="'" escaped="'\\''" out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then out+=("$arg"); else out+=("'${arg//$quote/$escaped}'"); fi
  done
  echo "${out[*]}"
}

run() {  # a command: printed, and run unless --dry-run
  echo "+ $(quoted "$@")" >&2
  if [[ $dry_run == 0 ]]; then "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu_name" "${where[@]}" --worker=all --command="$1"
}

# 1. Reuse or create the TPU VM.
describe=(gcloud compute tpus tpu-vm describe "$tpu_name" "${where[@]}" '--format=value(state)')
create=(gcloud compute tpus tpu-vm create "$tpu_name" "${where[@]}" --accelerator-type="$accelerator_type"
        --version="$runtime_version")
if [[ ${SPOT:-0} == 1 ]]; then create+=(--spot); fi
if [[ $dry_run == 1 ]]; then
  run "${describe[@]}"
  echo "# if it does not exist:" >&2
  run "${create[@]}"
elif state=$("${describe[@]}" 2>/dev/null); then
  echo "launch/tpu_pod.sh: reusing TPU VM $tpu_name ($state) in $zone" >&2
else
  run "${create[@]}"
fi

# 2. Copy the committed tree to every worker.
run_id=$(date +%Y%m%d-%H%M%S)
archive=flowjax-$run_id.tar.gz
log="~/$remote_dir-logs/$run_id.log"  # ~: the worker's home
if [[ $dry_run == 0 ]]; then trap 'rm -f "/tmp/$archive"' EXIT; fi
run git archive --format=tar.gz -o "/tmp/$archive" HEAD
run gcloud compute tpus tpu-vm scp "/tmp/$archive" "$tpu_name:" "${where[@]}" --worker=all
on_all_workers "mkdir -p ~/$remote_dir ~/$remote_dir-logs && find ~/$remote_dir -mindepth 1 -maxdepth 1 ! -name .venv \
-exec rm -rf {} + && tar -xzf ~/$archive -C ~/$remote_dir && rm ~/$archive"

# 3. Install flowjax and JAX for TPU (the venv is kept between launches).
on_all_workers "cd ~/$remote_dir && python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q --allow-existing \
--python 3.12 .venv && ~/.local/bin/uv pip install -q --python .venv/bin/python -e . $(printf '%q' "$jax_package")"

# 4. Start the run on all workers; each keeps its own log.
flags=$(printf '%q ' "$@")
on_all_workers "cd ~/$remote_dir && FLOWJAX_DISTRIBUTED=1 nohup .venv/bin/python -m flowjax.main $flags \
> $log 2>&1 < /dev/null &"

if [[ $dry_run == 1 ]]; then echo "launch/tpu_pod.sh: dry run, nothing was run" >&2; exit 0; fi
cat >&2 <<EOF
launch/tpu_pod.sh: started on every worker of $tpu_name; outputs go to $workdir.
Each worker logs to $log on its own disk. Follow process 0 (metrics, reports):
  gcloud compute tpus tpu-vm ssh $tpu_name --zone=$zone --worker=0 --command='tail -f $log'
The last lines of every worker:
  gcloud compute tpus tpu-vm ssh $tpu_name --zone=$zone --worker=all --command='tail -n 5 $log'
Delete the TPU VM when done:
  gcloud compute tpus tpu-vm delete $tpu_name --zone=$zone
EOF
