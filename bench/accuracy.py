"""Head-to-head accuracy of the four methods and LoRA on real tasks, several seeds, one command (issue 14).

    python bench/accuracy.py --model minilm-l6 --data ../shared/data/glue/SST-2
    python bench/accuracy.py --model minilm-l6 --data ../shared/data/glue/CoLA --rows lora-r8 spsft --seeds 0
    python bench/accuracy.py --model smollm2-135m --data ../shared/data/commonsense --seeds 0 \
        --rows lora-r8 g2r2 pilora taso spsft --max_steps 60 --lr 5e-4 --eval_commonsense ../shared/data/commonsense \
        --eval_mode loglik --eval_limit 100
    python bench/report.py                      # bench/results/accuracy-*.json -> RESULTS.md (+ charts)

    bash bench/accuracy_sweep.sh                # issue 25: full training sets, each row at its own learning rate

Every run goes through train.main with the same data order (--seed), steps and evaluation; flags this
script does not know pass through to every row (e.g. --eval_limit, --max_len).
A row = a method and its own settings from its paper (ROWS below; the readings are in RESULTS.md):

- shared by every row: --r 8 --alpha 16 --dropout 0.05 (G²R² Table 10 / PiLoRA Table 6: rank 8,
  dropout 0.05; α = 16 is PiLoRA's and is kept fixed when r changes, as LoRA's authors do), --lr (or each
  row's own, --lr_grid),
  linear schedule with 6 % warmup, AdamW, batch 8, no weight decay.
- G²R²: weight decay 0.01 for NLU, 0.05 for commonsense (000 §4 Implementation details); T_w = T_p =
  10 % of the steps (Table 10: 3 + 3 of SST-2's 30 epochs); p_f 0.2 and 0.7 (the paper's NLU settings).
- PiLoRA: r′ = 1 for NLU and 2 for commonsense (Tables 5–6, the method's defaults), stage 1 = one
  epoch before stage 2's own epochs (App. A.4 and Alg. 1; pilora.py's default).
- TASO: r 8 at density 1/8, the rank-1 LoRA budget (taso-notes §3; the method's defaults).
- SPSFT: --spsft_rows chosen so its trainable parameters match lora-r8 (rows = round(r · Σ(d_in + d_out)
  / Σ d_in) over the adapted matrices: Σ rows·d_in ≈ Σ 8·(d_in + d_out)); its learning rate (centre) is
  --lr × 0.2, the paper's ratio (004 §4.3: LoRA 1e-4, SPSFT 2e-5 on Llama) and weight decay 0.01
  ("decay rate 0.01", read as AdamW's); importance ℓ2 for causal LMs (§4.3), Taylor otherwise (Table 5).
- Ablations from the papers: g2r2-random (Table 5's random module choice), pilora-random (Table 4),
  taso-random (uniform importance).

Each row at its own learning rate (issue 25): --lr_grid 0.3 1 3 trains each row, in --rows order, once (seed
--select_seed) at lr_row × each factor on the training set minus a held-out --val_frac of it (carve(): a
fixed shuffle of train.tsv, dev.tsv is never opened), picks the factor with the best primary metric on that
held-out part, then trains every seed at it and reports the dev set, before the next row's grid (a sweep cut
short leaves whole rows). lr_row is --lr, SPSFT's --lr × 0.2. A best score at an end of the grid is not a
choice (the optimum may lie beyond it): the grid grows one factor past that end (0.3 1 3 -> 9), up to
--lr_extend (2) times, until the best is inside it.
Rows whose paper ties their learning rate to another row's take that row's choice (LR_TIED: TASO runs
at LoRA r = 8's learning rate and scales it by ρ^(-1/2) itself, taso.py T7; ablations at their method's).

The budget rule (budget_rule): a table ranks the methods only if the reference beats the better of the
`trivial` predictors, the untuned model (the "before" evaluation) and a constant one (the training set's
majority class; a constant has Matthews 0 and no Pearson correlation, counted as 0), by MARGIN of its
primary metric: 10 accuracy points, Matthews +0.2, Pearson +0.3. Otherwise bench/report.py prints "budget
too small to rank the methods" instead of verdicts.

Runs are cached twice, by their train.py argument list: in the output JSON ("cache", committed with it, so
a sweep continued on another machine skips what any earlier sitting finished; the JSON is rewritten after
every finished run) and under --runs_dir (result.json skipped; an unfinished run resumes from its
checkpoint, --resume, bit-exact). The JSON in bench/results/ holds the command, versions, machine, every
run's summary fields (with its training FLOP, "train_flop": torch's FlopCounterMode count of matrix products
and attention over the whole run, evaluations left out; None for a resumed run), per-row mean ± std, each
dev-set run's per-example predictions ("dev_pred", in the cache; the labels once, "dev_gold") and the paired
comparisons ("paired"): each row against lora-r8, an ablation also against its own method (COMPARE_WITH), by
seed (a t-interval) and by dev example (a bootstrap); *better* / *worse* only where the 95 % intervals exclude
0, otherwise *no difference shown* (compare()).
"""
import argparse
import collections
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

