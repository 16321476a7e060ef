#!/usr/bin/env bash
# Submit one training stage to a Slurm GPU cluster as a requeueable batch job.
# `launch/gpu_slurm.sh --help` explains every option.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --nodes N --gpus-per-node G [--process-per gpu|node] [--partition P]
                           [--time HH:MM:SS] [--account A] [--job-name NAME] [--log-dir DIR]
                           --config FILE --workdir DIR [--dry-run] [-- TRAINER_FLAGS...]

Writes an sbatch script to LOG_DIR/NAME.sbatch and submits it: on N nodes, `srun` starts
`python -m sdxl_jax.train --config FILE --workdir DIR TRAINER_FLAGS` as one JAX program
(jax.distributed reads the Slurm environment), then prints the job id and how to follow its log.
The job runs in this repository with the `python` found on PATH now (sbatch passes the
environment on): activate a venv with `pip install -r requirements.txt "jax[cuda12]" gcsfs==2026.10.1` first.

Preemption and time limits: the job is --requeue'd. On preemption Slurm sends SIGTERM to the
trainer, which saves a checkpoint and exits 0, and Slurm requeues the job. 300 s before the time
limit Slurm sends USR1 to the batch script, which passes SIGTERM to the trainer and, once it has
saved, requeues the job itself (scontrol requeue). Either way the requeued job runs the same
command, which resumes from the last checkpoint in DIR; the log is appended to, not replaced.
Exit code 2 (bad config or data) or 3 (diverged) ends the job as FAILED, without a requeue.

Options:
  --nodes N                number of nodes.
  --gpus-per-node G        GPUs to use on each node.
  --process-per gpu|node   node (default): one process per node drives its G GPUs;
                           gpu: G processes per node, one per GPU (SDXL_LOCAL_DEVICE_IDS is set
                           to each task's $SLURM_LOCALID).
  --partition P            Slurm partition (default: the cluster's).
  --time HH:MM:SS          time limit of each run of the job (default: the partition's); also
                           D-HH:MM:SS. The job is requeued when it runs out.
  --account A              account to charge.
  --job-name NAME          default sdxl_jax-<stage>, from the config's file name.
  --log-dir DIR            where the sbatch script and the job's log (NAME-JOBID.log) go; every
                           node must see it. Default: runs/slurm in this repository.
  --config FILE            stage config, relative to the repository root:
                           experiments/<stage>.py[:variant].
  --workdir DIR            run folder that every node can reach: a shared filesystem path or
                           gs://BUCKET/PATH (needs gcsfs).
  --dry-run                print the commands that write the sbatch script and submit it (the
                           script in full, as a here-document), and run nothing.
  -h, --help               this help.
  -- TRAINER_FLAGS         everything after -- goes to python -m sdxl_jax.train unchanged.

Examples:
  launch/gpu_slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 \
      --config experiments/base_1024.py --workdir /shared/runs/sdxl \
      -- --config.data.path=/shared/data/photos-tfds --config.mesh.fsdp=32
  launch/gpu_slurm.sh --nodes 2 --gpus-per-node 4 --process-per gpu --account my-lab \
      --config experiments/finetune.py --workdir gs://my-bucket/ft \
      -- --config.init_from=/shared/models/sdxl-base-1.0
  launch/gpu_slurm.sh ... --dry-run        # see the sbatch script first
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SAVE_GRACE_S=300 # USR1 this long before the time limit: time to save a full-size checkpoint

warn() { echo "gpu_slurm.sh: warning: $*" >&2; }
usage_error() {
  echo "gpu_slurm.sh: error: $* (see launch/gpu_slurm.sh --help)" >&2
  exit 2
}

# ---- Options -------------------------------------------------------------------------------
nodes='' gpus='' per=node partition='' time_limit='' account='' job_name='' log_dir='' config=''
workdir=''
dry_run=0
extra=()
need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || usage_error "$1 needs a value"; }
while (($#)); do
  case $1 in
  --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; # --opt=value -> --opt value
  -h | --help)
    usage
    exit 0
    ;;
  --nodes) need_value "$@" && nodes=$2 && shift 2 ;;
  --gpus-per-node) need_value "$@" && gpus=$2 && shift 2 ;;
  --process-per) need_value "$@" && per=$2 && shift 2 ;;
  --partition) need_value "$@" && partition=$2 && shift 2 ;;
  --time) need_value "$@" && time_limit=$2 && shift 2 ;;
  --account) need_value "$@" && account=$2 && shift 2 ;;
  --job-name) need_value "$@" && job_name=$2 && shift 2 ;;
  --log-dir) need_value "$@" && log_dir=$2 && shift 2 ;;
  --config) need_value "$@" && config=$2 && shift 2 ;;
  --workdir) need_value "$@" && workdir=$2 && shift 2 ;;
  --dry-run) dry_run=1 && shift ;;
  --)
    shift
    extra=("$@")
    break
    ;;
  *) usage_error "unknown option '$1' (trainer flags go after --)" ;;
  esac
done

missing=()
for pair in nodes:--nodes gpus:--gpus-per-node config:--config workdir:--workdir; do
  var=${pair%%:*}
  [[ -n ${!var} ]] || missing+=("${pair#*:}")
