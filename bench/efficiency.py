"""Measure each method's efficiency claim against HF PEFT LoRA and our own LoRA, side by side (issue 7).

    python bench/efficiency.py --model llama-7b-shape --seq_len 2048 --micro_batch_size 1 --grad_ckpt both  # H100
    python bench/efficiency.py --suite sweep --model llama-h1024-l8 llama-h2048-l8 llama-h4096-l8 \
        --seq_len 512 1024 2048 4096 --grad_ckpt on                                                    # GPU sweep
    python bench/efficiency.py --model llama-small-shape --seq_len 256 --grad_ckpt both                  # CPU suite
    python bench/report.py                          # bench/results/*.json -> BENCHMARKS.md (+ bench/efficiency.png)
    python bench/efficiency.py pairs --model llama-7b-shape --seq_len 2048 --out out/gpu/pairs.json  # issue 31, GPU

`pairs` (bench/gpu_check.sh; docs/gpu-check.md) times each pair of PAIRS with both rows resident at once (their
models share the frozen weights), in interleaved blocks (A B A B …), with CUDA events, the same loss
(train.causal_loss) in both rows; the ratio of medians gets a bootstrap 95 % interval (met only when the interval
clears the target) and MFU comes from bench/count.py's counted FLOP. The main suite below times rows one after
another, each with its own loss (HF's for PEFT), MFU from 4·N·T: kept for the runs already recorded.

Every row builds a fresh model (same seed, so the same base weights), attaches one method and drives it
through its Method hooks exactly as train.py's loop does (attach under the autocast ctx -> to_fp32 ->
AdamW from train.build_optimizer -> per step: lr from train.get_lr, forward + backward, after_backward,
clip, opt.step, after_step (rebuild the optimizer when it returns True), zero_grad), on one fixed
synthetic batch of random token ids with labels = inputs. So the code measured is the code that trains.
Stage rows first run untimed steps until the method reaches the stage (G²R² refinement after pruning
to p_f, PiLoRA stage 2), then time --warmup_steps + --steps more.

Per row: trainable parameters (train.count_params at measurement time); peak memory; model-only memory
(G²R² App. D.1: the peak of a forward of the same batch without grads, on the base model before any
adapter); aux = peak - model; median (and mean) step time; tokens/s; MFU = 4·N_params·tokens/s over the
device's dense bf16 peak (forward + activation backward; checkpointing's recompute not counted).
Memory on CUDA is torch.cuda.max_memory_allocated. On CPU there is no allocator counter, so peak = bytes
of the tensors alive when the step starts (parameters, buffers, optimizer state, batch) + the highest
running sum of the CPU allocator's allocations minus frees during one extra profiled step
(torch.profiler memory events); model-only likewise for the no-grad forward. CPU rows also report the
bytes of the tensors autograd saves for backward (saved_tensors_hooks, parameters excluded): an
activation-memory proxy, taken without checkpointing only (checkpointed layers save through their own
hooks, so that count would miss them).

Every row starts from a clean allocator (gc.collect, empty_cache, reset_peak_memory_stats) and runs within
--row_timeout seconds; one that fails (out of memory, a timeout, any exception) is recorded with its error and
the suite goes on (bench/gpu_check.sh relies on it). On CUDA, `allocated_after_bytes` is what a row left
allocated once freed: a few MiB at most (cuBLAS workspaces) unless something still holds its tensors.

peft is imported only here, for the baseline row; a missing peft skips the PEFT rows.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import g2r2  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

QKVUD = g2r2.TARGETS["llama"]  # G²R² Table 9 / PiLoRA Table 5 targets: q, k, v, up, down
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM

# name -> (method, r, targets or None = architecture defaults, extra train.py flags, stage, baseline row)
# Rank-matched pairs (issue 7): LoRA r=64 vs SPSFT 128 rows (SPSFT Table 6), LoRA r=32 vs PiLoRA r=32 / r'=2
# (on PiLoRA's and G²R²'s own targets), LoRA r=1 and r=8 vs TASO r=8 p=1/8.
ROWS = {
    "peft-lora-r8": ("peft", 8, None, [], None, None),
    "lora-r8": ("lora", 8, None, [], None, "peft-lora-r8"),
    "lora-r1": ("lora", 1, None, [], None, None),
    "taso-r8": ("taso", 8, None, [], None, "lora-r1"),
    "peft-lora-r64": ("peft", 64, None, [], None, None),
    "lora-r64": ("lora", 64, None, [], None, "peft-lora-r64"),
    "spsft-r128": ("spsft", 8, None, ["--spsft_rows", "128"], None, "peft-lora-r64"),
    "spsft-r128-taylor": ("spsft", 8, None, ["--spsft_rows", "128", "--spsft_importance", "taylor"], None,
                          "peft-lora-r64"),
    # the two importance passes scored in 4 runs of layers (--*_score_groups 4): 1/4 of the fp32 sums
    "taso-r8-g4": ("taso", 8, None, ["--taso_score_groups", "4"], None, "lora-r1"),
    "spsft-r128-taylor-g4": ("spsft", 8, None, ["--spsft_rows", "128", "--spsft_importance", "taylor",
                                                "--spsft_score_groups", "4"], None, "peft-lora-r64"),
    "lora-r8-qkvud": ("lora", 8, QKVUD, [], None, None),
    "g2r2-warmup": ("g2r2", 8, None, [], "warmup", "lora-r8-qkvud"),
    "g2r2-warmup-paper": ("g2r2", 8, None, ["--g2r2_score", "paper"], "warmup", "lora-r8-qkvud"),
    "g2r2-refine": ("g2r2", 8, None, ["--g2r2_pf", "0.2"], "refine", "lora-r8-qkvud"),
    "lora-r32-qkvud": ("lora", 32, QKVUD, [], None, None),
    "pilora-s1-K1": ("pilora", 32, None, ["--pilora_interval", "1"], "stage1", "lora-r32-qkvud"),
    "pilora-s1-K10": ("pilora", 32, None, ["--pilora_interval", "10"], "stage1", "lora-r32-qkvud"),
    "pilora-s2": ("pilora", 32, None, ["--pilora_r_supp", "2", "--pilora_interval", "1"], "stage2",
                  "lora-r32-qkvud"),  # hits from every untimed stage-1 step
}
SWEEP_ROWS = ["peft-lora-r8", "lora-r8", "lora-r1", "taso-r8", "peft-lora-r64", "spsft-r128", "lora-r8-qkvud",
              "g2r2-refine", "lora-r32-qkvud", "pilora-s2"]


def llama_shape(hidden, layers, vocab=32000, inter=None, heads=None):
    """LlamaConfig kwargs; intermediate size by Llama's rule (2·4h/3 rounded up to 256: 4096 -> 11008)."""
    inter = inter or 256 * math.ceil(int(8 * hidden / 3) / 256)
    heads = heads or max(1, hidden // (128 if hidden >= 2048 else 64))
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=8192)


