"""Head-to-head accuracy of the four methods and LoRA on real tasks, several seeds, one command (issue 14).

    python bench/accuracy.py --model minilm-l6 --data ../shared/data/glue/SST-2
    python bench/accuracy.py --model minilm-l6 --data ../shared/data/glue/CoLA --rows lora-r8 spsft --seeds 0
    python bench/accuracy.py --model smollm2-135m --data ../shared/data/commonsense --seeds 0 \
        --rows lora-r8 g2r2 pilora taso spsft --max_steps 60 --lr 5e-4 --eval_commonsense ../shared/data/commonsense \
        --eval_mode loglik --eval_limit 100
    python bench/report.py                      # bench/results/accuracy-*.json -> RESULTS.md (+ charts)

Every run goes through train.main with the same data order (--seed), steps, shared learning rate and
evaluation; flags this script does not know pass through to every row (e.g. --eval_limit, --max_len).
A row = a method and its own settings from its paper (ROWS below; the readings are in RESULTS.md):

- shared by every row: --r 8 --alpha 16 --dropout 0.05 (G²R² Table 10 / PiLoRA Table 6: rank 8,
  dropout 0.05; α = 16 is PiLoRA's and is kept fixed when r changes, as LoRA's authors do), --lr,
  linear schedule with 6 % warmup, AdamW, batch 8, no weight decay.
- G²R²: weight decay 0.01 for NLU, 0.05 for commonsense (000 §4 Implementation details); T_w = T_p =
  10 % of the steps (Table 10: 3 + 3 of SST-2's 30 epochs); p_f 0.2 and 0.7 (the paper's NLU settings).
- PiLoRA: r′ = 1 for NLU and 2 for commonsense (Tables 5–6, the method's defaults), stage 1 = one
  epoch before stage 2's own epochs (App. A.4 and Alg. 1; pilora.py's default).
- TASO: r 8 at density 1/8, the rank-1 LoRA budget (taso-notes §3; the method's defaults).
- SPSFT: --spsft_rows chosen so its trainable parameters match lora-r8 (rows = round(r · Σ(d_in + d_out)
  / Σ d_in) over the adapted matrices: Σ rows·d_in ≈ Σ 8·(d_in + d_out)); its learning rate is the
  shared one × 0.2, the paper's ratio (004 §4.3: LoRA 1e-4, SPSFT 2e-5 on Llama) and weight decay 0.01
  ("decay rate 0.01", read as AdamW's); importance ℓ2 for causal LMs (§4.3), Taylor otherwise (Table 5).
- Ablations from the papers: g2r2-random (Table 5's random module choice), pilora-random (Table 4),
  taso-random (uniform importance).

Runs are cached under --runs_dir by their full train.py argument list: a finished run (result.json)
is skipped, an unfinished one resumes from its checkpoint (--resume, bit-exact). The JSON in
bench/results/ holds the command, versions, machine, every run's summary fields and per-row mean ± std;
a row's difference to lora-r8 smaller than the larger of the two stds is a tie, not a win.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
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
    "taso": ["--method", "taso"],
    "spsft": ["--method", "spsft", "--spsft_rows", "{rows}", "--spsft_importance", "{spsft_imp}",
              "--lr", "{lr_spsft}", "--weight_decay", "0.01"],
    "g2r2-random": ["--method", "g2r2", "--g2r2_pf", "0.2", "--g2r2_score", "random", "--weight_decay", "{wd_g2r2}"],
    "pilora-random": ["--method", "pilora", "--pilora_partition", "random"],
    "taso-random": ["--method", "taso", "--taso_metric", "random"],
}
ALIASES = {"g2r2": "g2r2-pf0.2"}  # --rows g2r2 means the paper's main setting
# the metric a row is judged on, first present wins (all higher-is-better)
PRIMARY = ["commonsense_loglik.average", "commonsense_generate.average", "matthews", "pearson", "accuracy",
           "exact_match"]
LOWER_IS_BETTER = {"eval_loss"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="anything train.py --model accepts")
    p.add_argument("--data", required=True, help="anything train.py --data accepts")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"subset of: {', '.join(ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=1e-3, help="shared learning rate (SPSFT gets × 0.2)")
    p.add_argument("--max_samples", type=int, default=1000, help="training examples (0: all)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--save_every", type=int, default=50, help="checkpoint interval of every run (resume)")
    p.add_argument("--runs_dir", default=os.path.join(ROOT, "out", "accuracy"))
    p.add_argument("--json", help="output JSON (default bench/results/accuracy-<model>-<data>.json)")
    args, passthrough = p.parse_known_args(argv)
    args.rows = [ALIASES.get(r, r) for r in args.rows]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if REFERENCE not in args.rows:
        print(f"note: {REFERENCE} is not among --rows; ratios and ties need it and are left empty")
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
            "lr_spsft": f"{args.lr * SPSFT_LR_RATIO:.3g}", "spsft_imp": "l2" if causal else "taylor"}


def base_argv(args):
    out = ["--model", args.model, "--data", args.data, "--lr", str(args.lr), "--epochs", str(args.epochs)]
    if args.max_samples:
        out += ["--max_samples", str(args.max_samples)]
    return out + args.passthrough


def run_key(argv):
    return hashlib.sha1(json.dumps(argv).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------- one run

KEEP = ("method", "steps", "losses", "trainable_params_start", "trainable_params_end", "head_params", "step_time_s",
        "stage_times_s", "peak_memory_bytes", "metrics", "dtype", "device")


def run_one(argv, runs_dir, save_every):
    """train.main(argv) in runs_dir/<key>; cached: a finished run is read back, an unfinished one resumes."""
    import train
    out_dir = os.path.join(runs_dir, run_key(argv))
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f), True
    os.makedirs(out_dir, exist_ok=True)
    resumed, t0 = os.path.exists(os.path.join(out_dir, "ckpt.pt")), time.time()
    summary = train.main(argv + ["--output_dir", out_dir, "--resume", "--save_every", str(save_every)])
    res = {k: summary.get(k) for k in KEEP} | {"argv": argv, "wall_s": round(time.time() - t0, 1),
                                                "resumed": resumed}
    res["metrics"] = {k: v for k, v in res["metrics"].items() if k in ("before", "after")}
    train.write_json(res, done)
    return res, False


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


def verdict(row, ref, higher_is_better=True):
    """'tie' when |mean_row − mean_ref| < max(std_row, std_ref), else 'better' / 'worse' than ref;
    None when either side has fewer than two seeds (no spread to compare with)."""
    (m, s), (m0, s0) = row, ref
    if m is None or m0 is None or s is None or s0 is None:
        return None
    diff = m - m0
    if abs(diff) < max(s, s0):
        return "tie"
    return "better" if (diff > 0) == higher_is_better else "worse"


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
    for f in ("trainable_params_start", "trainable_params_end", "head_params", "wall_s", "step_time_s", "steps"):
        st[f] = mean_std([r.get(f) for r in runs])[0]
    if ref_runs:
        ref = {r["seed"]: r for r in ref_runs}
        for f in ("trainable_params_start", "trainable_params_end"):
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
    """Add stats and verdicts (vs REFERENCE, on every metric after training) to {row: {"runs": [...]}}."""
    ref_runs = rows.get(REFERENCE, {}).get("runs")
    for name, row in rows.items():
        row["stats"] = row_stats(row["runs"], ref_runs)
    if ref_runs:
        ref = rows[REFERENCE]["stats"]["after"]
        for name, row in rows.items():
            row["verdict"] = {m: verdict(v, ref[m], m.rsplit(".", 1)[-1] not in LOWER_IS_BETTER)
                              for m, v in row["stats"]["after"].items() if m in ref and name != REFERENCE}
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
    """(task, fills, [(row, seed, train.py argv)]): seed by seed, the rows in --rows order."""
    import train
    base = base_argv(args)
    # the task decides the per-row fills (G²R²'s weight decay, SPSFT's importance); resolve reads configs only
    _, task, _ = train.resolve(train.parse_args(base))
    fill = sweep_fill(args, task, target_shapes(args.model, task))
    return task, fill, [(name, seed, base + row_argv(name, fill) + ["--seed", str(seed)])
                        for seed in args.seeds for name in args.rows]


def main(argv=None):
    args = parse_args(argv)
    import train
    argv_shown = sys.argv[1:] if argv is None else argv
    task, fill, runs = plan(args)
    rows = {name: {"flags": row_argv(name, fill), "runs": []} for name in args.rows}
    t0, ran = time.time(), 0
    for i, (name, seed, argv_run) in enumerate(runs, 1):
        t = time.time()
        res, cached = run_one(argv_run, args.runs_dir, args.save_every)
        rows[name]["runs"].append(res | {"seed": seed, "cached": cached})
        ran += not cached
        left = len(runs) - i
        eta = (time.time() - t0) / max(ran, 1) * left if ran else 0.0
        after = flat(res["metrics"].get("after", {}))
        pm = primary_metric(after)
        print(f"[{i}/{len(runs)}] {name} seed {seed}: {pm} {after.get(pm, float('nan')):.4f} "
              f"({'cached' if cached else f'{time.time() - t:.0f} s'}); sweep ETA {fmt_eta(eta)}", flush=True)
    summarize(rows)
    names = set().union(*(r["stats"]["after"] for r in rows.values()))
    out = {"command": "python bench/accuracy.py " + shlex.join(argv_shown), "model": args.model,
           "data": args.data, "task": task, "seeds": args.seeds, "reference": REFERENCE,
           "primary_metric": primary_metric(names), "base_argv": base_argv(args), "fills": fill,
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(),
           "machine": machine(), "wall_s": round(time.time() - t0, 1), "rows": rows}
    path = args.json or os.path.join(ROOT, "bench", "results", f"accuracy-{slug(args.model)}-{slug(args.data)}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    train.write_json(out, path)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # one progress line per run instead of a bar per step
    main()
