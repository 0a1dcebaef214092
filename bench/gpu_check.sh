#!/usr/bin/env bash
# The device check (issues 15, 26, 31) as one command, at most 7 minutes by its limits on one H100 / H200:
#   1. env       python and the installed torch / transformers / peft / datasets beside the pinned ones
#                (requirements.txt, bench/requirements.txt), the GPU and its clocks (nvidia-smi);
#   2. tests     the CUDA unit tests (common.dropout_linear's backward redraws the forward's mask from CUDA's
#                generator): through pytest when it imports, else bench/plain_tests.py (same test functions);
#   3. pairs-off     `bench/efficiency.py pairs` at Llama-2-7B shape, seq 2048, bf16, without checkpointing: each
#                    compared pair (issue 31's targets) resident at once on one shared base model, timed in
#                    interleaved blocks (A×BLOCK B×BLOCK A×BLOCK …) with CUDA events, STEPS timed steps per row
#                    after warm-up, the same loss (train.causal_loss) in both rows; the ratio of medians with a
#                    bootstrap 95 % interval (a target is met only when the interval clears it), MFU from
#                    bench/count.py's counted FLOP (attention included), the GPU's clocks before and after;
#   4. pairs-compile LoRA r = 8 with torch.compile against eager, no checkpointing (the MFU target);
#      pairs-on      the pairs of 3 with checkpointing;
#   5. train     bench/gpu_train_check.py (train.py's main() for every method on tiny-llama, bf16, checkpointing,
#                --resume against the uninterrupted run), only in the time left of the 7 minutes (TOTAL_S).
# No part stops the script (no set -e): each runs under `timeout`, its exit status and seconds go to the log and
# to gpu-check-status.json; every JSON is rewritten as it grows, so a part cut short keeps what it measured.
# $OUT gets at most 7 files: gpu-check.log, gpu-check-status.json, tests.json (without pytest), three pairs JSONs,
# train-check.json. Copy the JSONs to bench/results/ and run bench/report.py.
#   OUT=<folder> bash bench/gpu_check.sh                                            # on the GPU machine
#   MODEL=llama-h128-l2-v512 SEQ=64 STEPS=4 BLOCK=2 bash bench/gpu_check.sh         # the same commands, small shape (CPU)
# Knobs (environment): PYTHON, MODEL, SEQ, STEPS, BLOCK, WARMUP, PAIRS (row names of efficiency.PAIRS), TEST_FILES,
# TEST_K, TRAIN_METHODS, TRAIN_STEPS, TOTAL_S (420: all parts), PAIR_S, and the per-part limits in seconds
# LIMIT_TESTS, LIMIT_OFF, LIMIT_COMPILE, LIMIT_ON (each cut to the time left of TOTAL_S).
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-out/gpu}
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-7b-shape}
SEQ=${SEQ:-2048}
STEPS=${STEPS:-20}
BLOCK=${BLOCK:-5}
WARMUP=${WARMUP:-2}
PAIRS=${PAIRS:-}
TEST_FILES=${TEST_FILES:-tests/test_memory.py}       # the CUDA tests: files, and words of their names
TEST_K=${TEST_K:-reuses_the_forward_mask}
TRAIN_METHODS=${TRAIN_METHODS:-"lora g2r2 pilora taso spsft"}
TRAIN_STEPS=${TRAIN_STEPS:-6}
TOTAL_S=${TOTAL_S:-420}
LIMIT_TESTS=${LIMIT_TESTS:-30}
LIMIT_OFF=${LIMIT_OFF:-160}
LIMIT_COMPILE=${LIMIT_COMPILE:-90}
LIMIT_ON=${LIMIT_ON:-170}
PAIR_S=${PAIR_S:-25}                                  # no pair starts later than this before its part's limit
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

part env 30 "$PY" bench/efficiency.py env

# shellcheck disable=SC2086
if "$PY" -c "import pytest" 2>/dev/null; then
  part tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider $TEST_FILES -k "${TEST_K// / or }"
else
  part tests "$LIMIT_TESTS" "$PY" bench/plain_tests.py $TEST_FILES -k $TEST_K --json "$OUT/tests.json"
fi

for mode in off compile on; do  # each part within its limit and the time left of TOTAL_S
  case $mode in off) limit=$LIMIT_OFF ckpt=off;; on) limit=$LIMIT_ON ckpt=on;; compile) limit=$LIMIT_COMPILE ckpt=off;; esac
  [ $mode = compile ] && compiled=only || compiled=without
  left=$((TOTAL_S - (SECONDS - T0) - 5))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 40 ]; then
    echo "=== pairs-$mode: skipped (${left} s left of ${TOTAL_S} s)" | tee -a "$LOG"
    continue
  fi
  # shellcheck disable=SC2086
  part pairs-$mode "$limit" "$PY" bench/efficiency.py pairs --model "$MODEL" --seq_len "$SEQ" --grad_ckpt $ckpt \
    --compiled $compiled --steps "$STEPS" --block "$BLOCK" --warmup_steps "$WARMUP" ${PAIRS:+--pairs $PAIRS} \
    --deadline_s $((limit - PAIR_S)) --out "$OUT/pairs-$MODEL-$SEQ-$mode-$stamp.json"
done

left=$((TOTAL_S - (SECONDS - T0) - 10))
if [ "$left" -ge 30 ]; then
  # shellcheck disable=SC2086
  part train "$left" "$PY" bench/gpu_train_check.py --methods $TRAIN_METHODS --steps "$TRAIN_STEPS" \
    --deadline_s $((left * 3 / 4)) --out "$OUT/train-check.json"
else
  echo "=== train: skipped (${left} s left of ${TOTAL_S} s)" | tee -a "$LOG"
fi

echo "=== done in $((SECONDS - T0)) s: $(cat "$STATUS")" | tee -a "$LOG"
ls -l "$OUT" | tee -a "$LOG"