# random-init shapes: speed and memory do not need trained weights. llama-h{H}-l{L}[-v{V}] builds any width.
SHAPES = {"llama-7b-shape": llama_shape(4096, 32, 32000, 11008, 32),          # Llama-2-7B
          "llama-small-shape": llama_shape(512, 4, 4096)}                     # CPU suite: the adapted
# layers dominate the FLOPs as at 7B (a 32000 vocabulary would make the frozen lm_head most of a small model)


# ------------------------------------------------------------------------------------------- models

def build_model(name, device, dtype, seed):
    """A causal LM: a tiny alias (models.TINY), a shape name (random init, built on the device) or a hub id / path."""
    import transformers as tf
    torch.manual_seed(seed)
    m = re.fullmatch(r"llama-h(\d+)-l(\d+)(?:-v(\d+))?", name)
    if name in models.TINY:
        model = models.build_tiny(name, seed=seed)
    elif name in SHAPES or m:
        kw = SHAPES[name] if name in SHAPES else llama_shape(int(m[1]), int(m[2]), int(m[3] or 32000))
        with torch.device(device):
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**kw)).to(dtype)
    else:
        model = tf.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model.to(device=device, dtype=dtype)


class PeftLoRA(common.Method):
    """HF PEFT's LoRA with our LoRA's targets, r, alpha and dropout: the library users would otherwise pick."""

    def __init__(self, r=8, alpha=16.0, dropout=0.05, targets=None, **unused):
        self.r, self.alpha, self.dropout, self.targets = r, alpha, dropout, targets

    def attach(self, model, batches=(), state=None):
        from peft import LoraConfig, get_peft_model
        targets = self.targets or common.DEFAULT_TARGETS[model.config.model_type]
        cfg = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(targets),
                         bias="none")
        self.model = get_peft_model(model, cfg)  # injects into `model` in place; users call the PeftModel
        return self.model


def have_peft():
    try:
        import peft  # noqa: F401
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------------------- the training step

class Loop:
    """train.py's loop body on one fixed batch, one micro-batch per optimizer step."""

    def __init__(self, model, method, args, batch, ctx, total):
        self.model, self.method, self.args, self.batch, self.ctx, self.total = model, method, args, batch, ctx, total
        self.n_items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()), device=batch["labels"].device)
        self.opt = train.build_optimizer(model, method, args)
        self.t = 0
        self.foreach = None  # clip_grad_norm_'s (train.py's default); bench/count.py sets True, as on CUDA
        self.hf_loss = isinstance(method, PeftLoRA)  # the PEFT rows' loss; a timed pair sets False for both rows

    def loss(self):
        """train.py's causal loss; the PEFT rows keep HF's (what PEFT users run)."""
        if self.hf_loss:
            return self.model(**self.batch, num_items_in_batch=self.n_items).loss
        return train.causal_loss(self.model, self.batch, self.n_items)

    def step(self, hooks=None):
        method, args, t = self.method, self.args, self.t
        lr = train.get_lr(t - method.schedule_start, self.total - method.schedule_start, args)
        for g in self.opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with self.ctx, hooks or nullcontext():
            loss = self.loss()
        loss.backward()
        loss = float(loss.detach())  # train.py reads the loss every micro-batch (a sync on CUDA)
        method.after_backward(t)
        if args.clip:
            nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], args.clip,
                                     foreach=self.foreach)
        self.opt.step()
        if method.after_step(t):
            self.opt = train.build_optimizer(self.model, method, args, old=self.opt)
        self.opt.zero_grad(set_to_none=True)
        self.t += 1
        return loss


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------------------- memory

