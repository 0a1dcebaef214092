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


def why_not(rows, names, model, seq, ckpt):
    """Why a target has no value in one mode: which of its rows were not run, or failed."""
    keys = [(n, model, seq, ckpt) for n in names]
    miss = [f"`{k[0]}`" for k in keys if k not in rows]
    bad = [f"`{k[0]}` ({rows[k]['error']})" for k in keys if "error" in rows.get(k, {})]
    if not miss and not bad:
        return None  # both rows ran: the quantity has no value in this mode (saved bytes under checkpointing)
    why = (["row not run: " + ", ".join(miss)] if miss else []) + (["row failed: " + "; ".join(bad)] if bad else [])
    return f"not measured ({'; '.join(why)})"


def targets(rows, model, seq, device, epoch_examples):
    """[(target, rows compared, {ckpt: (value text, met or None)}, row names)] for one main setting; a mode
    without a value says why (met None): a row not run or failed."""
    out = []

    def cmp(label, a, b, field, limit, pct=False):
        res = {}
        for ckpt in ckpt_modes(rows):
            ra, rb = get(rows, a, model, seq, ckpt), get(rows, b, model, seq, ckpt)
            x = ratio(ra and ra.get(field), rb and rb.get(field))
            why = why_not(rows, (a, b), model, seq, ckpt)
            if x is not None:
                res[ckpt] = (f"{x:.2f}×", x <= limit)
            elif why:
                res[ckpt] = (why, None)
        out.append((label, f"`{a}` / `{b}` ({field.replace('_', ' ')})", res, (a, b)))

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
        why = why_not(rows, ("taso-r8",), model, seq, ckpt)
        if f is not None:
            res[ckpt] = (f"{100 * f:.2g} %", f <= 0.05)
        elif why:
            res[ckpt] = (why, None)
    out.append((f"TASO importance pass ≤ 5 % of one epoch ({epoch_examples:,} examples)", "`taso-r8`", res,
                ("taso-r8",)))
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, time (r = 8)", "lora-r8", "peft-lora-r8", "step_time_median_s", 1.0)
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, memory (r = 8)", "lora-r8", "peft-lora-r8", "aux_bytes", 1.0)
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, time (r = 64)", "lora-r64", "peft-lora-r64", "step_time_median_s", 1.0)
    cmp("Our LoRA ≤ 1.00× PEFT LoRA, memory (r = 64)", "lora-r64", "peft-lora-r64", "aux_bytes", 1.0)
    res = {}
    if device == "cuda" and (model, seq) == GPU_SETTING:
        for ckpt in ckpt_modes(rows):
            r = get(rows, "lora-r8", model, seq, ckpt)
            why = why_not(rows, ("lora-r8",), model, seq, ckpt)
            if r is not None and r.get("mfu") is not None:
                res[ckpt] = (f"{100 * r['mfu']:.1f} %", r["mfu"] >= 0.35)
            elif why:
                res[ckpt] = (why, None)
    out.append(("LoRA-step MFU ≥ 35 % (Llama-2-7B shape, seq 2048; defined on an H100)", "`lora-r8`", res,
                ("lora-r8",)))
    return out


def verdict(res, device):
    """One cell: each mode's value and met / missed, or why it has none; "no GPU" where the device never ran."""
    if not res:
        return "not measured (no GPU)" if device == "cuda" else "not measured"
    if all(ok is None for _, ok in res.values()) and len({v for v, _ in res.values()}) == 1:
        return next(iter(res.values()))[0]  # the same reason in every mode: said once
    return "; ".join(f"{mode_name(c)}: {v}" + ("" if ok is None else f" **{'met' if ok else 'missed'}**")
                     for c, (v, ok) in sorted(res.items()))


def mfu_peak(rows):
    """The dense bf16 peak (FLOP/s) the rows' MFU was taken against, from the rows: 4 · N · tokens/s / MFU."""
    peaks = {round(4 * r["total_params"] * r["tokens_per_s"] / r["mfu"] / 1e12) for r in rows.values()
             if "error" not in r and r.get("mfu") and r.get("total_params") and r.get("tokens_per_s")}
    return peaks.pop() * 1e12 if len(peaks) == 1 else None


def gpu_summary(groups):
    """The banner's lines on the GPU: which device, when, which versions, which rows ran in which mode, which rows
    the targets use were not run there (and how many other rows of the CPU suite); None without CUDA rows."""
    g = groups.get(("main", "cuda"))
    if not g:
        return None
    runs, rows = g["runs"], g["rows"]
    pairs_runs_seen = pairs_runs(glob.glob(os.path.join(ROOT, "bench", "results", "pairs-*.json")))
    uniq = lambda xs: ", ".join(dict.fromkeys(str(x) for x in xs))  # noqa: E731
    need = list(dict.fromkeys(n for t in targets({}, None, None, "cuda", 1) for n in t[3]))
    other = [n for n in dict.fromkeys(k[0] for (su, dev), gg in groups.items() if su == "main" for k in gg["rows"])
             if n not in need]
    done, missing, cfgs = [], [], configs(rows)
    for model, seq in cfgs:
        at = f" ({model}, seq {seq})" if len(cfgs) > 1 else ""
        for ckpt in (True, False):
            ran = list(dict.fromkeys(k[0] for k in rows if k[1:] == (model, seq, ckpt)))
            ok = [f"`{n}`" for n in ran if "error" not in rows[(n, model, seq, ckpt)]]
            bad = [f"`{n}` ({rows[(n, model, seq, ckpt)]['error']})" for n in ran
                   if "error" in rows[(n, model, seq, ckpt)]]
            done.append(f"{mode_name(ckpt)}{at}: " + (", ".join(ok) or "none")
                        + (f"; failed: {'; '.join(bad)}" if bad else ""))
            gone = [f"`{n}`" for n in need if n not in ran]
            rest = sum(n not in ran for n in other)
            if gone or rest:
                missing.append(f"{mode_name(ckpt)}{at}: " + (", ".join(gone) or "none of them")
                               + (f" (and {rest} more rows of the CPU suite)" if rest else ""))
    sweep = ("sweep", "cuda") in groups
    steps = uniq(f"{m['settings'].get('steps', '?')} timed steps after {m['settings'].get('warmup_steps', '?')} "
                 "warm-up steps" for m in runs)
    peak = mfu_peak(rows)
    return [f"> **GPU tables: {'partly ' if missing or not sweep else ''}measured, on "
            f"{uniq(m['device_name'] for m in runs)}** ({uniq(m['date'] for m in runs)}; torch "
            f"{uniq(m['torch'] for m in runs)}, transformers {uniq(m['transformers'] for m in runs)}, peft "
            f"{uniq(m['peft'] or 'not installed' for m in runs)}). No GPU number here is estimated.", ">",
            f"> - Measured at {uniq(f'{m}, seq {q}' for m, q in cfgs)}, "
            f"{uniq(r.get('dtype', '?') for r in rows.values())}, micro-batch "
            f"{uniq(r.get('micro_batch_size', '?') for r in rows.values())}, {steps} per row — "
            + " · ".join(done) + "."]  + \
        ([f"> - **Not run on the GPU**, of the rows the targets use — {' · '.join(missing)}. A target whose rows "
          "were not run says *not measured (row not run: …)*."] if missing else []) + \
        ([] if sweep else ["> - The GPU scaling sweep has not been run."]) + \
        (["> - **These GPU tables measured the code before issue 31's lean paths.** For the code as it is, the GPU "
          "targets are not measured: see *Issue 31* below (the CPU step counter, and `bench/gpu_check.sh` to run)."]
         if not any(r.get("check") == "pairs" for r in pairs_runs_seen) else []) + \
        ([f"> - MFU is taken against {peak / 1e12:,.0f} TFLOP/s dense bf16 (from the rows: 4 · N · tokens/s ÷ MFU)."]
         if peak else [])


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


def budget(run):
    """bench/accuracy.py's budget rule on a sweep JSON (older JSONs without it included)."""
    import accuracy
    return accuracy.budget_rule(run)


def budget_line(run):
    """One sentence: does the table count as evidence (the budget rule), with its numbers."""
    b = budget(run)
    if b["ok"] is None:
        return "**Budget rule: not decidable** (no reference result or no margin for this metric yet)."
    parts = [f"untuned {b['untuned']:.3f}" if b["untuned"] is not None else None,
             f"constant predictor {b['constant']:.3f}" if b["constant"] is not None else None]
    trivial = " / ".join(p for p in parts if p)
    got = f"`{run['reference']}` {b['reference']:.3f} vs the better trivial predictor {b['trivial']:.3f} ({trivial})"
    if b.get("from_check"):
        got += " — from its budget-check runs (" + ", ".join(f"lr {c['lr']:.3g} seed {c['seed']}"
                                                            for c in run["budget_check"]) + "), its row is pending"
    if b["ok"]:
        return f"Budget rule **passed**: {got}, margin {b['margin']:+.2f} {b['metric']} required."
    return (f"**Budget too small to rank the methods**: {got}; the rule needs {b['margin']:+.2f} {b['metric']} "
            "over it, so the verdict column is left empty.")


