#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go, each part under its own time limit:
#
#   bash bench/gpu_check.sh [PART ...]      # default: all parts, in this order
#
#   tests     the tests that skip without CUDA: bf16 vs fp32 loss, the loss's gradient against
#             autograd, fused AdamW, the masked EMA, compiled vs eager,
#             CUDA phase timer and MFU, pinned batches, no host sync in a step, GPU-side views
#             against the CPU path, one-GPU torchrun against no launcher, peers on CUDA
#   bench     `dinokit bench --synthetic`: the paper's ViT-S/16 step (2 x 224 + 10 x 96 px views,
#             K = 65536, batch 128, bf16): images/s, time split, peak memory, MFU; then with
#             grad_checkpointing=true; then bench/device_views_cost.py: the kernels, memory traffic
#             and time of making those views on the GPU (views_on=device); then bench/gpu_profile.py:
#             the GPU's busy and idle time per step, its kernels by kind and the host's time to issue
#             a step, for dinokit and the official code
#   peers     bench/peers.py --device cuda: the same step through the official DINO code
#             (fp16 + GradScaler, its default) beside dinokit's, from one run
#   pipeline  `dinokit bench` fed by the data pipeline from JPEGs of ImageNet's typical size,
#             views made by the loader workers (the default workers, then 8), then on the GPU
#             (views_on=device), each also with overlap_views=true (the next batch's views on a side
#             stream during the step); bench/pipeline_peers.py: one core's rate beside the official code's
#   compile   `dinokit bench --synthetic compile=loss`, then `--compile` (backbones, heads and loss)
#
# Logs and results go to $OUT (the device tool's output folder) or bench/results/gpu-check;
# each part's summary (its status and last lines) is printed as it ends, and the statuses again last.
# On a lent machine, run a part or two per call (`bench` first): a call that stops answering
# returns nothing at all (2026-12-05: all four parts in one 590 s call, 643 s of device time, nothing back).
#
# Environment:
#   OFFICIAL_DINO  a checkout of github.com/facebookresearch/dino [default: .official-dino if present]
#   WHEELS         a folder of wheels installed first, for a machine without a package index
#                  (pydantic and its needs) [default: .whl if present; empty: none]. Made with:
#                    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                      --platform manylinux_2_17_x86_64 -d .whl pydantic annotated-types typing-inspection \
#                      typing_extensions "pydantic-core==$(unzip -p .whl/pydantic-*.whl '*/METADATA' |
#                      sed -n 's/^Requires-Dist: pydantic-core==//p')"   (the version pydantic pins; run
#                      the first download without it, then this one)
#   BUDGET         seconds for all parts together [default: 540]; each part's limit is cut to what is left
#   SMOKE=1        tiny workloads on whatever device there is: checks this script itself on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT_DIR/results" "$OUT_DIR/tmp"
LOG="$OUT_DIR/check.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}