def tensor_bytes(tensors):
    """Bytes of the distinct storages behind `tensors`."""
    seen = {}
    for t in tensors:
        if torch.is_tensor(t) and t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def live_bytes(model, opt=None, batch=None):
    """Parameters, their gradients, buffers, optimizer state and the batch: what is allocated between steps."""
    ts = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None] + list(model.buffers())
    if opt is not None:
        ts += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return tensor_bytes(ts + list((batch or {}).values()))


def cpu_peak_delta(fn):
    """(highest running sum of CPU allocations minus frees during fn(), fn's result), from torch.profiler's
    memory events: the CPU counterpart of max_memory_allocated - memory_allocated."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak, out


def saved_tensor_hooks(model, sink, skip=()):
    """saved_tensors_hooks that add up (in sink) the distinct storages autograd saves, parameters (and the
    tensors in `skip`) excluded."""
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *skip]}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() not in sink:
            sink[s.data_ptr()] = s.nbytes()
        return t
    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def model_only_bytes(model, batch, ctx, device):
    """G²R² App. D.1: peak memory of a forward of the batch without grads (the inference footprint)."""
    def fwd():
        with torch.no_grad(), ctx:
            return model(**batch).loss.item()
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        fwd()
        return torch.cuda.max_memory_allocated()
    return live_bytes(model, batch=batch) + cpu_peak_delta(fwd)[0]


# ------------------------------------------------------------------------------------------- a row

def method_args(kind, r, targets, extra, mbs, dtype, seed, calib):
    argv = ["--method", "lora" if kind == "peft" else kind, "--r", str(r), "--alpha", str(2 * r),
            "--batch_size", str(mbs), "--micro_batch_size", str(mbs), "--dtype", dtype, "--seed", str(seed)]
    argv += ["--targets", *targets] if targets else []
    if calib:
        argv += ["--taso_calib_batches", str(calib), "--spsft_calib_batches", str(calib)]
    return train.parse_args(argv + extra)


def stage_flags(kind, stage, pre, total):
    """Stage lengths (in steps) so that the timed steps fall in `stage`."""
    if kind == "g2r2":  # warmup: the whole run; refine: T_w = 1, T_p = 2, then refinement
        return ["--g2r2_warmup", str(total - 2), "--g2r2_prune", "1"] if stage == "warmup" else \
               ["--g2r2_warmup", "1", "--g2r2_prune", "2"]
    if kind == "pilora":
        return ["--pilora_phase", str(total - 1 if stage == "stage1" else pre)]
    return []


def row_method(name, mbs, dtype_name, seed, calib, steps):
    """(train.py args, the row's Method, steps before its stage, total steps) for a row measured over
    `steps` optimizer steps (warm-up included): its flags, stage lengths that put those steps in its
    stage, PEFT's LoRA or ours. Shared by this suite, bench/memory.py and bench/cut_cost.py."""
    kind, r, targets, extra, stage, _ = ROWS[name]
    pre = 3 if stage in ("refine", "stage2") else 0
    total = pre + 2 * steps + 40  # the schedule never ends inside the measurement
    args = method_args(kind, r, targets, extra + stage_flags(kind, stage, pre, total), mbs, dtype_name, seed, calib)
    method = PeftLoRA(**vars(args)) if kind == "peft" else train.build_method(args, "causal", total, total)
    method.heads = list(train.HEADS)  # bench/memory.py's image rows train their head (a causal LM has none)
    return args, method, pre, total


def run_row(name, model_name, seq, mbs, ckpt, opts, device, dtype_name):
    kind, r, targets, extra, stage, pair = ROWS[name]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    ctx = torch.autocast(device, dtype=dtype) if dtype_name == "bf16" else nullcontext()
    args, method, pre, total = row_method(name, mbs, dtype_name, opts.seed, opts.calib_batches,
                                          opts.warmup_steps + opts.steps)

    model = build_model(model_name, device, dtype if device == "cuda" else torch.float32, opts.seed)
    model.config.use_cache = False
    if ckpt:
        models.enable_checkpointing(model)
    fits = min(min(model.get_submodule(n).weight.shape) for n in common.find_targets(model, targets))
    if r > fits:  # PEFT would accept it; our layers refuse: skip both alike
        return {"row": name, "method": kind, "model": model_name, "seq_len": seq, "grad_ckpt": ckpt,
                "error": f"r={r} does not fit this model's smallest target ({fits} features)"}
    g = torch.Generator().manual_seed(opts.seed)
    ids = torch.randint(0, model.config.vocab_size, (mbs, seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    total_params = train.count_params(model)[1]
    model_bytes = model_only_bytes(model, batch, ctx, device)

    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    calib = (dict(batch) for _ in iter(int, 1))  # the importance passes see the same batch, as often as they ask
    attach_s, out = timed(lambda: _attach(method, model, calib, ctx), device)
    model = out or model
    attach_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    train.to_fp32(model)
    loop = Loop(model, method, args, batch, ctx, total)
    while loop.t < pre or (stage and getattr(method, "stage", stage) != stage):
        if loop.t > pre + 10:
            raise RuntimeError(f"{name}: never reached stage {stage!r} (at {method.stage!r})")
        loop.step()
    for _ in range(opts.warmup_steps):
        loop.step()
    # a method that scores every K steps (PiLoRA stage 1) is timed over whole periods from a scoring step,
    # so the mean is its amortised step and the median its plain step
    period = args.pilora_interval if (kind, stage) == ("pilora", "stage1") else 1
    while loop.t % period:
        loop.step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(loop.step, device)[0] for _ in range(period * math.ceil(opts.steps / period))]
    saved = {}
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:  # one more, profiled step (untimed); saved-for-backward bytes only without checkpointing
        start = live_bytes(model, loop.opt, batch)
        delta, _ = cpu_peak_delta(lambda: loop.step(None if ckpt else saved_tensor_hooks(model, saved)))
        peak = start + delta
    row = {"row": name, "method": kind, "stage": stage, "r": r, "pair": pair, "targets": targets or "default",
           "flags": extra, "model": model_name, "seq_len": seq, "micro_batch_size": mbs, "grad_ckpt": ckpt,
           "dtype": dtype_name, "device": device, "total_params": total_params,
           "trainable_params": train.count_params(model)[0], "peak_bytes": peak, "model_bytes": model_bytes,
           "aux_bytes": peak - model_bytes, "saved_bytes": None if ckpt or device == "cuda" else sum(saved.values()),
           "attach_s": attach_s, "attach_peak_bytes": attach_peak, "step_times_s": times,
           "step_time_median_s": statistics.median(times), "step_time_mean_s": statistics.fmean(times),
           "method_stage": getattr(method, "stage", None)}
    row["tokens_per_s"] = mbs * seq / row["step_time_median_s"]
    peak_flops = opts.peak_tflops * 1e12 if opts.peak_tflops else device_peak_flops(device)
    row["mfu"] = 4 * total_params * row["tokens_per_s"] / peak_flops if peak_flops else None
    row.update(method_fields(method, kind))
    if opts.profile:
        row["profile_top"] = profile_step(loop, opts.profile)
    del loop, model, method, batch
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _attach(method, model, batches, ctx):
    with ctx:
        return method.attach(model, batches)


def method_fields(method, kind):
    """The importance-pass time and the method's own structure numbers, from its summary()."""
    if kind == "peft":
        return {}
    s = method.summary()
    keep = ("importance_time_s", "calib_batches", "adapted_modules", "modules", "retained_modules", "adapter_params_start",
            "adapter_params_end", "dominant_fraction", "param_ratio", "lora_params", "pilora_params",
            "taso_params", "lora_r1_params", "spsft_params", "lora_params_matched", "r_supp", "scorings",
            "importance_buffer_bytes")
    out = {k: s[k] for k in keep if k in s}
    if "retained_modules" in out:
        out["retained_modules"] = len(out["retained_modules"])
    if kind == "spsft":
        out["calib_batches"] = 0 if method.importance == "l2" else method.calib_batches
    return out


def profile_step(loop, n):
    """The n ops with the most self time in one step (torch.profiler), for explaining a missed target."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        loop.step()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    avg = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]
    return [[e.key, round(getattr(e, key) / 1e3, 3), e.count] for e in avg]


def device_peak_flops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for k, tf in PEAK_BF16_TFLOPS.items() if k in name), None)


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"CPU: {model}, {torch.get_num_threads()} thread(s), {os.cpu_count()} cores on the machine"


# --------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["llama-small-shape"],
                   help="hub id / path, tiny-llama, llama-7b-shape, llama-small-shape, llama-h{H}-l{L}[-v{V}]")
    p.add_argument("--seq_len", type=int, nargs="+", default=[256])
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--suite", choices=["main", "sweep"], default="main", help="default rows and report section")
    p.add_argument("--rows", nargs="+", help=f"rows to run (default: all for main, {' '.join(SWEEP_ROWS)} for "
                   f"sweep); one of: {' '.join(ROWS)}")
    p.add_argument("--grad_ckpt", choices=["off", "on", "both"], default="both")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--calib_batches", type=int, help="batches of the TASO / SPSFT-taylor importance passes "
                   "(default: each method's own, 64 / 8)")
    p.add_argument("--epoch_examples", type=int, default=52002,
                   help="examples in one epoch, for TASO's importance-pass / epoch ratio (Alpaca: 52002)")
    p.add_argument("--peak_tflops", type=float, help="device dense bf16 peak for MFU (default: H100/H200 989)")
    p.add_argument("--profile", type=int, default=0, help="also record the top-N ops of one profiled step")
    p.add_argument("--row_timeout", type=float, default=0, help="seconds per row before it is recorded as "
                   "timed out and the suite goes on (0: no limit)")
    p.add_argument("--deadline_s", type=float, default=0, help="start no row after this many seconds of the "
                   "suite (the rest are recorded as skipped; 0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default bench/results/<suite>-<model>-<device>-<time>.json)")
    args = p.parse_args(argv)
    args.rows = args.rows or (list(ROWS) if args.suite == "main" else SWEEP_ROWS)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {' '.join(ROWS)}")
    for flag in ("steps", "micro_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = opts.rows
    if not have_peft() and any(ROWS[r][0] == "peft" for r in rows):
        print("peft is not installed (pip install -r bench/requirements.txt): skipping the PEFT rows")
        rows = [r for r in rows if ROWS[r][0] != "peft"]
    import transformers
    result = {"suite": opts.suite, "device": device, "device_name": device_name(device),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": __import__("peft").__version__ if have_peft() else None, "python": platform.python_version(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": "python bench/efficiency.py " + shlex.join(argv), "load_avg": os.getloadavg(),
              "settings": {k: v for k, v in vars(opts).items() if k not in ("out",)}, "rows": []}
    modes = {"off": [False], "on": [True], "both": [False, True]}[opts.grad_ckpt]
    t0 = time.time()
    path = opts.out or os.path.join(ROOT, "bench", "results", f"{opts.suite}-{'+'.join(opts.model)}-{device}-"
                                    f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for model_name in opts.model:
        for seq in opts.seq_len:
            for ckpt in modes:
                for name in rows:
                    if opts.deadline_s and time.time() - t0 > opts.deadline_s:
                        row = {"row": name, "method": ROWS[name][0], "model": model_name, "seq_len": seq,
                               "grad_ckpt": ckpt, "error": f"skipped: the suite's {opts.deadline_s:.0f} s are spent"}
                    else:
                        row = guarded_row(name, model_name, seq, ckpt, opts, device)
                    result["rows"].append(row)
                    print(format_row(row), flush=True)
                    result["wall_s"] = time.time() - t0
                    write_json(result, path)  # after every row: a run cut short keeps what it measured
    print(f"wrote {path} ({time.time() - t0:.0f} s)")
    result["path"] = path
    return result


class RowTimeout(Exception):
    pass


def clean_allocator(device):
    """Free what earlier rows left (cycles included) and start the peak counter here."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def guarded_row(name, model_name, seq, ckpt, opts, device):
    """run_row from a clean allocator, within --row_timeout seconds (SIGALRM, checked between Python ops);
    any failure (out of memory, a timeout, a bug) becomes the row's "error" and the suite goes on. The
    exception is dropped before cleaning up: its traceback holds the row's frame, and so its model."""
    clean_allocator(device)
    error = None
    alarm = opts.row_timeout and hasattr(signal, "SIGALRM")
    if alarm:
        def expire(signum, frame):
            raise RowTimeout(f"timed out after {opts.row_timeout:.0f} s")
        old = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, opts.row_timeout)
    t = time.time()
    try:
        row = run_row(name, model_name, seq, opts.micro_batch_size, ckpt, opts, device, opts.dtype)
    except Exception as e:  # noqa: BLE001 (recorded, not hidden: the row says what failed and where)
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        where = "" if oom or isinstance(e, RowTimeout) else " at " + " <- ".join(
            f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(traceback.extract_tb(e.__traceback__)[-3:]))
        error = "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"
        del e
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    if error is not None:
        row = {"row": name, "method": ROWS[name][0], "model": model_name, "seq_len": seq, "grad_ckpt": ckpt,
               "error": error}
    row["row_s"] = time.time() - t
    clean_allocator(device)
    if device == "cuda":  # what the row left behind: cuBLAS workspaces, unless something still holds its tensors
        row["allocated_after_bytes"] = torch.cuda.memory_allocated()
    return row


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def format_row(row):
    if "error" in row:
        return f"{row['row']:<20} {row['model']} seq {row['seq_len']} ckpt {row['grad_ckpt']}: {row['error']}"
    return (f"{row['row']:<20} {row['model']} seq {row['seq_len']} ckpt {int(row['grad_ckpt'])}  "
            f"params {row['trainable_params']:>10,}  step {row['step_time_median_s'] * 1e3:8.1f} ms  "
            f"aux {row['aux_bytes'] / 2 ** 20:8.1f} MiB  attach {row['attach_s']:.2f} s")


# ------------------------------------------------------- timed pairs (bench/gpu_check.sh, issue 31)
# (pair, row, baseline row, step-time target: row / baseline at most, memory target or None, modes)
PAIRS = [
    ("lora-r8 vs PEFT", "lora-r8", "peft-lora-r8", 0.90, 1.0, (False, True)),
    ("lora-r64 vs PEFT", "lora-r64", "peft-lora-r64", 0.90, 1.0, (False, True)),
    ("PiLoRA stage 2 vs LoRA r=32", "pilora-s2", "lora-r32-qkvud", 1.05, None, (False, True)),
    ("TASO vs LoRA r=1", "taso-r8", "lora-r1", 1.00, None, (False, True)),
    ("G²R² scoring vs LoRA", "g2r2-warmup", "lora-r8-qkvud", 1.15, None, (False, True)),
    ("G²R² refinement vs LoRA", "g2r2-refine", "lora-r8-qkvud", 0.90, None, (False, True)),
    ("SPSFT vs PEFT LoRA r=64", "spsft-r128", "peft-lora-r64", 1.00, None, (False, True)),
    ("lora-r8 compiled vs eager", "lora-r8+compile", "lora-r8", None, None, (False,)),  # MFU >= 40 % compiled
]
MFU_TARGET = 0.40  # LoRA r = 8 with torch.compile, no checkpointing (issue 31)


def bootstrap_ratio(a_blocks, b_blocks, n=2000, seed=0):
    """median(a) / median(b) over all steps, with a 95 % percentile interval from resampling whole blocks:
    block i of a and block i of b ran next to each other (A B A B …), so they are drawn together, keeping what
    drifted between blocks (clocks, temperature) in both. Returns (ratio, low, high)."""
    import random
    flat = lambda blocks, idx: [t for i in idx for t in blocks[i]]  # noqa: E731
    k = len(a_blocks)
    point = statistics.median(flat(a_blocks, range(k))) / statistics.median(flat(b_blocks, range(k)))
    rng = random.Random(seed)
    rs = []
    for _ in range(n):
        idx = [rng.randrange(k) for _ in range(k)]
        rs.append(statistics.median(flat(a_blocks, idx)) / statistics.median(flat(b_blocks, idx)))
    rs.sort()
    return point, rs[int(0.025 * n)], rs[int(0.975 * n) - 1]


def against(target, low, high, at_most=True):
    """met only when the whole interval clears the target; missed when the whole interval is past it."""
    if target is None:
        return None
    if at_most:
        return "met" if high <= target else "missed" if low > target else "not resolved"
    return "met" if low >= target else "missed" if high < target else "not resolved"


def twin(base):
    """A copy of `base` sharing its frozen tensors (parameters and buffers): a pair's two models hold the
    weights once; each method replaces modules of its own copy only."""
    import copy
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def compile_layers(model):
    """train.py's --compile (each decoder layer), or the layers' own .compile() where train.py has none."""
    if hasattr(train, "compile_model"):
        return train.compile_model(model)
    for layer in model.get_decoder().layers:
        layer.compile()


def own_bytes(model, opt, shared):
    """Parameters, gradients, buffers and optimizer state of one model of a pair, the shared frozen ones left out."""
    skip = {t.untyped_storage().data_ptr() for t in shared}
    ts = [t for t in [*model.parameters(), *model.buffers()] if t.untyped_storage().data_ptr() not in skip]
    ts += [p.grad for p in model.parameters() if p.grad is not None]
    ts += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return tensor_bytes(ts)


def pair_loop(name, base, batch, seq, ckpt, opts, device):
    """A row's loop on a twin of `base`, brought to its stage and warmed up: the same hooks and loop as the
    suite (row_method, Loop), the same loss for every row (train.causal_loss, PEFT's rows included)."""
    compiled = name.endswith("+compile")
    row = name[:-len("+compile")] if compiled else name
    kind, r, targets, extra, stage, _ = ROWS[row]
    ctx = torch.autocast(device, dtype=torch.bfloat16) if opts.dtype == "bf16" else nullcontext()
    args, method, pre, total = row_method(row, opts.micro_batch_size, opts.dtype, opts.seed, opts.calib_batches,
                                          opts.warmup_steps + opts.steps + 2)
    model = twin(base)
    if ckpt:
        models.enable_checkpointing(model)
    calib = (dict(batch) for _ in iter(int, 1))
    model = _attach(method, model, calib, ctx) or model
    train.to_fp32(model)
    if compiled:
        compile_layers(model)
    loop = Loop(model, method, args, batch, ctx, total)
    loop.hf_loss = False
    while loop.t < pre or (stage and getattr(method, "stage", stage) != stage):
        if loop.t > pre + 10:
            raise RuntimeError(f"{row}: never reached stage {stage!r} (at {method.stage!r})")
        loop.step()
    t0 = time.time()
    for _ in range(opts.warmup_steps):
        loop.step()
    loop.warmup_s = time.time() - t0
    loop.trainable = train.count_params(model)[0]
    return loop


def timed_steps(loop, n, device):
    """Seconds of each of n steps: CUDA events around each step (read after the block), perf_counter on CPU;
    on CUDA also the block's peak allocation above what was allocated at its start."""
    if device != "cuda":
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            loop.step()
            out.append(time.perf_counter() - t0)
        return out, None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in evs:
        a.record()
        loop.step()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in evs], torch.cuda.max_memory_allocated() - start


