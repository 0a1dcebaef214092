"""Turn bench/results/*.json into BENCHMARKS.md (bench/efficiency.py) and RESULTS.md (bench/accuracy.py),
with PNG charts.

    python bench/report.py                               # every JSON in bench/results -> BENCHMARKS.md, RESULTS.md
    python bench/report.py run1.json run2.json --out /tmp/B.md --png_dir /tmp

Rows of several JSONs are merged per device (the newest measurement of a row / model / seq_len /
checkpointing wins). The hand-written text between the NOTES markers of an existing output file is kept.
The chart needs matplotlib (optional): without it the report is written without the picture.
"""
import argparse
import glob
import json
import math
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- BEGIN NOTES (kept by bench/report.py) -->", "<!-- END NOTES -->"
MIB = 2 ** 20
GPU_SETTING = ("llama-7b-shape", 2048)  # where the MFU target is defined


def load(paths):
    """{(suite, device): {"runs": [meta...], "rows": {(row, model, seq, ckpt): row}}}, newest wins."""
    out = {}
    for path in sorted(paths, key=lambda p: json.load(open(p))["date"]):
        with open(path) as f:
            run = json.load(f)
        g = out.setdefault((run["suite"], run["device"]), {"runs": [], "rows": {}})
        g["runs"].append({k: v for k, v in run.items() if k != "rows"} | {"file": os.path.basename(path)})
        for r in run["rows"]:
            g["rows"][(r["row"], r["model"], r["seq_len"], bool(r["grad_ckpt"]))] = r
    return out


# --------------------------------------------------------------------------------------- formatting

def mib(b):
    return "–" if b is None else f"{b / MIB:,.1f}"


def ms(s):
    return "–" if s is None else f"{s * 1e3:,.1f}"


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def fx(x):
    return "–" if x is None else f"{x:.2f}×"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def configs(rows):
    """The (model, seq_len) settings of a group of rows, in first-seen order."""
    return list(dict.fromkeys((k[1], k[2]) for k in rows))


def ckpt_modes(rows):
    return sorted({k[3] for k in rows})


def mode_name(ckpt):
    return "checkpointing" if ckpt else "no checkpointing"


# ------------------------------------------------------------------------------------------ targets

def get(rows, name, model, seq, ckpt):
    r = rows.get((name, model, seq, ckpt))
    return None if r is None or "error" in r else r


def epoch_fraction(row, epoch_examples):
    """Importance-pass time over one epoch of training steps of the same method (one micro-batch per step)."""
    if row is None or row.get("importance_time_s") is None:
        return None
    steps = math.ceil(epoch_examples / row["micro_batch_size"])
    return row["importance_time_s"] / (row["step_time_median_s"] * steps)


