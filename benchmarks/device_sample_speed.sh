#!/usr/bin/env bash
# SDXL text-to-image seconds per image on one GPU: sdxl_jax (JAX) against diffusers (PyTorch),
# same settings, random weights (benchmarks/sample_speed.py). Meant for a rented H100/H200
# machine (jax 0.11.2, torch 2.11, no diffusers), run from the repository root with the wheels
# of .whl/ carried along:
#   diffusers 0.42.1, and importlib_metadata 8.7.0: the one requirement of it that image lacks;
#   flax 0.12.10: flax 0.12.8, which this code is developed on, does not import with jax >= 0.11
#     (jax.experimental.hijax.HiPrimitive is gone); 0.12.10 ran this benchmark with jax 0.11.2
#     on a CPU.
#
#   bash benchmarks/device_sample_speed.sh            # extra arguments go to sample_speed.py
#
# Writes $OUT/sample_speed.json and $OUT/sample_speed.log ($OUT defaults to a temp folder).
# Finishes within 8 minutes: each implementation's subprocess gets 210 s (one that ends early
# leaves the rest to the next), and the whole run is cut at 440 s.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 benchmarks/versions.py

timeout -k 10 440 python3 benchmarks/sample_speed.py --preset sdxl --impl both \
    --height 1024 --width 1024 --steps 30 --guidance 5 --batch 1 --repeats 3 --timeout 210 \
    --json "$OUT/sample_speed.json" "$@" 2>&1 | tee "$OUT/sample_speed.log"