def counted_flop(row, model_name, seq, ckpt, mbs, counts):
    """FLOP of one step of `row` (bench/count.py): from a committed count JSON when it has the row, else
    counted now on fake tensors (seconds at a small shape, minutes at 7B shape); None if that fails."""
    for c in counts:
        if (c.get("model"), c.get("seq_len"), c.get("micro_batch_size", 1)) == (model_name, seq, mbs):
            for r in c["rows"]:
                if r.get("row") == row and bool(r.get("grad_ckpt")) == ckpt and "flop" in r:
                    return r["flop"], c.get("file")
    try:
        import count
        r = count.count_row(row, model_name, seq, mbs, ckpt)
        return (r["flop"], "counted now") if "flop" in r else (None, r.get("error"))
    except Exception as e:  # noqa: BLE001 (MFU is then not given; the timing stands)
        return None, f"{type(e).__name__}: {e}"


def run_pair(pair, base, batch, seq, ckpt, opts, device, counts):
    label, a_name, b_name, target, mem_target, _ = pair
    out = {"pair": label, "row": a_name, "baseline": b_name, "grad_ckpt": ckpt, "target": target,
           "memory_target": mem_target, "model": opts.model, "seq_len": seq, "block": opts.block}
    t0 = time.time()
    loops = [pair_loop(n, base, batch, seq, ckpt, opts, device) for n in (a_name, b_name)]
    out["setup_s"] = time.time() - t0
    blocks, peaks = ([], []), ([], [])
    for _ in range(math.ceil(opts.steps / opts.block)):
        for i, loop in enumerate(loops):  # A B A B …
            times, peak = timed_steps(loop, opts.block, device)
            blocks[i].append(times)
            peaks[i].append(peak)
    shared = [*base.parameters(), *base.buffers()]
    peak_flops = opts.peak_tflops * 1e12 if opts.peak_tflops else device_peak_flops(device)
    for key, name, loop, bl, pk in (("a", a_name, loops[0], blocks[0], peaks[0]),
                                    ("b", b_name, loops[1], blocks[1], peaks[1])):
        flat = [t for b in bl for t in b]
        med = statistics.median(flat)
        flop, src = counted_flop(name.split("+")[0], opts.model, seq, ckpt, opts.micro_batch_size, counts)
        own = own_bytes(loop.model, loop.opt, shared)
        out[key] = {"row": name, "step_times_s": bl, "median_s": med, "steps": len(flat),
                    "warmup_s": loop.warmup_s, "trainable_params": loop.trainable, "flop": flop, "flop_from": src,
                    "mfu": flop / med / peak_flops if flop and peak_flops else None, "own_bytes": own,
                    "step_peak_bytes": max(pk) if pk[0] is not None else None,
                    "memory_bytes": own + max(pk) if pk[0] is not None else None}
    out["ratio"], out["low"], out["high"] = bootstrap_ratio(blocks[0], blocks[1], seed=opts.seed)
    out["verdict"] = against(target, out["low"], out["high"])
    ma, mb = out["a"]["memory_bytes"], out["b"]["memory_bytes"]
    out["memory_ratio"] = ratio_or_none(ma, mb)
    out["memory_verdict"] = None if mem_target is None or out["memory_ratio"] is None else \
        ("met" if out["memory_ratio"] <= mem_target else "missed")
    if a_name.endswith("+compile"):
        m = out["a"]["mfu"]
        out["mfu_target"] = MFU_TARGET
        out["mfu_verdict"] = None if m is None else "met" if m >= MFU_TARGET else "missed"
    out["pair_s"] = time.time() - t0
    del loops
    return out