def targets(rows, model, seq, device, epoch_examples):
    """[(target, rows compared, {ckpt: (value text, met or None)})] for one main setting."""
    out = []

    def cmp(label, a, b, field, limit, pct=False):
        res = {}
        for ckpt in ckpt_modes(rows):
            ra, rb = get(rows, a, model, seq, ckpt), get(rows, b, model, seq, ckpt)
            x = ratio(ra and ra.get(field), rb and rb.get(field))
            if x is not None:
                res[ckpt] = (f"{x:.2f}×", x <= limit)
        out.append((label, f"`{a}` / `{b}` ({field.replace('_', ' ')})", res))

    cmp("SPSFT aux memory ≤ 0.70× PEFT LoRA (comparable params)", "spsft-r128", "peft-lora-r64", "aux_bytes", 0.70)
    if device == "cpu":
        cmp("  ↳ same, saved-for-backward bytes (CPU activation proxy)", "spsft-r128", "peft-lora-r64",
            "saved_bytes", 0.70)
    cmp("G²R² refinement aux memory ≤ 0.75× LoRA (p_f = 0.2)", "g2r2-refine", "lora-r8-qkvud", "aux_bytes", 0.75)
    cmp("G²R² refinement step time ≤ 0.90× LoRA", "g2r2-refine", "lora-r8-qkvud", "step_time_median_s", 0.90)
    cmp("G²R² warmup (scoring) step ≤ 1.15× LoRA, exact ∂ℒ/∂ΔW", "g2r2-warmup", "lora-r8-qkvud",
        "step_time_median_s", 1.15)
    cmp("  ↳ same, Eq 6 estimator (`--g2r2_score paper`)", "g2r2-warmup-paper", "lora-r8-qkvud",
        "step_time_median_s", 1.15)
    cmp("PiLoRA stage-2 step ≤ 1.05× LoRA (r = 32, r′ = 2)", "pilora-s2", "lora-r32-qkvud", "step_time_median_s",
        1.05)
    cmp("PiLoRA trainable params ≤ 0.8× LoRA", "pilora-s2", "lora-r32-qkvud", "trainable_params", 0.8)
    cmp("TASO step ≤ LoRA r = 1 step", "taso-r8", "lora-r1", "step_time_median_s", 1.0)
    res = {}
    for ckpt in ckpt_modes(rows):
        f = epoch_fraction(get(rows, "taso-r8", model, seq, ckpt), epoch_examples)
        if f is not None:
            res[ckpt] = (f"{100 * f:.2f} %", f <= 0.05)
    out.append((f"TASO importance pass ≤ 5 % of one epoch ({epoch_examples:,} examples)", "`taso-r8`", res))
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, time (r = 8)", "lora-r8", "peft-lora-r8", "step_time_median_s", 1.0)
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, memory (r = 8)", "lora-r8", "peft-lora-r8", "aux_bytes", 1.0)
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, time (r = 64)", "lora-r64", "peft-lora-r64", "step_time_median_s", 1.0)
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, memory (r = 64)", "lora-r64", "peft-lora-r64", "aux_bytes", 1.0)
    res = {}
    if device == "cuda" and (model, seq) == GPU_SETTING:
        for ckpt in ckpt_modes(rows):
            r = get(rows, "lora-r8", model, seq, ckpt)
            if r is not None and r.get("mfu") is not None:
                res[ckpt] = (f"{100 * r['mfu']:.1f} %", r["mfu"] >= 0.35)
    out.append(("LoRA-step MFU ≥ 35 % (H100, Llama-2-7B shape, seq 2048)", "`lora-r8`", res))
    return out


def verdict(res, device):
    if not res:
        return "not measured (no GPU)" if device == "cuda" else "not measured"
    return "; ".join(f"{mode_name(c)}: {v} **{'met' if ok else 'missed'}**" for c, (v, ok) in sorted(res.items()))


# ------------------------------------------------------------------------------------------ sections

def run_meta(runs):
    lines = []
    for m in runs:
        lines += [f"- `{m['file']}` — {m['date']}; {m['device_name']}; torch {m['torch']}, transformers "
                  f"{m['transformers']}, peft {m['peft'] or 'not installed'}, Python {m['python']}; load average "
                  f"at start {', '.join(f'{x:.2f}' for x in m['load_avg'])}; wall {m.get('wall_s', 0):.0f} s",
                  f"  `{m['command']}`"]
    return lines