def lr_cell(run, name):
    sel = run.get("lr_select", {}).get(name)
    if sel and sel.get("chosen") is not None:
        return f"{sel['chosen']:.3g}" + (f" (= `{sel['tied_to']}`)" if sel.get("tied_to") else "")
    r = run["rows"][name]["runs"]
    argv = r[0].get("argv", []) if r else []
    if "--lr" in argv:
        return argv[len(argv) - 1 - argv[::-1].index("--lr") + 1]
    lr = re.search(r"--lr (\S+)", " ".join(run.get("base_argv", [])))
    return lr.group(1) + (" × 0.2" if name.startswith("spsft") else "") if lr else "–"


def interval(iv):
    return f"[{iv[0]:+.3f}, {iv[1]:+.3f}]"


def paired_cell(c, ok=True):
    """A paired comparison (accuracy.compare) as the verdict and the intervals it comes from: 'worse −0.013
    (t [−0.024, −0.001]; bootstrap [−0.020, −0.006])'; '–' where the budget rule fails."""
    if c is None or not ok:
        return "–"
    if c["t"] is None:
        return f"{c['diff']:+.3f} (1 seed: no interval, no verdict)"
    v = c["verdict"]
    boot = f"; bootstrap {interval(c['boot'])}" if c["boot"] else ""
    return f"{f'**{v}**' if v in ('better', 'worse') else v} {c['diff']:+.3f} (t {interval(c['t'])}{boot})"


def verdict_summary(run):
    """The paired verdicts of one sweep JSON in one list item: the rows *worse* / *better* than the reference,
    those with no difference shown (each with its interval), then the ablations against their own method.
    Nothing where the budget rule fails."""
    import accuracy
    if not budget(run)["ok"]:
        return []
    ref, task = run["reference"], os.path.basename(os.path.normpath(run["data"]))
    short = lambda c: f"{c['diff']:+.3f} (t {interval(c['t'])}" + (f"; bootstrap {interval(c['boot'])}" if c["boot"] else "") + ")"  # noqa: E731
    by = {"better": [], "worse": [], "no difference shown": []}
    own = []
    for name, cs in accuracy.comparisons(run).items():
        for c in cs:
            if c["verdict"] is None:
                continue
            item = f"`{name}` {short(c)}"
            if c["against"] == ref:
                by[c["verdict"]].append(item)
            else:
                own.append(f"`{name}` vs `{c['against']}`: {c['verdict']} {short(c)}")
    parts = [f"**{v}**: " + ", ".join(xs) for v, xs in by.items() if xs and v != "no difference shown"] + \
            ([f"no difference shown: {', '.join(by['no difference shown'])}"] if by["no difference shown"] else []) + \
            ([f"own method: {'; '.join(own)}"] if own else [])
    n = len(run["seeds"])
    head = f"- **{task}** ({run['primary_metric']}, vs `{ref}`, {n} seed{'s' * (n != 1)}) — "
    return [head + ("; ".join(parts) if parts else "no row compared yet (each needs 2 seeds beside the reference's)") + "."]


def accuracy_table(run):
    """One markdown table of an accuracy JSON: rows × (learning rate, primary before / after, the paired verdict
    vs the reference and, for an ablation, vs its own method, other metrics after, parameters, ratios, step time
    ratio, optimizer steps and their ratio, wall), a `trivial` row first; verdicts only where the budget rule
    passes."""
    import accuracy
    rows, ref, pmet = accuracy.summarize(run["rows"]), run["reference"], run["primary_metric"]  # stats from the runs
    ok = budget(run)["ok"]
    paired = accuracy.comparisons(run)
    own = any(accuracy.COMPARE_WITH.get(n) in rows for n in rows)
    others = sorted({m for r in rows.values() for m in r["stats"]["after"] if m != pmet})
    head = ["row", "lr", "seeds", f"{pmet} before", f"{pmet} after", f"vs {ref} (paired, 95 %)"] + \
           (["vs its own method (paired, 95 %)"] if own else []) + [f"{m} after" for m in others] + \
           ["trainable start → end", f"× {ref} (end)", f"adapter × {ref}", f"step time × {ref}", "steps",
            f"steps × {ref}", "training FLOP", f"training FLOP × {ref}", "wall / run"]
    b = budget(run)
    body = [["`trivial`", "–", "–", pm((b["untuned"], None)) + " (untuned)",
             ("–" if b["constant"] is None else f"{b['constant']:.3f}") + " (constant)", "–"]
            + ["–"] * (len(head) - 6)]
    for name, r in rows.items():
        st = r["stats"]
        if not r["runs"]:
            body.append([f"`{name}`", lr_cell(run, name), "0", "pending"] + [""] * (len(head) - 4))
            continue
        cs = {c["against"]: c for c in paired.get(name, [])}
        mine = accuracy.COMPARE_WITH.get(name)
        body.append([f"`{name}`", lr_cell(run, name), str(len(r["runs"])), pm(st["before"].get(pmet)),
                     pm(st["after"].get(pmet)), "(reference)" if name == ref else paired_cell(cs.get(ref), ok)]
                    + ([f"`{mine}`: {paired_cell(cs.get(mine), ok)}" if mine in cs else "–"] if own else [])
                    + [pm(st["after"].get(m)) for m in others]
                    + [f"{count(st.get('trainable_params_start'))} → {count(st.get('trainable_params_end'))}",
                       fx(st.get("trainable_params_end_ratio")), fx(st.get("adapter_params_end_ratio")),
                       fx(st.get("step_time_ratio")), count(st.get("steps")), fx(st.get("steps_ratio")),
                       "–" if st.get("train_flop") is None else f"{st['train_flop']:.3g}", fx(st.get("train_flop_ratio")),
                       "–" if st.get("wall_s") is None else f"{st['wall_s']:.0f} s"])
    notes = sorted({c["boot_missing"] for cs in paired.values() for c in cs if c["boot_missing"]})
    missing = ([f"No bootstrap over dev examples where a side lacks it ({'; '.join(notes)}): those verdicts rest "
                "on the t-interval over seeds alone."] if notes and ok else [])
    return [budget_line(run), ""] + table(head, body) + ([""] + missing if missing else [])


def lr_table(run):
    """The learning-rate choice per row: each grid value's held-out score, the chosen value."""
    sel = run.get("lr_select")
    if not sel:
        return []
    grid = run.get("lr_grid") or []
    body = []
    for name, s in sel.items():
        if s.get("tied_to"):
            body.append([f"`{name}`", f"tied to `{s['tied_to']}`" + (" (taso.py scales it by ρ^(-1/2), T7)"
                                                                     if name.startswith("taso") else ""),
                         "–" if s.get("chosen") is None else f"{s['chosen']:.3g}"])
            continue
        ext = s.get("extended", [])
        cells = ", ".join(f"{lr:.3g}{'⁺' if lr in ext else ''}: {'–' if sc is None else f'{sc:.3f}'}"
                          for lr, sc in s["grid"])
        left = max(0, len(grid) - len(s["grid"]))
        body.append([f"`{name}`", cells + (f" ({left} pending)" if left else ""),
                     "pending" if s.get("chosen") is None else f"**{s['chosen']:.3g}**"])
    any_sel = next((s for s in sel.values() if s.get("val_frac")), {})
    return [f"Learning rates: each row's centre (--lr, SPSFT's × 0.2) × {' / '.join(f'{f:g}' for f in grid)}, one "
            f"run each (seed {any_sel.get('seed', 0)}) on the training set minus a held-out "
            f"{100 * any_sel.get('val_frac', 0.1):.0f} % of it; the best held-out {run['primary_metric'] or 'score'} "
            "is chosen and used for every seed; where the best is at an end of the grid, the grid grows past that "
            "end by its end ratio (⁺, up to twice) until it is not. The reported dev set is never read for this.", ""] + \
        table(["row", "held-out score per learning rate", "chosen"], body) + [""]


def progress(run):
    """'k of n planned runs finished' and the CPU hours the rest needs at the finished runs' mean pace."""
    grid = run.get("lr_grid") or []
    import accuracy
    tied = accuracy.LR_TIED
    own = [n for n in run["rows"] if not (n in tied and tied[n] in run["rows"])] if grid else []
    planned = len(run["rows"]) * len(run["seeds"])
    for n in own:  # a grid grown past its end counts its added runs, and one more while its choice is open
        s = run.get("lr_select", {}).get(n, {})
        ran = len(s.get("grid", []))
        planned += max(len(grid), ran + (ran >= len(grid) and s.get("chosen") is None))
    walls = [r.get("wall_s") for r in run.get("cache", {}).values() if r.get("wall_s")]
    done = sum(len(r["runs"]) for r in run["rows"].values()) + \
        sum(len(s.get("grid", [])) for s in run.get("lr_select", {}).values())
    if done >= planned:
        return f"All {planned} planned runs finished."
    pace = sum(walls) / len(walls) if walls else None
    est = "" if pace is None else (f"; the {planned - done} pending need about {(planned - done) * pace / 3600:.1f} "
                                   f"h of this machine's wall time at the finished runs' mean ({pace / 60:.0f} min/run; a plan, "
                                   "not a measurement)")
    return f"**Sweep unfinished: {done} of {planned} planned runs finished{est}.** Rerun the command to continue it."