def ratio_or_none(a, b):
    return None if a is None or not b else a / b


def gpu_clocks():
    """nvidia-smi's clocks, temperature and power now, or None without it."""
    import subprocess
    try:
        q = "clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,clocks_throttle_reasons.active"
        return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions():
    """{package: (installed, pinned in requirements.txt / bench/requirements.txt or None)}."""
    from importlib.metadata import PackageNotFoundError, version
    pins = {}
    for f in ("requirements.txt", os.path.join("bench", "requirements.txt")):
        try:
            for line in open(os.path.join(ROOT, f)):
                m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#]+)", line)
                if m:
                    pins[m[1].lower()] = m[2]
        except OSError:
            pass
    out = {}
    for pkg in ("torch", "transformers", "peft", "datasets"):
        try:
            out[pkg] = [version(pkg), pins.get(pkg)]
        except PackageNotFoundError:
            out[pkg] = [None, pins.get(pkg)]
    return out


def env_report():
    """`python bench/efficiency.py env`: python, the installed versions beside the pinned ones, the GPU, its clocks."""
    import importlib.util
    print("python", platform.python_version(), "|", device_name("cuda" if torch.cuda.is_available() else "cpu"))
    for pkg, (have, pin) in versions().items():
        same = not pin or (have or "").split("+")[0] == pin
        print(f"{pkg:<13} installed {have or 'ABSENT':<16} pinned {pin or '-'}{'' if same else '   << differs'}")
    print("clocks (sm, mem, max sm, temperature, power, throttle):", gpu_clocks() or "nvidia-smi absent")
    if importlib.util.find_spec("pytest") is None:
        print("pytest ABSENT")
    else:
        try:
            import pytest  # noqa: F401
        except ImportError:
            print("pytest ABSENT (does not import)")


