#!/usr/bin/env bash
# The device checks of issue 15 in one run (about 5 minutes on one H100 / H200, a few rows at 7B shape):
#   1. common.dropout_linear on CUDA: backward redraws the forward's mask from CUDA's generator;
#   2. the efficiency suite's CUDA rows (torch.cuda.max_memory_allocated, step time, MFU) at Llama-2-7B shape,
#      seq 2048, bf16, without and with checkpointing: one JSON per mode, each written after every row.
# Copy $OUT/*.json to bench/results/ and run bench/report.py: BENCHMARKS.md then shows the GPU targets and
# "Validation on the GPU", the count of bench/memory.py beside what the GPU measured.
#   bash bench/gpu_check.sh                                    # on the GPU machine, OUT=<folder>
#   MODEL=llama-h128-l2-v512 SEQ=64 bash bench/gpu_check.sh    # the same commands on a small shape (CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
MODEL=${MODEL:-llama-7b-shape}
SEQ=${SEQ:-2048}
ROWS=${ROWS:-"peft-lora-r64 lora-r64 spsft-r128 lora-r8-qkvud g2r2-refine peft-lora-r8 lora-r8"}
mkdir -p "$OUT"
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
python -m pytest -q tests/test_memory.py -k reuses_the_forward_mask 2>&1 | tail -3
stamp=$(date -u +%Y%m%d-%H%M%S)
for ckpt in off on; do
  # shellcheck disable=SC2086
  python bench/efficiency.py --model "$MODEL" --seq_len "$SEQ" --micro_batch_size 1 --grad_ckpt "$ckpt" \
    --rows $ROWS --steps 3 --warmup_steps 2 --out "$OUT/main-$MODEL-$SEQ-ckpt-$ckpt-$stamp.json" 2>&1 \
    | grep -v -e USDT -e Warning -e warnings.warn
done
ls -l "$OUT"