def reruns_line(run):
    """The runs trained again for their per-example predictions (`--backfill_predictions`, "rerun_of"): how many
    reproduce the earlier run's primary metric exactly, and each that does not (row, seed, earlier → now, and the
    code each ran). None where no run was trained again."""
    import accuracy
    pmet, same, moved, twice = run.get("primary_metric"), 0, [], 0
    short = lambda c: c[:7] if c else "unrecorded"  # noqa: E731
    for name, row in run["rows"].items():
        for r in row["runs"]:
            if "rerun_of" not in r:
                continue
            now, before = (accuracy.flat(m.get("after", {})).get(pmet) for m in (r["metrics"], r["rerun_of"]["metrics"]))
            if now == before:
                same += 1
                continue
            codes = [c or {} for c in (r["rerun_of"].get("code"), r.get("code"))]
            was, ran = (c.get("commit") for c in codes)
            moved.append(f"`{name}` seed {r['seed']} {before:.4f} → {now:.4f} (code {short(was)} → {short(ran)})")
            twice += bool(was) and was == ran and not any(c.get("dirty") for c in codes)  # the same code twice
    if not same and not moved:
        return None
    line = (f"Trained again for their per-example predictions (the paired bootstrap; `--backfill_predictions`): "
            f"{same + len(moved)} runs, {same} of which reproduce the earlier run's {pmet} exactly")
    if not moved:
        return line + "."
    return (line + f"; {len(moved)} do not (every statistic above uses the new run): " + ", ".join(moved) + "." +
            (f" **{twice} of them ran the same commit twice: not reproducible.**" if twice else ""))


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
             "(committed beside it, with every finished run's summary: a sweep continues where it stopped). Each row "
             "is one method with its paper's own settings (the rules are in `bench/accuracy.py`'s docstring), "
             "trained through `train.main` with the same data order and evaluation as every other row, at its own "
             "learning rate where the table says so. Cells are mean ± std (sample std) over the seeds. **Verdicts are "
             "paired** (`bench/accuracy.py` `compare`): every row runs the reference's seeds on the same data order and "
             "dev set, so the primary metric's difference is taken seed by seed: its mean, a 95 % t-interval over the "
             "seeds (`t`) and, where both sides kept their per-example dev predictions, a 95 % paired bootstrap over dev "
             "examples (2,000 resamples, one resample shared by every seed and both rows; the mean over seeds of the "
             "differences). A row is **better** / **worse** only when every interval shown excludes 0 on the same side; "
             "otherwise *no difference shown* (not a tie: the interval says how large a difference the data leave "
             "open). An ablation is also compared with its own method (random vs importance), `pilora-equal` with "
             "`pilora`. With 3 seeds the t-interval is wide (t₀.₉₇₅,₂ = 4.30). **Budget rule**: a table ranks "
             "the methods only if the reference beats the better `trivial` predictor (the untuned model, or a "
             "constant: the training set's majority class; a constant scores Matthews 0 and Pearson 0) by 10 "
             "accuracy points, Matthews +0.2 or Pearson +0.3; otherwise it says so and gives no verdicts. `× ref` columns "
             "are ratios to the reference row (`adapter ×` leaves out the classifier / pooler head, trained fully "
             "by every row); step time ratios pair each seed with the reference's run of the same seed. `steps` are "
             "optimizer steps; `training FLOP` is torch's FlopCounterMode count over a whole run (matrix products and "
             "attention, forward and backward, the evaluations left out; – for runs made before it was counted).", ""]
    # this sweep's tables first, those with learning-rate grids (the method rows) before the budget checks
    runs = sorted(runs, key=lambda r: ("cache" not in r, not r.get("lr_grid"), r["model"], r["data"]))
    glance = [line for run in runs if "cache" in run and run.get("lr_grid") for line in verdict_summary(run)]
    if glance:
        lines += ["## Verdicts at a glance (paired, 95 %; the tables below give every row)", ""] + glance + [""]
    for k, run in enumerate(runs):
        task = os.path.basename(os.path.normpath(run["data"]))
        m = run["machine"]
        if "cache" not in run and (k == 0 or "cache" in runs[k - 1]):
            lines += ["## Reading", "", BEGIN, notes.strip("\n"), END, ""]
            notes = None
            lines += ["# Earlier short-budget tables", "",
                      "The first sweep (issue 14): at most the first 1,000 training examples × 2 epochs, every row at "
                      "the same learning rate (SPSFT at 0.2× of it). Kept for the record; only tables that pass the "
                      "budget rule rank the methods, and none of these chose its learning rates.", ""]
        budget_txt = ("full training set" if "--max_samples" not in run["base_argv"] else
                      f"first {int(run['base_argv'][run['base_argv'].index('--max_samples') + 1]):,} examples")
        ep = run["base_argv"][run["base_argv"].index("--epochs") + 1] if "--epochs" in run["base_argv"] else "?"
        ba = run["base_argv"]
        length = f"{ba[ba.index('--max_steps') + 1]} steps" if "--max_steps" in ba else f"{float(ep):g} epoch{'s' * (float(ep) != 1)}"
        lines += [f"## {run['model']} · {task} · {budget_txt}, {length}", "", "```bash", run["command"], "```", "",
                  f"Seeds {' '.join(map(str, run['seeds']))}; train.py flags shared by every row: "
                  f"`{' '.join(run['base_argv'])}`; per-row fills {json.dumps(run['fills'])}. "
                  f"Measured {run['date']} on {m['device']} ({m['cpu_count']} cores, torch "
                  f"{run['versions']['torch']}, transformers {run['versions']['transformers']}); the runs' wall "
                  f"time in all {sum(r.get('wall_s') or 0 for row in run['rows'].values() for r in row['runs']) / 60:.0f} "
                  f"min (each run's own, cached or not).", ""]
        lines += ([progress(run), ""] if "cache" in run else []) + accuracy_table(run) + [""]
        again = reruns_line(run)
        lines += ([again, ""] if again else []) + lr_table(run)
        if png_dir:
            tag = task + (f"-{budget_txt}-{length}" if "cache" in run else "")  # the earlier sweep's names unchanged
            name = f"accuracy-{re.sub(r'[^a-z0-9]+', '-', (run['model'] + '-' + tag).lower())}.png"
            if accuracy_plot(run, os.path.join(png_dir, name)):
                lines += [f"![{run['primary_metric']} per row, {run['model']} on {task}]"
                          f"({os.path.relpath(os.path.join(png_dir, name), md_dir)})", ""]
    if notes is not None:
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


# --------------------------------------------------------------------- counted memory (bench/memory.py)

GIB = 2 ** 30
PAPER_MEMORY = {"spsft": "SPSFT Table 7 (Llama-2-7B): aux 17.62 GB vs LoRA 23.46 GB = 0.75×",
                "g2r2": "G²R² Table 3: −22 % final memory = 0.78×"}


def memory_runs(paths):
    """{label: {(row, model, seq, ckpt): row}} from bench/memory.py's JSON lists. Label from the file name:
    memory-validation-*.json, memory-*-before.json (no memory cuts), memory-*-dropout.json (dropout cut only),
    else "now" (the code as committed)."""
    out = {}
    for path in sorted(paths):
        base = os.path.basename(path)[:-len(".json")]
        label = "validation" if base.startswith("memory-validation") else \
            next((x for x in ("before", "dropout") if base.endswith("-" + x)), "now")
        for r in json.load(open(path)):
            out.setdefault(label, {})[(r["row"], r["model"], r["seq_len"], bool(r["grad_ckpt"]))] = r
    return out