def main_tables(rows, device, epoch_examples):
    lines = []
    cpu = device == "cpu"
    for model, seq in configs(rows):
        for ckpt in ckpt_modes(rows):
            sel = [r for k, r in rows.items() if k[1:] == (model, seq, ckpt)]
            if not sel:
                continue
            any_r = next(r for r in sel if "error" not in r) if any("error" not in r for r in sel) else sel[0]
            lines += ["", f"#### {model}, seq_len {seq}, micro-batch {any_r.get('micro_batch_size', '?')}, "
                          f"{any_r.get('dtype', '?')}, {mode_name(ckpt)}", ""]
            header = ["row", "trainable params", "peak MiB", "model MiB", "aux MiB"]
            header += ["saved-for-bwd MiB (proxy)"] if cpu else []
            header += ["median step ms", "mean step ms", "tokens/s", "MFU", "attach / importance s",
                       "vs", "step ×", "aux ×"]
            body = []
            for r in sel:
                if "error" in r:
                    body.append([f"`{r['row']}`", f"skipped: {r['error']}"] + [""] * (len(header) - 2))
                    continue
                p = get(rows, r["pair"], model, seq, ckpt) if r.get("pair") else None
                line = [f"`{r['row']}`", f"{r['trainable_params']:,}", mib(r["peak_bytes"]), mib(r["model_bytes"]),
                        mib(r["aux_bytes"])]
                line += [mib(r["saved_bytes"]) if r["saved_bytes"] is not None else "n/a (ckpt)"] if cpu else []
                line += [ms(r["step_time_median_s"]), ms(r["step_time_mean_s"]), f"{r['tokens_per_s']:,.0f}",
                         "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %", f"{r['attach_s']:.2f}",
                         f"`{r['pair']}`" if p else "", fx(ratio(r["step_time_median_s"], p and p["step_time_median_s"])),
                         fx(ratio(r["aux_bytes"], p and p["aux_bytes"]))]
                body.append(line)
            lines += table(header, body)
        lines += ["", importance_table(rows, model, seq, epoch_examples)]
        lines += structure_lines(rows, model, seq)
    return lines


def importance_table(rows, model, seq, epoch_examples):
    body = []
    for (name, m, s, ckpt), r in rows.items():
        if (m, s) != (model, seq) or "error" in r or not r.get("calib_batches"):
            continue
        f = epoch_fraction(r, epoch_examples)
        body.append([f"`{name}`", mode_name(ckpt), r["calib_batches"], f"{r['importance_time_s']:.2f}",
                     f"{1e3 * r['importance_time_s'] / r['calib_batches']:.0f}", ms(r["step_time_median_s"]),
                     "–" if f is None else f"{100 * f:.3f} %",
                     "–" if r.get("importance_buffer_bytes") is None
                     else f"{r['importance_buffer_bytes'] / 2 ** 20:.1f}"])
    if not body:
        return ""
    return "\n".join([f"Importance passes (one epoch = {epoch_examples:,} examples at this micro-batch, timed "
                      "with the method's own median step):", ""] +
                     table(["row", "mode", "calibration batches", "pass s", "ms / batch", "train step ms",
                            "pass / epoch", "fp32 sum buffers MiB"], body))


def structure_lines(rows, model, seq):
    """What the stage rows ended up with (retained modules, dominant rows), from the method summaries."""
    out = []
    for (name, m, s, ckpt), r in rows.items():
        if (m, s) != (model, seq) or ckpt or "error" in r:
            continue
        if name == "g2r2-refine" and "retained_modules" in r:
            out.append(f"- `g2r2-refine`: {r['retained_modules']} of {r.get('modules', '?')} modules retained, "
                       f"adapter params {r['adapter_params_start']:,} → {r['adapter_params_end']:,}.")
        if name == "pilora-s2" and "dominant_fraction" in r:
            out.append(f"- `pilora-s2`: dominant rows {100 * r['dominant_fraction']:.1f} % of all output rows "
                       f"(hit counts from {r['scorings']} scoring steps on the random-init model), param ratio "
                       f"{r['param_ratio']:.3f} of rank-32 LoRA on the same targets.")
        if name == "pilora-s1-K10" and "step_time_mean_s" in r:
            base = get(rows, "lora-r32-qkvud", model, seq, ckpt)
            out.append(f"- `pilora-s1-K10`: timed over {len(r['step_times_s'])} steps from a scoring step, so its "
                       f"mean ({ms(r['step_time_mean_s'])} ms) is the amortised stage-1 step"
                       + (f": {fx(ratio(r['step_time_mean_s'], base['step_time_mean_s']))} LoRA's mean." if base else "."))
        if name == "taso-r8" and "taso_params" in r:
            out.append(f"- `taso-r8`: {r['taso_params']:,} params vs LoRA r = 1 {r['lora_r1_params']:,}.")
        if name == "spsft-r128" and "spsft_params" in r:
            out.append(f"- `spsft-r128`: {r['spsft_params']:,} params (LoRA rank with the nearest count: "
                       f"{r['lora_params_matched']:,}).")
    return [""] + out if out else []


