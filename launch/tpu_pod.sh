#!/usr/bin/env bash
# Train one stage on a Cloud TPU VM (one host or a pod) and keep it going through preemptions.
# `launch/tpu_pod.sh --help` explains every option.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE --project PROJECT --accelerator-type TYPE
                         --config FILE --workdir DIR [--spot] [--queued] [--runtime-version V]
                         [--dry-run] [-- TRAINER_FLAGS...]

Runs `python -m sdxl_jax.train --config FILE --workdir DIR TRAINER_FLAGS` as one JAX program on
every host of a Cloud TPU VM (jax.distributed finds the other hosts by itself), until the stage
finishes:
  1. creates the TPU VM NAME unless `gcloud compute tpus tpu-vm describe` finds it (with
     --queued: through a queued resource NAME, waiting until it is ACTIVE);
  2. packs this repository's HEAD commit (git archive, without runs/; uncommitted changes are
     not shipped) and copies it to every worker (~/sdxl_jax);
  3. on every worker: a Python 3.12 venv ~/sdxl_venv (made with uv: the TPU images ship Python
     3.10) and `pip install -r requirements.txt "jax[tpu]" gcsfs==2026.10.1`;
  4. starts the trainer on every worker, detached (setsid nohup): log ~/sdxl_jax.log, exit code
     ~/sdxl_jax.exit (followed by " sigterm" when it exited after a SIGTERM);
  5. streams worker 0's log here. Ctrl-C stops only the streaming: the trainer keeps running, and
     rerunning the same command follows it again (it does not start a second one).

Preemption: when the ssh connection drops or the trainer exits after a SIGTERM (it saves a
checkpoint first), the VM's state decides: not READY (PREEMPTED, TERMINATED, ...) -> the VM is
deleted and created again, the code copied and installed again, and the trainer restarted; it
resumes from the last checkpoint in DIR. The script exits 0 once worker 0's trainer exits 0
without a SIGTERM (the stage is done), and with the trainer's exit code otherwise: 2 (bad config or
data) and 3 (diverged) are not retried, nor is a crash on a READY VM (rerun this command to
resume from the last checkpoint).

Options:
  --name NAME              TPU VM name (lower-case letters, digits, '-'); also the queued
                           resource's name with --queued.
  --zone ZONE              zone with TPU quota, e.g. us-central2-b.
  --project PROJECT        Google Cloud project id.
  --accelerator-type TYPE  e.g. v4-8 (one host), v4-32 (4 hosts), v5litepod-16, v5p-64, v6e-8.
                           Types above 8 (cores or chips) span several hosts.
  --config FILE            stage config, relative to the repository root:
                           experiments/<stage>.py[:variant].
  --workdir DIR            run folder. Use gs://BUCKET/PATH: on a pod every host would otherwise
                           write its own disk, and a recreated VM starts with an empty disk.
  --spot                   spot capacity: cheaper, preemptible at any time.
  --queued                 create the VM through a queued resource, which waits for capacity
                           instead of failing when the zone has none.
  --runtime-version V      TPU software image. Default by TYPE: v2-*, v3-*, v4-*:
                           tpu-ubuntu2204-base; v5litepod-*, v5e-*: v2-alpha-tpuv5-lite; v5p-*:
                           v2-alpha-tpuv5; v6e-*: v2-alpha-tpuv6e. Other types need this option
                           (`gcloud compute tpus tpu-vm versions list --zone=ZONE`).
  --dry-run                print the commands (gcloud, and git for packing) in the order they
                           would run, one per line and quoted so that a shell runs them as
                           printed, assuming the VM does not exist; run nothing.
  -h, --help               this help.
  -- TRAINER_FLAGS         everything after -- goes to python -m sdxl_jax.train unchanged.

Environment: SDXL_LAUNCH_POLL_S, seconds between state polls (default 30).

Examples:
  launch/tpu_pod.sh --name sdxl-256 --zone us-central2-b --project my-proj \
      --accelerator-type v4-32 --config experiments/base_256.py --workdir gs://my-bucket/sdxl \
      -- --config.data.path=gs://my-bucket/photos-tfds --config.mesh.fsdp=16
  launch/tpu_pod.sh --name sdxl-ft --zone us-east5-b --project my-proj --spot --queued \
      --accelerator-type v6e-8 --config experiments/finetune.py --workdir gs://my-bucket/ft \
      -- --config.init_from=gs://my-bucket/sdxl-base-1.0
  launch/tpu_pod.sh ... --dry-run          # see every command first

To stop a run: Ctrl-C here, then delete the VM
  gcloud compute tpus tpu-vm delete NAME --zone=ZONE --project=PROJECT