def memory_section(paths, model="llama-7b-shape", seq=2048, measured=None, gpu_name=None):
    """BENCHMARKS.md's "counted at 7B shape (no GPU)" section: targets, aux per row, the cuts, validation
    (on CPU, and against the GPU's max_memory_allocated where `measured`, the CUDA efficiency rows, has them)."""
    runs = memory_runs(paths)
    now = runs.get("now", {})
    if not now:
        return []
    gib = lambda b: "–" if b is None else f"{b / GIB:.2f}"  # noqa: E731

    def row(name, ckpt, rows=now, s=seq):
        r = rows.get((name, model, s, ckpt))
        return None if r is None or "error" in r else r

    def cmp(a, b, limit, field="aux_bytes"):
        """Ratio cells without / with checkpointing; `limit` a bound for both, or (bound, None): the
        target is defined without checkpointing and the checkpointed ratio is only reported."""
        cells = []
        for ckpt, lim in zip((False, True), limit if isinstance(limit, tuple) else (limit, limit)):
            ra, rb = row(a, ckpt), row(b, ckpt)
            x = ratio(ra and ra[field], rb and rb[field])
            cells.append("–" if x is None else f"{x:.2f}× ({gib(ra[field])} / {gib(rb[field])} GiB)"
                         + ("" if lim is None else f" **{'met' if x <= lim else 'missed'}**"))
        return cells

    def importance(name):
        cells = []
        for ckpt in (False, True):
            r = row(name, ckpt)
            if r is None or "attach_peak_bytes" not in r:
                cells.append("–")
                continue
            extra, buf = r["attach_peak_bytes"] - r["model_bytes"], 2 * r["target_weight_numel"]
            cells.append(f"model + {gib(extra)} GiB = model + {extra / buf:.2f} bf16 ({extra / buf / 2:.2f} fp32) "
                         f"buffers of the target weights ({gib(buf)} GiB bf16) **{'met' if extra <= buf else 'missed'}**")
        return cells

    lines = ["## Counted at 7B shape (no GPU)", "",
             "Counted, not measured on a GPU: `bench/memory.py` builds the model on fake tensors (shapes and dtypes, "
             "no data) and runs each efficiency row through the same Method hooks and loop (`efficiency.Loop`: "
             "forward, backward, hooks, clip, AdamW; one warm-up step, then one counted step), adding the bytes of "
             "every storage an op creates and subtracting them when it is freed. bf16 base weights, fp32 trainable "
             "tensors, bf16 autocast, micro-batch 1, SDPA attention: the fused (flash) kernel runs, which keeps the "
             "output and a log-sum-exp, never a T × T matrix — as CUDA's flash / memory-efficient kernels do; "
             "the adapter dropout runs in x's dtype, as CUDA's kernel does (`memory.cuda_dropout`: the CPU's fp32 "
             "round trip for its rounding is not counted; `--validate` counts it, as the CPU runs). "
             "**model** = the peak of a no-grad forward of the same batch on the base model (weights 12.55 GiB "
             "included), **aux** = peak − model, as in the efficiency suite. Not in the count: allocator rounding "
             "and fragmentation, kernel workspaces (cuBLAS, flash backward), the CUDA context; a GPU's "
             "`max_memory_allocated` will be somewhat higher. "
             + (f"The rows measured on the GPU ({gpu_name or 'CUDA'}) stand beside this count under *Validation on "
                "the GPU* below; every other figure in this section is counted." if measured else
                "No GPU was lent, so no GPU figure is given."), "",
             "```bash",
             "OMP_NUM_THREADS=1 python bench/memory.py --model llama-7b-shape --seq_len 2048 --grad_ckpt both "
             "--json bench/results/memory-llama-7b-shape-2048.json",
             "OMP_NUM_THREADS=1 python bench/memory.py --model llama-h128-l2-v512 --seq_len 64 --validate "
             "--json bench/results/memory-validation-llama-h128-l2-v512.json",
             "OMP_NUM_THREADS=1 python bench/memory.py --model vit-b16-shape --micro_batch_size 64 "
             "--json bench/results/memory-vit-b16-shape-197.json",
             "OMP_NUM_THREADS=1 python bench/memory.py --model vit-b16-shape --micro_batch_size 2 --validate "
             "--json bench/results/memory-validation-vit-b16-shape.json   # real tensors at full ViT-B shape",
             "OMP_NUM_THREADS=1 python bench/cut_cost.py --json bench/results/cut-cost-llama-small-shape-256.json",
             "OUT=out/gpu bash bench/gpu_check.sh   # on a GPU: the same rows measured (max_memory_allocated)",
             "```", "",
             f"### Targets ({model}, seq {seq}, counted)", ""]
    body = [["SPSFT aux ≤ 0.70× PEFT LoRA (≈ equal params; no checkpointing, the checkpointed ratio reported)",
             "`spsft-r128` / `peft-lora-r64`", *cmp("spsft-r128", "peft-lora-r64", (0.70, None)),
             PAPER_MEMORY["spsft"]],
            ["Our LoRA aux ≤ 0.85× PEFT LoRA (r = 64)", "`lora-r64` / `peft-lora-r64`",
             *cmp("lora-r64", "peft-lora-r64", 0.85), ""],
            ["Our LoRA aux ≤ 0.85× PEFT LoRA (r = 8)", "`lora-r8` / `peft-lora-r8`",
             *cmp("lora-r8", "peft-lora-r8", 0.85), ""],
            ["G²R² refinement aux ≤ 0.75× LoRA (same targets)", "`g2r2-refine` / `lora-r8-qkvud`",
             *cmp("g2r2-refine", "lora-r8-qkvud", 0.75), PAPER_MEMORY["g2r2"]],
            ["SPSFT vs our LoRA (both without dropout copies or full logits): finding", "`spsft-r128` / `lora-r64`",
             *cmp("spsft-r128", "lora-r64", None), PAPER_MEMORY["spsft"]],
            ["TASO importance pass ≤ bf16 inference + one weight-sized buffer", "`taso-r8` attach peak",
             *importance("taso-r8"), ""],
            ["SPSFT-Taylor importance pass ≤ bf16 inference + one weight-sized buffer",
             "`spsft-r128-taylor` attach peak", *importance("spsft-r128-taylor"), ""],
            ["  ↳ TASO, scored in 4 runs of layers (`--taso_score_groups 4`)", "`taso-r8-g4` attach peak",
             *importance("taso-r8-g4"), ""],
            ["  ↳ SPSFT-Taylor, scored in 4 runs of layers (`--spsft_score_groups 4`)",
             "`spsft-r128-taylor-g4` attach peak", *importance("spsft-r128-taylor-g4"), ""],
            ["G²R² warmup with the exact ∂ℒ/∂ΔW capture (reported)", "`g2r2-warmup` / `lora-r8-qkvud`",
             *cmp("g2r2-warmup", "lora-r8-qkvud", None), ""],
            ["PiLoRA stage 1, G̃ scored every step (reported)", "`pilora-s1-K1` / `lora-r32-qkvud`",
             *cmp("pilora-s1-K1", "lora-r32-qkvud", None), ""]]
    lines += table(["target", "counted as", "no checkpointing", "checkpointing", "paper"], body) + [""]
    aux = lambda n, c: (row(n, c) or {}).get("aux_bytes")  # noqa: E731
    if all(aux(n, c) for n in ("lora-r1", "spsft-r128", "lora-r64", "peft-lora-r64") for c in (False, True)):
        lines += ["Reading:", "",
                  f"- Without checkpointing every row carries the frozen model's own activations: LoRA r = 1 "
                  f"already counts {gib(aux('lora-r1', False))} GiB (the 11008-wide MLP activations, RMSNorm's "
                  f"fp32 upcasts, attention outputs). PEFT LoRA adds, per adapted module, a dropped copy of its "
                  f"input in fp32 (PEFT casts x to the adapter's dtype before its dropout) and the mask, and HF's "
                  f"loss keeps the fp32 logits, log-softmax and their gradient: {gib(aux('peft-lora-r64', False))} GiB.",
                  f"- SPSFT's advantage over PEFT LoRA is mostly LoRA's dropout copies. Against our LoRA, whose "
                  f"dropout keeps no copy (`common.dropout_linear`), SPSFT is "
                  f"{fx(ratio(aux('spsft-r128', False), aux('lora-r64', False)))} without checkpointing and "
                  f"{fx(ratio(aux('spsft-r128', True), aux('lora-r64', True)))} with it: not caching W_f x saves only "
                  f"T × r per module; with checkpointing what differs is the AdamW state of 146 M vs 160 M "
                  f"parameters. The paper's 0.75× does not survive a LoRA without dropout copies.",
                  "- G²R² refinement prunes 80 % of the modules, which removes their adapter state and r-wide "
                  "activations but none of the frozen model's activations: the target is met with checkpointing "
                  "and missed without it (it was met, 0.64×, against the LoRA that kept dropout copies).",
                  "- The importance passes keep an fp32 sum per target weight (two bf16 weight-sized buffers: "
                  "24.1 GiB for the seven targets), by design in `taso.py` / `spsft.py` (a bf16 sum moves the "
                  "selection); beyond those the checkpointed pass adds the HF loss's full logits and one layer's "
                  "working set. `--taso_score_groups 4` / `--spsft_score_groups 4` (rows `*-g4`) score a quarter "
                  "of the layers per pass and meet the target with checkpointing, at 2.7–3.5× the pass time on "
                  "CPU (the main suite's attach column; the upper runs' backward stops early); without "
                  "checkpointing the frozen model's activations alone exceed the buffer. G²R²'s exact capture keeps no "
                  "dropped copy (it draws dropout_linear's mask again in backward) and two fp32 out × in tensors per "
                  "scored module at a time (the summed gradient, reduced in place, and ΔW: 172 MiB each for an MLP "
                  f"matrix): its warmup step counts {fx(ratio(aux('g2r2-warmup', False), aux('lora-r8-qkvud', False)))} "
                  f"LoRA's aux without checkpointing and {fx(ratio(aux('g2r2-warmup', True), aux('lora-r8-qkvud', True)))} "
                  "with it, where those two tensors are most of what is left.", ""]

    seqs = sorted({k[2] for k in now if k[1] == model})
    names = list(dict.fromkeys(k[0] for k in now if k[1] == model))
    lines += [f"### aux GiB per row ({model})", ""]
    head = ["row", "trainable params"] + [f"seq {s} {'ckpt' if c else 'no ckpt'}" for s in seqs for c in (False, True)]
    body = []
    for n in names:
        any_r = next((r for k, r in now.items() if k[0] == n and k[1] == model and "error" not in r), None)
        body.append([f"`{n}`", f"{any_r['trainable_params']:,}" if any_r else "–"]
                    + [gib((row(n, c, s=s) or {}).get("aux_bytes")) for s in seqs for c in (False, True)])
    lines += table(head, body) + [""]

    pairs = [("spsft-r128", "peft-lora-r64"), ("lora-r64", "peft-lora-r64"), ("lora-r8", "peft-lora-r8"),
             ("g2r2-refine", "lora-r8-qkvud"), ("spsft-r128", "lora-r64")]
    lines += [f"### aux ratios per sequence length ({model})", ""]
    body = [[f"`{a}` / `{b}`"] + [fx(ratio((row(a, c, s=q) or {}).get("aux_bytes"), (row(b, c, s=q) or {}).get("aux_bytes")))
                                  for q in seqs for c in (False, True)] for a, b in pairs]
    lines += table(["rows"] + [f"seq {q} {'ckpt' if c else 'no ckpt'}" for q in seqs for c in (False, True)], body)
    lines += [""]

    lines += [f"### Largest tensors at the peak ({model}, seq {seq}, no checkpointing)", ""]
    for n in ("peft-lora-r64", "lora-r64", "spsft-r128", "lora-r8-qkvud", "g2r2-refine", "g2r2-warmup"):
        r = row(n, False)
        if r:
            tops = "; ".join(f"{t['bytes'] / 2 ** 20:,.0f} MiB {t['dtype']} {tuple(t['shape'])} `{t['op']}` "
                             f"({t['where'] or '–'})" for t in r["top"][:5])
            lines.append(f"- `{n}`: {tops}")
    for n in ("taso-r8", "spsft-r128-taylor", "taso-r8-g4", "spsft-r128-taylor-g4"):
        r = row(n, True)
        if r and r.get("attach_top"):
            tops = "; ".join(f"{t['bytes'] / 2 ** 20:,.0f} MiB {t['dtype']} {tuple(t['shape'])} `{t['op']}` "
                             f"({t['where'] or '–'})" for t in r["attach_top"][:5])
            lines.append(f"- `{n}` importance pass (checkpointing): {tops}")
    lines += [""]

    before, drop = runs.get("before", {}), runs.get("dropout", {})
    if before:
        lines += [f"### Memory cuts ({model}, seq {seq}): aux GiB before → after", "",
                  "`before`: adapter dropout as nn.Dropout (each module keeps its dropped input and the mask) and "
                  "the model's own loss (full fp32 logits and log-softmax). `+ dropout_linear`: "
                  "`common.dropout_linear` (backward redraws the mask from the saved RNG state). `+ causal_loss`: "
                  "`train.causal_loss` (LM head + cross-entropy in checkpointed chunks of 1024 positions) — the "
                  "code as committed; for `g2r2-warmup` it also has the exact capture's cut (the mask drawn "
                  "again instead of nn.Dropout's copy, ΣS reduced in place). PEFT rows keep PEFT's layers and "
                  "HF's loss throughout.", ""]
        body = []
        for (n, m, s, c), r in before.items():
            if m != model or s != seq or "error" in r:
                continue
            d, a = drop.get((n, m, s, c)), now.get((n, m, s, c))
            body.append([f"`{n}`", mode_name(c), gib(r["aux_bytes"]), gib(d and d["aux_bytes"]),
                         gib(a and a["aux_bytes"]), fx(ratio(a and a["aux_bytes"], r["aux_bytes"]))])
        lines += table(["row", "mode", "before", "+ dropout_linear", "+ causal_loss (now)", "now / before"], body)
        lines += [""]

    for other in dict.fromkeys(k[1] for k in now if k[1] != model):  # e.g. llama-3-8b-shape (128k vocabulary)
        keys = [k for k in now if k[1] == other and "error" not in now[k]]
        lines += [f"### Other shapes: {other}, aux GiB (counted)", ""]
        body = []
        for n in dict.fromkeys(k[0] for k in keys):
            rs = {(k[2], k[3]): now[k] for k in keys if k[0] == n}
            base = {(k[2], k[3]): now[k] for k in keys if k[0] == "peft-lora-r64"}
            body.append([f"`{n}`", f"{next(iter(rs.values()))['trainable_params']:,}"]
                        + [f"{gib(r['aux_bytes'])} ({fx(ratio(r['aux_bytes'], (base.get(sc) or {}).get('aux_bytes')))} PEFT r64)"
                           for sc, r in sorted(rs.items())])
        cols = [f"seq {q} {'ckpt' if c else 'no ckpt'}" for q, c in sorted({(k[2], k[3]) for k in keys})]
        lines += table(["row", "trainable params"] + cols, body) + [""]
        if other.startswith("llama-3"):
            lines += ["The trainable counts of `peft-lora-r64` and `spsft-r128` equal the SPSFT paper's Table 6 "
                      "(167.8 M and 159.4 M): a check of the shape. aux can be negative: the no-grad forward that "
                      "defines **model** computes the full 128k-vocabulary logits, which our training step "
                      "(`train.causal_loss`, chunked) never holds at once.", ""]
        if other.startswith("deberta"):
            lines += ["Our rows' trainable counts include the new pooler + classifier head (592,130 parameters, "
                      "trained fully); the PEFT rows' counts are the adapters alone. The `*-qkvud` rows name LLaMA "
                      "modules and do not apply to DeBERTa.", ""]
        if other.startswith("vit"):
            r0 = next(iter(now[k] for k in keys))
            lines += [f"ViT-B/16 at 224 px: {r0['seq_len']} tokens (196 patches + [CLS]) per image, micro-batch "
                      f"{r0['micro_batch_size']} (PiLoRA Table 7's batch), 100 classes. Our rows' trainable counts "
                      "include the new classifier head (trained fully); the PEFT rows' are the adapters alone. The "
                      "`*-qkvud` rows name LLaMA modules: on ViT only q, k, v match (no up / down).", ""]

    gpu = [(k, r, now[k]) for k, r in (measured or {}).items() if k in now and "error" not in r
           and "error" not in now[k]]
    if gpu:
        lines += ["### Validation on the GPU: counted vs `torch.cuda.max_memory_allocated`", "",
                  f"The efficiency suite's CUDA rows (bf16, measured{' on ' + gpu_name if gpu_name else ''}) beside "
                  "this count of the same rows at the same "
                  "shape. The count leaves out the allocator's rounding, cuBLAS / flash workspaces and the CUDA "
                  "context's own allocations, so where it models the code that ran it should read a little low; "
                  "`counted / measured` says how much.", ""]
        body = [[f"`{k[0]}`", f"{k[1]}, seq {k[2]}", mode_name(k[3]), gib(c["peak_bytes"]), gib(m["peak_bytes"]),
                 fx(ratio(c["peak_bytes"], m["peak_bytes"])), gib(c["aux_bytes"]), gib(m["aux_bytes"]),
                 fx(ratio(c["aux_bytes"], m["aux_bytes"]))] for k, m, c in gpu]
        lines += table(["row", "shape", "mode", "peak counted GiB", "peak measured GiB", "counted / measured",
                        "aux counted GiB", "aux measured GiB", "counted / measured"], body) + [""]
        pk = {k: ratio(c["peak_bytes"], m["peak_bytes"]) for k, m, c in gpu}
        high = [f"`{k[0]}` {mode_name(k[3])} {fx(x)}" for k, x in pk.items() if x > 1.02]
        lines += [f"Peak counted / measured over these {len(pk)} rows: {fx(min(pk.values()))} to {fx(max(pk.values()))}"
                  + (f"; the count reads more than 2 % high in {len(high)}: {', '.join(high)} — there the count does "
                     "not model what ran, and its ratios against these rows do not carry to the GPU." if high else
                     "."), ""]

    val = runs.get("validation", {})
    for vm, vs in dict.fromkeys((k[1], k[2]) for k in val):
        lines += [f"### Validation: counted vs the CPU allocator on real tensors ({vm}, seq {vs})", "",
                  "The same row run twice, on fake tensors (counted) and on real ones (CPU, bf16 autocast) where "
                  "`torch.profiler`'s allocator events give the step's peak above its start, as the efficiency "
                  "suite measures CPU memory. tests/test_memory.py asserts −20 % / +3 % (+ 32 KiB) on every "
                  "method with and without checkpointing, and the no-grad forward exactly; the count misses kernel "
                  "scratch (MKL's int32 buffer inside `bernoulli_` while a dropout mask is drawn, CPU SDPA's "
                  "backward buffers), so it reads low where dropout masks are drawn in backward."
                  + (" ViT's patch convolution adds oneDNN's scratch, seen by the allocator only: the forward "
                     "columns differ by it." if vm.startswith("vit") else ""), ""]
        body = []
        for (n, m, s, c), r in val.items():
            v = r.get("validation")
            if v and (m, s) == (vm, vs):
                body.append([f"`{n}`", mode_name(c), f"{v['counted_step_bytes'] / 2 ** 10:,.0f}",
                             f"{v['measured_step_bytes'] / 2 ** 10:,.0f}",
                             f"{100 * (v['counted_step_bytes'] / v['measured_step_bytes'] - 1):+.1f} %",
                             f"{v['counted_forward_bytes'] / 2 ** 10:,.0f} / {v['measured_forward_bytes'] / 2 ** 10:,.0f}"])
        lines += table(["row", "mode", "step: counted KiB", "allocator KiB", "difference", "forward: counted / allocator KiB"],
                       body) + [""]
    return lines


