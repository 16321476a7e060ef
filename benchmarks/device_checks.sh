#!/usr/bin/env bash
# Every accelerator measurement of this project in one call (issue 17), within the device
# budget: the full-size SDXL train step (ours: batches x remat policies, the largest batch that
# fits; PyTorch/diffusers' on the same card), sampling at the MLPerf Inference settings (1024^2,
# Euler 20 steps, guidance 8, batch 1 and 8, ours and diffusers) and the 30-step batch-1 latency,
# the refiner's step and a LoRA step. Random weights throughout (no checkpoint files).
#
#   bash benchmarks/device_checks.sh                 # on the GPU machine, from the repo root
#   bash benchmarks/device_checks.sh train sample    # only these parts (a rerun's leftovers)
#   bash benchmarks/device_checks.sh --smoke         # the same code on this CPU, tiny presets
#
# Parts, in order, each with its own time budget (seconds of wall time; the Python scripts
# skip what would not finish and write their JSON after every configuration, so a part cut
# short keeps what it measured): train 230, torch 70, sample 110, extra 60 -> about 8 minutes
# with start-up. The machine's image has jax 0.11.2 and torch but no diffusers and no registry:
# the wheels in .whl/ are installed first (carry .whl with the call):
#   diffusers 0.42.1 and importlib_metadata 8.7.0 (pip download --no-deps -d .whl ...);
#   flax: the image's own is used unless a flax wheel is in .whl/ (flax 0.12.8 does not import
#     with jax >= 0.11; 0.12.10 ran there on 2026-11-26).
#
# Writes under $OUT (default a temp folder): train_step.json, torch_step.json, sample_*.json,
# extra_*.json, their logs, and device_checks.md / device_checks.json (the table, printed last).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

SMOKE=0
PARTS=()
for a in "$@"; do
    case "$a" in
        --smoke) SMOKE=1 ;;
        train|torch|sample|extra) PARTS+=("$a") ;;
        *) echo "device_checks.sh: unknown argument $a (use --smoke and/or train torch sample extra)" >&2; exit 2 ;;
    esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(train torch sample extra)
want() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }
# timeout -k 10 SECONDS, logged to $OUT/NAME.log; a part that fails does not stop the others.
run() {
    local name=$1 seconds=$2; shift 2
    echo "== $name (budget ${seconds} s): $*"
    timeout -k 10 "$seconds" "$@" > >(tee "$OUT/$name.log") 2>&1
    local rc=$?
    [ $rc -ne 0 ] && echo "== $name: exit $rc (see $OUT/$name.log)"
    return 0
}

if [ $SMOKE -eq 1 ]; then
    export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
    export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
    # One configuration per code path: the remat policy, a LoRA rank, the refiner's batch.
    TRAIN=(--smoke --batch 2 --remat attention_saveable --lora 0 4)
    TORCH=(--smoke --batch 1 --checkpointing on)
    SAMPLE=(--preset tiny --repeats 1)
    T_TRAIN=300 T_TORCH=120 T_SAMPLE=300
else
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "warning: no wheels in .whl/: diffusers is missing there (the PyTorch rows fail)"
        export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    # In order of importance (each full-size compile costs about a minute): batch 4 under
    # two remat policies, then the largest batch that fits; what the deadline skips is left for
    # a rerun of that part (bash benchmarks/device_checks.sh extra, with other --batch/--remat).
    TRAIN=(--batch 4 --remat nothing_saveable attention_saveable --attention auto --fit)
    TORCH=(--batch 4 --checkpointing on --no-count-flops)
    SAMPLE=(--preset sdxl --repeats 3)
    T_TRAIN=230 T_TORCH=70 T_SAMPLE=110 T_EXTRA=60
fi

python3 benchmarks/versions.py | tee "$OUT/versions.txt"

START=$SECONDS
if want train; then
    run train_step "$T_TRAIN" python3 benchmarks/train_step_speed.py "${TRAIN[@]}" \
        --deadline-s $((T_TRAIN - 15)) --json "$OUT/train_step.json"
fi
if want torch; then
    run torch_step "$T_TORCH" python3 benchmarks/torch_train_step_speed.py "${TORCH[@]}" \
        --deadline-s $((T_TORCH - 10)) --json "$OUT/torch_step.json"
fi
if want sample && [ $SMOKE -eq 1 ]; then  # both implementations, one batch: the code paths
    run sample_mlperf_b2 "$T_SAMPLE" python3 benchmarks/sample_speed.py "${SAMPLE[@]}" \
        --impl both --sampler euler --steps 4 --guidance 8 --batch 2 \
        --json "$OUT/sample_mlperf_b2.json"
elif want sample; then
    # MLPerf Inference's SDXL settings: Euler, 20 steps, guidance 8; batch 8 (half the part's
    # budget) then 1 (a quarter); --timeout: each implementation's share of its call.
    for b in 8 1; do
        budget=$((b == 8 ? T_SAMPLE / 2 : T_SAMPLE / 4))
        run "sample_mlperf_b$b" "$budget" python3 benchmarks/sample_speed.py "${SAMPLE[@]}" \
            --impl both --sampler euler --steps 20 --guidance 8 --batch "$b" \
            --timeout $(((budget - 5) / 2)) --json "$OUT/sample_mlperf_b$b.json"
    done
    run sample_30step_b1 $((T_SAMPLE / 4)) python3 benchmarks/sample_speed.py "${SAMPLE[@]}" \
        --impl ours --sampler euler --steps 30 --guidance 5 --batch 1 \
        --json "$OUT/sample_30step_b1.json"
fi
if want extra && [ $SMOKE -eq 0 ]; then  # (smoke: the LoRA path ran in the train part)
    run extra_refiner $((T_EXTRA / 2)) python3 benchmarks/train_step_speed.py \
        --preset refiner --batch 4 --remat nothing_saveable --deadline-s $((T_EXTRA / 2 - 5)) \
        --json "$OUT/extra_refiner.json"
    run extra_lora $((T_EXTRA / 2)) python3 benchmarks/train_step_speed.py \
        --lora 32 --batch 4 --remat none --deadline-s $((T_EXTRA / 2 - 5)) \
        --json "$OUT/extra_lora.json"
fi
echo "== parts took $((SECONDS - START)) s"
python3 benchmarks/device_checks_report.py "$OUT"
