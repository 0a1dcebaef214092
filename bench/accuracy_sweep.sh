#!/usr/bin/env bash
# The issue-25 sweep, most valuable results first; every stage skips the runs its JSON's cache already
# holds, so rerunning this script (here or on another machine, after `git pull`) continues it.
#   nohup nice -n 19 bash bench/accuracy_sweep.sh > out/accuracy_sweep.log 2>&1 &
# COMMIT=1 commits the JSONs after every stage (the branch's worktree; only those files).
# THREADS (default 1): torch's threads per run. On a shared, busy CPU one thread is ~10-40x faster per step
# than two (two threads wait on each other whenever one is descheduled); on an idle machine use its cores.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
GLUE=${GLUE:-../shared/data/glue}
MAIN="lora-r1 lora-r8 g2r2-pf0.7 pilora taso spsft"
ABL="g2r2-pf0.2 g2r2-random pilora-random taso-random"
# the budget: full training sets (SST-2: its first 10,000 examples), 3 epochs, batch 8, max length 128
BUDGET="--model minilm-l6 --epochs 3 --max_len 128 --save_every 200"
stage() {  # task max_samples json rows... -- extra flags
    local task=$1 n=$2 json=bench/results/accuracy-minilm-l6-$3.json; shift 3
    echo "== $(date '+%F %T') $task $*"
    python bench/accuracy.py $BUDGET --data "$GLUE/$task" --max_samples "$n" --json "$json" "$@" || echo "stage failed: $?"
    if [ "${COMMIT:-0}" = 1 ]; then git add "$json" && git commit -q -m "accuracy sweep: $task $* (cache)" -- "$json"; fi
}
# 1. does LoRA r = 8 learn the task at this budget (one seed, the budget rule)?
stage STS-B 0 sts-b-full --rows lora-r8 --seeds 0
stage CoLA 0 cola-full --rows lora-r8 --seeds 0     # Matthews 0.148 at lr 1e-3: misses the rule (+0.2)
stage SST-2 10000 sst-2-10k --rows lora-r8 --seeds 0
# 2. each main row's learning rate (3 factors, held-out 10 % of train), then 3 seeds at it
stage STS-B 0 sts-b-full --rows $MAIN --lr_grid 0.3 1 3 --seeds 0 1 2
stage SST-2 10000 sst-2-10k --rows $MAIN --lr_grid 0.3 1 3 --seeds 0 1 2
stage CoLA 0 cola-full --rows $MAIN --lr_grid 0.3 1 3 --seeds 0 1 2
# 3. ablations (their method's chosen learning rate, see LR_TIED)
stage STS-B 0 sts-b-full --rows $MAIN $ABL --lr_grid 0.3 1 3 --seeds 0 1 2
stage CoLA 0 cola-full --rows $MAIN $ABL --lr_grid 0.3 1 3 --seeds 0 1 2
echo "== $(date '+%F %T') done"