def pairs_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/efficiency.py pairs", description="Each compared pair resident at "
                                "once, timed in interleaved blocks, ratio with a bootstrap 95 % interval")
    p.add_argument("--model", default="llama-7b-shape")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--grad_ckpt", choices=["off", "on", "both"], default="both")
    p.add_argument("--pairs", nargs="+", help="rows whose pairs to run (default: every pair)")
    p.add_argument("--compiled", choices=["with", "without", "only"], default="with",
                   help="the torch.compile pair (lora-r8+compile) with the others, without it, or alone")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (after warm-up)")
    p.add_argument("--block", type=int, default=4, help="steps per block: A×block, B×block, A×block, …")
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--calib_batches", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--peak_tflops", type=float, help="dense bf16 peak for MFU (default: H100 / H200 989)")
    p.add_argument("--deadline_s", type=float, default=0, help="start no pair after this many seconds (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON path, rewritten after every pair")
    a = p.parse_args(argv)
    known = {x[1] for x in PAIRS}
    if a.pairs and set(a.pairs) - known:
        p.error(f"unknown pair rows {sorted(set(a.pairs) - known)}; choose from {' '.join(sorted(known))}")
    if a.steps < 1 or a.block < 1:
        p.error("--steps and --block must be >= 1")
    return a