REFERENCE = "lora-r8"
SPSFT_LR_RATIO = 2e-5 / 1e-4  # SPSFT §4.3 (Llama): LoRA at 1e-4, SPSFT at 2e-5
# name -> train.py flags of the row; "{wd_g2r2}", "{rows}", "{lr_spsft}", "{spsft_imp}" are filled per sweep
ROWS = {
    "lora-r1": ["--method", "lora", "--r", "1"],
    "lora-r8": ["--method", "lora"],
    "g2r2-pf0.2": ["--method", "g2r2", "--g2r2_pf", "0.2", "--weight_decay", "{wd_g2r2}"],
    "g2r2-pf0.7": ["--method", "g2r2", "--g2r2_pf", "0.7", "--weight_decay", "{wd_g2r2}"],
    "pilora": ["--method", "pilora"],
    "pilora-equal": ["--method", "pilora", "--pilora_stage1_in_epochs"],
    "taso": ["--method", "taso"],
    "spsft": ["--method", "spsft", "--spsft_rows", "{rows}", "--spsft_importance", "{spsft_imp}",
              "--weight_decay", "0.01"],
    "g2r2-random": ["--method", "g2r2", "--g2r2_pf", "0.2", "--g2r2_score", "random", "--weight_decay", "{wd_g2r2}"],
    "pilora-random": ["--method", "pilora", "--pilora_partition", "random"],
    "taso-random": ["--method", "taso", "--taso_metric", "random"],
}
LR_RATIO = {"spsft": SPSFT_LR_RATIO}  # a row's learning rate centre: --lr × this (1 when absent)
# rows that take another row's chosen learning rate instead of a grid of their own (see the docstring)
LR_TIED = {"taso": "lora-r8", "taso-random": "lora-r8", "g2r2-random": "g2r2-pf0.2", "pilora-random": "pilora"}
MAIN_ROWS = ["lora-r1", "lora-r8", "g2r2-pf0.7", "pilora", "pilora-equal", "taso", "spsft"]
ALIASES = {"g2r2": "g2r2-pf0.2"}  # --rows g2r2 means the paper's main setting
# the metric a row is judged on, first present wins (all higher-is-better)
PRIMARY = ["commonsense_loglik.average", "commonsense_generate.average", "matthews", "pearson", "accuracy",
           "exact_match"]
LOWER_IS_BETTER = {"eval_loss"}
# the budget rule: the reference must beat the best trivial predictor by this much (metric's last part)
MARGIN = {"accuracy": 0.10, "average": 0.10, "exact_match": 0.10, "matthews": 0.20, "pearson": 0.30}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="anything train.py --model accepts")
    p.add_argument("--data", required=True, help="anything train.py --data accepts")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"subset of: {', '.join(ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (SPSFT gets × 0.2); the grid's centre")
    p.add_argument("--lr_grid", nargs="*", type=float, default=[], help="factors of each row's learning rate to "
                   "choose from on a held-out part of the training set, e.g. 0.3 1 3 (none: no choice)")
    p.add_argument("--lr_extend", type=int, default=2, help="times a grid of >= 3 factors grows past an end "
                   "that holds the best held-out score (0: never)")
    p.add_argument("--val_frac", type=float, default=0.1, help="share of the training set held out for --lr_grid")
    p.add_argument("--select_seed", type=int, default=0, help="the seed of the --lr_grid runs")
    p.add_argument("--max_samples", type=int, default=1000, help="training examples (0: all)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--save_every", type=int, default=50, help="checkpoint interval of every run (resume)")
    p.add_argument("--runs_dir", default=os.path.join(ROOT, "out", "accuracy"))
    p.add_argument("--json", help="output JSON (default bench/results/accuracy-<model>-<data>.json)")
    p.add_argument("--backfill_predictions", action="store_true", help="train again the cached dev-set runs "
                   "of --rows that have no per-example predictions (made before they were kept)")
    args, passthrough = p.parse_known_args(argv)
    args.rows = [ALIASES.get(r, r) for r in args.rows]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if REFERENCE not in args.rows:
        print(f"note: {REFERENCE} is not among --rows; ratios and verdicts need it and are left empty")
    if any(f <= 0 for f in args.lr_grid) or not 0 < args.val_frac < 1 or args.lr_extend < 0:
        p.error("--lr_grid factors must be > 0, --val_frac in (0, 1) and --lr_extend >= 0")
    args.passthrough = passthrough
    return args


# ------------------------------------------------------------------------------------ the rows