def cut_cost_section(paths):
    """What the memory cuts cost in step time: bench/cut_cost.py's interleaved medians, as ratios to ours."""
    runs = [r for p in sorted(paths) for r in json.load(open(p))]
    if not runs:
        return []
    pair = lambda r: next((k for k in r["vs_ours"] if k.startswith("peft-")), None)  # noqa: E731
    names = list(dict.fromkeys(k for r in runs for k in r["median_s"] if not k.startswith("peft-")))
    lines = ["### What the memory cuts cost in step time (CPU, `bench/cut_cost.py`)", "",
             "Our LoRA row timed step by step against itself with each cut undone and against its PEFT pair, "
             "interleaved (A B C … A B C …), medians; `nn.Dropout`: the adapter input dropped by nn.Dropout "
             "(its dropped copy and mask kept) instead of `common.dropout_linear` (mask redrawn in backward); "
             "`HF loss`: the model's own loss over the full logits instead of `train.causal_loss` (LM head "
             "recomputed chunk by chunk in backward). Ratios to `ours`; the memory the cuts buy is in the aux "
             "columns above.", ""]
    body = [[f"`{r['row']}`", f"{r['model']}, seq {r['seq_len']}", mode_name(r["grad_ckpt"]),
             ms(r["median_s"]["ours"])] + [fx(r["vs_ours"].get(n)) for n in names[1:]]
            + [f"{fx(r['vs_ours'].get(pair(r)))} (`{pair(r)}`)" if pair(r) else "–"] for r in runs]
    return lines + table(["row", "shape", "mode", "ours ms"] + [f"{n} ×" for n in names[1:]] + ["PEFT pair ×"],
                         body) + [""]