def sweep_tables(rows):
    lines = []
    models = sorted(dict.fromkeys(k[1] for k in rows), key=width)
    seqs = sorted({k[2] for k in rows})
    names = list(dict.fromkeys(k[0] for k in rows))
    for ckpt in ckpt_modes(rows):
        for field, label, fmt in (("step_time_median_s", "median step ms", ms), ("aux_bytes", "aux MiB", mib)):
            for model in models:
                ss = [s for s in seqs if any(k[1:] == (model, s, ckpt) for k in rows)]
                if len(ss) < 2:
                    continue
                lines += ["", f"#### {label} vs seq_len — {model}, {mode_name(ckpt)}", ""]
                lines += table(["row"] + [str(s) for s in ss],
                               [[f"`{n}`"] + [cell(rows, (n, model, s, ckpt), field, fmt) for s in ss] for n in names])
            for s in seqs:
                ms_ = [m for m in models if (any(k[1:] == (m, s, ckpt) for k in rows))]
                if len(ms_) < 2:
                    continue
                lines += ["", f"#### {label} vs width — seq_len {s}, {mode_name(ckpt)}", ""]
                lines += table(["row"] + ms_,
                               [[f"`{n}`"] + [cell(rows, (n, m, s, ckpt), field, fmt) for m in ms_] for n in names])
    return lines


def width(model):
    """Sort key of a model name: the hidden size of llama-h{H}-... shapes, else the name."""
    m = re.search(r"-h(\d+)-", model)
    return (0, int(m[1]), model) if m else (1, 0, model)


def cell(rows, key, field, fmt):
    r = rows.get(key)
    if r is None:
        return ""
    return "OOM" if r.get("error") == "out of memory" else "–" if "error" in r else fmt(r[field])


# --------------------------------------------------------------------------------------------- chart

