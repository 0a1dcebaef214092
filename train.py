"""Fine-tune a Hugging Face model with plain LoRA or one of four importance-guided PEFT methods.

    python train.py                                    # offline demo: SmolLM2-135M on the built-in task
    python train.py --method spsft --model meta-llama/Llama-2-7b-hf --data alpaca.json --dtype bf16 --grad_ckpt
    python train.py --method g2r2 --model microsoft/deberta-v3-base --data glue/rte --lr 1e-3 --epochs 20
    python train.py --method pilora --model google/vit-base-patch16-224-in21k --data ./cifar10 --task image
    python train.py --method taso --model tiny-llama --max_steps 20            # smoke run, random init
    python train.py --model out/demo/merged --eval_only --eval_commonsense ../shared/data/commonsense
    torchrun --nproc_per_node 8 train.py --method g2r2 --model meta-llama/Llama-2-7b-hf --data alpaca.json ...

One plain loop (nanoGPT shape): micro-batches accumulate into an optimizer step; the method object
gets the same hooks whatever the method (common.Method): attach, after_backward, after_step,
state_dict, export. Outputs in --output_dir: summary.json, adapter.safetensors + method_state.pt,
ckpt.pt (atomic, for --resume), with --merge a merged save_pretrained model and, with --export peft,
peft/ (adapter_config.json + adapter_model.safetensors: peft.PeftModel.from_pretrained loads it). Bad
input (flags, files, models, checkpoints) stops with one line `error: <what is wrong>; <the fix>` and
exit status 2. SIGTERM, Ctrl-C or SIGUSR1 end the current step, checkpoint and exit with 128 + the
signal; a run never writes into a folder that holds another run (docs/run-safety.md). Under torchrun
(WORLD_SIZE > 1) each process runs its share of every step's micro-batches in DistributedDataParallel;
rank 0 evaluates and writes (README, Multi-GPU).
"""
import argparse
import hashlib
import inspect
import itertools
import json
import math
import os
import pickle
import re
import resource
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import common
from common import UserError
import data
import evaluate
import g2r2
from models import TINY, cast_parameters, enable_checkpointing, load_model, model_errors, resolve
import interop
from interop import no_sync, on_rank0, wrap
import pilora
import plots
import spsft
import taso

METHODS = {"lora": common.LoRA, "g2r2": g2r2.G2R2, "pilora": pilora.PiLoRA, "taso": taso.TASO,
           "spsft": spsft.SPSFT}
SHARED = ("r", "alpha", "dropout", "targets", "seed")  # flags every method's constructor may take by their name
HEADS = ("classifier", "score", "pooler.dense")  # a classification / image task's new head: trained fully

class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A bad flag is a UserError like any other bad input: one line, no usage dump."""
        raise UserError(f"{message}; see python train.py --help")


def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="lora", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--model", default="smollm2-135m", help="hub id, local path, smollm2-135m, minilm-l6, "
                   + ", ".join(TINY))
    p.add_argument("--task", choices=["causal", "cls", "image"], help="default: inferred from the config")
    p.add_argument("--data", default="builtin", help="builtin | instruction .json/.jsonl | glue/<task> | "
                   "GLUE-layout dir or csv/tsv/json | imagefolder dir | hub dataset")
    p.add_argument("--max_samples", type=int, help="use at most this many training examples")
    p.add_argument("--max_len", type=int, default=256)
    # adapter (shared by every method)
    p.add_argument("--targets", nargs="+", help="module-name suffixes to adapt (default: per architecture)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    # optimisation
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=8, help="examples per forward/backward")
    p.add_argument("--max_steps", type=int, help="optimizer steps of the whole run (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.06, help="warmup steps (≥1) or fraction of steps")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--grad_ckpt", action="store_true", help="non-reentrant gradient checkpointing")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer and the loss (default: eager)")
    p.add_argument("--seed", type=int, default=0)
    # evaluation and outputs
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: before/after only)")
    p.add_argument("--eval_limit", type=int, help="evaluate on at most this many examples")
    p.add_argument("--eval_only", action="store_true", help="evaluate --model (with --adapter) and exit")
    p.add_argument("--adapter", help="a run's output_dir whose adapter to load for --eval_only")
    p.add_argument("--eval_commonsense", help="dir of LLM-Adapters test files to evaluate after training")
    p.add_argument("--eval_mode", choices=["generate", "loglik", "both"], default="generate")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--num_beams", type=int, default=1,
                   help="beams for commonsense generation (1: greedy; LLM-Adapters' own script uses 4)")
    p.add_argument("--output_dir", help="default: a new folder out/<method>-<model>-<date>-<time>")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --output_dir")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--save_every_min", type=float, default=30.0,
                   help="also checkpoint when this many minutes passed since the last one (0: off)")
    p.add_argument("--stop_after", type=int, help="stop after N steps as if killed (testing --resume)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/ckpt.pt")
    p.add_argument("--merge", action="store_true", help="also save a merged model in <output_dir>/merged")
    p.add_argument("--export", choices=["peft"], help="also write <output_dir>/peft in PEFT's LoRA format "
                   "(peft.PeftModel.from_pretrained loads it); with --eval_only, the --adapter run's")
    method_flags(p)
    args = p.parse_args(argv)
    if args.method not in METHODS:
        raise UserError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    check_args(args)
    return args


def method_flags(p):
    """--<method>_<keyword>: each reaches that keyword of the method's constructor (method_kwargs)."""
    g = p.add_argument_group("g2r2 (g2r2.G2R2's keywords)")
    g.add_argument("--g2r2_warmup", type=float, default=0.1, help="T_w: steps if >= 1, else fraction of steps")
    g.add_argument("--g2r2_prune", type=float, default=0.1, help="T_p: steps if >= 1, else fraction of steps")
    g.add_argument("--g2r2_p0", type=float, default=1.0, help="initial retention fraction p_0")
    g.add_argument("--g2r2_pf", type=float, default=0.2, help="final retention fraction p_f")
    g.add_argument("--g2r2_beta1", type=float, default=0.85, help="EMA of the redundancy (Eq 8)")
    g.add_argument("--g2r2_beta2", type=float, default=0.95, help="EMA of its uncertainty (Eq 9)")
    g.add_argument("--g2r2_score", choices=g2r2.SCORES, default="exact", help="estimator of dL/dDeltaW")
    g.add_argument("--g2r2_score_every", type=int, default=1, help="score every K optimizer steps")
    g = p.add_argument_group("pilora (pilora.PiLoRA's keywords)")
    g.add_argument("--pilora_interval", type=int, default=10, help="K: score every K optimizer steps in stage 1")
    g.add_argument("--pilora_phase", type=int, default=None,
                   help="stage-1 length in optimizer steps (default: one epoch)")
    g.add_argument("--pilora_stage1_in_epochs", action="store_true",
                   help="take stage 1 out of --epochs instead of running it before them (Alg. 1)")
    g.add_argument("--pilora_tau", type=float, default=0.7, help="dominant rows hold this fraction of all hits")
    g.add_argument("--pilora_partition", choices=pilora.PARTITIONS, default="hits", help="hits, or Table 4's ablations")
    g.add_argument("--pilora_r_supp", type=int, default=None,
                   help="r′ of the supplementary rows (default 2 for causal LMs, 1 otherwise; 0 freezes them)")
    g.add_argument("--pilora_warm_start", action="store_true",
                   help="stage 2 starts from B[M], A of stage 1 on the dominant rows and keeps the heads")
    g = p.add_argument_group("taso (taso.TASO's keywords)")
    g.add_argument("--taso_calib_batches", type=int, default=64,
                   help="batches summed for the importance pass (fewer if the train set is smaller)")
    g.add_argument("--taso_score_groups", type=int, default=1,
                   help="score the targets in this many runs of layers, one pass each: the fp32 "
                        "importance sums ÷ this, the pass time × about this (same importance)")
    g.add_argument("--taso_topk", type=float, default=0.01, help="fraction k of entries marked in S (T2)")
    g.add_argument("--taso_density", type=float, default=None,
                   help="fraction p of rows and of columns kept (T4); default 1/r")
    g.add_argument("--taso_metric", choices=["wg", "g", "w", "random"], default="wg",
                   help="importance: |W*G| (T1), |G|, |W| or random")
    g.add_argument("--taso_select", choices=["both", "rows", "cols"], default="both",
                   help="axes chosen by importance; the other is random with the same size")
    g.add_argument("--taso_lr_scale", choices=["sqrt", "linear", "none"], default="sqrt",
                   help="adapter LR multiplier p^-1/2, p^-1 or 1 (T7)")
    g = p.add_argument_group("spsft (spsft.SPSFT's keywords)")
    g.add_argument("--spsft_importance", choices=spsft.IMPORTANCE, default="l2",
                   help="neuron importance: l2 (data-free), taylor, qm_taylor (classification only)")
    g.add_argument("--spsft_rows", type=int, default=128,
                   help="rows r tuned per matrix (paper's Llama setting r=128, Tables 6-10)")
    g.add_argument("--spsft_ratio", type=float, default=None,
                   help="instead of --spsft_rows: fraction of each matrix's parameters (paper: 0.05)")
    g.add_argument("--spsft_calib_batches", type=int, default=8, help="batches for taylor/qm_taylor")
    g.add_argument("--spsft_score_groups", type=int, default=1,
                   help="taylor/qm_taylor: score the targets in this many runs of layers, one pass each: "
                        "the fp32 gradient sums ÷ this, the pass time × about this (same rows)")
    g.add_argument("--spsft_mlp_only", action="store_true", help="freeze attention (the FA setting)")
    g.add_argument("--spsft_norms", action="store_true", help="also train LayerNorm/RMSNorm affine vectors")


