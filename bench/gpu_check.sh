#!/usr/bin/env bash
# The device checks (issues 15, 26) as one command: 168 s on one H200 (2026-12-04), at most ~8 minutes by its limits.
#   1. env      python, torch, transformers, peft, the GPU;
#   2. tests    the CUDA unit tests (common.dropout_linear's backward redraws the forward's mask from CUDA's
#               generator): through pytest when it imports, else bench/plain_tests.py (same test functions);
#   3. train    bench/gpu_train_check.py: train.py's main() for every method on tiny-llama in bf16 with
#               checkpointing, and --resume from a mid-run checkpoint against the uninterrupted run;
#   4. 7b-ckpt  bench/efficiency.py's CUDA rows (max_memory_allocated, step time, MFU) at Llama-2-7B shape,
#   5. 7b-plain seq 2048, bf16, with then without checkpointing: a step of every method, each row from a clean
#               allocator, within --row_timeout; a failing row is recorded and the next one runs.
# No part stops the script (no set -e): each runs under `timeout`, its exit status and seconds go to the log and
# to gpu-check-status.json; every JSON is rewritten as it grows, so a part cut short keeps what it measured.
# $OUT gets at most 6 files: gpu-check.log, gpu-check-status.json, tests.json (without pytest), train-check.json,
# and one efficiency JSON per mode. Copy the JSONs to bench/results/ and run bench/report.py.
#   OUT=<folder> bash bench/gpu_check.sh                                  # on the GPU machine
#   MODEL=llama-h128-l2-v512 SEQ=64 bash bench/gpu_check.sh               # the same commands, small shape (CPU)
# Knobs (environment): PYTHON, MODEL, SEQ, TEST_FILES, TEST_K, ROWS_CKPT, ROWS_PLAIN, TRAIN_METHODS, TRAIN_STEPS, ROW_TIMEOUT, and the
# per-part limits in seconds LIMIT_TESTS, LIMIT_TRAIN, LIMIT_CKPT, LIMIT_PLAIN.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-7b-shape}
SEQ=${SEQ:-2048}
ROWS_CKPT=${ROWS_CKPT:-"lora-r8 peft-lora-r8 lora-r64 peft-lora-r64 spsft-r128 g2r2-refine g2r2-warmup g2r2-warmup-paper lora-r8-qkvud lora-r32-qkvud pilora-s2 taso-r8 lora-r1"}
ROWS_PLAIN=${ROWS_PLAIN:-"$ROWS_CKPT"}
TEST_FILES=${TEST_FILES:-tests/test_memory.py}       # the CUDA tests: files, and words of their names
TEST_K=${TEST_K:-reuses_the_forward_mask}
TRAIN_METHODS=${TRAIN_METHODS:-"lora g2r2 pilora taso spsft"}
TRAIN_STEPS=${TRAIN_STEPS:-6}
ROW_TIMEOUT=${ROW_TIMEOUT:-45}
LIMIT_TESTS=${LIMIT_TESTS:-45}
LIMIT_TRAIN=${LIMIT_TRAIN:-110}
LIMIT_CKPT=${LIMIT_CKPT:-170}
LIMIT_PLAIN=${LIMIT_PLAIN:-150}
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
STATUS="$OUT/gpu-check-status.json"
stamp=$(date -u +%Y%m%d-%H%M%S)
T0=$SECONDS
PARTS=""
: > "$LOG"

part() {  # part NAME LIMIT_S CMD...: run CMD under timeout, log it, record its exit status; never stops the script
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s, at ${SECONDS} s): $*" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | grep --line-buffered -v -e USDT -e 'Warning' -e 'warnings.warn' | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "=== $name: TIMED OUT after ${limit} s" | tee -a "$LOG"
  echo "=== $name: exit status $rc, $((SECONDS - t)) s (total $((SECONDS - T0)) s)" | tee -a "$LOG"
  PARTS="$PARTS${PARTS:+, }{\"part\": \"$name\", \"rc\": $rc, \"s\": $((SECONDS - t))}"
  printf '{"parts": [%s], "total_s": %d, "model": "%s", "seq_len": %s, "stamp": "%s"}\n' \
    "$PARTS" $((SECONDS - T0)) "$MODEL" "$SEQ" "$stamp" > "$STATUS"
}

part env 30 "$PY" -c "import sys, torch; from importlib.util import find_spec; from importlib.metadata import version
print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')
for m in ('transformers', 'peft', 'datasets', 'safetensors', 'tqdm', 'accelerate', 'pytest'):
    print(m, version(m) if find_spec(m) else 'ABSENT')
try:
    import pytest
except ImportError:
    print('pytest ABSENT (does not import)')"

# shellcheck disable=SC2086
if "$PY" -c "import pytest" 2>/dev/null; then
  part tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider $TEST_FILES -k "${TEST_K// / or }"
else
  part tests "$LIMIT_TESTS" "$PY" bench/plain_tests.py $TEST_FILES -k $TEST_K --json "$OUT/tests.json"
fi

# shellcheck disable=SC2086
part train "$LIMIT_TRAIN" "$PY" bench/gpu_train_check.py --methods $TRAIN_METHODS --steps "$TRAIN_STEPS" \
  --deadline_s $((LIMIT_TRAIN * 3 / 4)) --out "$OUT/train-check.json"

for mode in on off; do
  if [ $mode = on ]; then rows=$ROWS_CKPT limit=$LIMIT_CKPT name=7b-ckpt; else rows=$ROWS_PLAIN limit=$LIMIT_PLAIN name=7b-plain; fi
  # shellcheck disable=SC2086
  part $name "$limit" "$PY" bench/efficiency.py --model "$MODEL" --seq_len "$SEQ" --micro_batch_size 1 \
    --grad_ckpt $mode --rows $rows --steps 3 --warmup_steps 2 --calib_batches 2 --row_timeout "$ROW_TIMEOUT" \
    --deadline_s $((limit * 3 / 4)) --out "$OUT/main-$MODEL-$SEQ-ckpt-$mode-$stamp.json"
done

echo "=== done in $((SECONDS - T0)) s: $(cat "$STATUS")" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
