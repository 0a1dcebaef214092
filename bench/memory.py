"""Count every method's training memory at any model shape on a CPU, without having that memory (issue 15).

    python bench/memory.py --model llama-7b-shape --seq_len 2048 --grad_ckpt both --json bench/results/memory-7b-2048.json
    python bench/memory.py --model tiny-llama --seq_len 16 --rows lora-r8 spsft-r128      # seconds
    python bench/memory.py --model llama-7b-shape --importance                             # TASO / SPSFT / G²R² / PiLoRA passes

The model is built and trained on fake tensors (torch._subclasses.fake_tensor.FakeTensorMode: shapes, dtypes
and autograd, no data), and `Counter`, a TorchDispatchMode, adds the bytes of every new storage an op returns
and subtracts them when that storage is freed (weakref.finalize on the storage; views and in-place results
share a storage and count once). Everything the program creates is counted, weights included, so "live" is
what an allocator would hold without fragmentation or rounding. Each row of bench/efficiency.py (same names,
same Method hooks, same loop: efficiency.Loop) runs at bf16 base weights, fp32 trainable tensors, CPU bf16
autocast, SDPA attention; a fake CUDA device cannot run SDPA, so the tensors are fake CPU ones and SDPA picks
its fused CPU flash kernel, which saves what CUDA's flash / memory-efficient kernels save (the output and a
fp32 log-sum-exp per query and head, no T × T matrix); `attention` in each row names the kernel that ran.
Per row: weights (`base_bytes`), `model_bytes` (the peak of a no-grad forward of the same batch on the base
model, as the efficiency suite defines it), `peak_bytes` over the measured optimizer steps after warm-up,
`aux_bytes` = peak − model, and the largest tensors alive at the peak with the op and module that made them;
`attach_peak_bytes` (and `attach_top`) over method.attach, where TASO's and SPSFT-Taylor's importance passes run.

Values never exist, so an op whose result depends on them gets a placeholder, counted in `placeholders`:
`.item()` (the loss the loop prints, Adam's step count, a score) returns 1 / True, and `nonzero` of a fake mask
returns half its entries, rounded up (PiLoRA's stage-2 switch: its dominant rows, an adapter-size detail;
DeBERTa's loss: which labels are set).
Checked in tests/test_memory.py on what holds on any CPU: the count equals the counter on real tensors, is at
least the bytes autograd saves for backward and at most what the CPU allocator saw (which adds kernel scratch:
oneDNN, MKL, SDPA workspaces, different per CPU and thread count). How close it comes to the allocator is a
benchmark, not a test: --validate records both, and prints measured / counted per row.
"""
import argparse
import json
import os
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import efficiency  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20
_check_index = common.check_index


def check_index(idx, size, kw):
    """common.check_index, which reads the values, on the fake indices of a counted step: only the sort."""
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    return idx.sort().values if isinstance(idx, FakeTensor) else _check_index(idx, size, kw)


common.check_index = check_index  # the counted step's special case lives here, not in common.py


@contextmanager
def cuda_dropout(on=True):
    """While on: the adapter dropout runs as on CUDA, in x's dtype. common._dropout scales a half x in fp32 on the
    CPU only (for the CPU kernel's rounding), whose two fp32 temporaries of x's size CUDA never holds."""
    cpu = common.half_on_cpu
    common.half_on_cpu = (lambda x: False) if on else cpu
    try:
        yield
    finally:
        common.half_on_cpu = cpu
SHAPES = dict(efficiency.SHAPES, **{
    "llama-3-8b-shape": dict(efficiency.llama_shape(4096, 32, 128256, 14336, 32), num_key_value_heads=8)})