# The trainer's own quantities, passed to the constructors that name them, and the flags behind them.
TRAINER = {"total_steps": "--max_steps / --epochs", "steps_per_epoch": "--max_samples / --batch_size",
           "micro_batches": "--batch_size / --micro_batch_size", "extend": "--max_steps", "heads": "--task",
           "causal": "--task"}


def method_kwargs(args, **trainer):
    """(keywords, {keyword: flag}) for --method's constructor, in one place for every method: flag
    --<method>_<name> gives keyword <name>, the SHARED flags keep theirs, and of the trainer's
    quantities (TRAINER) those its signature names."""
    names = inspect.signature(METHODS[args.method]).parameters
    kw, flags = {}, {}
    for flag, value in vars(args).items():
        key = flag.removeprefix(args.method + "_") if flag.startswith(args.method + "_") else flag
        if key in names and (key != flag or flag in SHARED):
            kw[key], flags[key] = value, "--" + flag
    for key, value in trainer.items():
        if key in names:
            kw[key], flags[key] = value, TRAINER[key]
    return kw, flags


def build_method(args, task="causal", total_steps=None, steps_per_epoch=None):
    """The --method object for this run; its ValueErrors become `error:` lines naming the flags."""
    accum = args.batch_size // args.micro_batch_size
    kw, flags = method_kwargs(args, total_steps=total_steps, steps_per_epoch=steps_per_epoch, micro_batches=accum,
                              extend=args.max_steps is None, heads=HEADS if task != "causal" else (),
                              causal=task == "causal")
    with method_errors(flags):
        return METHODS[args.method](**kw)