(with --queued: gcloud compute tpus queued-resources delete NAME --force ...), or save first:
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --project=PROJECT --worker=all \
      --command='kill -TERM -- -$(cat ~/sdxl_jax.pid)'
EOF
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
POLL_S=${SDXL_LAUNCH_POLL_S:-30}
PYTHON_VERSION=3.12
MAX_FAILURES=5 # consecutive setup failures or unreachable worker 0 on a READY VM

note() { echo "tpu_pod.sh: $*" >&2; }
warn() { echo "tpu_pod.sh: warning: $*" >&2; }
die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 1
}
usage_error() {
  echo "tpu_pod.sh: error: $* (see launch/tpu_pod.sh --help)" >&2
  exit 2
}
pause() { sleep "$POLL_S"; }

# ---- Options -------------------------------------------------------------------------------
name='' zone='' project='' accel='' config='' workdir='' runtime='' spot=0 queued=0 dry_run=0
extra=()
need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || usage_error "$1 needs a value"; }
while (($#)); do
  case $1 in
  --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;; # --opt=value -> --opt value
  -h | --help)
    usage
    exit 0
    ;;
  --name) need_value "$@" && name=$2 && shift 2 ;;
  --zone) need_value "$@" && zone=$2 && shift 2 ;;
  --project) need_value "$@" && project=$2 && shift 2 ;;
  --accelerator-type) need_value "$@" && accel=$2 && shift 2 ;;
  --config) need_value "$@" && config=$2 && shift 2 ;;
  --workdir) need_value "$@" && workdir=$2 && shift 2 ;;
  --runtime-version) need_value "$@" && runtime=$2 && shift 2 ;;
  --spot) spot=1 && shift ;;
  --queued) queued=1 && shift ;;
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
for pair in name:--name zone:--zone project:--project accel:--accelerator-type config:--config \
  workdir:--workdir; do
  var=${pair%%:*}
  [[ -n ${!var} ]] || missing+=("${pair#*:}")