# ------------------------------------------------------- counted step and timed pairs (issue 31)

def count_runs(paths):
    """bench/count.py's JSONs (count-*.json), oldest first."""
    return sorted((json.load(open(p)) | {"file": os.path.basename(p)} for p in paths
                   if os.path.basename(p).startswith("count-")), key=lambda r: r.get("date", ""))


def pairs_runs(paths):
    """`bench/efficiency.py pairs` JSONs (pairs-*.json) measured on CUDA, oldest first."""
    runs = [json.load(open(p)) | {"file": os.path.basename(p)} for p in paths
            if os.path.basename(p).startswith("pairs-")]
    return sorted((r for r in runs if r.get("device") == "cuda"), key=lambda r: r.get("date", ""))


def pairs_list():
    """efficiency.PAIRS (read from bench/efficiency.py without importing torch)."""
    import ast
    src = open(os.path.join(ROOT, "bench", "efficiency.py")).read()
    node = next(n for n in ast.parse(src).body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PAIRS")
    return ast.literal_eval(node.value)


def grew(a, b, n=3):
    """The ops whose kernel count grew most from row b to row a: "op +k" text."""
    ops = {k: a["top_ops"].get(k, 0) - b["top_ops"].get(k, 0) for k in {*a["top_ops"], *b["top_ops"]}}
    return ", ".join(f"`{k}` {v:+,}" for k, v in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))[:n] if v > 0) or "–"


def phase_grew(a, b):
    """" (most in <phase>: +x GB)": where row a moves the most bytes more than row b."""
    pa, pb = a.get("bytes_by_phase"), b.get("bytes_by_phase")
    if not pa or not pb:
        return ""
    ph, d = max(((p, pa[p] - pb.get(p, 0)) for p in pa), key=lambda kv: kv[1])
    return f" (most in {ph}: {d / 1e9:+,.1f} GB)" if d > 0 else ""


def counted_causes(rows):
    """The causes of the counter's misses that its 'most grown' ops do not say, with the counted figures."""
    out = ["What the misses are made of:"]
    g, l = rows.get(("g2r2-warmup", False)), rows.get(("lora-r8-qkvud", False))
    if g and l:
        out.append(f"- **G²R² scoring** (exact ∂ℒ/∂ΔW, the default): Eq 5's Σ|∂ℒ/∂ΔW ⊙ ΔW| needs ∂ℒ/∂ΔW whole, one "
                   f"out × in GEMM per scored module (+{(g['flop'] - l['flop']) / 1e12:.1f} TFLOP, "
                   f"{g['flop'] / l['flop']:.2f}× the FLOP of LoRA's step) and its out × in blocks in backward: "
                   f"inherent to the estimator, not to the code. Only a scored step pays it: `score_every` K divides "
                   f"it by K; its blocks are in a bf16 model's dtype (one micro-batch). The Eq 6 estimator "
                   f"(`--g2r2_score paper`) adds no GEMM FLOP but forms the same out × in blocks (its ∂ℒ/∂ΔW and "
                   f"ΔW) in fp32, from the fp32 factors and their gradients.")
    p, l = rows.get(("pilora-s2", False)), rows.get(("lora-r32-qkvud", False))
    t, l1 = rows.get(("taso-r8", False)), rows.get(("lora-r1", False))
    if p and l and t and l1:
        nb, l8 = (lambda r: r["bytes_read"] + r["bytes_written"]), rows.get(("lora-r8", False))  # noqa: E731
        r8 = f" (LoRA r = 8 moves +{(nb(l8) - nb(l1)) / 1e9:.2f} GB)" if l8 else ""
        out.append(f"- **PiLoRA stage 2, TASO**: each attention and MLP builds its adapters' zero-padded factors "
                   f"at once before its forward (`common.together`: one `cat` and one cast of all compact blocks, a "
                   f"zero matrix and an `index_copy_` per row group; in backward one `index_select` each) in place of "
                   f"the per-module casts LoRA pays: the step dispatches about LoRA's kernels (PiLoRA "
                   f"{p['kernels']:,} against LoRA r = 32's {l['kernels']:,}, TASO {t['kernels']:,} against LoRA "
                   f"r = 1's {l1['kernels']:,}; built one module at a time they added 6 to 8 per module), and a "
                   f"checkpoint's recompute holds one attention's or MLP's at a time, as before. TASO moves "
                   f"{nb(t) / nb(l1):.4f}× the bytes of LoRA r = 1 (+{(nb(t) - nb(l1)) / 1e9:.2f} GB): its rank-8 "
                   f"pair on the full x (padded A and "
                   f"B, an r-wide A x: eight times a rank-1 LoRA's) against a rank-1 one, a cost of the row's "
                   f"rank{r8}, not of the code.")
        ts, ps = rows.get(("taso-r8", True)), rows.get(("pilora-s2", True))
        l1s, ls = rows.get(("lora-r1", True)), rows.get(("lora-r32-qkvud", True))
        if ts and ps and l1s and ls:
            aux = lambda a, b: f"{a['aux_bytes'] / b['aux_bytes']:.2f}×"  # noqa: E731
            out.append(f"- **Memory of PiLoRA stage 2 and TASO** (aux, no checkpointing / checkpointing; no target row "
                       f"above): PiLoRA {aux(p, l)} / {aux(ps, ls)} LoRA r = 32's, TASO {aux(t, l1)} / "
                       f"{aux(ts, l1s)} LoRA r = 1's. TASO's is a miss of item 5's \"no memory ratio worse\": the "
                       f"weight-space pair keeps the full x for A's gradient, as LoRA does, where the gather form "
                       f"kept x[..., C] (0.83× / 0.95×, `memory-llama-7b-shape-2048.json` at c8c4cd3), and item 2 "
                       f"asks for no gather on activations; its checkpointed figure also holds a 64 MiB count "
                       f"artifact (the importance map kept for the plot, which `.cpu()` moves off a GPU). Building "
                       f"a module's factors at once adds the cached row positions and, without checkpointing, the "
                       f"compact blocks' bf16 copy, which one module at a time did not hold.")
    return out if len(out) > 1 else []