done
((${#missing[@]} == 0)) || usage_error "missing required option(s): ${missing[*]}"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || usage_error "--nodes '$nodes': expected a positive integer"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || usage_error "--gpus-per-node '$gpus': expected a positive integer"
[[ $per == gpu || $per == node ]] || usage_error "--process-per '$per': expected gpu or node"
[[ -z $time_limit || $time_limit =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] ||
  usage_error "--time '$time_limit': expected HH:MM:SS or D-HH:MM:SS"
[[ $config != /* && -f $ROOT/${config%%:*} ]] ||
  usage_error "--config '$config': no file ${config%%:*} in $ROOT (give a path relative to the \
repository root, e.g. experiments/base_256.py)"
stage=$(basename "${config%%:*}" .py)
job_name=${job_name:-sdxl_jax-$stage}
[[ $job_name =~ ^[A-Za-z0-9_.-]+$ ]] ||
  usage_error "--job-name '$job_name': use letters, digits, '_', '.', '-'"
if ((nodes > 1)) && [[ $workdir != gs://* && $workdir != /* ]]; then
  warn "--workdir '$workdir' is relative: every node must see the same folder (a shared \
filesystem or gs://)"
fi

# ---- The sbatch script ---------------------------------------------------------------------
# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"  # quote, quote_all

tasks=1
[[ $per == gpu ]] && tasks=$gpus
log_dir=${log_dir:-$ROOT/runs/slurm}
[[ $log_dir == /* ]] || log_dir=$PWD/$log_dir
script_file=$log_dir/$job_name.sbatch
trainer_args=(--config "$config" --workdir "$workdir" "${extra[@]}")
trainer="python -m sdxl_jax.train $(quote_all "${trainer_args[@]}")"
if [[ $per == gpu ]]; then
  # Each task sees every GPU of its node (--gpu-bind=none) and keeps the one at its local rank.
  # shellcheck disable=SC2016 # expanded inside the task
  trainer='bash -c '\''export SDXL_LOCAL_DEVICE_IDS=$SLURM_LOCALID; exec "$@"'\'' sdxl_jax '$trainer
fi
optional=''
[[ -n $partition ]] && optional+="#SBATCH --partition=$(quote "$partition")"$'\n'
[[ -n $time_limit ]] && optional+="#SBATCH --time=$time_limit"$'\n'
[[ -n $account ]] && optional+="#SBATCH --account=$(quote "$account")"$'\n'

script="#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks
#SBATCH --gpus-per-node=$gpus
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@$SAVE_GRACE_S
#SBATCH --open-mode=append
#SBATCH --output=$(quote "$log_dir")/%x-%j.log
#SBATCH --chdir=$(quote "$ROOT")
$optional# Written by launch/gpu_slurm.sh: one process per $per.
# Preemption: Slurm sends SIGTERM to the trainer (it saves, exits 0) and requeues the job.
# Time limit: USR1 arrives here ${SAVE_GRACE_S} s before; the trainer gets SIGTERM, saves, and the
# job is requeued. A requeued job resumes from the last checkpoint in the workdir.
set -uo pipefail
echo \"\$(date -u +%FT%TZ) job \$SLURM_JOB_ID (restart \${SLURM_RESTART_COUNT:-0}) on\" \\
  \"\$SLURM_JOB_NODELIST\"
requeue=0
on_time_limit() {
  requeue=1
  echo \"\$(date -u +%FT%TZ) time limit near: the trainer saves, then the job is requeued\"
  scancel --signal=TERM \"\$SLURM_JOB_ID\" # the job steps (the trainer), not this script
}
trap on_time_limit USR1
trap 'echo \"\$(date -u +%FT%TZ) SIGTERM: the trainer saves and exits\"' TERM
srun --ntasks-per-node=$tasks --cpus-per-task=\$((\${SLURM_CPUS_ON_NODE:-$tasks} / $tasks)) \\
  --gpu-bind=none --kill-on-bad-exit=1 $trainer &
srun_pid=\$!
# A trapped signal interrupts wait (status 128 + the signal): wait again until srun has exited,
# then once more for its own exit status (the trainer may end while the trap runs).
while kill -0 \"\$srun_pid\" 2>/dev/null; do
  wait \"\$srun_pid\"
done
wait \"\$srun_pid\"
rc=\$?
echo \"\$(date -u +%FT%TZ) the trainer exited with code \$rc\"
if ((requeue && rc == 0)); then
  scontrol requeue \"\$SLURM_JOB_ID\"
fi
exit \"\$rc\"
"

# ---- Write and submit ----------------------------------------------------------------------
submit=(sbatch --parsable "$script_file")
if ((dry_run)); then
  printf '%s\n' "mkdir -p $(quote "$log_dir")"
  printf '%s\n' "cat > $(quote "$script_file") <<'SBATCH'"
  printf '%s' "$script"
  printf '%s\n' "SBATCH"
  quote_all "${submit[@]}"
  echo
  exit 0
fi
mkdir -p "$log_dir"
printf '%s' "$script" >"$script_file"
job_id=$("${submit[@]}")
job_id=${job_id%%;*} # --parsable prints JOBID[;CLUSTER]
echo "submitted job $job_id ($script_file)"
echo "follow its log:  tail -F $(quote "$log_dir/$job_name-$job_id.log")"
echo "its state:       squeue -j $job_id; stop it: scancel $job_id"