def pairs_main(argv=None):
    """`python bench/efficiency.py pairs ...`: every pair of PAIRS in each checkpointing mode; one base model
    (built once) shared by all of them."""
    opts = pairs_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = [p for p in PAIRS if (not opts.pairs or p[1] in opts.pairs)
             and {"with": True, "without": not p[1].endswith("+compile"), "only": p[1].endswith("+compile")}[opts.compiled]]
    if not have_peft():
        print("peft is not installed: skipping the PEFT pairs")
        pairs = [p for p in pairs if not p[2].startswith("peft")]
    import glob
    counts = []
    for f in sorted(glob.glob(os.path.join(ROOT, "bench", "results", "count-*.json"))):
        with open(f) as fh:
            counts.append(json.load(fh) | {"file": os.path.basename(f)})
    import count
    res = {"check": "pairs", "device": device, "device_name": device_name(device), "versions": versions(),
           "commit": count.commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "python bench/efficiency.py pairs " + shlex.join(argv or sys.argv[2:]),
           "clocks_before": gpu_clocks(), "settings": vars(opts), "pairs": []}
    dtype = torch.bfloat16 if opts.dtype == "bf16" else torch.float32
    t0 = time.time()
    base = build_model(opts.model, device, dtype, opts.seed)
    base.config.use_cache = False
    base.requires_grad_(False)
    g = torch.Generator().manual_seed(opts.seed)
    ids = torch.randint(0, base.config.vocab_size, (opts.micro_batch_size, opts.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    res["build_s"] = time.time() - t0
    modes = {"off": [False], "on": [True], "both": [False, True]}[opts.grad_ckpt]
    for ckpt in modes:
        for pair in pairs:
            if ckpt not in pair[5]:
                continue
            if opts.deadline_s and time.time() - t0 > opts.deadline_s:
                row = {"pair": pair[0], "row": pair[1], "baseline": pair[2], "grad_ckpt": ckpt,
                       "error": f"skipped: the {opts.deadline_s:.0f} s are spent"}
            else:
                clean_allocator(device)
                try:
                    row = run_pair(pair, base, batch, opts.seq_len, ckpt, opts, device, counts)
                except Exception as e:  # noqa: BLE001 (recorded; the next pair runs)
                    oom = isinstance(e, torch.cuda.OutOfMemoryError)
                    row = {"pair": pair[0], "row": pair[1], "baseline": pair[2], "grad_ckpt": ckpt,
                           "error": "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                           + " at " + " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}"
                                                  for f in reversed(traceback.extract_tb(e.__traceback__)[-3:]))}
                    del e
                clean_allocator(device)
            res["pairs"].append(row)
            res["wall_s"] = time.time() - t0
            write_json(res, opts.out)
            print(format_pair(row), flush=True)
    res["clocks_after"] = gpu_clocks()
    write_json(res, opts.out)
    print(f"wrote {opts.out} ({time.time() - t0:.0f} s)")
    return res


def format_pair(r):
    head = f"{r['row']:<16} / {r['baseline']:<15} ckpt {int(bool(r['grad_ckpt']))}"
    if "error" in r:
        return f"{head}: {r['error']}"
    mfu = lambda x: "–" if x["mfu"] is None else f"{100 * x['mfu']:.1f} %"  # noqa: E731
    target = "" if r["target"] is None else f"  target {r['target']:.2f}× {r['verdict']}"
    memory = "" if r["memory_ratio"] is None else f"  memory {r['memory_ratio']:.2f}×"
    return (f"{head}  {r['ratio']:.3f}× [{r['low']:.3f}, {r['high']:.3f}]{target}  {r['a']['median_s'] * 1e3:.1f} / "
            f"{r['b']['median_s'] * 1e3:.1f} ms ({r['a']['steps']} steps each)  MFU {mfu(r['a'])} / {mfu(r['b'])}{memory}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["pairs"]:
        pairs_main(sys.argv[2:])
    elif sys.argv[1:2] == ["env"]:
        env_report()
    else:
        main()