def check_args(args):
    """Flags that would crash later or train nonsense, refused before anything loads."""
    def need(ok, what, fix):
        if not ok:
            raise UserError(f"{what}; {fix}")
    finite = math.isfinite
    need(0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}", "e.g. --dropout 0.05")
    need(finite(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}", "e.g. --lr 3e-4")
    need(finite(args.weight_decay) and args.weight_decay >= 0,
         f"--weight_decay must be finite and >= 0, got {args.weight_decay}", "e.g. --weight_decay 0.01")
    need(finite(args.alpha) and args.alpha > 0, f"--alpha must be finite and > 0, got {args.alpha}",
         "LoRA's scaling is alpha / r; e.g. --alpha 16")
    need(finite(args.clip) and args.clip >= 0, f"--clip must be finite and >= 0, got {args.clip}",
         "0 turns clipping off")
    need(finite(args.warmup) and args.warmup >= 0, f"--warmup must be finite and >= 0, got {args.warmup}",
         "steps if >= 1, a fraction of the steps if < 1")
    need(finite(args.epochs) and args.epochs > 0, f"--epochs must be finite and > 0, got {args.epochs}",
         "or give --max_steps")
    for flag in ("batch_size", "micro_batch_size", "max_len", "eval_batch_size", "r"):
        v = getattr(args, flag)
        need(v >= 1, f"--{flag} must be >= 1, got {v}", "pass a positive integer")
    for flag in ("max_steps", "max_samples", "eval_limit", "stop_after"):
        v = getattr(args, flag)
        need(v is None or v >= 1, f"--{flag} must be >= 1, got {v}", "pass a positive integer or leave it out")
    for flag in ("eval_every", "save_every", "save_every_min"):
        need(getattr(args, flag) >= 0, f"--{flag} must be >= 0, got {getattr(args, flag)}", "0 turns it off")
    need(args.batch_size % args.micro_batch_size == 0,
         f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size {args.micro_batch_size}",
         "make it one (accumulation runs batch_size / micro_batch_size micro-batches)")
    need(args.num_beams >= 1, f"--num_beams must be 1 (greedy) or more, got {args.num_beams}",
         "e.g. --num_beams 4")
    need(math.isfinite(args.save_every_min), f"--save_every_min must be finite, got {args.save_every_min}",
         "e.g. --save_every_min 30")
    need(not (args.resume and args.overwrite), "--resume and --overwrite contradict each other",
         "--resume continues the run in --output_dir, --overwrite replaces it: pass one")
    need(args.output_dir or not args.resume, "--resume needs --output_dir",
         "pass the --output_dir of the run to continue")
    need(not (args.export and args.eval_only) or args.adapter, "--export with --eval_only has no adapter to export",
         "pass --adapter RUN_DIR (the run whose adapter to export)")


def check_paths(args):
    """Folders the run reads only at its end (or without --data's checks), refused before it starts."""
    if args.eval_commonsense and not os.path.exists(args.eval_commonsense):
        raise UserError(f"--eval_commonsense {args.eval_commonsense}: no such file or folder; pass a folder "
                        "of <task>/test.json files (LLM-Adapters' dataset/)")
    if args.eval_commonsense:
        evaluate.check_commonsense(args.eval_commonsense)  # a bad record fails now, not after the training
    if args.adapter and not os.path.isdir(args.adapter):
        raise UserError(f"--adapter {args.adapter}: no such folder; pass the --output_dir of a finished run")


# ------------------------------------------------------------------------------------- data

def load_data(args, task, proc):
    """(train examples, eval examples or records, info)."""
    if task == "causal":
        if args.data == "builtin":
            train_recs, test_recs = data.builtin_task(args.seed)
        else:
            recs = data.read_records(args.data)
            n_val = min(max(len(recs) // 20, 1), 200)  # a held-out slice for eval loss, drawn with --seed
            held = set(torch.randperm(len(recs), generator=torch.Generator().manual_seed(args.seed))[:n_val].tolist())
            train_recs = [r for i, r in enumerate(recs) if i not in held]
            test_recs = [r for i, r in enumerate(recs) if i in held]
        if len(train_recs) + len(test_recs) < 2:
            raise UserError(f"{args.data} holds one record; give it at least 2 (5 % are held out for the eval loss)")
        examples = data.tokenize_instructions(train_recs, proc, args.max_len)
        if not any(any(t != -100 for t in e["labels"]) for e in examples):
            raise UserError(f"--max_len {args.max_len} cuts off every response; raise --max_len")
        if args.data != "builtin":
            check_held_out(test_recs, proc, args)
        return examples, test_recs, {"task": args.data}
    if task == "cls":
        train, info = data.load_classification(args.data, "train", proc, args.max_len)
        dev, _ = data.load_classification(args.data, "validation", proc, args.max_len, space=info)
        return train, dev, info
    train, info = data.load_images(args.data, "train", proc)
    for split in ("test", "validation"):
        try:
            return train, data.load_images(args.data, split, proc)[0], info
        except (ValueError, FileNotFoundError, KeyError):
            continue
    raise UserError(f"{args.data} has no test or validation split for evaluation; add a test/ or "
                    "validation/ folder of <class>/<image> beside train/")


def check_held_out(records, proc, args):
    """The held-out records' eval loss needs target tokens: none left within --max_len is refused, some
    records without any is a warning (they do not count in eval_loss)."""
    held = data.tokenize_instructions(records[:args.eval_limit] if args.eval_limit else records, proc, args.max_len)
    empty = sum(all(t == -100 for t in e["labels"][1:]) for e in held)  # the loss predicts labels[1:]
    if empty == len(held):
        raise UserError(f"--max_len {args.max_len} cuts off the response of every held-out record (their prompts "
                        "fill it), so the eval loss would be nan; raise --max_len or shorten those prompts")
    if empty:
        print(f"warning: {empty} of {len(held)} held-out records have no response token within --max_len "
              f"{args.max_len} and do not count in eval_loss; raise --max_len to count them", file=sys.stderr)


class Batches:
    """Micro-batch m of the run, deterministic: epoch = m // per_epoch reshuffles with seed + epoch,
    so a resumed run sees exactly the batches the uninterrupted one would."""

    def __init__(self, examples, size, pad_id, seed, device):
        self.examples, self.size, self.pad_id, self.seed, self.device = examples, size, pad_id, seed, device
        self.per_epoch = math.ceil(len(examples) / size)
        self._perm = (None, None)

    def __call__(self, m):
        return to_device(self.host(m), self.device)

    def host(self, m):
        """Micro-batch m on the CPU (to count its tokens without waiting for the device)."""
        epoch, i = divmod(m, self.per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.examples), generator=g).tolist())
        idx = self._perm[1][i * self.size:(i + 1) * self.size]
        return data.collate([self.examples[j] for j in idx], self.pad_id)

    def stream(self):
        return map(self, itertools.count())


def to_device(batch, device):
    """A CPU batch on `device`: on CUDA from pinned memory without blocking the host."""
    if torch.device(device).type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def eval_batches(examples, size, pad_id, device):
    for i in range(0, len(examples), size):
        yield to_device(data.collate(examples[i:i + size], pad_id), device)


def run_eval(args, model, proc, task, eval_set, info, ctx, device):
    """The task metric: exact match (built-in task) or eval loss (instruction data), GLUE metrics,
    image accuracy; plus the commonsense protocol when --eval_commonsense is given."""
    limit, t0 = args.eval_limit, time.time()
    eval_set = eval_set[:limit] if limit else eval_set
    out = {}
    with ctx:
        if task == "causal" and args.data == "builtin":
            out.update(evaluate.evaluate_generation(model, proc, eval_set, args.eval_batch_size))
        elif task == "causal":
            ex = data.tokenize_instructions(eval_set, proc, args.max_len)
            out["eval_loss"] = evaluate.evaluate_loss(model, eval_batches(ex, args.eval_batch_size, proc.pad_token_id, device))
        elif task == "cls":
            out.update(evaluate.evaluate_classification(
                model, eval_batches(eval_set, args.eval_batch_size, proc.pad_token_id, device),
                info.get("task"), info.get("regression", False)))
        else:
            out.update(evaluate.evaluate_images(
                model, eval_batches(eval_set, args.eval_batch_size, 0, device), info["num_labels"]))
        if args.eval_commonsense:
            modes = ["generate", "loglik"] if args.eval_mode == "both" else [args.eval_mode]
            for mode in modes:
                out[f"commonsense_{mode}"] = evaluate.evaluate_commonsense(
                    model, proc, args.eval_commonsense, mode, args.eval_batch_size, limit=limit,
                    num_beams=args.num_beams)
    out["eval_time_s"] = round(time.time() - t0, 1)
    return out


# ------------------------------------------------------------------------ optimiser, schedule

def build_optimizer(model, method, args, old=None):
    """AdamW over the tensors that train now (method.param_groups: decay for matrices, none for vectors;
    the method's tensors at lr · method.lr_scale). Surviving tensors keep their Adam state; dropped
    tensors leave with theirs."""
    opt = torch.optim.AdamW(method.param_groups(args.lr, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    if old is not None:
        for g in opt.param_groups:
            for p in g["params"]:
                if p in old.state:
                    opt.state[p] = old.state[p]
    return opt


def get_lr(it, total, args):
    """Warmup then linear / cosine decay; `it` counts from the method's schedule_start."""
    warmup = args.warmup if args.warmup >= 1 else args.warmup * total
    if it < warmup:
        return args.lr * (it + 1) / (warmup + 1)
    frac = (it - warmup) / max(1, total - warmup)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return args.lr * (1 - frac) if args.schedule == "linear" else args.lr


def plain_lm_head(model):
    """True when the model's logits are its output embeddings applied to the decoder's last hidden state
    (Llama, Mistral, Qwen, ...), checked on a 2-token probe in eval mode; False for a model that scales or
    caps them (Cohere's logit_scale, Granite's logits_scaling, Gemma 2's soft-capping), whose loss
    causal_loss then takes from the model itself."""
    core, out = getattr(model, "module", model), []
    hook = core.get_decoder().register_forward_hook(lambda mod, args, o: out.append(o.last_hidden_state))
    modes = {m: m.training for m in core.modules()}
    core.eval()
    try:
        with torch.no_grad():
            x = torch.tensor([[1, 2]], device=core.get_output_embeddings().weight.device)
            logits = core(input_ids=x).logits.float()
            plain = torch.allclose(core.get_output_embeddings()(out[0]).float(), logits, rtol=1e-3, atol=1e-6)
    finally:
        hook.remove()
        for m, t in modes.items():
            m.training = t
    return plain


def causal_loss(model, batch, n_items, chunk=1024, plain=True, ce=None):
    """model(**batch, num_items_in_batch=n_items).loss (next-token cross-entropy summed over the target tokens,
    over n_items) without the (tokens × vocab) fp32 logits and their gradient: the LM head and the loss run
    `chunk` positions at a time, each chunk recomputed in backward (non-reentrant checkpoint), so one
    chunk's logits are alive at a time. The forward still goes through model(...) (hooks, DDP); its own
    LM head computes no position (logits_to_keep = none) and the decoder's output is taken by a hook."""
    if not plain:  # the model's own head and loss (plain_lm_head: logits scaled or capped)
        return model(**batch, num_items_in_batch=n_items).loss
    core = getattr(model, "module", model)  # DDP
    out = []
    hook = core.get_decoder().register_forward_hook(lambda mod, args, o: out.append(o.last_hidden_state))
    none = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=none)
    finally:
        hook.remove()
    h = out[0].flatten(0, 1)  # (B·T, H)
    y = nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100).flatten()  # next token, as HF shifts
    head = core.get_output_embeddings()
    return sum(checkpoint(ce or _ce_sum, head, h[i:i + chunk], y[i:i + chunk], use_reentrant=False)
               for i in range(0, len(y), chunk)) / n_items


def _ce_sum(head, h, y):
    return nn.functional.cross_entropy(head(h).float(), y, ignore_index=-100, reduction="sum")


def forward_backward(net, micro, task, accum, ctx, plain, device, ce=None):
    """Forward and backward of this process's micro-batches of one optimizer step (gradients accumulate;
    DDP reduces after the last); returns the step's loss summed over the processes. Causal LM losses are
    normalised by the target tokens of the whole step, counted on the host before the copies."""
    if task == "causal":
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        n_items = max(1, int(common.all_reduce(torch.tensor(n_items))))  # all processes' tokens
    micro = [to_device(b, device) for b in micro]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync
    for j, b in enumerate(micro):
        with ctx, no_sync(net, j < len(micro) - 1):
            if task == "causal":
                loss = causal_loss(net, b, n_items, plain=plain, ce=ce)  # through net: DDP's forward runs
            else:
                loss = net(**b).loss / accum
        loss.backward()
        loss_sum += loss.detach()
    return float(common.all_reduce(loss_sum))  # all processes; the step's one wait for the device


def save_atomic(obj, path):
    """torch.save to path.tmp, flushed to disk, then renamed over path: a kill, a full disk or a second
    Ctrl-C at any point leaves the previous file whole (the rename is atomic). A failed write removes
    path.tmp; a full or failing disk is a UserError that names what the folder still holds."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            kept = "the previous one is kept" if os.path.exists(path) else "there is no earlier one"
            raise UserError(f"could not write {path} ({e.strerror or e}); {kept}: free space (or fix the "
                            "folder) and continue with the same command and --resume") from None
        raise


def peak_memory(reset=False):
    """CUDA: the most bytes allocated since the last reset (train.py resets before the first step, so scoring
    passes and the evaluation before training are not counted); CPU: the process's peak resident set."""
    if torch.cuda.is_available():
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def to_fp32(model):
    """Trainable tensors (adapters, heads) live in fp32 whatever the base dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def load_adapter(model, method, run_dir, batches=(), expect=None):
    """Attach `method` from a run's method_state.pt and load its adapter.safetensors. `expect`
    ({"method", "model"} of this run) is checked against the adapter's metadata first."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    file = os.path.join(run_dir, "adapter.safetensors")
    if not os.path.isfile(file):
        raise UserError(f"{run_dir} has no adapter.safetensors; pass the --output_dir of a run that finished")
    try:
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(file)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is damaged or truncated ({e}); re-run the training that wrote it") from None
    if expect and "method" in meta:
        was, now = (f"--method {d['method']} --model {d['model']}" for d in (meta, expect))
        if meta["method"] != expect["method"] or model_id(meta["model"]) != model_id(expect["model"]):
            raise UserError(f"{run_dir} was trained with {was}, this run has {now}; "
                            "pass the same --method and --model")
    state = load_weights(os.path.join(run_dir, "method_state.pt"), "re-run the training that wrote it")
    with method_errors():
        try:
            method.attach(model, batches, state=state)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            if "method" in meta:  # an adapter that names its method: this is a bug, keep the traceback
                raise
            raise UserError(f"{run_dir}'s adapter has no method in its metadata and its method state does not fit "
                            f"--method {type(method).__name__.lower()} ({type(e).__name__}: {e}); pass the --method "
                            "(and --model, --targets) it was trained with") from None
    to_fp32(model)
    load_trainable(model, tensors)


def load_weights(path, fix):
    """torch.load with weights_only=True: tensors and plain Python values, never code from the file."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file; {fix}")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")  # the trainer moves what it loads
    except pickle.UnpicklingError:
        raise UserError(f"{path} is damaged or holds more than tensors and plain values (refused: loading "
                        f"it could run code); {fix}") from None
    except Exception as e:  # whatever a damaged file makes the reader raise (RuntimeError, EOFError, ...)
        reason = str(e).split(". ")[0] or type(e).__name__
        raise UserError(f"{path} is damaged or truncated ({reason}); {fix}") from None


def model_id(name):
    """--model as saved with an adapter: an absolute path for a local folder, else the name."""
    return os.path.realpath(name) if os.path.exists(name) else name


@contextmanager
def method_errors(flags=None):
    """Methods refuse bad keywords and data with ValueError in their constructor and attach, naming a
    keyword in backticks: report those as user errors with the flag (`flags`: keyword -> flag, default
    those of this run's method) in its place. Any other exception is a bug and keeps its traceback."""
    try:
        yield
    except ValueError as e:
        names = {"targets": "--targets", "r": "--r", **(flags or {})}
        msg = re.sub(r"`(\w+)`", lambda m: names.get(m[1], m[1]), str(e))
        if isinstance(e, UserError) and msg == str(e):
            raise
        raise UserError(msg if "; " in msg else f"{msg}; see python train.py --help") from e


def count_params(model):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def trainable_state_dict(model):
    """The tensors a run trains (adapters and heads), detached, as saved in adapter.safetensors."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def check_same(method, when):
    """torchrun: the method's decisions (its choices() but the timings `*_s`:
    rows, regions, pruned modules, stage) are identical on every process, checked where they are made (after attach, after a True
    from after_step). A difference means an all-reduce before a decision is missing. Skipped under python -O
    and in one process."""
    if __debug__ and common.world()[1] > 1:
        plain = lambda x: (x.tolist() if torch.is_tensor(x) else {k: plain(v) for k, v in x.items()}
                           if isinstance(x, dict) else [plain(v) for v in x] if isinstance(x, (list, tuple)) else x)
        plain_choices = {k: v for k, v in method.choices().items() if not k.endswith("_s")}  # no timings
        digests = common.all_gather(hashlib.sha256(repr(plain(plain_choices)).encode()).hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"{type(method).__name__}'s decisions {when} differ between processes (digests "
                               f"{digests}); the all-reduce before a decision is missing or the processes ran different code")


def load_trainable(model, tensors):
    """The saved trainable tensors into `model`, whose trainable tensors must be exactly those (another
    --targets, --method or head gives other names)."""
    missing = set(tensors) - set(dict(model.named_parameters()))
    if missing:
        raise UserError(f"{len(missing)} saved tensors are not in this model (e.g. {min(missing)}); "
                        "load them into the --method, --model and --targets they were trained with")
    extra = {n for n, p in model.named_parameters() if p.requires_grad} - set(tensors)
    if extra:
        raise UserError(f"this run trains {len(extra)} tensors that were not saved (e.g. {min(extra)}); use the "
                        "--method, --model and --targets the saved tensors were trained with")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # same names, other shapes (another --r, another number of labels)
        reason = " ".join(str(e).split("\n\t")[1:2]) or str(e).splitlines()[0]
        raise UserError(f"saved tensors do not fit this model ({reason}); use the --r, --model and "
                        "data (number of labels) they were trained with") from None


# ------------------------------------------------------------------------------- run safety

PREV = "ckpt.prev.pt"  # the checkpoint before ckpt.pt, kept for a run that diverges
RUN_FILES = ("ckpt.pt", "summary.json", "adapter.safetensors", "eval.json")  # the files that mark a run
# everything a run writes into its --output_dir (--overwrite moves them aside)
OUTPUTS = ("ckpt.pt", PREV, "summary.json", "adapter.safetensors", "method_state.pt", "eval.json", "peft", "merged",
           "g2r2_modules.png", "pilora_partition.png", "taso_importance.png", "spsft_rows.png")
LOCK = ".lock"
STOP_SIGNALS = [getattr(signal, s) for s in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, s)]
CUDA = torch.cuda  # the CUDA generators checkpoints save (tests put a stub here on machines without CUDA)


class Stopped(BaseException):
    """A signal outside the training loop, or a second one inside it: stop at once (cli: 128 + signal)."""

    def __init__(self, signum, where):
        super().__init__(signum, where)
        self.signum, self.where = signum, where


@contextmanager
def stop_signals():
    """SIGTERM, SIGINT (Ctrl-C), SIGUSR1 (SLURM's --signal) while main runs; the previous handlers come
    back when it returns. Yields {"signal", "loop", "where"}: inside the training loop ("loop" true) the
    first signal only sets "signal" (the loop ends its step, checkpoints, returns); before or after the
    loop, or a second signal, raises Stopped at once ("where" says what the folder holds)."""
    stop = {"signal": None, "loop": False, "where": "nothing was trained yet; run the command again"}

    def handler(signum, frame):
        if stop["loop"] and stop["signal"] is None:
            stop["signal"] = signum
            return
        raise Stopped(signum, stop["where"])
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield stop
        return
    old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def rng_state():
    """Every generator dropout draws from: the CPU one and, once CUDA is in use, one per GPU."""
    return {"cpu": torch.get_rng_state(), "cuda": CUDA.get_rng_state_all() if CUDA.is_initialized() else []}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    for i, s in enumerate(state["cuda"][:CUDA.device_count()] if CUDA.is_initialized() else []):
        CUDA.set_rng_state(s, i)


def rank_seed(seed, rank):
    """The dropout stream of process `rank` under torchrun, drawn after model, adapter and data are set
    up alike on every process: rank 0 keeps the one-process stream, the others reseed."""
    if rank > 0:
        torch.manual_seed(seed + 1_000_003 * rank)


def output_folder(args, rank):
    """(--output_dir checked and locked, or a new out/<method>-<model>-<date>-<time> (printed); the old run's
    entries that --overwrite moves aside at this run's first write). A folder that holds another run
    (RUN_FILES; --eval_only: its own eval.json, peft/) is refused unless --resume continues it or
    --overwrite replaces it. Nothing is moved or deleted here: clear_old_run does it once every input is
    checked and the new run writes."""
    d = args.output_dir
    if d is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        d = base = os.path.join("out", f"{args.method}-{os.path.basename(os.path.normpath(args.model))}-{stamp}")
        for k in itertools.count(1):  # two runs started in the same second
            if not os.path.exists(d):
                break
            d = f"{base}-{k}"
        d = common.all_gather(d)[0]  # rank 0's name (the clocks may differ by a second)
        if rank == 0:
            print(f"output folder: {d}")
    if os.path.exists(d) and not os.path.isdir(d):
        raise UserError(f"--output_dir {d} is a file; pass a folder (it is made if missing)")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output_dir {d} cannot be made ({e.strerror or e}); pass a folder you can write to") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise UserError(f"--output_dir {d} is not writable; pass a folder you can write to")
    mine = ["eval.json"] + (["peft"] if args.export else []) if args.eval_only else RUN_FILES
    found = [f for f in mine if os.path.exists(os.path.join(d, f))]
    resumable = args.resume and "ckpt.pt" in found
    if found and not resumable and not args.overwrite:
        how = ("pass --resume to continue it, " if "ckpt.pt" in found and not args.eval_only else "") + \
            "--overwrite to replace it, or another --output_dir"
        what = "holds a finished run and no ckpt.pt to resume" if args.resume else \
            "holds an earlier evaluation" if args.eval_only else "holds another run"
        raise UserError(f"{d} {what} ({describe_run(d, found)}); {how}")
    if rank == 0:
        lock(d)
    old = []
    if found and args.overwrite:  # training replaces every output; --eval_only only its own
        old = [f for f in (mine if args.eval_only else OUTPUTS) if os.path.lexists(os.path.join(d, f))]
    return d, old


def clear_old_run(r):
    """--overwrite, at the new run's first write: the old run's outputs move to <dir>.old-<time> (printed),
    so nothing is lost and a later --resume cannot pick up the old checkpoint."""
    if not r.old or r.rank > 0:
        return
    d = os.path.normpath(r.out)
    dest = base = f"{d}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    for k in itertools.count(1):
        if not os.path.exists(dest):
            break
        dest = f"{base}-{k}"
    os.makedirs(dest)
    for f in r.old:
        os.replace(os.path.join(d, f), os.path.join(dest, f))
    tqdm.write(f"--overwrite: the old run's {', '.join(r.old)} moved to {dest}; delete it when you no longer need it")
    r.old = []


LOCKS = []  # the lock files this process holds (released when main returns)


def lock(d):
    """One process per output folder: <d>/.lock holds the owner's pid and host. A lock of a live process is
    refused; one whose process is gone (same host) is taken over with a line saying so."""
    path, me = os.path.join(d, LOCK), f"{os.getpid()} {socket.gethostname()}"
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if attempt or not stale_lock(path, d):
                raise UserError(f"{d} is in use by another run ({LOCK}: pid {lock_owner(path)}); wait for it to end, "
                                f"or pass another --output_dir (if that process is gone, delete {path})") from None
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        LOCKS.append(path)
        return


def lock_owner(path):
    try:
        return open(path).read().strip() or "?"
    except OSError:
        return "?"


def stale_lock(path, d):
    """True (and the lock removed, with a printed line) when the lock's process is gone from this host."""
    pid, _, host = lock_owner(path).partition(" ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        return False  # alive (or not ours to signal: alive too)
    except ProcessLookupError:
        pass
    except PermissionError:
        return False
    os.remove(path)
    print(f"{d}: taking over the lock of pid {pid}, which is no longer running")
    return True


def release_locks():
    while LOCKS:
        path = LOCKS.pop()
        if lock_owner(path).split(" ")[0] == str(os.getpid()):
            os.remove(path)


def describe_run(d, found):
    """What the run in d is: "ckpt.pt, summary.json: --method lora --model tiny-llama, step 4, 2026-12-04 15:02"."""
    info, date = {}, max(os.path.getmtime(os.path.join(d, f)) for f in found)
    try:
        if "summary.json" in found:
            s = json.load(open(os.path.join(d, "summary.json")))
            info = {"method": s.get("method"), "model": s.get("model"), "step": f"{s.get('steps')} (finished)"}
        elif "ckpt.pt" in found:
            c = torch.load(os.path.join(d, "ckpt.pt"), weights_only=True, mmap=True, map_location="cpu")
            info = {"method": c["args"]["method"], "model": c["args"]["model"], "step": c["step"]}
        elif "adapter.safetensors" in found:
            from safetensors import safe_open
            with safe_open(os.path.join(d, "adapter.safetensors"), "pt") as f:
                info = {**(f.metadata() or {}), "step": "?"}
        elif "eval.json" in found:
            s = json.load(open(os.path.join(d, "eval.json")))
            info = {"method": s.get("method"), "model": s.get("model"), "step": "- (an evaluation)"}
    except Exception:  # a damaged file still names the run; what it holds stays unknown
        pass
    run = f"--method {info.get('method', '?')} --model {info.get('model', '?')}, step {info.get('step', '?')}, "
    return f"{', '.join(found)}: {run}{time.strftime('%Y-%m-%d %H:%M', time.localtime(date))}"


# ------------------------------------------------------------------------------------- main

def main(argv=None):
    """The run train.py's command line describes; a signal stops it as stop_signals says."""
    args = parse_args(argv)
    with stop_signals() as stop:
        try:
            return run(args, stop)
        finally:
            release_locks()


def run(args, stop):
    """Set up, then train as nanoGPT's loop does, then evaluate and save; None on a process other than rank 0."""
    r = setup(args)
    if args.eval_only:
        return evaluate_only(args, r)
    start_training(args, r)
    stopped = train_loop(args, r, stop)
    if stopped:
        return stopped
    stop["loop"] = False  # from here a signal stops at once: the last step's checkpoint is written
    return finish(args, r)


def setup(args):
    """Everything a run shares, as one namespace `r`, with every input checked before anything is written:
    process, device and autocast, output folder (locked; an --overwrite'n run still in place), the --resume
    checkpoint (loaded, checked against the flags), data, model (loaded in the run's dtype), batches,
    schedule length and the method (not attached yet)."""
    check_paths(args)
    r = SimpleNamespace(accum=args.batch_size // args.micro_batch_size)
    r.rank, r.world = interop.init_distributed(args)  # torchrun: WORLD_SIZE > 1
    torch.manual_seed(args.seed)
    r.device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    r.ctx = torch.autocast(r.device, dtype=dtype) if dtype != torch.float32 else nullcontext()
    args.output_dir, r.old = output_folder(args, r.rank)
    r.out, r.ckpt_path = args.output_dir, os.path.join(args.output_dir, "ckpt.pt")

    # data first: a classification head needs the number of labels
    r.path, r.task, r.proc = on_rank0(resolve, args) or resolve(args)  # rank 0 first: it fills the caches
    r.ckpt = resume_checkpoint(args, r.ckpt_path)  # after that wait: rank 0's last write has landed
    examples, r.eval_set, r.info = load_data(args, r.task, r.proc)
    if args.max_samples:
        examples = examples[:args.max_samples]
    if not examples:
        raise UserError(f"no training examples in {args.data}; check the file, or raise --max_samples")
    with model_errors(r.path) if r.path else nullcontext():
        r.model = load_model(args, r.path, r.task, r.info.get("num_labels", 2), r.info.get("regression", False), dtype)
    check_max_len(r.model, args, r.task)
    r.model.to(r.device)  # only the device: the dtypes are from_pretrained's (fp32 rotary buffers stay fp32)
    r.model.config.use_cache = False
    r.plain = r.task != "causal" or plain_lm_head(r.model)
    if args.grad_ckpt:
        enable_checkpointing(r.model)

    r.batches = Batches(examples, args.micro_batch_size, getattr(r.proc, "pad_token_id", 0) or 0, args.seed, r.device)
    steps_per_epoch = math.ceil(r.batches.per_epoch / r.accum)
    total = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    if args.eval_only:  # the adapter's method state decides; its schedule is never run: a nominal one
        r.method = build_method(args, r.task, max(total, 2), 1)
    else:
        r.method = build_method(args, r.task, total, steps_per_epoch)
    r.total = r.method.run_steps(total)  # PiLoRA's stage 1 comes before --epochs of stage 2
    r.total_params = count_params(r.model)[1]
    r.run_id = {"method": args.method, "model": model_id(args.model)}
    return r


def check_max_len(model, args, task):
    """--max_len within a model's learnt position embeddings (BERT's 512, GPT-2's 1024): beyond them the
    forward fails on the first long example. Rotary models (Llama) have no such table."""
    tables = [m.num_embeddings for n, m in model.named_modules()
              if isinstance(m, nn.Embedding) and n.endswith(("position_embeddings", "wpe"))]
    if task != "image" and tables and args.max_len > min(tables):
        raise UserError(f"--max_len {args.max_len} is longer than the {min(tables)} positions {args.model} has "
                        f"embeddings for; pass --max_len {min(tables)} or less")


def compile_model(model):
    """--compile: torch.compile of each decoder layer (transformers' GradientCheckpointingLayer, else the
    entries of the model's first layer list); the loss is compiled in forward_backward's caller."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        layers = next((list(m) for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)), [])
    for layer in layers:
        layer.compile()
    return len(layers)


def eval_now(args, r):
    """The model's metrics on the evaluation set (rank 0 evaluates; None on the others)."""
    return on_rank0(run_eval, args, r.model, r.proc, r.task, r.eval_set, r.info, r.ctx, r.device)


def evaluate_only(args, r):
    """--eval_only: the (adapted) model's metrics, written to eval.json (a run's own files are never touched);
    --export its PEFT adapter."""
    if args.adapter:
        load_adapter(r.model, r.method, args.adapter, expect=r.run_id)
    metrics = eval_now(args, r)
    if r.rank > 0:
        return None  # rank 0 evaluated and writes
    clear_old_run(r)
    if args.export:
        with writing(r, "peft"):
            interop.save_peft(r.model, os.path.join(args.output_dir, "peft"), r.path or args.model)
    summary = {"method": args.method, "model": args.model, "adapter": args.adapter, "total_params": r.total_params,
               "metrics": {"eval": metrics}}
    evaluate.print_table(metrics, "eval")
    with writing(r, "eval.json"):
        write_json(summary, os.path.join(args.output_dir, "eval.json"))
    return summary


def start_training(args, r):
    """The state the loop starts from: a checkpoint's (--resume) or a fresh one. The method attaches (its
    scoring passes see at most one epoch of training batches), the trainable tensors go to fp32, the
    optimizer is built, and a checkpoint's tensors, optimizer, metrics, losses and RNG streams are restored."""
    ckpt, r.ckpt = r.ckpt, None
    r.metrics = (ckpt.get("metrics") or {"before": ckpt["metrics_before"]}) if ckpt else {"before": eval_now(args, r)}
    r.model.train()
    t0 = time.time()
    with r.ctx, tqdm(itertools.islice(r.batches.stream(), r.rank, r.batches.per_epoch, r.world),  # this process's share
                     desc="scoring", total=len(range(r.rank, r.batches.per_epoch, r.world)), leave=False,
                     dynamic_ncols=True, disable=r.rank > 0) as calib:
        with method_errors(method_kwargs(args)[1]):
            r.method.attach(r.model, calib, state=ckpt["method"] if ckpt else None)
    check_same(r.method, "at attach")
    attach_time = time.time() - t0
    to_fp32(r.model)
    r.ce = _ce_sum
    if args.compile:
        compile_model(r.model)
        r.ce = torch.compile(_ce_sum)
    rank_seed(args.seed, r.rank)  # model, adapters and data order are set up alike; dropout differs per process
    r.trainable_start = ckpt["trainable_params_start"] if ckpt else count_params(r.model)[0]
    r.opt = build_optimizer(r.model, r.method, args)
    r.start, r.losses, r.step_times, r.stage_times = 0, [], [], {}
    r.saved = ckpt["step"] if ckpt else None  # the step of the last checkpoint this run can fall back to
    r.prev = ckpt.get("prev_step") if ckpt and os.path.exists(os.path.join(r.out, PREV)) else None
    if not ckpt:
        r.stage_times["attach"] = attach_time
        return
    load_trainable(r.model, ckpt["trainable"])
    try:
        r.opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{r.ckpt_path}: its optimizer state does not fit this run's trainable tensors ({e}); resume "
                        "with the flags of the run that wrote it, or start a new run in another --output_dir") from None
    r.start, r.losses, r.stage_times = ckpt["step"], ckpt["losses"], ckpt["stage_times"]
    r.step_times = ckpt.get("step_times", [])
    rngs = ckpt.get("rng_ranks") or [ckpt["rng"]]
    rngs = [s if isinstance(s, dict) else {"cpu": s, "cuda": []} for s in rngs]  # older checkpoints: CPU only
    if r.rank < len(rngs):
        set_rng_state(rngs[r.rank])
    else:  # more processes than the checkpoint's run had: a new stream for this one
        torch.manual_seed(args.seed + 1_000_003 * r.rank + r.start)


def resume_checkpoint(args, path):
    """--resume: the folder's ckpt.pt, loaded and checked against this run's flags (None: start from scratch)."""
    if not args.resume:
        return None
    if not os.path.exists(path):
        print(f"no checkpoint at {path}; starting from scratch")
        return None
    ckpt = load_weights(path, "delete it to start from scratch, or pass another --output_dir")
    check_ckpt(ckpt, path, args)
    return ckpt


def save_checkpoint(args, r, step, stop):
    """ckpt.pt (atomically, rank 0) with everything --resume needs, every process's RNG streams included; the
    one it replaces stays as ckpt.prev.pt (what a diverged run falls back to)."""
    rngs = common.all_gather(rng_state())  # every process's dropout streams (CPU, each GPU)
    prev = r.saved
    if r.rank == 0:
        clear_old_run(r)
        prev = r.saved if keep_previous(r.ckpt_path) else None
        save_atomic({"step": step, "trainable": trainable_state_dict(r.model), "optimizer": r.opt.state_dict(),
                     "method": r.method.choices(), "losses": r.losses, "stage_times": r.stage_times,
                     "rng": rngs[0], "rng_ranks": rngs, "metrics_before": r.metrics["before"], "metrics": r.metrics,
                     "step_times": r.step_times, "prev_step": prev, "trainable_params_start": r.trainable_start,
                     "args": vars(args)}, r.ckpt_path)
    r.saved, r.prev = step, prev
    stop["where"] = f"{r.ckpt_path} keeps step {step}; continue with the same command and --resume"


def keep_previous(path):
    """The checkpoint at `path` also as ckpt.prev.pt (a hard link: no copy, no moment without a ckpt.pt)."""
    if not os.path.exists(path):
        return False
    prev = os.path.join(os.path.dirname(path), PREV)
    try:
        if os.path.exists(prev + ".tmp"):
            os.remove(prev + ".tmp")
        try:
            os.link(path, prev + ".tmp")
        except OSError:  # a file system without hard links
            shutil.copyfile(path, prev + ".tmp")
        os.replace(prev + ".tmp", prev)
        return True
    except OSError:
        if os.path.exists(prev + ".tmp"):
            os.remove(prev + ".tmp")
        return False


def train_loop(args, r, stop):
    """The optimizer steps from r.start: lr, forward_backward, the method's hooks, clip, step, log, save.
    Returns None at the end, or {"stopped_at", "losses"[, "signal"]} when a signal or --stop_after ends it.
    A non-finite loss or gradient, or a loss stuck at --lr far too high, stops it (diverged)."""
    net = wrap(r.model, r.method)
    peak_memory(reset=True)
    bar = tqdm(range(r.start, r.total), initial=r.start, total=r.total, dynamic_ncols=True, disable=r.rank > 0)
    stop["where"] = (f"{r.ckpt_path} keeps step {r.saved}; continue with the same command and --resume" if r.saved
                     else "no checkpoint was written yet; run the command again")
    stop["loop"], r.last_save = True, time.time()  # a signal now ends the step and checkpoints
    for step in bar:
        t = time.time()
        lr = get_lr(step - r.method.schedule_start, r.total - r.method.schedule_start, args)
        for g in r.opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        micro = [r.batches.host(step * r.accum + k) for k in range(r.rank, r.accum, r.world)]  # this process's share
        loss_sum = forward_backward(net, micro, r.task, r.accum, r.ctx, r.plain, r.device, r.ce)
        params = [p for g in r.opt.param_groups for p in g["params"]]
        if not math.isfinite(loss_sum):  # stop before the step spreads it into the weights
            diverged(args, r, bar, f"the loss is {loss_sum} at step {step + 1}", step + 1)
        norm = float(nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if not math.isfinite(norm):
            diverged(args, r, bar, f"the gradient norm is {norm} at step {step + 1}", step + 1)
        r.method.after_backward(step)
        if args.clip:
            nn.utils.clip_grad_norm_(params, args.clip)
        r.opt.step()
        if r.method.after_step(step):
            check_same(r.method, f"at step {step}")
            r.opt = build_optimizer(r.model, r.method, args, old=r.opt)
            net = None  # the old DDP (and its gradient hooks) goes before the new one is built
            net = wrap(r.model, r.method)
        r.opt.zero_grad(set_to_none=True)
        r.losses.append(loss_sum)
        r.step_times.append(time.time() - t)
        r.stage_times[r.method.stage] = r.stage_times.get(r.method.stage, 0.0) + r.step_times[-1]
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", stage=r.method.stage)
        since = stuck_since(args, r.losses, step + 1 == r.total)
        if since:
            diverged(args, r, bar, f"the loss has stayed at {loss_sum:.6g} since step {since} (step {step + 1} now) "
                     f"at --lr {args.lr:g}, far above any rate that trains (>= {STUCK_LR:g})", since)
        stopped = between_steps(args, r, step + 1, stop)
        if stopped:
            bar.close()
            return stopped
    bar.close()
    return None


STUCK_LR, STUCK_STEPS = 0.1, 10  # a loss flat for STUCK_STEPS steps at --lr >= STUCK_LR is a dead run


def stuck_since(args, losses, last):
    """The first step of a flat tail of the losses (equal to 1e-6 relative) that is STUCK_STEPS long (3 at
    the last step) at --lr >= STUCK_LR, else None: a saturated model whose every output is uniform."""
    if args.lr < STUCK_LR or not losses:
        return None
    n = next((k for k, x in enumerate(reversed(losses)) if abs(x - losses[-1]) > 1e-6 * abs(losses[-1])), len(losses))
    return len(losses) - n + 1 if n >= (3 if last else STUCK_STEPS) else None


def diverged(args, r, bar, what, first_bad):
    """Stop a run whose loss at step `first_bad` already came from a bad update (step first_bad - 1): the
    checkpoints that hold that update are removed (ckpt.prev.pt comes back if it is older), nothing else is
    written, and one line says which step ckpt.pt keeps and what to change."""
    bar.close()
    good = lambda c: c is not None and c <= first_bad - 2  # noqa: E731: written before update first_bad - 1
    prev, removed = os.path.join(r.out, PREV), []
    if r.saved is not None and not good(r.saved):
        if r.rank == 0 and good(r.prev) and os.path.exists(prev):
            os.replace(prev, r.ckpt_path)
            removed.append(f"step {r.saved}")
            r.saved = r.prev
        else:
            removed.append(f"step {r.prev} and {r.saved}" if r.prev is not None else f"step {r.saved}")
            if r.rank == 0:
                for f in (r.ckpt_path, prev):
                    if os.path.exists(f):
                        os.remove(f)
            r.saved = None
    gone = f" (the checkpoint of {removed[0]} held it and was removed)" if removed else ""
    fix = f"lower --lr (now {args.lr:g}, e.g. --lr {args.lr / 10:g}) or check the data"
    kept = (f"{r.ckpt_path} keeps step {r.saved}, the last checkpoint before it{gone}; {fix}, then continue with "
            "--resume" if r.saved else f"no checkpoint from before it is kept{gone}; {fix}, then run again")
    raise UserError(f"{what}: the update of step {first_bad - 1} diverged, training stopped and no adapter is "
                    f"written; {kept}")


def between_steps(args, r, done, stop):
    """After optimizer step `done`: --eval_every, the checkpoint (--save_every, --save_every_min, the last
    step, a signal; the routine ones held back while the loss looks stuck), then a stop. Returns None, or
    the stopped run's dict."""
    if args.eval_every and done % args.eval_every == 0 and done < r.total:
        m = eval_now(args, r)
        if r.rank == 0:
            r.metrics.setdefault("during", []).append({"step": done, **m})
            tqdm.write(f"step {done}: {json.dumps(m)}")
        r.model.train()
    due = bool(args.save_every_min) and time.time() - r.last_save >= 60 * args.save_every_min
    flags = common.all_reduce(torch.tensor([int(stop["signal"] is not None), int(due)]))  # alike on every rank
    routine = ((args.save_every and done % args.save_every == 0) or flags[1]) and not suspect(args, r.losses)
    if routine or done == r.total or flags[0]:
        save_checkpoint(args, r, done, stop)
        r.last_save = time.time()
    if flags[0]:  # a signal (on any process): every process stops after this step
        signum = stop["signal"] or signal.SIGTERM
        if r.rank == 0:
            tqdm.write(f"stopped at step {done} of {r.total} ({signal.Signals(signum).name}); continue with "
                       "the same command and --resume", file=sys.stderr)
        return {"stopped_at": done, "losses": r.losses, "signal": int(signum)}
    if args.stop_after and done >= args.stop_after and done < r.total:
        return {"stopped_at": done, "losses": r.losses}
    return None


def suspect(args, losses):
    """The last two losses equal at --lr >= STUCK_LR: the start of what stuck_since stops; no routine
    checkpoint is written over the good ones meanwhile."""
    return args.lr >= STUCK_LR and len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= 1e-6 * abs(losses[-1])


def finish(args, r):
    """After the last step: evaluate, then (rank 0) the adapter, plots, --export, --merge and summary.json."""
    peak = peak_memory()
    r.metrics["after"] = eval_now(args, r)
    if r.rank > 0:
        return None  # rank 0 writes the adapter, summary, plots and merged model
    model, method = r.model, r.method
    clear_old_run(r)
    with writing(r, "adapter.safetensors"):
        save_adapter(model, method, args.output_dir, meta=r.run_id)
    summary = {
        "method": args.method, "model": args.model, "task": r.task, "data": args.data,
        "total_params": r.total_params, "trainable_params_start": r.trainable_start,
        "trainable_params_end": count_params(model)[0], "peak_memory_bytes": peak,
        "head_params": sum(p.numel() for n, p in model.named_parameters()
                           if p.requires_grad and common.is_head(n, getattr(method, "heads", ()))),
        "step_time_s": statistics.median(r.step_times) if r.step_times else None,
        "stage_times_s": r.stage_times, "steps": r.total, "metrics": r.metrics, "losses": r.losses,
        "device": r.device, "world_size": r.world, "dtype": args.dtype, "grad_ckpt": args.grad_ckpt,
        **method.summary(),
    }
    with writing(r, "the method's plot (.png)"):
        plots.plot(method, args.output_dir)
    if args.export:  # before --merge, which replaces the adapter layers
        with writing(r, "peft"):
            interop.save_peft(model, os.path.join(args.output_dir, "peft"), r.path or args.model)
    if args.merge:  # in fp32: adding ΔW into a bf16 W drops every update below half a bf16 step of W
        with writing(r, "merged"):
            merged = method.export(cast_parameters(model, torch.float32))
            merged.save_pretrained(os.path.join(args.output_dir, "merged"))
            r.proc.save_pretrained(os.path.join(args.output_dir, "merged"))
    with writing(r, "summary.json"):
        write_json(summary, os.path.join(args.output_dir, "summary.json"))
    evaluate.print_table({"before": r.metrics["before"], "after": r.metrics["after"]}, args.method)
    return summary


@contextmanager
def writing(r, what):
    """A full disk (or any write error) while writing an output: one line saying what the folder keeps."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or (re.findall(r'message: "([^"]+)"', str(e)) or [str(e)[:160]])[0]
        again = (f"{r.ckpt_path} keeps the finished run (step {r.saved}): free space (or fix the folder) and run the "
                 "same command with --resume, which evaluates and writes the outputs" if r.saved else
                 "free space (or fix the folder) and run the command again")
        raise UserError(f"could not write {os.path.join(r.out, what)} ({reason}); {again}") from None


# --resume refuses a change of these (and of --<method>_*); another --targets shows in the saved tensors' names
RUN_DEFINING = ("method", "model", "task", "data", "max_samples", "max_len", "batch_size", "micro_batch_size",
                "r", "alpha", "dropout", "seed")


def check_ckpt(ckpt, path, args):
    """A checkpoint of this run: a train.py checkpoint whose run-defining flags (RUN_DEFINING and the
    method's own) are this run's; --lr, --max_steps, the evaluation and saving flags may change."""
    fix = "delete it to start from scratch, or pass another --output_dir"
    if not isinstance(ckpt, dict) or not {"step", "trainable", "optimizer", "method", "args"} <= set(ckpt):
        raise UserError(f"{path} is not a train.py checkpoint; {fix}")
    was = {k: ckpt["args"].get(k) for k in ("method", "model")}
    if was["method"] != args.method or model_id(str(was["model"])) != model_id(args.model):
        raise UserError(f"{path} was written by a --method {was['method']} --model {was['model']} run, this "
                        f"run has --method {args.method} --model {args.model}; resume with those flags or {fix}")
    flag = lambda v: "(default)" if v is None else " ".join(map(str, v)) if isinstance(v, list) else f"{v}"  # noqa
    same = lambda k, a, b: model_id(str(a)) == model_id(str(b)) if k == "data" else a == b  # noqa: E731
    for k in [*RUN_DEFINING, *sorted(k for k in vars(args) if k.startswith(args.method + "_"))]:
        if k in ckpt["args"] and not same(k, ckpt["args"][k], getattr(args, k)):
            was = flag(ckpt["args"][k])
            raise UserError(f"{path} was written with --{k} {was}, this run has --{k} {flag(getattr(args, k))}; "
                            f"resume with --{k} {was} (it defines the run), or start a new run in another --output_dir")


def save_adapter(model, method, out_dir, meta=None):
    """adapter.safetensors (with `meta`, {"method", "model"}, as its metadata) and method_state.pt."""
    from safetensors.torch import save_file
    tensors = {n: t.contiguous() for n, t in trainable_state_dict(model).items()}
    tmp = os.path.join(out_dir, "adapter.safetensors.tmp")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, os.path.join(out_dir, "adapter.safetensors"))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    save_atomic(method.choices(), os.path.join(out_dir, "method_state.pt"))


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def cli(argv=None):
    """main() for the command line: a UserError becomes one line on stderr and exit status 2
    (main() called from Python raises it); any other exception is a bug and keeps its traceback.
    A run stopped by a signal exits with 128 + the signal (143 SIGTERM, 130 Ctrl-C, 138 SIGUSR1)."""
    try:
        out = main(argv)
    except UserError as e:
        tqdm.write(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # on a line of its own under a bar
        return 2
    except Stopped as e:
        tqdm.write(f"stopped at once ({signal.Signals(e.signum).name}); {e.where}", file=sys.stderr)
        return 128 + e.signum
    return 128 + out["signal"] if isinstance(out, dict) and "signal" in out else 0


if __name__ == "__main__":
    sys.exit(cli())