def target_shapes(model_name, task, targets=None):
    """[(d_out, d_in)] of the default LoRA targets, from the config alone (meta device, no weights)."""
    import torch
    import transformers as tf

    import common
    import models
    if model_name in models.TINY:
        with torch.device("meta"):
            model = models.build_tiny(model_name)
    else:
        config = tf.AutoConfig.from_pretrained(models.model_path(model_name))
        with torch.device("meta"):
            model = tf.AutoModel.from_config(config)
    names = common.find_targets(model, targets)
    return [(m.out_features, m.in_features) for m in (model.get_submodule(n) for n in names)]


def spsft_rows(shapes, r=8):
    """Rows per matrix so SPSFT's Σ rows·d_in matches rank-r LoRA's Σ r·(d_in + d_out)."""
    return max(1, round(r * sum(o + i for o, i in shapes) / sum(i for _, i in shapes)))


def row_argv(name, fill):
    return [str(fill[a[1:-1]]) if a.startswith("{") else a for a in ROWS[name]]


def sweep_fill(args, task, shapes):
    causal = task == "causal"
    return {"wd_g2r2": 0.05 if causal else 0.01, "rows": spsft_rows(shapes),
            "lr_spsft": lr_str(args.lr * SPSFT_LR_RATIO), "spsft_imp": "l2" if causal else "taylor"}


def lr_str(lr):
    return f"{lr:.3g}"


def base_argv(args):
    out = ["--model", args.model, "--data", args.data, "--epochs", str(args.epochs)]
    if args.max_samples:
        out += ["--max_samples", str(args.max_samples)]
    return out + args.passthrough


def run_argv(base, name, fill, lr, seed, val_frac=None):
    """One run's argument list, the cache key: held-out runs carry --val_split (exec_argv resolves it)."""
    return base + row_argv(name, fill) + ["--lr", lr_str(lr), "--seed", str(seed)] + \
        ([] if val_frac is None else ["--val_split", str(val_frac)])


# ----------------------------------------------------------------- held-out part of the training set

