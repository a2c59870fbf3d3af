#!/usr/bin/env bash
# The GPU rows of issue #13 in one call of the device tool (README, "Speed on a GPU"). Here, first:
#     bash benchmarks/device_wheels.sh
# then the call: command `bash benchmarks/device_run.sh`, carry [".whl"], timeout_s 600.
#
# 1. installs the carried wheels into /tmp/site (the image's torch stays) and prints what it runs on;
# 2. the tests of the CUDA-only code paths (`-k cuda`: against the CPU and aten, they skip without a GPU);
# 3. benchmarks/device_benchmark.py in stages, each under `timeout` so that all end inside DEVICE_BUDGET_S (default
#    540 s, under the call's 600 s), interrupted there like Ctrl-C, which keeps every table already written: the GPU
#    targets' models eager with profiles (targets/, at most 200 s), the same compiled (compiled/, at most 260 s),
#    the S, Ti and B groups, the later ones only while time is left. Arguments given to this script make one stage;
#    after each stage, what the benchmark wrote under DEVICE_RESULTS (default benchmarks/results/<device>) is
#    packed into $OUT/results.tgz, paths relative to the repository: `tar xzf results.tgz` in the checkout puts them
#    in place.
# $OUT (the device tool's folder; a temporary one elsewhere) also gets env.txt, tests.log and benchmark.log. Exits
# with the first failing step's status. DEVICE_WHEELS, PYTHON: the wheels' folder, the interpreter.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
BUDGET_S=${DEVICE_BUDGET_S:-540}
PY=${PYTHON:-python3}
# seconds left of the budget, at most $1 (timeout takes 0 as no limit at all: at least 1)
left() {
  local l=$((BUDGET_S - SECONDS))
  if [ -n "${1:-}" ] && [ "$1" -lt "$l" ]; then l=$1; fi
  echo $((l > 1 ? l : 1))
}
status=0
note() { [ "$status" -ne 0 ] || status=$1; }

WHEELS=${DEVICE_WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl || { echo 'installing the carried wheels failed' >&2; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no $WHEELS/ carried (benchmarks/device_wheels.sh): using the packages installed here" >&2
  export PYTHONPATH=$PWD
fi
"$PY" - > "$OUT/env.txt" 2>&1 <<'PY'
import torch, timm, fvcore, timm_hybrid
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print(f'torch {torch.__version__}, timm {timm.__version__} ({timm.__file__}), '
      f'timm_hybrid {timm_hybrid.__version__}, {gpu}')
PY
note $?
cat "$OUT/env.txt"

timeout "$(left 120)" "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -k cuda tests 2>&1 \
  | tee "$OUT/tests.log"
note $?

RESULTS=${DEVICE_RESULTS:-$("$PY" -c 'import torch
from timm_hybrid.compare import SpeedSettings, device_folder_name
device = "cuda" if torch.cuda.is_available() else "cpu"
print("benchmarks/results/" + device_folder_name(SpeedSettings(device=device)))')}
stamp=$(mktemp)
# one benchmark stage: at most $1 seconds of what is left, output folder $2, then device_benchmark.py's arguments;
# interrupted at its limit like Ctrl-C (the tables written so far stay), and everything so far packed after it
stage() {
  local limit=$1 folder=$2
  shift 2
  timeout -s INT -k 20 "$(left "$limit")" "$PY" benchmarks/device_benchmark.py "$@" --output "$folder" 2>&1 \
    | tee -a "$OUT/benchmark.log"
  note $?
  find "$RESULTS" -type f -newer "$stamp" -print0 | tar czf "$OUT/results.tgz" --null -T -
  echo "packed: $(tar tzf "$OUT/results.tgz" | wc -l) files of $RESULTS into $OUT/results.tgz"
}

if [ $# -gt 0 ]; then
  stage "$BUDGET_S" "$RESULTS" "$@"
else
  # by what the next session needs most: the targets eager (CNT-S and Refiner-S against DeiT-S, with the
  # alternatives of their GPU choices, and profiles), then the same models compiled (inductor fuses the passes over
  # memory that bound eager mode: benchmarks/memory_traffic.py), then the full size groups with what is left
  targets=(cnt_s_patch16_224 refiner_vit_small_patch16_224 deit_small_patch16_224)
  stage 200 "$RESULTS/targets" --no-memory --profile --reference deit_small_patch16_224 --models "${targets[@]}" \
    cnt_s_patch16_224:inner_impl=conv refiner_vit_small_patch16_224:refine_image_stats=False
  [ "$(left)" -lt 90 ] || stage 260 "$RESULTS/compiled" --compile --no-memory --reference deit_small_patch16_224 \
    --models "${targets[@]}"
  [ "$(left)" -lt 60 ] || stage "$BUDGET_S" "$RESULTS" --sizes s ti b --no-memory
fi
exit "$status"