# classification shapes (train.py's cls and image tasks: the model's own loss, one label per example)
CLS_SHAPES = {
    "deberta-v3-base-shape": ("DebertaV2Config", "DebertaV2ForSequenceClassification", dict(
        vocab_size=128100, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
        type_vocab_size=0, layer_norm_eps=1e-7, num_labels=2)),
    # ViT-B/16 at 224 px: 196 patches + [CLS] = 197 tokens, whatever --seq_len says; 100 classes (CIFAR-100)
    "vit-b16-shape": ("ViTConfig", "ViTForImageClassification", dict(
        image_size=224, patch_size=16, num_channels=3, hidden_size=768, num_hidden_layers=12,
        num_attention_heads=12, intermediate_size=3072, num_labels=100))}


# ------------------------------------------------------------------------------------------ the counter

class Counter(TorchDispatchMode):
    """Live bytes of the tensor storages created while it is active: +nbytes when an op returns a storage
    not seen before, −nbytes when that storage dies. `peak` is the highest `live` since reset()."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.placeholders = 0
        self.info = {}          # storage key -> (nbytes, shape, dtype, op, where)
        self.names, self.stack = {}, []
        self.log = self.start = None
        self.kernels, self.weights = set(), set()  # weights: storages top() leaves out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            self.placeholders += 1
            return True if args[0].dtype == torch.bool else 1
        if func is torch.ops.aten.nonzero.default and isinstance(args[0], FakeTensor):
            self.placeholders += 1  # the count of a fake mask is unknown: half of its entries, rounded up
            out = torch.empty((args[0].numel() + 1) // 2, args[0].dim(), dtype=torch.long, device=args[0].device)
            self.add(out, "nonzero")
            return out
        if "scaled_dot_product" in func.__name__:
            self.kernels.add(func.__name__.split(".")[0])
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, func.__name__.split(".")[0])
        return out

    def add(self, t, op="input"):
        s = t.untyped_storage()
        key = s._cdata
        if key in self.info:
            return
        node = torch._C._current_autograd_node()
        where = self.stack[-1] if self.stack else ""
        if node is not None:
            where = f"{'recompute ' + where + ' in ' if where else ''}backward {node.name()}"
        self.info[key] = entry = (s.nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", ""), op, where)
        self.live += entry[0]
        if self.log is not None:
            self.log.append((key, entry))
        if self.live > self.peak:
            self.peak = self.live
            self.peak_at = None if self.log is None else len(self.log)
        weakref.finalize(s, self.free, key)

    def free(self, key):
        entry = self.info.pop(key, None)
        if entry is not None:
            self.live -= entry[0]
            if self.log is not None:
                self.log.append((key, None))

    def reset(self, record=False):
        """Start a new peak here; with record, remember what is alive at the peak (top())."""
        self.peak, self.peak_at = self.live, 0
        self.start, self.log = (dict(self.info), []) if record else (None, None)

    def top(self, n=10):
        """The n largest storages alive at the peak since reset(record=True), the base weights left out."""
        alive = dict(self.start)
        for key, entry in self.log[:self.peak_at]:
            if entry is None:
                alive.pop(key, None)
            else:
                alive[key] = entry
        big = sorted((e for k, e in alive.items() if k not in self.weights), key=lambda e: -e[0])[:n]
        return [{"bytes": b, "shape": list(s), "dtype": d, "op": op, "where": w} for b, s, d, op, w in big]

    def on_model(self, model, batch, targets):
        """Called by count_row once the model and batch exist (bench/count.py's counter reads their sizes)."""

    def on_measure(self):
        """Called by count_row right before the measured steps (after the reset that starts their peak)."""

    def fields(self):
        """Extra per-row fields read after the measured steps (bench/count.py's counter: kernels, bytes, FLOP)."""
        return {}

    @contextmanager
    def modules(self, model):
        """Name the module (forward) or autograd node (backward) that creates each tensor."""
        self.names = {id(m): n or type(m).__name__ for n, m in model.named_modules()}

        def pre(mod, args):
            self.stack.append(self.names.get(id(mod), type(mod).__name__))

        def post(mod, args, out):
            if self.stack:
                self.stack.pop()
        hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
                 nn.modules.module.register_module_forward_hook(post, always_call=True)]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            self.stack.clear()