done
((${#missing[@]} == 0)) || usage_error "missing required option(s): ${missing[*]}"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  usage_error "--name '$name': use lower-case letters, digits and '-', starting with a letter"
[[ $config != /* && -f $ROOT/${config%%:*} ]] ||
  usage_error "--config '$config': no file ${config%%:*} in $ROOT (give a path relative to the \
repository root, e.g. experiments/base_256.py)"
[[ $accel =~ -([0-9]+)$ ]] ||
  usage_error "--accelerator-type '$accel': expected e.g. v4-8, v5litepod-16"
size=${BASH_REMATCH[1]}
if [[ -z $runtime ]]; then
  case $accel in
  v2-* | v3-* | v4-*) runtime=tpu-ubuntu2204-base ;;
  v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) runtime=v2-alpha-tpuv5 ;;
  v6e-*) runtime=v2-alpha-tpuv6e ;;
  *) usage_error "--accelerator-type '$accel' has no default image: pass --runtime-version" ;;
  esac
fi
if [[ $workdir != gs://* ]]; then
  if ((size > 8)); then
    warn "--workdir '$workdir' is not gs://: each host of this multi-host $accel writes its own \
disk, so checkpoints are incomplete; use gs://BUCKET/PATH"
  else
    warn "--workdir '$workdir' is not gs://: checkpoints are lost when the VM is preempted and \
recreated"
  fi
fi

# ---- Commands: every one goes through run, which prints it (--dry-run) or runs it ----------
# shellcheck source=launch/quote.sh
source "$(dirname "${BASH_SOURCE[0]}")/quote.sh"  # quote, quote_all
exec 3>&1 # the dry run prints here, also from inside $(...)
run() {
  if ((dry_run)); then
    printf '%s\n' "$(quote_all "$@")" >&3
    return 0
  fi
  "$@"
}

loc=(--zone="$zone" --project="$project")
ssh_opts=(--strict-host-key-checking=no --quiet)
keepalive=(--ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=6)
tarball=${TMPDIR:-/tmp}/sdxl_jax-$name.tar.gz
dry_vm=0 dry_qr=0 # what the dry run pretends exists

# What runs on the workers (their login shell is bash): one line each, so that --dry-run prints
# one line per command.
remote() { # join shell commands with "; "
  local out=$1
  shift
  for cmd; do out+="; $cmd"; done
  printf '%s' "$out"
}
# shellcheck disable=SC2016,SC2088 # these expand on the workers
{
  setup_cmd=$(remote 'set -e' 'rm -rf ~/sdxl_jax' 'mkdir -p ~/sdxl_jax' \
    'tar -xzf ~/sdxl_jax.tar.gz -C ~/sdxl_jax' 'cd ~/sdxl_jax' \
    "if [ ! -x ~/sdxl_venv/bin/python ]; then python3 -m pip install --user --quiet uv; \
~/.local/bin/uv venv --seed --python $PYTHON_VERSION ~/sdxl_venv; fi" \
    '~/sdxl_venv/bin/python -m pip install --quiet -r requirements.txt "jax[tpu]" gcsfs==2026.10.1')
  # Stop what is left of an earlier trainer (its process group), then start one in a session of
  # its own, so that the ssh connection can close; the wrapper notes a SIGTERM after the exit code.
  wrapper='trap "t=1" TERM; "$@" >> ~/sdxl_jax.log 2>&1; echo "$?${t:+ sigterm}" > ~/sdxl_jax.exit'
  trainer_args=(--config "$config" --workdir "$workdir" "${extra[@]}")
  start_cmd=$(remote 'cd ~/sdxl_jax' 'pid=$(cat ~/sdxl_jax.pid 2>/dev/null || true)' \
    'if [ -n "$pid" ] && kill -TERM -- "-$pid" 2>/dev/null; then for i in $(seq 60); do '\
'kill -0 -- "-$pid" 2>/dev/null || break; sleep 1; done; kill -KILL -- "-$pid" 2>/dev/null; fi' \
    'rm -f ~/sdxl_jax.exit' \
    'if [ -e ~/sdxl_jax.log ]; then mv ~/sdxl_jax.log ~/sdxl_jax.log.prev; fi' \
    "setsid nohup bash -c $(quote "$wrapper") sdxl_jax ~/sdxl_venv/bin/python -m sdxl_jax.train \
$(quote_all "${trainer_args[@]}") > /dev/null 2>&1 < /dev/null & echo \$! > ~/sdxl_jax.pid")
  status_cmd=$(remote 'if [ -e ~/sdxl_jax.exit ]; then echo "exit $(cat ~/sdxl_jax.exit)"' \
    'elif [ -s ~/sdxl_jax.pid ] && kill -0 -- "-$(cat ~/sdxl_jax.pid)" 2>/dev/null' \
    'then echo running' \
    'else echo none; fi')
}
follow_cmd() { echo "tail -n $1 -F --pid=\"\$(cat ~/sdxl_jax.pid)\" ~/sdxl_jax.log"; }

vm_state() { # READY, CREATING, PREEMPTED, ... or NOT_FOUND
  local out err tries
  err=$(mktemp)
  for ((tries = 1; ; tries++)); do
    if out=$(run gcloud compute tpus tpu-vm describe "$name" "${loc[@]}" \
      --format='value(state)' 2>"$err"); then
      ((dry_run)) && out=$( ((dry_vm)) && echo READY || echo NOT_FOUND)
      rm -f "$err"
      echo "${out:-UNKNOWN}"
      return
    fi
    if grep -qiE 'NOT_FOUND|not found' "$err"; then
      rm -f "$err"
      echo NOT_FOUND
      return
    fi
    ((tries < MAX_FAILURES)) || die "gcloud compute tpus tpu-vm describe $name fails: $(cat "$err")"
    pause
  done
}

qr_state() { # ACCEPTED, WAITING_FOR_RESOURCES, ACTIVE, SUSPENDED, FAILED, ... or NOT_FOUND
  local out err
  err=$(mktemp)
  if out=$(run gcloud compute tpus queued-resources describe "$name" "${loc[@]}" \
    --format='value(state.state)' 2>"$err"); then
    ((dry_run)) && out=$( ((dry_qr)) && echo ACTIVE || echo NOT_FOUND)
    echo "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    echo NOT_FOUND
  else
    echo UNKNOWN
  fi
  rm -f "$err"
}

delete_vm() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${loc[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${loc[@]}" --quiet
  fi
}

create_vm() {
  local capacity=() state
  ((spot)) && capacity=(--spot)
  if ((!queued)); then
    run gcloud compute tpus tpu-vm create "$name" "${loc[@]}" --accelerator-type="$accel" \
      --version="$runtime" "${capacity[@]}"
    dry_vm=1
    return
  fi
  while :; do
    state=$(qr_state)
    case $state in
    NOT_FOUND)
      run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${loc[@]}" \
        --accelerator-type="$accel" --runtime-version="$runtime" "${capacity[@]}"
      dry_qr=1 dry_vm=1
      ;;
    ACTIVE)
      [[ $(vm_state) != NOT_FOUND ]] && return
      note "queued resource $name is ACTIVE but its node is gone: deleting it"
      delete_vm
      ;;
    FAILED)
      die "queued resource $name FAILED (gcloud compute tpus queued-resources describe $name \
$(quote_all "${loc[@]}") says why); delete it to try again"
      ;;
    SUSPENDED)
      note "queued resource $name is SUSPENDED (preempted): deleting it to queue again"
      delete_vm
      ;;
    *)
      note "queued resource $name is $state: waiting"
      pause
      ;;
    esac
  done
}

fresh=0 # set when ensure_vm created the VM: nothing runs there yet
ensure_vm() {
  local state
  while :; do
    state=$(vm_state)
    case $state in
    READY) return ;;
    NOT_FOUND)
      note "creating TPU VM $name ($accel, $runtime$( ((spot)) && echo ', spot')\
$( ((queued)) && echo ', queued'))"
      create_vm
      fresh=1
      ;;
    CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | UNHIDING | STOPPING | DELETING | \
      UNKNOWN)
      note "TPU VM $name is $state: waiting"
      pause
      ;;
    *)
      note "TPU VM $name is $state: deleting it to create it again"
      delete_vm
      ;;
    esac
  done
}

packed=0
setup_workers() { # one && chain: errexit does not apply inside `if`
  if ((!packed)); then
    if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
      warn "uncommitted changes are not shipped: the workers run HEAD \
($(git -C "$ROOT" rev-parse --short HEAD))"
    fi
    run git -C "$ROOT" archive --format=tar.gz --output="$tarball" HEAD -- . ':(exclude)runs' ||
      return 1
    packed=1
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:sdxl_jax.tar.gz" "${loc[@]}" --worker=all \
    "${ssh_opts[@]}" &&
    run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all "${ssh_opts[@]}" \
      --command="$setup_cmd" &&
    run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=all "${ssh_opts[@]}" \
      --command="$start_cmd"
}

trainer_status() { # running | exit CODE [sigterm] | none | unreachable
  local out
  if out=$(run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=0 "${ssh_opts[@]}" \
    --command="$status_cmd"); then
    ((dry_run)) && out='exit 0'
    out=$(grep -E '^(running|none|exit )' <<<"$out" | tail -n 1 || true)
    echo "${out:-unreachable}"
  else
    echo unreachable
  fi
}

# ---- Create, install, start, follow; after a preemption, again -----------------------------
((dry_run)) || trap 'rm -f "$tarball"' EXIT
stopped() {
  note "stopped following; the trainer keeps running on $name: rerun this command to follow it"
  exit 130
}
((dry_run)) || trap stopped INT

ensure_vm
action=start
if ((!fresh)) && [[ $(trainer_status) == running ]]; then
  note "the trainer is already running on $name: following worker 0's log"
  action=follow
fi
failures=0
while :; do
  lines=20
  if [[ $action == start ]]; then
    note "copying the code to every worker of $name, installing and starting the trainer"
    if ! setup_workers; then
      ((++failures < MAX_FAILURES)) || die "setting up $name failed $failures times"
      note "setting up $name failed: checking the VM"
      pause
      ensure_vm
      continue
    fi
    lines=+1 failures=0
  fi
  followed=0
  run gcloud compute tpus tpu-vm ssh "$name" "${loc[@]}" --worker=0 "${ssh_opts[@]}" \
    "${keepalive[@]}" --command="$(follow_cmd "$lines")" || followed=$?
  status=$(trainer_status)
  read -r _ code sigterm <<<"$status" || true
  case $status in
  running)
    action=follow failures=0
    ((followed == 0)) || pause # the connection dropped: do not hammer ssh
    continue
    ;;
  'exit 0')
    ((dry_run)) && exit 0 # as if the trainer had finished
    note "the trainer on worker 0 finished (exit code 0)"
    exit 0
    ;;
  'exit 2' | 'exit 2 sigterm' | 'exit 3' | 'exit 3 sigterm')
    why=$([[ $code == 2 ]] && echo 'bad config or data' || echo 'diverged')
    echo "tpu_pod.sh: error: the trainer exited with code $code ($why): see the log above" >&2
    exit "$code"
    ;;
  esac
  state=$(vm_state)
  if [[ $state != READY ]]; then
    note "TPU VM $name is $state (worker 0: $status): recreating it, then resuming"
    ensure_vm
    action=start
  elif [[ $status == none || $sigterm == sigterm ]]; then
    note "the trainer on worker 0 stopped ($status) on a READY VM: starting it again"
    action=start
  elif [[ $status == unreachable ]]; then
    ((++failures < MAX_FAILURES)) || die "worker 0 of $name is READY but unreachable over ssh"
    pause
    action=follow
  else
    echo "tpu_pod.sh: error: the trainer exited with code $code: see the log above; rerun this \
command to resume from the last checkpoint" >&2
    [[ $code =~ ^[0-9]+$ ]] && ((code > 0 && code < 256)) && exit "$code"
    exit 1
  fi
done