def count_section(paths, groups=None):
    """BENCHMARKS.md's issue-31 section: the GPU targets (timed pairs, or plainly not measured), the CPU
    counter's kernels and bytes per row against its baseline × its time target, every row at 7B shape beside
    the measured GPU time, and one adapter layer of each kind."""
    runs = count_runs(paths)
    if not runs:
        return []
    run = runs[-1]
    rows = {(r["row"], bool(r["grad_ckpt"])): r for r in run["rows"] if "error" not in r}
    peaks = run["peaks"]
    gpu_main = ((groups or {}).get(("main", "cuda")) or {}).get("rows", {})
    gpu_names = ", ".join(dict.fromkeys(m["device_name"] for m in ((groups or {}).get(("main", "cuda")) or {})
                                        .get("runs", []))) or "GPU"
    timed = pairs_runs(paths)
    gb = lambda b: f"{b / 1e9:,.0f}"  # noqa: E731
    lines = ["## Issue 31: the step counted (no GPU) and the GPU targets", "",
             f"Counted by `bench/count.py` at **commit {run.get('commit') or '?'}** ({run['date']}; torch "
             f"{run['torch']}, transformers {run['transformers']}): one optimizer step of each efficiency row at "
             f"{run['model']}, seq {run['seq_len']}, micro-batch {run['micro_batch_size']}, bf16, on fake tensors "
             "(shapes, no data). **kernels**: ops that write a tensor (views and allocations not counted; one "
             "dropout = one fused kernel, as CUDA's `native_dropout`; AdamW and the clip as CUDA's foreach "
             "kernels, one per foreach op). **GB**: bytes read + written by those kernels, no cache. **TFLOP**: "
             "matmuls and attention (causal SDPA: the pairs it keeps, backward 2.5× forward). **syncs**: host "
             "waits (`.item()`, `nonzero`, …). **index**: index ops, (activation-sized ones: ≥ tokens × hidden "
             "elements). **roofline** = max(FLOP / peak, bytes / bandwidth) for the whole step, **Σ kernels** = "
             "the sum over kernels of each one's max: bounds, not GPU times. Peaks (dense bf16, SXM): "
             + "; ".join(f"{g} {v['tflops']:,.0f} TFLOP/s, {v['tbps']} TB/s" for g, v in peaks.items()) + ".", "",
             "```bash", "nice -n 19 " + re.sub(r" --commit \S+", "", re.sub(r"--json \S+", f"--json bench/results/{run['file']}",
                                                                     run["command"])),
             "```", ""]
    # -- the GPU targets
    lines += ["### GPU targets (issue 31, item 5)", ""]
    if not timed:
        lines += ["**Not measured for the new code.** No GPU has run the lean paths: every GPU figure in this "
                  "file (the *Targets (CUDA)* and *Main suite (CUDA)* tables above, H200, 2026-12-04) measured the "
                  "code before them, with 3 timed steps per row, rows run one after another, and different loss "
                  "computations for PEFT's rows and ours. `OUT=out/gpu bash bench/gpu_check.sh` measures each "
                  "target below as issue 31 asks (pairs resident at once, interleaved blocks, ≥ 20 timed steps, "
                  "bootstrap 95 % interval); until it runs, each GPU cell says *not measured*.", ""]
    latest = {}
    for t in timed:
        for p in t["pairs"]:
            latest[(p["row"], p["baseline"], bool(p["grad_ckpt"]))] = p | {"file": t["file"],
                                                                            "device_name": t["device_name"]}

    def gpu_cell(a, b, ckpt, field="verdict"):
        p = latest.get((a, b, ckpt))
        if p is None:
            return "not measured"
        if "error" in p:
            return f"not measured ({p['error']})"
        if field == "memory":
            return "–" if p.get("memory_ratio") is None else f"{p['memory_ratio']:.2f}× **{p['memory_verdict']}**"
        if field == "mfu":
            m = p["a"].get("mfu")
            return "–" if m is None else f"{100 * m:.1f} % **{p['mfu_verdict']}**"
        return f"{p['ratio']:.3f}× [{p['low']:.3f}, {p['high']:.3f}] **{p['verdict']}**"

    def counted_cell(a, b, ckpt, target):
        ra, rb = rows.get((a, ckpt)), rows.get((b, ckpt))
        if ra is None or rb is None:
            return "not counted"
        k, m = ra["kernels"] / rb["kernels"], (ra["bytes_read"] + ra["bytes_written"]) / (rb["bytes_read"] + rb["bytes_written"])
        ok = k <= target and m <= target
        ma, mb = ra["bytes_read"] + ra["bytes_written"], rb["bytes_read"] + rb["bytes_written"]
        why = ([f"kernels {ra['kernels']:,} > {target:.2f} × {rb['kernels']:,}; most grown: {grew(ra, rb)}"]
               if k > target else []) + \
            ([f"bytes {ma / 1e9:,.1f} > {target:.2f} × {mb / 1e9:,.1f} GB{phase_grew(ra, rb)}"] if m > target else [])
        return f"kernels {k:.2f}×, bytes {m:.2f}× **{'met' if ok else 'missed'}**" + (f" ({'; '.join(why)})" if why else "")

    body = []
    for label, a, b, target, mem, modes in pairs_list():
        if target is None:  # the compiled LoRA row: an MFU target, GPU only
            body.append([f"LoRA MFU ≥ 40 % with `--compile` ({mode_name(False)})", f"`{a}`",
                         gpu_cell(a, b, False, "mfu"), "GPU only (the counter has no compiler)"])
            continue
        for ckpt in modes:
            body.append([f"{label}: step ≤ {target:.2f}× ({mode_name(ckpt)})", f"`{a}` / `{b}`",
                         gpu_cell(a, b, ckpt), counted_cell(a, b, ckpt, target)])
        if mem is not None:
            for ckpt in modes:
                ra, rb = rows.get((a, ckpt)), rows.get((b, ckpt))
                x = ratio(ra and ra.get("aux_bytes"), rb and rb.get("aux_bytes"))
                body.append([f"{label}: memory ≤ {mem:.2f}× ({mode_name(ckpt)})", f"`{a}` / `{b}` (aux)",
                             gpu_cell(a, b, ckpt, "memory"),
                             "not counted" if x is None else f"aux {x:.2f}× **{'met' if x <= mem else 'missed'}**"])
    lines += table(["target", "rows", "GPU (timed pair: ratio [95 % interval])",
                    "CPU counter: row / baseline ≤ the time target"], body) + [""]
    lines += ["The counter's verdict holds both the kernels and the bytes of the row to its baseline's × the time "
              "target (a step costs at least its launches and its memory traffic); it says nothing of kernel "
              "efficiency, so a *met* here is necessary for the GPU target, not sufficient.", ""]
    lines += counted_causes(rows) + [""]
    # -- every row
    for ckpt in (False, True):
        sel = [r for (n, c), r in rows.items() if c == ckpt]
        if not sel:
            continue
        lines += [f"### Counted step per row ({run['model']}, seq {run['seq_len']}, {mode_name(ckpt)})", ""]
        body = []
        for r in sel:
            h = r["roofline"]
            g = gpu_main.get((r["row"], run["model"], run["seq_len"], ckpt))
            kp = r["kernels_by_phase"]
            body.append([f"`{r['row']}`", f"{r['kernels']:,}",
                         f"{kp['forward']:,} / {kp['backward'] + kp['recompute']:,} / {kp['optimizer']:,}",
                         gb(r["bytes_read"] + r["bytes_written"]), f"{r['flop'] / 1e12:.1f}", f"{r['host_syncs']}",
                         f"{r['index_ops']:,} ({r['activation_index_ops']:,})", f"{r['dropout_kernels']:,}",
                         f"{h['H100']['roofline_ms']:.0f} / {h['H100']['kernel_sum_ms']:.0f}",
                         f"{h['H200']['roofline_ms']:.0f} / {h['H200']['kernel_sum_ms']:.0f}",
                         "–" if g is None or "error" in g else f"{g['step_time_median_s'] * 1e3:.0f}"])
        lines += table(["row", "kernels", "fwd / bwd / AdamW", "GB", "TFLOP", "syncs", "index (act.)", "dropouts",
                        "H100 roofline / Σ kernels ms", "H200 roofline / Σ kernels ms",
                        f"measured {gpu_names} ms (old code)"], body) + [""]
    # -- one layer
    layers = [r for r in run.get("layers", []) if "error" not in r]
    plain = next((r for r in layers if r["layer"] == "plain"), None)
    if layers:
        r0 = layers[0]
        lines += [f"### One adapter layer, forward + backward ({r0['tokens'] // 256} × 256 × {r0['in_features']} → "
                  f"{r0['out_features']}, r = {r0['r']}, p = {r0['p']}, bf16 autocast)", "",
                  "`count.count_layer`, what tests/test_count.py bounds: `plain` is nn.Dropout + two F.linear "
                  "(loralib's / PEFT's form); ours may add one kernel and one x-sized copy with its mask (the mask "
                  "drawn again in backward instead of kept); the compact layers may run no activation-sized index op.",
                  ""]
        body = [[f"`{r['layer']}`", r["kernels"], f"{r['bytes_written'] / 2 ** 20:.2f}",
                 fx(ratio(r["bytes_written"], plain and plain["bytes_written"])), r["dropout_kernels"],
                 f"{r['index_ops']} ({r['activation_index_ops']})"] for r in layers]
        lines += table(["layer", "kernels", "MiB written", "× plain", "dropout kernels", "index ops (act.)"], body)
        lines += [""]
    return lines


def with_memory(md, paths, groups=None):
    """md with memory_section(paths) inserted before its Notes; groups: load()'s, for the GPU comparison."""
    mem = [p for p in paths if os.path.basename(p).startswith("memory-")]
    gpu = (groups or {}).get(("main", "cuda"), {})
    lines = memory_section(mem, measured=gpu.get("rows"),
                           gpu_name=", ".join(dict.fromkeys(m["device_name"] for m in gpu.get("runs", []))) or None)
    lines += cut_cost_section([p for p in paths if os.path.basename(p).startswith("cut-cost-")])
    lines += count_section(paths, groups)
    if not lines or "## Notes\n" not in md:
        return md
    head, tail = md.split("## Notes\n", 1)
    return head + "\n".join(lines) + "\n## Notes\n" + tail


# ---------------------------------------------------------------------------------------------- main

