#!/usr/bin/env bash
# Start N processes of one JAX program on this machine (what a pod or cluster does, in small).
#
#   launch/local.sh -n 2 --devices-per-process 2 -- \
#       --config experiments/base_256.py:tiny --workdir /tmp/run
#
# Each process gets SDXL_COORDINATOR=localhost:PORT, SDXL_NUM_PROCESSES=N and SDXL_PROCESS_ID=i,
# so `python -m sdxl_jax.train` starts jax.distributed (gloo collectives on CPU). Process 0's
# output streams here; every process also logs to <log-dir>/process_<i>.log. If one process
# fails, the others are stopped and the script exits with its status. Ctrl-C / SIGTERM are
# passed on to every process (the trainer saves a checkpoint and exits).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh -n N [options] -- [trainer flags]

Start N processes of `python -m sdxl_jax.train` (or --module) on this machine, coordinated by
jax.distributed, e.g. to try multi-host training on one box or to test it on CPU.

options:
  -n, --processes N           number of processes (required)
  --devices-per-process D     run on CPU with D simulated devices per process
                              (JAX_PLATFORMS=cpu, --xla_force_host_platform_device_count=D);
                              default: each process sees this machine's real devices, so on a
                              GPU box use one process per GPU via --gpus-per-process 1
  --gpus-per-process G        give process i GPUs i*G .. i*G+G-1 (SDXL_LOCAL_DEVICE_IDS)
  --port P                    coordinator port (default: a free one)
  --log-dir DIR               per-process logs (default: ./logs/local_<date>)
  --module M                  python module to run (default: sdxl_jax.train)
  -h, --help                  this text

everything after `--` goes to every process unchanged.
EOF
}

n="" devices="" gpus="" port="" log_dir="" module="sdxl_jax.train"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --processes) n="$2"; shift 2 ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    --gpus-per-process) gpus="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --module) module="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (trainer flags go after --; see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! "$n" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: -n N is required (a positive number of processes); see --help" >&2
  exit 2
fi
python="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-logs/local_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$log_dir"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all' INT TERM

for ((i = 0; i < n; i++)); do
  env_vars=(SDXL_COORDINATOR="localhost:$port" SDXL_NUM_PROCESSES="$n" SDXL_PROCESS_ID="$i")
  env_vars+=(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}")
  if [[ -n "$devices" ]]; then
    env_vars+=(JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices")
  fi
  if [[ -n "$gpus" ]]; then
    ids="$(seq -s, $((i * gpus)) $((i * gpus + gpus - 1)))"
    env_vars+=(SDXL_LOCAL_DEVICE_IDS="$ids")
  fi
  log="$log_dir/process_$i.log"
  if [[ $i -eq 0 ]]; then
    env "${env_vars[@]}" "$python" -m "$module" "$@" > >(tee "$log") 2>&1 &
  else
    env "${env_vars[@]}" "$python" -m "$module" "$@" >"$log" 2>&1 &
  fi
  pids+=($!)
done
echo "local.sh: $n processes (coordinator localhost:$port), logs in $log_dir" >&2

status=0
remaining=$n
while ((remaining > 0)); do
  set +e
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  set -e
  if [[ -z "${done_pid:-}" ]]; then continue; fi  # a signal interrupted the wait
  remaining=$((remaining - 1))
  if ((rc != 0 && status == 0)); then
    status=$rc
    for ((i = 0; i < n; i++)); do
      if [[ "${pids[$i]}" == "$done_pid" ]]; then
        echo "local.sh: process $i exited with status $rc; stopping the others (see $log_dir/process_$i.log)" >&2
      fi
    done
    stop_all
  fi
  unset done_pid
done
exit "$status"