def carve(data, out_root, frac):
    """A GLUE directory whose train.tsv is `data`'s train.tsv minus a fixed random `frac` of its lines and
    whose dev.tsv is that held-out part (same header, same folder name). `data`'s dev.tsv is never read."""
    import data as D
    src = os.path.normpath(data)
    if not os.path.isfile(os.path.join(src, "train.tsv")):
        raise SystemExit(f"error: --lr_grid needs a GLUE directory with train.tsv, got {data}; give one")
    dst = os.path.join(out_root, f"{slug(src)}-val{frac}", os.path.basename(src))
    if os.path.isfile(os.path.join(dst, "dev.tsv")):
        return dst
    with open(os.path.join(src, "train.tsv"), encoding="utf-8") as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    from pathlib import Path
    head = [] if D.glue_task(Path(src)) == "cola" else lines[:1]  # CoLA's TSVs have no header
    body = lines[len(head):]
    order = list(range(len(body)))
    random.Random(0).shuffle(order)
    n_val = max(1, round(frac * len(body)))
    val = set(order[:n_val])
    os.makedirs(dst + ".tmp", exist_ok=True)
    for split, keep in (("train", lambda i: i not in val), ("dev", lambda i: i in val)):
        with open(os.path.join(dst + ".tmp", f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("\n".join(head + [ln for i, ln in enumerate(body) if keep(i)]) + "\n")
    os.replace(dst + ".tmp", dst) if not os.path.exists(dst) else None
    return dst


def exec_argv(argv, carve_root):
    """The argv train.py runs: --val_split f becomes --data <carve(data, f)>."""
    if "--val_split" not in argv:
        return argv
    i = argv.index("--val_split")
    frac, out = float(argv[i + 1]), argv[:i] + argv[i + 2:]
    j = out.index("--data")
    return out[:j + 1] + [carve(out[j + 1], carve_root, frac)] + out[j + 2:]


# ------------------------------------------------------------------------------- trivial predictors

def constant_score(data, metric):
    """The primary metric of the best constant prediction on the dev set: the training set's majority
    class for accuracy; a constant has Matthews 0 and Pearson undefined (counted 0). None: not known."""
    if metric.rsplit(".", 1)[-1] in ("matthews", "pearson", "spearman"):
        return 0.0
    if metric != "accuracy" or not os.path.isdir(data):
        return None
    import data as D
    from pathlib import Path

    def labels(split):
        task = D.glue_task(Path(data))
        ds = D.read_table(D.split_file(Path(data), split, task), task)
        return [str(v) for v in ds[D.find_columns(ds.column_names, data)[1]]]
    majority = collections.Counter(labels("train")).most_common(1)[0][0]
    dev = labels("validation")
    return sum(y == majority for y in dev) / len(dev)


def budget_rule(run):
    """{"ok", "reference", "untuned", "constant", "trivial", "margin", "metric"} of a sweep JSON: ok when the
    reference's mean primary metric after training ≥ max(untuned, constant) + MARGIN; None fields unknown."""
    pmet, ref = run.get("primary_metric"), run.get("rows", {}).get(run.get("reference"), {})
    st = ref.get("stats", {})
    refm = (st.get("after", {}).get(pmet) or (None, None))[0]
    untuned = (st.get("before", {}).get(pmet) or (None, None))[0]
    check = run.get("budget_check") or []
    if refm is None and check and pmet:  # the reference row has no runs yet: its budget-check runs
        refm = mean_std([flat(c["metrics"].get("after", {})).get(pmet) for c in check])[0]
        untuned = mean_std([flat(c["metrics"].get("before", {})).get(pmet) for c in check])[0]
    constant = run.get("trivial", {}).get("constant")
    margin = MARGIN.get((pmet or "").rsplit(".", 1)[-1])
    best = max((x for x in (untuned, constant) if x is not None), default=None)
    ok = None if refm is None or best is None or margin is None else refm >= best + margin
    return {"ok": ok, "metric": pmet, "reference": refm, "untuned": untuned, "constant": constant,
            "trivial": best, "margin": margin, "from_check": bool(refm is not None and not st.get("after") and check)}


def run_key(argv):
    return hashlib.sha1(json.dumps(argv).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- one run

KEEP = ("method", "steps", "losses", "trainable_params_start", "trainable_params_end", "head_params", "step_time_s",
        "stage_times_s", "peak_memory_bytes", "metrics", "dtype", "device")


MAX_LOSSES = 100  # a longer loss curve is kept every k-th step ("losses_stride": k) to keep the JSON small


@contextlib.contextmanager
def recording_evaluations():
    """{"seen": [(pred, gold)], "flop": {"total", "eval"}} filled while inside: (pred, gold) of every GLUE
    evaluation (evaluate.py's evaluate_classification hands both to evaluate.glue_metrics, the one place that sees
    them, so that call is recorded and still made; train.main evaluates before and after training: the last pair
    is "after"), and the FLOP torch's FlopCounterMode counts (matrix products and attention, forward and
    backward: the work that grows with the model; elementwise ops are not counted), with the part spent inside
    evaluate_classification kept apart ("eval"): total − eval is the training FLOP."""
    import evaluate
    from torch.utils.flop_counter import FlopCounterMode
    rec, glue, classify = {"seen": [], "flop": {"eval": 0}}, evaluate.glue_metrics, evaluate.evaluate_classification
    counter = FlopCounterMode(display=False)

    def glue_metrics(task, pred, gold, regression=False):
        rec["seen"].append((list(pred), list(gold)))
        return glue(task, pred, gold, regression=regression)

    def evaluate_classification(*a, **k):
        before = counter.get_total_flops()
        try:
            return classify(*a, **k)
        finally:
            rec["flop"]["eval"] += counter.get_total_flops() - before
    evaluate.glue_metrics, evaluate.evaluate_classification = glue_metrics, evaluate_classification
    try:
        with counter:
            yield rec
    finally:
        evaluate.glue_metrics, evaluate.evaluate_classification = glue, classify
        rec["flop"]["total"] = counter.get_total_flops()


def code_version():
    """{"commit", "dirty"} of the checkout the run trains from (git HEAD; dirty: a tracked .py file differs
    from it); None outside a git checkout (e.g. a `git archive` copy, whose commit the sweep's log names)."""
    import subprocess
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        diff = subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "*.py"], capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": diff.returncode != 0}


def pack(xs):
    """Per-example values as one space-separated string (the JSON is written with indent=1: a list would
    take a line per example); floats to 4 decimals."""
    return " ".join(str(round(x, 4) if isinstance(x, float) else x) for x in xs)


def unpack(s):
    """pack's list back: ints stay ints."""
    return [float(v) if any(c in v for c in ".en") else int(v) for v in s.split()]


def run_one(argv, runs_dir, save_every, cache=None, need_pred=False):
    """train.main(argv) in runs_dir/<key>; cached: a run in `cache` (the committed JSON's) or with a
    result.json is read back, an unfinished one resumes. Adds a finished run to `cache`. A dev-set run keeps
    its per-example predictions after training ("dev_pred") and the labels ("dev_gold"; main keeps one copy
    per JSON); need_pred reruns a cached dev-set run that has none (runs made before they were kept), keeping the
    earlier run's metrics and code in "rerun_of"."""
    import train
    key = run_key(argv)
    dev_run = "--val_split" not in argv
    if cache is not None and key in cache and not (need_pred and dev_run and "dev_pred" not in cache[key]):
        return cache[key], True
    out_dir = os.path.join(runs_dir, key)
    done = os.path.join(out_dir, "result.json")
    earlier = cache.get(key) if cache is not None else None  # a finished run trained again for its predictions
    if os.path.exists(done):
        with open(done) as f:
            res, cached = json.load(f), True
        earlier = earlier or res
    if not os.path.exists(done) or (need_pred and dev_run and "dev_pred" not in res):
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(done):  # a finished run without predictions: train it again from scratch
            for f in ("result.json", "ckpt.pt"):
                if os.path.exists(os.path.join(out_dir, f)):
                    os.remove(os.path.join(out_dir, f))
        resumed, t0 = os.path.exists(os.path.join(out_dir, "ckpt.pt")), time.time()
        with recording_evaluations() as rec:
            summary = train.main(exec_argv(argv, os.path.join(runs_dir, "carved")) +
                                 ["--output_dir", out_dir, "--resume", "--save_every", str(save_every)])
        if "signal" in summary:  # stopped by SIGTERM / Ctrl-C: its checkpoint is saved, the sweep stops here
            raise SystemExit(f"stopped at step {summary['stopped_at']} ({out_dir}); rerun the same command to "
                             "continue it")
        res = {k: summary.get(k) for k in KEEP} | {"argv": argv, "wall_s": round(time.time() - t0, 1),
                                                    "resumed": resumed}
        res["code"] = code_version()  # the methods change under a sweep: each run says which code it ran
        if earlier is not None:  # what the run it replaces scored, from which code (report.py: did it reproduce?)
            res["rerun_of"] = {"metrics": earlier["metrics"], "code": earlier.get("code")}
        # a resumed run counted only the part after its checkpoint: no training FLOP
        res["train_flop"] = None if resumed else rec["flop"]["total"] - rec["flop"]["eval"]
        if rec["seen"] and dev_run:
            res["dev_pred"], res["dev_gold"] = map(pack, rec["seen"][-1])
        res["metrics"] = {k: v for k, v in res["metrics"].items() if k in ("before", "after")}
        losses = res.get("losses") or []
        if len(losses) > MAX_LOSSES:
            k = -(-len(losses) // MAX_LOSSES)
            res["losses"], res["losses_stride"] = losses[::k], k
        train.write_json(res, done)
        cached = False
    if cache is not None:
        cache[key] = res
    return res, cached


# ---------------------------------------------------------------------------------- statistics

def flat(metrics):
    """{"accuracy": .8, "commonsense_loglik": {"average": .4, "n": {...}}} -> numeric leaves by dotted name."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in flat(v).items() if not kk.startswith("n.")})
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("time_s"):
            out[k] = float(v)
    return out


def mean_std(xs):
    """(mean, sample std) of a list; std is None for fewer than two values."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


# The paired verdict (issue 34). Every row runs the reference's seeds with the same data order and the same dev
# set, so a row and the row it is compared with are paired twice: by seed and by dev example.
# - t over seeds: the per-seed differences d_s = m(row, s) − m(against, s) of the primary metric, their mean and
#   mean ± t_{0.975, n−1} · sd(d) / √n (the spread of training randomness, on this one dev set);
# - the paired bootstrap over dev examples (accuracy, Matthews, Pearson; the runs' per-example predictions): each of
#   N_BOOT replicates draws one multiset of dev examples (n with replacement) and scores both rows of every seed on
#   it; the replicate's value is the mean over seeds of the differences; the interval is its 2.5 and 97.5
#   percentiles (the spread of the dev sample). One draw serves every seed because the seeds share one dev set
#   (an independent draw per seed would shrink that spread by the number of seeds).
# *better* / *worse* only when every interval there is excludes 0 on the same side; otherwise *no difference shown*.
COMPARE_WITH = {"g2r2-random": "g2r2-pf0.2", "pilora-random": "pilora", "taso-random": "taso",
                "pilora-equal": "pilora"}  # a row's own method (an ablation's, PiLoRA's at LoRA's step count)
BOOT_METRICS = ("accuracy", "matthews", "pearson")
N_BOOT = 2000


def t_interval(diffs, level=0.95):
    """(mean, low, high) of the mean of paired differences: Student t with n − 1 degrees of freedom;
    (mean, None, None) for fewer than two."""
    from scipy import stats
    d = [float(x) for x in diffs]
    if not d:
        return None, None, None
    m = statistics.fmean(d)
    if len(d) < 2:
        return m, None, None
    h = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * statistics.stdev(d) / len(d) ** 0.5
    return m, m - h, m + h


def weighted_metric(metric, weights, pred, gold):
    """The metric of every bootstrap replicate at once: weights (B, n) counts of each dev example in the
    replicate (each row sums to n), pred / gold (n,). Accuracy; Matthews in Gorodkin's form (any number of
    classes; 0 when undefined, as evaluate.matthews); Pearson (0 when a side is constant, as evaluate.pearson)."""
    import numpy as np
    w = np.asarray(weights, dtype=np.float64)
    p, g = np.asarray(pred), np.asarray(gold)
    s = w.sum(1)
    if metric == "accuracy":
        return w @ (p == g).astype(np.float64) / s
    if metric == "matthews":
        classes = np.union1d(p, g)
        pk = w @ (p[:, None] == classes[None]).astype(np.float64)  # (B, K)
        tk = w @ (g[:, None] == classes[None]).astype(np.float64)
        c = w @ (p == g).astype(np.float64)
        cov = c * s - (pk * tk).sum(1)
        den = (s * s - (pk * pk).sum(1)) * (s * s - (tk * tk).sum(1))
        return np.where(den > 0, cov / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)
    if metric == "pearson":
        x, y = p.astype(np.float64), g.astype(np.float64)
        mx, my = (w @ x) / s, (w @ y) / s
        sxy = w @ (x * y) - s * mx * my
        sxx, syy = w @ (x * x) - s * mx * mx, w @ (y * y) - s * my * my
        ok = (sxx > 1e-12 * (w @ (x * x))) & (syy > 1e-12 * (w @ (y * y)))
        return np.where(ok, sxy / np.sqrt(np.where(ok, sxx * syy, 1.0)), 0.0)
    raise ValueError(f"no bootstrap for metric {metric!r}; one of {BOOT_METRICS}")


def bootstrap_interval(metric, preds, preds_against, gold, n_boot=N_BOOT, level=0.95, seed=0):
    """(low, high) of the paired bootstrap over dev examples, pooled over seeds: preds / preds_against are
    lists (one per seed, in the same seed order) of per-example predictions on the dev set whose labels are
    `gold`; each replicate draws one resample of the examples for every seed and both sides."""
    import numpy as np
    n = len(gold)
    w = np.random.default_rng(seed).multinomial(n, [1.0 / n] * n, size=n_boot)  # (B, n) counts
    diff = np.mean([weighted_metric(metric, w, a, gold) - weighted_metric(metric, w, b, gold)
                    for a, b in zip(preds, preds_against)], axis=0)
    lo, hi = np.quantile(diff, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def paired_verdict(intervals, higher_is_better=True):
    """'better' / 'worse' when every (low, high) interval excludes 0 on the same side, else 'no difference
    shown'; None when there is no interval."""
    intervals = [iv for iv in intervals if iv is not None and None not in iv]
    if not intervals:
        return None
    if all(lo > 0 for lo, _ in intervals):
        return "better" if higher_is_better else "worse"
    if all(hi < 0 for _, hi in intervals):
        return "worse" if higher_is_better else "better"
    return "no difference shown"


def compare(run, name, against=None):
    """The paired comparison of row `name` with `against` (default the reference) on a sweep JSON's primary
    metric: {"against", "metric", "seeds", "diff", "t", "boot", "boot_missing", "verdict"}; "boot" is None
    (and "boot_missing" says why) where the metric has no bootstrap or a run has no per-example predictions.
    None when either row has no runs on a shared seed."""
    against = against or run.get("reference")
    rows, metric = run.get("rows", {}), run.get("primary_metric")
    if name not in rows or against not in rows or not metric:
        return None
    mine = {r["seed"]: r for r in rows[name]["runs"]}
    theirs = {r["seed"]: r for r in rows[against]["runs"]}
    seeds = [s for s in mine if s in theirs]
    score = lambda r: flat(r["metrics"].get("after", {})).get(metric)  # noqa: E731
    pairs = [(s, score(mine[s]), score(theirs[s])) for s in seeds]
    pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
    if not pairs:
        return None
    diff, lo, hi = t_interval([a - b for _, a, b in pairs])
    higher = metric.rsplit(".", 1)[-1] not in LOWER_IS_BETTER
    out = {"against": against, "metric": metric, "seeds": [s for s, _, _ in pairs], "diff": diff,
           "t": None if lo is None else [lo, hi], "boot": None, "boot_missing": None}
    cache, gold = run.get("cache", {}), run.get("dev_gold")
    pred = lambda r: cache.get(run_key(r.get("argv", [])), {}).get("dev_pred")  # noqa: E731
    if metric not in BOOT_METRICS:
        out["boot_missing"] = f"no bootstrap for {metric}"
    elif not gold or any(pred(mine[s]) is None or pred(theirs[s]) is None for s, _, _ in pairs):
        out["boot_missing"] = "runs without per-example predictions"
    else:
        out["boot"] = list(bootstrap_interval(metric, [unpack(pred(mine[s])) for s, _, _ in pairs],
                                              [unpack(pred(theirs[s])) for s, _, _ in pairs], unpack(gold)))
    out["verdict"] = paired_verdict([out["t"], out["boot"]], higher) if out["t"] else None
    return out


def comparisons(run):
    """{row: [compare vs the reference, compare vs its own method (COMPARE_WITH)]} of a sweep JSON."""
    out = {}
    for name in run.get("rows", {}):
        targets = [t for t in (run.get("reference"), COMPARE_WITH.get(name)) if t and t != name]
        out[name] = [c for c in (compare(run, name, t) for t in targets) if c]
    return out


def primary_metric(names):
    return next((p for p in PRIMARY if p in names), next(iter(sorted(names)), None))


def row_stats(runs, ref_runs):
    """Per-row mean ± std of every metric before / after, parameters and their ratio to the reference,
    the median step time ratio to the reference seed by seed, wall time."""
    st = {}
    for when in ("before", "after"):
        per = [flat(r["metrics"].get(when, {})) for r in runs]
        names = sorted(set().union(*per)) if per else []
        st[when] = {n: mean_std([p.get(n) for p in per]) for n in names}
    for f in ("trainable_params_start", "trainable_params_end", "head_params", "wall_s", "step_time_s", "steps",
              "train_flop"):
        st[f] = mean_std([r.get(f) for r in runs])[0]
    if ref_runs:
        ref = {r["seed"]: r for r in ref_runs}
        for f in ("trainable_params_start", "trainable_params_end", "steps", "train_flop"):
            st[f"{f}_ratio"] = _ratio(st[f], mean_std([r.get(f) for r in ref_runs])[0])
        adapter = lambda r, f: None if r.get(f) is None else r[f] - (r.get("head_params") or 0)
        st["adapter_params_end_ratio"] = _ratio(mean_std([adapter(r, "trainable_params_end") for r in runs])[0],
                                                mean_std([adapter(r, "trainable_params_end") for r in ref_runs])[0])
        ratios = [_ratio(r.get("step_time_s"), ref[r["seed"]].get("step_time_s")) for r in runs if r["seed"] in ref]
        st["step_time_ratio"] = mean_std(ratios)[0]
    return st


def _ratio(a, b):
    return None if a is None or not b else a / b


def summarize(rows):
    """Add stats (per-row means ± stds and ratios to REFERENCE) to {row: {"runs": [...]}}; the verdicts are
    paired comparisons of the whole sweep (comparisons)."""
    ref_runs = rows.get(REFERENCE, {}).get("runs")
    for name, row in rows.items():
        row["stats"] = row_stats(row["runs"], ref_runs)
    return rows


# ------------------------------------------------------------------------------------- main

def versions():
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def machine():
    import torch
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": dev}


def slug(s):
    return re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(os.path.normpath(s))).strip("-").lower()


def fmt_eta(s):
    return f"{s / 60:.0f} min" if s >= 90 else f"{s:.0f} s"


def plan(args):
    """(task, fill, [(row, seed, train.py argv)]): seed by seed, the rows in --rows order, each at its
    learning-rate centre (--lr, SPSFT's × 0.2)."""
    import train
    base = base_argv(args)
    # the task decides the per-row fills (G²R²'s weight decay, SPSFT's importance); resolve reads configs only
    _, task, _ = train.resolve(train.parse_args(base))
    fill = sweep_fill(args, task, target_shapes(args.model, task))
    return task, fill, [(name, seed, run_argv(base, name, fill, lr_centre(args, name), seed))
                        for seed in args.seeds for name in args.rows]


def lr_centre(args, name):
    return args.lr * LR_RATIO.get(name.split("-")[0], 1.0)


def select_lr(args, task, fill, run, log, out, name, after_run=lambda cached: None):
    """Fill out[name] = {"grid": [[lr, score]], "chosen", "metric", "val_frac", "seed", "extended"} or
    {"tied_to", "chosen"}: a row not in LR_TIED trains once per grid factor on carve(); the best held-out
    primary metric wins (the first of equals). A best value at an end of a grid of >= 3 factors is not a choice:
    the grid grows past that end by its end ratio (0.3 1 3 -> 9, or -> 0.09), up to --lr_extend times
    ("extended" lists the added rates). A tied row takes its partner's choice (selected first if it was not
    yet); one whose partner is not in the sweep keeps its own centre. `out` is filled as the grid runs (an
    interrupted sweep's JSON shows the part that finished)."""
    if name in out:
        return out[name]["chosen"]
    if name in LR_TIED and LR_TIED[name] in args.rows:
        chosen = select_lr(args, task, fill, run, log, out, LR_TIED[name], after_run)
        out[name] = {"tied_to": LR_TIED[name], "chosen": chosen}
        return chosen
    base, grid = base_argv(args), []
    out[name] = {"grid": grid, "chosen": None, "metric": None, "val_frac": args.val_frac, "seed": args.select_seed,
                 "extended": []}

    def held_out(lr):
        lr = float(lr_str(lr))
        res, cached = run(name, args.select_seed, run_argv(base, name, fill, lr, args.select_seed, args.val_frac))
        after = flat(res["metrics"].get("after", {}))
        out[name]["metric"] = primary_metric(after)
        grid.append([lr, after.get(out[name]["metric"])])
        after_run(cached)
        log(f"  lr grid {name} lr {lr_str(lr)}: held-out {out[name]['metric']} {grid[-1][1]}")
        return lr

    def best():  # the first of equals; NaN (a diverged run) never wins
        scored = [g for g in grid if g[1] is not None and g[1] == g[1]]
        return max(scored, key=lambda g: g[1])[0] if scored else None

    for f in args.lr_grid:
        held_out(lr_centre(args, name) * f)
    for _ in range(args.lr_extend if len(set(args.lr_grid)) >= 3 else 0):
        b, lrs = best(), sorted(lr for lr, _ in grid)
        if b not in (lrs[0], lrs[-1]):
            break
        out[name]["extended"].append(held_out(b * b / (lrs[1] if b == lrs[0] else lrs[-2])))
    out[name]["chosen"] = best() or lr_centre(args, name)
    return out[name]["chosen"]


def load_earlier(path):
    """The JSON an earlier sitting wrote at `path` (its "cache": the finished runs), {} when there is none."""
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def main(argv=None):
    args = parse_args(argv)
    import train
    argv_shown = sys.argv[1:] if argv is None else argv
    path = args.json or os.path.join(ROOT, "bench", "results", f"accuracy-{slug(args.model)}-{slug(args.data)}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    task, fill, runs = plan(args)
    earlier = load_earlier(path)
    cache = earlier.get("cache", {})
    rows = {name: {"flags": row_argv(name, fill), "runs": []} for name in args.rows}
    t0, done = time.time(), {"ran": 0, "n": 0, "metrics": set()}
    out = {"command": "python bench/accuracy.py " + shlex.join(argv_shown), "model": args.model,
           "data": args.data, "task": task, "seeds": args.seeds, "reference": REFERENCE,
           "primary_metric": None, "base_argv": base_argv(args), "fills": fill, "lr_grid": args.lr_grid,
           "trivial": {}, "rows": rows, "cache": cache, "dev_gold": earlier.get("dev_gold")}
    ref_prefix = base_argv(args) + row_argv(REFERENCE, fill)

    def write(final=False):
        names = set().union(*(r["stats"]["after"] for r in summarize(rows).values()))
        # the reference's finished dev-set runs at any learning rate, for the budget rule while its row is empty
        out["budget_check"] = [{"lr": float(r["argv"][-3]), "seed": int(r["argv"][-1]), "metrics": r["metrics"]}
                               for r in cache.values() if r["argv"][:len(ref_prefix)] == ref_prefix
                               and r["argv"][len(ref_prefix):][::2] == ["--lr", "--seed"]]
        if not names and out["budget_check"]:
            names = set(flat(out["budget_check"][0]["metrics"].get("after", {})))
        names = names or done["metrics"]  # only learning-rate grid runs so far
        out.update(primary_metric=primary_metric(names), date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
                   versions=versions(), machine=machine(), wall_s=round(time.time() - t0, 1), complete=final)
        if out["primary_metric"] and "constant" not in out["trivial"]:
            out["trivial"] = {"constant": constant_score(args.data, out["primary_metric"])}
        out["budget"] = budget_rule(out)
        out["paired"] = comparisons(out)
        train.write_json(out, path)

    def run(name, seed, argv_run):
        t = time.time()
        res, cached = run_one(argv_run, args.runs_dir, args.save_every, cache, args.backfill_predictions)
        gold = res.pop("dev_gold", None)  # the dev set's labels, one copy per JSON (every run's are the same)
        if gold is not None:
            if out["dev_gold"] is not None and out["dev_gold"] != gold:
                raise SystemExit(f"error: the dev labels of {argv_run} differ from the JSON's dev_gold")
            out["dev_gold"] = gold
        done["ran"] += not cached
        done["n"] += 1
        after = flat(res["metrics"].get("after", {}))
        pm = primary_metric(after)
        done["metrics"] |= set(after)
        print(f"[{done['n']}] {name} seed {seed} lr {argv_run[argv_run.index('--lr') + 1]}"
              f"{' (held-out)' if '--val_split' in argv_run else ''}: {pm} {after.get(pm, float('nan')):.4f} "
              f"({'cached' if cached else f'{time.time() - t:.0f} s'})", flush=True)
        return res, cached

    if args.lr_grid:  # row by row, its grid then its seeds: a sweep cut short leaves whole rows
        out["lr_select"] = {}
        runs = [(name, seed, None) for name in args.rows for seed in args.seeds]
    for name, seed, argv_run in runs:
        if argv_run is None:
            lr = select_lr(args, task, fill, run, print, out["lr_select"], name, lambda cached: cached or write())
            argv_run = run_argv(base_argv(args), name, fill, lr, seed)
        res, cached = run(name, seed, argv_run)
        # the row's runs without their predictions (report.py reads those from the cache, by run_key)
        rows[name]["runs"].append({k: v for k, v in res.items() if k != "dev_pred"} | {"seed": seed, "cached": cached})
        if not cached:  # the JSON (its cache, committed) is rewritten after every finished run
            write()
    write(final=True)
    print(f"wrote {path}; budget rule: {out['budget']}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # one progress line per run instead of a bar per step
    main()