def render(groups, png_dir=None, notes="", md_dir=ROOT, checks=(), status=()):
    """BENCHMARKS.md; checks: bench/gpu_train_check.py's JSONs, status: bench/gpu_check.sh's, each with its "file"."""
    lines = ["# BENCHMARKS", "",
             "Generated by `python bench/report.py` from the JSONs `bench/efficiency.py` writes to `bench/results/` "
             "(committed beside it); regenerate after a new run. Rows, definitions and the targets come from issue 7.", ""]
    gpu_line = gpu_summary(groups)
    if gpu_line is None:
        lines += ["> **GPU tables: still to be measured.** Every number below was measured on CPU on small "
                  "random-init shapes. The H100 / Llama-2-7B-shape tables (bf16, seq 2048, with and without "
                  "checkpointing) and the GPU scaling sweep have not been run; no GPU number here is estimated. "
                  "Run the GPU commands under *Reproduce* and re-run `bench/report.py`.", ""]
    else:
        lines += gpu_line + [""]
    lines += ["## Reproduce", "", "```bash", "pip install -r requirements.txt -r bench/requirements.txt",
              "# GPU (H100 / H200): every device check in one command, <= 7 minutes (CUDA tests, issue 31's timed "
              "pairs at 7B shape with and without checkpointing, the training check)",
              "OUT=out/gpu bash bench/gpu_check.sh",
              "# GPU: the whole 7B-shape suite and the scaling sweep",
              "python bench/efficiency.py --model llama-7b-shape --seq_len 2048 --micro_batch_size 1 --grad_ckpt both",
              "python bench/efficiency.py --suite sweep --model llama-h1024-l8 llama-h2048-l8 llama-h4096-l8 "
              "--seq_len 512 1024 2048 4096 --grad_ckpt on",
              "# CPU: one optimizer step of every row counted at 7B shape (kernels, bytes, FLOP; minutes)",
              "nice -n 19 python bench/count.py --model llama-7b-shape --seq_len 2048 --grad_ckpt both --layers "
              "--json bench/results/count-llama-7b-shape-2048.json",
              "# CPU (what the CPU tables below ran; see each run's exact command)",
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
              "peak (`efficiency.PEAK_BF16_TFLOPS`: H100 and H200 SXM 989 TFLOP/s; recompute of checkpointing not "
              "counted); n/a on CPU.",
              "- **attach / importance**: wall time of `method.attach` (TASO's and SPSFT-Taylor's importance passes "
              "run there). **vs / step × / aux ×**: the row's rank-matched baseline and the ratios to it.",
              "- Rows: `peft-lora-r*` is HF PEFT LoRA and `lora-r*` ours, on all linear layers of the attention and "
              "MLP; `*-qkvud` rows are on q, k, v, up, down (G²R² and PiLoRA's own targets, so their LoRA "
              "baselines use the same modules); alpha = 2r, dropout 0.05 everywhere; `spsft-r128` tunes 128 rows "
              "per matrix (paired with LoRA r = 64, SPSFT Table 6); `taso-r8` has r = 8, p = 1/8.", ""]
    gpu_g = groups.get(("main", "cuda"), {"rows": {}, "runs": []})
    gpu_rows = gpu_g["rows"]
    gpu_name = ", ".join(dict.fromkeys(m["device_name"] for m in gpu_g["runs"])) or "H100"
    for (suite, device), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "main", kv[0][1] != "cuda")):
        if suite != "main":
            continue
        epoch = g["runs"][-1]["settings"].get("epoch_examples", 52002)
        lines += [f"## Targets ({device.upper()})", ""]
        if device == "cpu":
            lines += ["CPU results on a small shape are a proxy: the memory ratios use the CPU allocator peak "
                      "above (and the saved-for-backward bytes), the time ratios are CPU times on shared cores "
                      "(noisy, see the load average). The targets are about a GPU at 7B shape"
                      + ("; the GPU column stays *not measured* until the GPU suite is run." if not gpu_rows else
                         f": the GPU column is the {gpu_name} run's (section *Targets (CUDA)*), *not measured* where "
                         "a row was not run there."), ""]
        gpu_cfg = configs(gpu_rows)[0] if gpu_rows else None
        gpu_t = {t[0]: t[2] for t in targets(gpu_rows, *gpu_cfg, "cuda", epoch)} if gpu_cfg else {}
        for model, seq in configs(g["rows"]):
            body = []
            for (label, what, res, _) in targets(g["rows"], model, seq, device, epoch):
                gpu = "" if device == "cuda" else (
                    "not measured (no GPU)" if not gpu_cfg else
                    verdict(gpu_t[label], "cuda") if label in gpu_t else "n/a (a CPU proxy)")
                body.append([label, what, verdict(res, device)] + ([] if device == "cuda" else [gpu]))
            dev = f"CUDA ({gpu_name})" if device == "cuda" else device.upper()
            head = ["target", "measured as", f"{dev} · {model}, seq {seq}"]
            gpu_head = (f"GPU ({gpu_name}, {gpu_cfg[0]}, seq {gpu_cfg[1]})" if gpu_cfg
                        else "GPU (H100, 7B shape, seq 2048)")
            lines += table(head + ([] if device == "cuda" else [gpu_head]), body) + [""]
        lines += [f"## Main suite ({device.upper()})", ""] + run_meta(g["runs"])
        lines += main_tables(g["rows"], device, epoch)
        if png_dir:
            for model, seq in configs(g["rows"]):
                name = f"efficiency-{device}-{model}-{seq}.png"
                if plot(g["rows"], model, seq, os.path.join(png_dir, name)):
                    rel = os.path.relpath(os.path.join(png_dir, name), md_dir)
                    lines += ["", f"![aux memory and step time per row, {model} seq {seq}]({rel})"]
        lines += [""]
    lines += train_check_section(checks, status)
    for (suite, device), g in sorted(groups.items()):
        if suite == "sweep":
            lines += [f"## Scaling sweep ({device.upper()})", ""] + run_meta(g["runs"]) + sweep_tables(g["rows"]) + [""]
    if not any(s == "sweep" for s, _ in groups):
        lines += ["## Scaling sweep", "", "Not run yet (on CPU or GPU).", ""]
    lines += ["## Notes", "", BEGIN, notes.strip("\n"), END, ""]
    return "\n".join(lines)


def stamp(check):
    """The date-time stamp bench/gpu_check.sh puts in its files' names (yyyymmdd-hhmmss), or ""."""
    m = re.search(r"(\d{8}-\d{6})", check.get("file", "") or check.get("stamp", ""))
    return m[1] if m else ""


def train_check_section(checks, status=()):
    """bench/gpu_train_check.py's JSONs (train.py, every method, bf16 + checkpointing, --resume vs the
    uninterrupted run) as one table, the newest run of each method winning; bench/gpu_check.sh's part statuses."""
    if not checks and not status:
        return []
    lines = ["## Training check on the GPU (`bench/gpu_train_check.py`)", "",
             "train.py's own `main()` per method on tiny-llama: N steps uninterrupted, the same run stopped after "
             "its checkpoint at N/2 and resumed with `--resume`, and the uninterrupted run once more (the device's "
             "run-to-run floor). **resume exact**: the resumed run's losses and every trainable tensor equal the "
             "uninterrupted run's bit for bit (otherwise: within the floor or not); Δ columns are the largest "
             "absolute differences (resumed / again vs uninterrupted). dtypes: frozen weights / trainable tensors / "
             "rotary `inv_freq`. Step time and peak memory are the uninterrupted run's summary.", ""]
    for st in sorted(status, key=stamp):
        rc = lambda p: ("ok" if p["rc"] == 0 else "TIMED OUT" if p["rc"] in (124, 137)  # noqa: E731
                        else f"exit {p['rc']}")
        parts = ", ".join(f"{p['part']} {rc(p)} ({p['s']} s)" for p in st.get("parts", []))
        lines.append(f"- `{st['file']}` — `bench/gpu_check.sh` at {st.get('model', '?')}, seq "
                     f"{st.get('seq_len', '?')}: "
                     f"{parts}; {st.get('total_s', '?')} s in all.")
    latest = {}
    for c in sorted(checks, key=stamp):
        lines.append(f"- `{c['file']}` — {c.get('device_name', c.get('device', '?'))}; torch {c.get('torch', '?')}, "
                     f"transformers {c.get('transformers', '?')}; {c.get('model', '?')}, {c.get('dtype', '?')}, "
                     f"{c.get('steps', '?')} steps; wall {c.get('wall_s', 0):.0f} s; every method ran and resumed "
                     f"within the floor: {'yes' if c.get('all_ok') else 'no'}")
        for m in c.get("methods", []):
            latest[m["method"]] = (stamp(c), m)
    lines.append("")
    if not latest:
        return lines
    head = ["method", "run", "resume exact", "Δ loss resumed / again", "Δ tensor resumed / again",
            "dtypes", "trainable start → end", "step ms", "peak MiB"]
    body = []
    for name, (when, m) in latest.items():
        if "error" in m:
            body.append([f"`{name}`", when, f"**error**: {m['error']}".replace("|", "\\|")] + [""] * (len(head) - 3))
            continue
        exact = "yes" if m.get("resume_exact") else "no, within the floor" if m.get("resume_ok") else "**no**"
        d = m.get("dtypes", {})
        dt = " / ".join(",".join(d.get(k, [])) or "?" for k in ("frozen", "trainable", "inv_freq"))
        g = lambda k: "–" if m.get(k) is None else f"{m[k]:.3g}"  # noqa: E731
        body.append([f"`{name}`" + (f" `{' '.join(m['flags'])}`" if m.get("flags") else ""), when, exact,
                     f"{g('resume_loss_diff')} / {g('again_loss_diff')}",
                     f"{g('resume_tensor_diff')} / {g('again_tensor_diff')}",
                     dt + ("" if m.get("dtypes_ok", True) else " **(not bf16 / fp32 / fp32)**"),
                     f"{count(m.get('trainable_params_start'))} → {count(m.get('trainable_params_end'))}",
                     ms(m.get("step_time_s")), mib(m.get("peak_memory_bytes"))])
    return lines + table(head, body) + [""]


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
        gpu_json = lambda prefix: [json.load(open(p)) | {"file": os.path.basename(p)} for p in paths  # noqa: E731
                                   if os.path.basename(p).startswith(prefix)]
        md = render(load(eff), a.png_dir or None, kept_notes(a.out), os.path.dirname(os.path.abspath(a.out)),
                    checks=gpu_json("gpu-train-check-"), status=gpu_json("gpu-check-status-"))
        md = with_memory(md, [p for p in paths if os.path.basename(p).startswith(("memory-", "cut-cost-", "count-",
                                                                                     "pairs-"))],
                         load(eff))
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