WHEELS=${WHEELS-$([ -d .whl ] && echo .whl)}  # WHEELS= (empty): none
if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dinokit-site \
        "$WHEELS"/*.whl || { echo "could not install the wheels of $WHEELS"; exit 1; }
    export PYTHONPATH=/tmp/dinokit-site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
OFFICIAL_DINO=${OFFICIAL_DINO:-$([ -d .official-dino ] && echo "$PWD/.official-dino")}
export DINOKIT_OFFICIAL_DINO=$OFFICIAL_DINO  # the tests of bench/peers.py with the official code

if [ "${SMOKE:-0}" = 1 ]; then
    WORKLOAD=(--arch vit_tiny --patch-size 8 --global-size 32 --local-size 16 --local-crops 2 --batch-size 8
              --out-dim 256)
    STEPS=(--steps 2 --warmup 1)
    PEER_STEPS=(--steps 2 --warmup 1)
    IMAGES=64
    VIEWS_BATCH=(--batch-size 8)
else
    WORKLOAD=()  # dinokit bench's GPU default: the paper's ViT-S/16 views at batch 128
    STEPS=(--steps 30 --warmup 5)
    PEER_STEPS=(--steps 20 --warmup 5)
    IMAGES=1024
    VIEWS_BATCH=()  # the paper preset's views at batch 128
fi
DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null)
PAPER=(--arch vit_small --patch-size 16 --global-size 224 --local-size 96 --local-crops 10 --batch-size 128)
[ "${SMOKE:-0}" = 1 ] && PAPER=("${WORKLOAD[@]}")

DEADLINE=$(($(date +%s) + ${BUDGET:-540}))  # BUDGET: seconds for all parts together

# run NAME SECONDS COMMAND...: the command's output to the log, its last lines and status to the summary;
# the limit is cut to what is left of BUDGET, and a part with under 20 s left is skipped
run() {
    local name=$1 limit=$2 start rc left
    shift 2
    start=$(date +%s)
    left=$((DEADLINE - start))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, ${left} s of BUDGET left" | tee -a "$LOG" "$SUMMARY"
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    echo "=== $name: $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT_DIR/tmp/$name.log" 2>&1
    rc=$?
    cat "$OUT_DIR/tmp/$name.log" >>"$LOG"
    {
        echo "=== $name: exit $rc after $(($(date +%s) - start)) s (limit $limit s)"
        grep -v -E '^\s*$|Warning|warn\(' "$OUT_DIR/tmp/$name.log" | tail -n "${TAIL:-22}"
    } | tee -a "$SUMMARY"  # printed as each part ends: a command cut off later still shows the parts before
}

part_tests() {
    # -k "cuda or gpu": every test that needs CUDA has one of them in its name or parameters; -k also
    # matches the file's name, so a word like "device" would add all of test_device_views.py, on the CPU
    run tests 200 "$PY" -m pytest -q -rs -p no:cacheprovider -o addopts="" \
        tests/train/test_fast_paths.py tests/data/test_device_views.py tests/method/test_loss.py \
        tests/method/test_teacher.py tests/data/test_prefetch.py \
        tests/train/test_distributed.py::test_torchrun_with_one_process_equals_no_launcher \
        tests/cli/test_bench_cli.py tests/bench/test_scripts.py -k "cuda or gpu"
}

part_bench() {
    run bench 100 "$PY" -m dinokit bench --synthetic "${WORKLOAD[@]}" "${STEPS[@]}" --results "$OUT_DIR/results"
    run bench_grad_checkpointing 60 "$PY" -m dinokit bench --synthetic "${WORKLOAD[@]}" "${PEER_STEPS[@]}" \
        --results "$OUT_DIR/results" grad_checkpointing=true  # peak memory and images/s, recomputing the blocks
    run device_views_cost 40 "$PY" bench/device_views_cost.py "${VIEWS_BATCH[@]}" --device "$DEVICE" \
        --results "$OUT_DIR/results"
    if [ "$DEVICE" = cuda ]; then  # the GPU's busy and idle time per step, kernels by kind, the host's time
        run gpu_profile 90 "$PY" bench/gpu_profile.py "${PAPER[@]}" --only "dinokit${OFFICIAL_DINO:+,official}" \
            ${OFFICIAL_DINO:+--official-dino "$OFFICIAL_DINO"} --steps 5 --warmup 3 --results "$OUT_DIR/results"
    else
        echo "=== gpu_profile: skipped, no CUDA GPU" >>"$SUMMARY"
    fi
}

part_peers() {
    if [ -z "$OFFICIAL_DINO" ]; then
        echo "=== peers: skipped: set OFFICIAL_DINO to a checkout of github.com/facebookresearch/dino" >>"$SUMMARY"
        return
    fi
    run peers 150 "$PY" bench/peers.py --device "$DEVICE" --official-dino "$OFFICIAL_DINO" --only dinokit,official \
        "${PAPER[@]}" "${PEER_STEPS[@]}" --results "$OUT_DIR/results"
}

part_pipeline() {
    local images="$OUT_DIR/tmp/images"
    run make_images 60 "$PY" - "$images" "$IMAGES" <<'EOF'
"""JPEGs of ImageNet's typical size (500 x 375) cut from scikit-image's sample photos, 8 folders."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

root, count = Path(sys.argv[1]), int(sys.argv[2])
photos = [Image.fromarray(getattr(data, name)()).convert("RGB")
          for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")]
fits = [max(500 / photo.width, 375 / photo.height) for photo in photos]  # the least scale a crop fits in
bigs = [photo.resize((round(photo.width * fit * scale + 0.5), round(photo.height * fit * scale + 0.5)), Image.BICUBIC)
        for photo, fit in zip(photos, fits) for scale in (1.0, 1.3, 1.6, 2.0)]
rng = np.random.default_rng(0)
for i in range(count):
    big = bigs[rng.integers(len(bigs))]
    left, top = rng.integers(0, big.width - 500 + 1), rng.integers(0, big.height - 375 + 1)
    folder = root / f"class{i % 8}"
    folder.mkdir(parents=True, exist_ok=True)
    big.crop((left, top, left + 500, top + 375)).save(folder / f"{i:05d}.jpg", quality=90)
print(f"{count} images of 500 x 375 px in {root}")
EOF
    run pipeline_host 100 "$PY" -m dinokit bench --data "$images" "${WORKLOAD[@]}" "${STEPS[@]}" \
        --results "$OUT_DIR/results" views_on=host
    run pipeline_host_overlap 100 "$PY" -m dinokit bench --data "$images" "${WORKLOAD[@]}" "${STEPS[@]}" \
        --results "$OUT_DIR/results" views_on=host overlap_views=true  # the views on a side stream
    run pipeline_device 100 "$PY" -m dinokit bench --data "$images" "${WORKLOAD[@]}" "${STEPS[@]}" \
        --results "$OUT_DIR/results" views_on=device
    run pipeline_device_overlap 100 "$PY" -m dinokit bench --data "$images" "${WORKLOAD[@]}" "${STEPS[@]}" \
        --results "$OUT_DIR/results" views_on=device overlap_views=true
    run pipeline_host_8_workers 100 "$PY" -m dinokit bench --data "$images" "${WORKLOAD[@]}" "${STEPS[@]}" \
        --workers 8 --results "$OUT_DIR/results" views_on=host  # the default before it became all cores but one
    local peers=dinokit,dinokit-device
    [ -n "$OFFICIAL_DINO" ] && peers=$peers,official
    run pipeline_peers 60 "$PY" bench/pipeline_peers.py "$images" --images 128 --rounds 1 --only "$peers" \
        ${OFFICIAL_DINO:+--official-dino "$OFFICIAL_DINO"} --results "$OUT_DIR/results"
}

part_compile() {
    run compile_loss 100 "$PY" -m dinokit bench --synthetic "${WORKLOAD[@]}" "${STEPS[@]}" \
        --results "$OUT_DIR/results" compile=loss
    run compile_all 200 "$PY" -m dinokit bench --synthetic --compile "${WORKLOAD[@]}" "${STEPS[@]}" \
        --results "$OUT_DIR/results"
}

{
    echo "=== machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | head -2
    "$PY" -c "import torch, torchvision, timm, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
    echo "cores: $(nproc); /dev/shm (the loader workers' batches): $(df -h /dev/shm 2>/dev/null | awk 'NR == 2 {print $2 ", " $4 " free"}')"
    # what the parts import beyond torch, said at once (a machine without one fails every part that needs it)
    "$PY" -c "import importlib.util as u
need = {'dinokit': 'pydantic yaml click tqdm matplotlib numpy PIL', 'tests': 'pytest', 'pipeline': 'skimage'}
missing = ['%s (%s)' % (m, part) for part, ms in need.items() for m in ms.split() if u.find_spec(m) is None]
print('missing modules: ' + (', '.join(missing) or 'none'))"
} 2>&1 | tee -a "$LOG" "$SUMMARY"

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests bench peers pipeline compile)
for part in "${parts[@]}"; do
    if declare -F "part_$part" >/dev/null; then
        "part_$part"
    else
        echo "unknown part '$part': choose from tests bench peers pipeline compile" | tee -a "$SUMMARY"
    fi
done
rm -rf "$OUT_DIR/tmp"
echo "=== all parts:"
grep '^=== ' "$SUMMARY"