@contextmanager
def counting(fake=True, counter=None):
    """(Counter, or `counter`: a subclass instance) active over fake tensors (fake=True) or real ones."""
    counter = Counter() if counter is None else counter
    with (FakeTensorMode() if fake else nullcontext()), counter:
        yield counter


# ------------------------------------------------------------------------------------------- models

def build_model(name, seed=0, dtype=torch.bfloat16, fake=True):
    """A model of a shape name (efficiency.SHAPES, llama-h{H}-l{L}[-v{V}], llama-3-8b-shape, CLS_SHAPES) or a
    models.TINY alias, built in `dtype` by the default-dtype route (model.to(dtype) cannot swap fake tensors).
    fake: skip weight initialisation: the values never exist, and ViT's trunc_normal_ is a rejection loop
    that reads them (`while mask.any()`), endless on the counter's placeholder."""
    import re
    import transformers as tf
    from transformers.initialization import no_init_weights
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    m = re.fullmatch(r"llama-h(\d+)-l(\d+)(?:-v(\d+))?", name)
    try:
        with no_init_weights() if fake else nullcontext():
            if name in models.TINY:
                model = models.build_tiny(name, seed=seed)
            elif name in CLS_SHAPES:
                cfg_cls, model_cls, kw = CLS_SHAPES[name]
                model = getattr(tf, model_cls)(getattr(tf, cfg_cls)(**kw))
            elif name in SHAPES or m:
                kw = SHAPES[name] if name in SHAPES else efficiency.llama_shape(int(m[1]), int(m[2]), int(m[3] or 32000))
                model = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
            else:
                raise SystemExit(f"unknown --model {name}; use {', '.join([*SHAPES, *CLS_SHAPES])}, "
                                 f"llama-h{{H}}-l{{L}}[-v{{V}}] or {', '.join(models.TINY)}")
    finally:
        torch.set_default_dtype(old)
    model.config.use_cache = False
    return model


def attach(method, model, batches, ctx, counter):
    """method.attach under the autocast ctx. PEFT's injection calls .to() on its new layers, which fails on
    fake tensors: it runs on real tensors, and the new (real) adapter tensors are then faked and counted."""
    if not isinstance(method, efficiency.PeftLoRA) or not isinstance(next(model.parameters()), FakeTensor):
        with ctx:
            return method.attach(model, batches) or model
    fake_mode = next(model.parameters()).fake_mode
    with unset_fake_temporarily():
        model = method.attach(model, batches)
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is not None and not isinstance(t, FakeTensor):
                    f = fake_mode.from_tensor(t)
                    counter.add(f, "peft")
                    store[k] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
    return model