def plot(rows, model, seq, path):
    """Aux memory and median step time per row, with and without checkpointing; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = ckpt_modes(rows)
    names = [n for n in dict.fromkeys(k[0] for k in rows if k[1:3] == (model, seq))
             if any(get(rows, n, model, seq, c) for c in modes)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), sharey=True)
    h = 0.8 / len(modes)
    for j, c in enumerate(modes):
        ys = [i + j * h for i in range(len(names))]
        for ax, field, scale in ((axes[0], "aux_bytes", MIB), (axes[1], "step_time_median_s", 1e-3)):
            vals = [(get(rows, n, model, seq, c) or {}).get(field) for n in names]
            ax.barh(ys, [0 if v is None else v / scale for v in vals], height=h, label=mode_name(c))
    axes[0].set_yticks([i + 0.4 - h / 2 for i in range(len(names))], names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("aux memory (peak − model), MiB")
    axes[1].set_xlabel("median step time, ms")
    axes[1].legend()
    fig.suptitle(f"{model}, seq_len {seq}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ accuracy (RESULTS.md)

def pm(ms_pair, digits=3):
    """mean ± std (or the mean alone for one seed)."""
    m, s = ms_pair if ms_pair else (None, None)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def count(n):
    return "–" if n is None else f"{n:,.0f}"


def accuracy_table(run):
    """One markdown table of an accuracy JSON: rows × (primary before / after, other metrics after,
    verdict vs the reference, parameters, ratios, step time ratio, wall)."""
    rows, ref, pmet = run["rows"], run["reference"], run["primary_metric"]
    others = sorted({m for r in rows.values() for m in r["stats"]["after"] if m != pmet})
    head = ["row", f"{pmet} before", f"{pmet} after", f"vs {ref}"] + [f"{m} after" for m in others] + \
           ["trainable start → end", f"× {ref} (end)", f"adapter × {ref}", f"step time × {ref}", "steps", "wall / run"]
    body = []
    for name, r in rows.items():
        st, v = r["stats"], r.get("verdict", {}).get(pmet)
        body.append([f"`{name}`", pm(st["before"].get(pmet)), pm(st["after"].get(pmet)),
                     "(reference)" if name == ref else (v or "– (1 seed)")]
                    + [pm(st["after"].get(m)) for m in others]
                    + [f"{count(st.get('trainable_params_start'))} → {count(st.get('trainable_params_end'))}",
                       fx(st.get("trainable_params_end_ratio")), fx(st.get("adapter_params_end_ratio")),
                       fx(st.get("step_time_ratio")), count(st.get("steps")),
                       "–" if st.get("wall_s") is None else f"{st['wall_s']:.0f} s"])
    return table(head, body)


def accuracy_plot(run, path):
    """Bars of the primary metric after training, mean ± std over seeds, a line at the mean before."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows, pmet = run["rows"], run["primary_metric"]
    names = list(rows)
    after = [rows[n]["stats"]["after"].get(pmet) or (None, None) for n in names]
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 3.6))
    ax.bar(range(len(names)), [a[0] or 0 for a in after], yerr=[a[1] or 0 for a in after], capsize=4,
           color=["#555" if n == run["reference"] else "#4c72b0" for n in names])
    before = [rows[n]["stats"]["before"].get(pmet, (None, None))[0] for n in names]
    before = [b for b in before if b is not None]
    if before:
        ax.axhline(sum(before) / len(before), ls="--", color="#c44", lw=1, label="before training")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"{pmet} after (mean ± std, {len(run['seeds'])} seed{'s' * (len(run['seeds']) > 1)})")
    ax.set_title(f"{run['model']} on {os.path.basename(os.path.normpath(run['data']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_render(runs, png_dir=None, notes="", md_dir=ROOT):
    """RESULTS.md: one section per (model, data) with its command, setting, table and chart."""
    lines = ["# RESULTS: the four methods and LoRA, head to head", "",
             "Generated by `python bench/report.py` from the JSONs `bench/accuracy.py` writes to `bench/results/` "
             "(committed beside it). Each row is one method with its paper's own settings (the rules are in "
             "`bench/accuracy.py`'s docstring), trained through `train.main` with the same data order, shared "
             "learning rate and evaluation as every other row. Cells are mean ± std (sample std) over the seeds; "
             "a difference to the reference smaller than the larger of the two stds is a **tie**. `× ref` columns "
             "are ratios to the reference row (`adapter ×` leaves out the classifier / pooler head, trained fully "
             "by every row); step time ratios pair each seed with the reference's run of the same seed.", ""]
    for run in sorted(runs, key=lambda r: (r["model"], r["data"])):
        task = os.path.basename(os.path.normpath(run["data"]))
        m = run["machine"]
        lines += [f"## {run['model']} · {task}", "", "```bash", run["command"], "```", "",
                  f"Seeds {' '.join(map(str, run['seeds']))}; train.py flags shared by every row: "
                  f"`{' '.join(run['base_argv'])}`; per-row fills {json.dumps(run['fills'])}. "
                  f"Measured {run['date']} on {m['device']} ({m['cpu_count']} cores, torch "
                  f"{run['versions']['torch']}, transformers {run['versions']['transformers']}); sweep wall "
                  f"{run['wall_s'] / 60:.0f} min (cached runs count 0).", ""]
        lines += accuracy_table(run) + [""]
        if png_dir:
            name = f"accuracy-{re.sub(r'[^a-z0-9]+', '-', (run['model'] + '-' + task).lower())}.png"
            if accuracy_plot(run, os.path.join(png_dir, name)):
                lines += [f"![{run['primary_metric']} per row, {run['model']} on {task}]"
                          f"({os.path.relpath(os.path.join(png_dir, name), md_dir)})", ""]
    lines += ["## Reading", "", BEGIN, notes.strip("\n"), END, ""]
    return "\n".join(lines)


def kind(path):
    """Which script wrote a result JSON: bench/efficiency.py ("suite") or bench/accuracy.py ("primary_metric")."""
    with open(path) as f:
        d = json.load(f)
    return "efficiency" if isinstance(d, dict) and "suite" in d else \
        "accuracy" if isinstance(d, dict) and "primary_metric" in d else None


def kept_notes(path):
    if os.path.exists(path):
        text = open(path).read()
        if BEGIN in text and END in text:
            return text.split(BEGIN, 1)[1].split(END, 1)[0]
    return ""


# ---------------------------------------------------------------------------------------------- main

def render(groups, png_dir=None, notes="", md_dir=ROOT):
    lines = ["# BENCHMARKS", "",
             "Generated by `python bench/report.py` from the JSONs `bench/efficiency.py` writes to `bench/results/` "
             "(committed beside it); regenerate after a new run. Rows, definitions and the targets come from issue 7.", ""]
    has_gpu = any(dev == "cuda" for _, dev in groups)
    if not has_gpu:
        lines += ["> **GPU tables: still to be measured.** Every number below was measured on CPU on small "
                  "random-init shapes. The H100 / Llama-2-7B-shape tables (bf16, seq 2048, with and without "
                  "checkpointing) and the GPU scaling sweep have not been run; no GPU number here is estimated. "
                  "Run the GPU commands under *Reproduce* and re-run `bench/report.py`.", ""]
    lines += ["## Reproduce", "", "```bash", "pip install -r requirements.txt -r bench/requirements.txt",
              "# GPU (H100): the 7B-shape suite and the scaling sweep",
              "python bench/efficiency.py --model llama-7b-shape --seq_len 2048 --micro_batch_size 1 --grad_ckpt both",
              "python bench/efficiency.py --suite sweep --model llama-h1024-l8 llama-h2048-l8 llama-h4096-l8 "
              "--seq_len 512 1024 2048 4096 --grad_ckpt on",
              "# CPU (what the tables below ran; see each run's exact command)",
              "OMP_NUM_THREADS=1 python bench/efficiency.py --model llama-small-shape --seq_len 256 --grad_ckpt both",
              "python bench/report.py", "```", ""]
    lines += ["## Columns", "",
              "- **peak**: CUDA `torch.cuda.max_memory_allocated` over the timed steps. CPU (no allocator counter): "
              "bytes alive at the start of a step (parameters, gradients, buffers, AdamW state, batch) + the "
              "highest running sum of CPU-allocator allocations minus frees during one extra profiled step "
              "(`torch.profiler` memory events) — a **CPU proxy** of the same quantity.",
              "- **model**: G²R² App. D.1 — peak during a forward of the same batch without grads, on the base "
              "model before any adapter is attached (same method as peak). **aux** = peak − model: adapter "
              "weights, their gradients and AdamW state, saved activations, transient buffers.",
              "- **saved-for-bwd** (CPU, no checkpointing only): bytes of the distinct tensors autograd saves for "
              "backward in one step (`saved_tensors_hooks`, parameters excluded) — the activation part of aux.",
              "- **step**: one optimizer step (forward, backward, the method's after_backward / after_step hooks, "
              "clip, AdamW) on one micro-batch, driven through the Method hooks exactly as `train.py` does; median "
              "(and mean: PiLoRA K = 10 scores one step in ten) over the timed steps after untimed warmup steps. "
              "**tokens/s** = tokens per step / median. **MFU** = 4 · N_params · tokens/s / the device's dense bf16 "
              "peak (H100 SXM 989 TFLOP/s; recompute of checkpointing not counted); n/a on CPU.",
              "- **attach / importance**: wall time of `method.attach` (TASO's and SPSFT-Taylor's importance passes "
              "run there). **vs / step × / aux ×**: the row's rank-matched baseline and the ratios to it.",
              "- Rows: `peft-lora-r*` is HF PEFT LoRA and `lora-r*` ours, on all linear layers of the attention and "
              "MLP; `*-qkvud` rows are on q, k, v, up, down (G²R² and PiLoRA's own targets, so their LoRA "
              "baselines use the same modules); alpha = 2r, dropout 0.05 everywhere; `spsft-r128` tunes 128 rows "
              "per matrix (paired with LoRA r = 64, SPSFT Table 6); `taso-r8` has r = 8, p = 1/8.", ""]
    for (suite, device), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "main", kv[0][1] != "cuda")):
        if suite != "main":
            continue
        epoch = g["runs"][-1]["settings"].get("epoch_examples", 52002)
        lines += [f"## Targets ({device.upper()})", ""]
        if device == "cpu":
            lines += ["CPU results on a small shape are a proxy: the memory ratios use the CPU allocator peak "
                      "above (and the saved-for-backward bytes), the time ratios are CPU times on shared cores "
                      "(noisy, see the load average). The targets are about a GPU at 7B shape; the GPU column "
                      "stays *not measured* until the GPU suite is run.", ""]
        for model, seq in configs(g["rows"]):
            gpu_rows = groups.get(("main", "cuda"), {"rows": {}})["rows"]
            gpu_cfg = configs(gpu_rows)[0] if gpu_rows else None
            body = []
            for (label, what, res) in targets(g["rows"], model, seq, device, epoch):
                gpu = "" if device == "cuda" else (
                    verdict(next(t[2] for t in targets(gpu_rows, *gpu_cfg, "cuda", epoch) if t[0] == label), "cuda")
                    if gpu_cfg else "not measured (no GPU)")
                body.append([label, what, verdict(res, device)] + ([] if device == "cuda" else [gpu]))
            head = ["target", "measured as", f"{device.upper()} · {model}, seq {seq}"]
            lines += table(head + ([] if device == "cuda" else ["GPU (H100, 7B shape, seq 2048)"]), body) + [""]
        lines += [f"## Main suite ({device.upper()})", ""] + run_meta(g["runs"])
        lines += main_tables(g["rows"], device, epoch)
        if png_dir:
            for model, seq in configs(g["rows"]):
                name = f"efficiency-{device}-{model}-{seq}.png"
                if plot(g["rows"], model, seq, os.path.join(png_dir, name)):
                    rel = os.path.relpath(os.path.join(png_dir, name), md_dir)
                    lines += ["", f"![aux memory and step time per row, {model} seq {seq}]({rel})"]
        lines += [""]
    for (suite, device), g in sorted(groups.items()):
        if suite == "sweep":
            lines += [f"## Scaling sweep ({device.upper()})", ""] + run_meta(g["runs"]) + sweep_tables(g["rows"]) + [""]
    if not any(s == "sweep" for s, _ in groups):
        lines += ["## Scaling sweep", "", "Not run yet.", ""]
    lines += ["## Notes", "", BEGIN, notes.strip("\n"), END, ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="*", help="result JSONs (default: bench/results/*.json)")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--results", default=os.path.join(ROOT, "RESULTS.md"), help="the accuracy report")
    p.add_argument("--png_dir", default=os.path.join(ROOT, "bench"), help="where the charts go ('' for none)")
    a = p.parse_args(argv)
    paths = a.paths or sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*.json")))
    kinds = {p: kind(p) for p in paths}
    acc = [p for p in paths if kinds[p] == "accuracy"]
    eff = [p for p in paths if kinds[p] == "efficiency"]
    if not paths:
        raise SystemExit("no result JSONs; run bench/efficiency.py or bench/accuracy.py first")
    md = ""
    if eff:
        md = render(load(eff), a.png_dir or None, kept_notes(a.out), os.path.dirname(os.path.abspath(a.out)))
        with open(a.out, "w") as f:
            f.write(md)
        print(f"wrote {a.out}")
    if acc:
        runs = [json.load(open(p)) for p in acc]
        text = accuracy_render(runs, a.png_dir or None, kept_notes(a.results),
                               os.path.dirname(os.path.abspath(a.results)))
        with open(a.results, "w") as f:
            f.write(text)
        print(f"wrote {a.results}")
    return md


if __name__ == "__main__":
    main()