def make_batch(model, mbs, seq):
    """Random token ids; labels = inputs for a causal LM, one class per example otherwise. An image model
    gets fp32 pixel_values (data.py's collate) of its own image size; its sequence length follows from that."""
    cfg = model.config
    if cfg.model_type == "vit":
        pix = torch.randn(mbs, cfg.num_channels, cfg.image_size, cfg.image_size)
        return {"pixel_values": pix, "labels": torch.zeros(mbs, dtype=torch.long)}
    ids = torch.randint(0, cfg.vocab_size, (mbs, seq))
    labels = ids.clone() if model.config.model_type == "llama" else torch.zeros(mbs, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class Classify(efficiency.Loop):
    """efficiency.Loop on a classification batch. The loss is cross-entropy on the model's logits, what its
    own loss computes (train.py's non-causal branch), without DeBERTa's data-dependent label filtering."""

    def __init__(self, model, method, args, batch, ctx, total):
        super().__init__(model, method, args, {**batch, "labels": batch["labels"][:, None]}, ctx, total)
        self.batch = batch  # (B,) labels; the Loop's token count read a (B, 1) view

    def loss(self):
        logits = self.model(**{k: v for k, v in self.batch.items() if k != "labels"}).logits
        return nn.functional.cross_entropy(logits.float(), self.batch["labels"].view(-1))


# ------------------------------------------------------------------------------------------- a row

def count_row(name, model_name, seq, mbs, ckpt, steps=1, warmup=1, seed=0, fake=True, top=10, counter=None,
              foreach=None, cuda=None):
    """One row of efficiency.ROWS, counted on fake tensors; fake=False runs it on real tensors and also
    measures what the efficiency suite measures on CPU (`profiled_*`: torch.profiler's allocator events, which
    include the CPU's kernel scratch) and the bytes autograd saves for backward (`saved_bytes`: outside
    checkpointed layers, parameters, buffers and batch left out), which is how tests/test_memory.py checks it.
    counter: a Counter subclass instance to count with (bench/count.py); foreach: efficiency.Loop's clip
    (None: train.py's default); cuda: the adapter dropout as CUDA runs it (cuda_dropout; None: when fake)."""
    kind, r, targets, extra, stage, pair = efficiency.ROWS[name]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    args, method, pre, total = efficiency.row_method(name, mbs, "bf16", seed, 2, warmup + steps)
    row = {"row": name, "method": kind, "stage": stage, "r": r, "pair": pair, "model": model_name, "seq_len": seq,
           "micro_batch_size": mbs, "grad_ckpt": ckpt, "dtype": "bf16", "fake": fake}
    t0 = time.time()
    with counting(fake, counter) as c, cuda_dropout(fake if cuda is None else cuda):
        model = build_model(model_name, seed, fake=fake)
        if ckpt:
            models.enable_checkpointing(model)
        fits = min(min(model.get_submodule(n).weight.shape) for n in common.find_targets(model, targets))
        if r > fits:
            return row | {"error": f"r={r} does not fit this model's smallest target ({fits} features)"}
        batch = make_batch(model, mbs, seq)
        c.on_model(model, batch, targets)
        if model.config.model_type == "vit":  # tokens = patches + [CLS], fixed by the image size
            row["seq_len"] = (model.config.image_size // model.config.patch_size) ** 2 + 1
        row["base_bytes"] = c.live
        c.weights = set(c.info)
        row["total_params"] = train.count_params(model)[1]
        c.reset()
        fwd = lambda: model(**batch).loss  # noqa: E731
        with torch.no_grad(), ctx, c.modules(model):
            if fake:
                fwd()
            else:
                row["profiled_model_delta"] = efficiency.cpu_peak_delta(fwd)[0]
        row["model_bytes"] = c.peak
        model.train()
        calib = (dict(batch) for _ in iter(int, 1))
        c.reset(record=True)
        target_numel = sum(model.get_submodule(n).weight.numel() for n in common.find_targets(model, targets))
        model = attach(method, model, calib, ctx, c)  # TASO's and SPSFT-Taylor's importance passes run here
        row.update(attach_peak_bytes=c.peak, attach_top=c.top(top), target_weight_numel=target_numel)
        train.to_fp32(model)
        causal = model.config.model_type == "llama"
        loop = (efficiency.Loop if causal else Classify)(model, method, args, batch, ctx, total)
        loop.foreach = foreach
        with c.modules(model):
            while loop.t < pre or (stage and getattr(method, "stage", stage) != stage):
                if loop.t > pre + 10:
                    raise RuntimeError(f"{name}: never reached stage {stage!r} (at {method.stage!r})")
                loop.step()
            for _ in range(warmup):
                loop.step()
            row["start_bytes"] = c.live
            c.reset(record=True)
            c.on_measure()
            if fake:
                for _ in range(steps):
                    loop.step()
            else:
                row["profiled_start_bytes"] = efficiency.live_bytes(model, loop.opt, batch)
                alive = [*model.buffers(), *batch.values()]  # saved, but not new in the step
                sinks = [{} for _ in range(steps)]
                row["profiled_step_delta"] = efficiency.cpu_peak_delta(
                    lambda: [loop.step(efficiency.saved_tensor_hooks(model, s, alive)) for s in sinks])[0]
                row["saved_bytes"] = max(sum(s.values()) for s in sinks)  # saved for backward, outside checkpoints
        row.update(peak_bytes=c.peak, aux_bytes=c.peak - row["model_bytes"], top=c.top(top),
                   trainable_params=train.count_params(model)[0], method_stage=getattr(method, "stage", None),
                   attention=sorted(c.kernels), placeholders=c.placeholders)
        row.update(c.fields())
        row.update(efficiency.method_fields(method, kind))
        del loop, model, method, batch, calib
    row["count_s"] = time.time() - t0
    return row


# --------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-7b-shape",
                   help=f"{', '.join([*SHAPES, *CLS_SHAPES])}, llama-h{{H}}-l{{L}}[-v{{V}}] or {', '.join(models.TINY)}")
    p.add_argument("--seq_len", type=int, nargs="+", default=[2048])
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--grad_ckpt", choices=["off", "on", "both"], default="both")
    p.add_argument("--rows", nargs="+", default=list(efficiency.ROWS), help=f"of: {' '.join(efficiency.ROWS)}")
    p.add_argument("--steps", type=int, default=1, help="measured optimizer steps per row")
    p.add_argument("--warmup_steps", type=int, default=1, help="steps before measuring (Adam state exists)")
    p.add_argument("--top", type=int, default=10, help="largest tensors at the peak to report")
    p.add_argument("--validate", action="store_true", help="also run each row on real tensors (small shapes "
                   "only) and record the CPU allocator's peak beside the count (as tests/test_memory.py checks)")
    p.add_argument("--json", help="write the rows (a JSON list) here")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows if r not in efficiency.ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {' '.join(efficiency.ROWS)}")
    if args.steps < 1 or args.micro_batch_size < 1:
        p.error("--steps and --micro_batch_size must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    rows_names = args.rows
    if not efficiency.have_peft() and any(efficiency.ROWS[r][0] == "peft" for r in rows_names):
        print("peft is not installed (pip install -r bench/requirements.txt): skipping the PEFT rows")
        rows_names = [r for r in rows_names if efficiency.ROWS[r][0] != "peft"]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    rows = []
    for seq in args.seq_len:
        for ckpt in modes:
            for name in rows_names:
                try:
                    row = count_row(name, args.model, seq, args.micro_batch_size, ckpt, args.steps,
                                    args.warmup_steps, top=args.top, cuda=not args.validate)
                except ValueError as e:  # e.g. a row's targets that this architecture does not have
                    row = {"row": name, "model": args.model, "seq_len": seq, "grad_ckpt": ckpt, "error": str(e)}
                if args.validate and "error" not in row:
                    real = count_row(name, args.model, seq, args.micro_batch_size, ckpt, args.steps,
                                     args.warmup_steps, fake=False)
                    row["validation"] = {"counted_step_bytes": row["peak_bytes"] - row["start_bytes"],
                                         "measured_step_bytes": real["profiled_step_delta"],
                                         "counted_forward_bytes": row["model_bytes"] - row["base_bytes"],
                                         "measured_forward_bytes": real["profiled_model_delta"]}
                rows.append(row)
                print(format_row(row), flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
        print(f"wrote {args.json}")
    return rows


def format_row(row):
    head = f"{row['row']:<18} {row['model']} seq {row['seq_len']} ckpt {int(row['grad_ckpt'])}"
    if "error" in row:
        return f"{head}: {row['error']}"
    v = row.get("validation")
    check = "" if not v else (f"  allocator / count: step {v['measured_step_bytes'] / max(1, v['counted_step_bytes']):.3f}"
                              f", forward {v['measured_forward_bytes'] / max(1, v['counted_forward_bytes']):.3f}")
    return (f"{head}  params {row['trainable_params']:>11,}  peak {row['peak_bytes'] / MIB:10,.1f} MiB  "
            f"model {row['model_bytes'] / MIB:10,.1f}  aux {row['aux_bytes'] / MIB:10,.1f} MiB  ({row['count_s']:.1f} s)"
            f"{check}")


if __name__ == "__main__":
    main()
