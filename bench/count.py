"""Count one optimizer step per efficiency row at any shape on a CPU: kernels, bytes, FLOP, host syncs, roofline (issue 31).

    nice -n 19 python bench/count.py --model llama-7b-shape --seq_len 2048 --grad_ckpt both \
        --json bench/results/count-llama-7b-shape-2048.json                    # every row, minutes
    python bench/count.py --model llama-h128-l2-v512 --seq_len 64 --rows lora-r8 peft-lora-r8   # seconds
    python bench/count.py --layers                      # one adapter layer of each kind, forward + backward

The step is bench/memory.py's (the row built on fake tensors, driven through efficiency.Loop: forward, backward,
the method's hooks, clip, AdamW; one warm-up step, then the counted one), and `StepCounter` (a subclass of
memory.Counter, so the memory count runs alongside) records every op dispatched in the counted step:
- **kernels**: ops that write a tensor; views (`t`, `view`, `expand`, …, `_unsafe_view`, `detach`), allocations
  (`empty*`, `resize_`) and ops that return no tensor are not kernels. One dropout counts as the one fused kernel
  CUDA runs (`native_dropout`): a `bernoulli_` and the elementwise ops right after it that read what it drew
  (`div_` by 1 − p, the `mul` into x, a cast) are one kernel, whose bytes are what it reads from outside and the
  tensors it made that are still alive when the next kernel starts (a mask or scale kept for later is written;
  a temporary is not). AdamW and the gradient clip run their foreach (multi-tensor) kernels, as on CUDA by
  default; one foreach op is counted as one kernel (CUDA's multi_tensor_apply launches one per ≤ 36–110 tensors).
- **bytes** read and written per kernel: each distinct input tensor's elements read once (a broadcast one at most
  its storage), each output or mutated tensor written once; an op that overwrites (`copy_`, `fill_`, `zero_`,
  `bernoulli_`, an `out=`) does not read its destination. No cache is modelled: every kernel goes to memory.
- **FLOP**: matmuls and convolutions by torch.utils.flop_counter's formulas (2·m·n·k for a matmul);
  attention by SDPA's fused kernels: forward 2·(d_qk + d_v) per query-key pair and head, backward 2.5× that (five
  matmuls to two), causal: the Tq·(Tq + 1)/2 pairs it keeps (the math fallback is counted as its bmms).
  Elementwise ops count no FLOP.
- **host syncs**: ops whose result the host must wait for: `.item()` / `float()` / `bool()` (aten
  `_local_scalar_dense`), `nonzero`, `masked_select`, `unique`, `repeat_interleave` by a tensor, `equal`;
  AdamW's step counters live on the host on CUDA, so its `.item()`s are not counted; a `.tolist()` is one
  (a fake tensor's reads element by element).
- **index ops** (`index_select`, `index_add_`, `index_put_`, `gather`, `scatter*`, …; embedding lookups left
  out), and how many touch an *activation-sized* tensor: one with at least tokens × hidden elements that is
  not weight-shaped (out × in or in × out of a target); an op whose result is empty moves none (HF's
  `logits_to_keep` slice of no position).
- **roofline**: max(FLOP / peak, bytes / bandwidth) for the whole step, and the sum over kernels of each
  kernel's own max (tighter: a memory-bound kernel cannot use the compute a matmul leaves idle). Peaks in PEAKS
  (dense bf16, SXM, NVIDIA's data sheets). A bound, never a GPU time: launch latency, kernel efficiency and
  host syncs are not in it.
A LLaMA row's attention is counted as the GPU runs it on the all-ones batch: SDPA with is_causal=True and no
mask (on fake tensors HF would pass an explicit causal mask; `causal` drops it).
Phases: forward, backward, recompute (checkpointing's forwards inside backward), optimizer (AdamW), other
(clip, zero_grad, the loop's loss read).

`count_layer` counts one adapter layer's forward + backward the same way (for tests/test_count.py's bounds).
"""
import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import weakref
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import efficiency  # noqa: E402
import memory  # noqa: E402

aten = torch.ops.aten
# dense bf16 TFLOP/s and HBM TB/s, SXM parts (NVIDIA H100 and H200 data sheets; sparsity not counted)
PEAKS = {"H100": {"tflops": 989.0, "tbps": 3.35}, "H200": {"tflops": 989.0, "tbps": 4.8}}
NOT_KERNELS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
               "resize_", "set_", "_unsafe_view", "lift_fresh", "detach", "alias", "_local_scalar_dense",
               "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "equal"}
OVERWRITE = {"copy_", "fill_", "zero_", "bernoulli_", "uniform_", "normal_", "random_", "exponential_"}
DRAW = {"bernoulli_", "bernoulli"}                    # a dropout mask drawn ...
DRAW_FOLD = {"div", "div_", "mul", "mul_", "_to_copy", "copy_"}  # ... and applied: one fused kernel on CUDA
DROPOUT_KERNELS = {"native_dropout", "native_dropout_backward"}  # CUDA's own fused dropout kernels
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
         "unique_consecutive", "equal"}
INDEX = {"index_select", "index_add", "index_add_", "index_put", "index_put_", "_index_put_impl_", "index",
         "index_copy", "index_copy_", "index_fill", "index_fill_", "gather", "scatter", "scatter_", "scatter_add",
         "scatter_add_", "scatter_reduce", "scatter_reduce_", "masked_scatter", "masked_scatter_", "take",
         "index_reduce", "index_reduce_"}
PHASES = ("forward", "backward", "recompute", "optimizer", "other")


def op_name(func):
    return func._overloadpacket.__name__


def nbytes(t):
    """Bytes of a tensor's elements, at most its storage (a broadcast view reads each stored element once)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


def view_key(t):
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def bound_args(func, args, kwargs):
    """{argument name: value} by the op's schema."""
    out = {a.name: v for a, v in zip(func._schema.arguments, args)}
    out.update(kwargs)
    return out


def attention_flop(func, args, kwargs):
    """FLOP of a fused SDPA kernel (forward or backward) from its query, key and value; None for other ops."""
    name = op_name(func)
    if not ("scaled_dot_product" in name or name in ("_flash_attention_forward", "_flash_attention_backward",
                                                     "_efficient_attention_forward", "_efficient_attention_backward")):
        return None
    a = bound_args(func, args, kwargs)
    q, k, v = a.get("query"), a.get("key"), a.get("value")
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    tq, tk = q.shape[-2], k.shape[-2]
    heads = math.prod(q.shape[:-2])
    if name.startswith("_flash_attention") or name.startswith("_efficient_attention"):  # (B, T, H, D) layouts
        tq, tk, heads = q.shape[1], k.shape[1], q.shape[0] * q.shape[2]
    causal = bool(a.get("is_causal", False) or a.get("causal", False)) and a.get("attn_mask") is None
    pairs = tq * (tq + 1) // 2 if causal and tq == tk else tq * tk // 2 if causal else tq * tk
    fwd = 2 * heads * pairs * (q.shape[-1] + v.shape[-1])
    return int(2.5 * fwd) if "backward" in name else fwd


def causal(func, args, kwargs):
    """An SDPA call with an explicit mask as the causal call without one. HF builds a causal mask on fake
    tensors (it cannot see that the batch's attention mask is all ones); on real tensors it calls SDPA with
    is_causal=True and no mask, which is what the GPU runs (count_row's batches are all ones)."""
    names = [a.name for a in func._schema.arguments]
    args, kwargs = list(args), dict(kwargs, attn_mask=None)
    i = names.index("is_causal")
    if i < len(args):
        args[i] = True
    else:
        kwargs["is_causal"] = True
    return tuple(args), kwargs


def op_flop(func, args, kwargs, out):
    f = attention_flop(func, args, kwargs)
    if f is not None:
        return f
    fn = flop_registry.get(func._overloadpacket)
    if fn is None:
        return 0
    return int(fn(*args, **kwargs, out_val=out))


class Stats:
    """Totals of one counted stretch."""

    def __init__(self):
        self.kernels = {p: 0 for p in PHASES}
        self.flop = {p: 0 for p in PHASES}
        self.read = {p: 0 for p in PHASES}
        self.written = {p: 0 for p in PHASES}
        self.ops, self.syncs, self.index_ops = {}, {}, []
        self.attention_flop = self.dropouts = 0
        self.kernel_time = {g: 0.0 for g in PEAKS}  # Σ per kernel of max(flop / peak, bytes / bandwidth), s
        self.trace = []  # (phase, kernel, flop, bytes read, bytes written) in order

    def add_kernel(self, phase, name, flop, read, written):
        self.kernels[phase] += 1
        self.flop[phase] += flop
        self.read[phase] += read
        self.written[phase] += written
        self.ops[name] = self.ops.get(name, 0) + 1
        self.trace.append((phase, name, flop, read, written))
        for g, pk in PEAKS.items():
            self.kernel_time[g] += max(flop / (pk["tflops"] * 1e12), (read + written) / (pk["tbps"] * 1e12))


class StepCounter(memory.Counter):
    """memory.Counter that also counts, from the last reset() on, each dispatched op's kernel, bytes, FLOP,
    host syncs and index ops (see the module docstring for the rules). activation: the (tokens, hidden,
    weight shapes) that make a tensor activation-sized; count_row sets it from the model (on_model)."""

    def __init__(self, activation=None, cuda_like=True):
        super().__init__()
        self.activation, self.cuda_like, self.causal_sdpa = activation, cuda_like, False
        self.always = True  # count from every reset(); count_row's rows count from on_measure() only
        self.stats, self.on, self.in_opt, self.draw, self.pending, self.hooks = Stats(), False, False, None, None, []
        self.in_tolist = False

    # -- the mode
    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        def pre(opt, args, kwargs):
            self.in_opt = True
            if self.cuda_like:  # AdamW's CUDA default: foreach kernels (fake CPU tensors would take the loop)
                for g in opt.param_groups:
                    if not g.get("fused"):
                        g["foreach"] = True

        def post(opt, args, kwargs):
            self.in_opt = False
        self.hooks = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        # a fake tensor's tolist() reads element by element (one _local_scalar_dense each); on a device it is one
        # copy to the host, one sync: counted as one `tolist`
        self.tolist, me = FakeTensor.tolist, self

        def tolist(t):
            if me.in_tolist:
                return me.tolist(t)
            if me.on:
                me.stats.syncs["tolist"] = me.stats.syncs.get("tolist", 0) + 1
            me.in_tolist = True
            try:
                return me.tolist(t)
            finally:
                me.in_tolist = False
        FakeTensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        FakeTensor.tolist = self.tolist
        return super().__exit__(*exc)

    def reset(self, record=False):
        super().reset(record)
        self.draw = self.pending = None
        self.stats, self.on = Stats(), self.always

    def on_measure(self):
        self.stats, self.on = Stats(), True

    def on_model(self, model, batch, targets):
        cfg = model.config
        tokens = math.prod(next(iter(batch.values())).shape[:2])
        shapes = set()
        for n in common.find_targets(model, targets):
            w = model.get_submodule(n).weight
            shapes |= {tuple(w.shape), tuple(w.shape[::-1])}
        self.activation = (tokens, getattr(cfg, "hidden_size", 1), shapes)
        self.causal_sdpa = cfg.model_type == "llama" and bool(batch["attention_mask"].dtype == torch.long)

    def phase(self):
        if self.in_opt:
            return "optimizer"
        if torch._C._current_autograd_node() is not None:
            return "recompute" if self.stack else "backward"
        return "forward" if self.stack else "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.causal_sdpa and kwargs.get("attn_mask") is not None and "scaled_dot_product" in op_name(func):
            args, kwargs = causal(func, args, kwargs)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.on:
            self.account(func, args, kwargs, out)
        return out

    # -- accounting
    def account(self, func, args, kwargs, out):
        name = op_name(func)
        if name in SYNCS and not ((self.in_opt or self.in_tolist) and name == "_local_scalar_dense"):
            self.stats.syncs[name] = self.stats.syncs.get(name, 0) + 1
        if func.is_view or name in NOT_KERNELS:
            return
        schema = func._schema.arguments
        ins, written = [], []
        for a, v in list(zip(schema, args)) + [(next((s for s in schema if s.name == k), None), v)
                                               for k, v in kwargs.items()]:
            ts = [t for t in tree_leaves(v) if isinstance(t, torch.Tensor)]
            write = a is not None and a.alias_info is not None and a.alias_info.is_write
            if write:
                written += ts
            if not (write and (a.name == "out" or (name in OVERWRITE and a.name == "self"))):
                ins += ts
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        written += outs
        if not written:
            return  # returns no tensor and writes none: not a kernel
        rec = {"phase": self.phase(), "name": name, "ins": {t.untyped_storage()._cdata for t in ins},
               "reads": {view_key(t): nbytes(t) for t in ins},
               "outs": {view_key(t): (weakref.ref(t.untyped_storage()), nbytes(t)) for t in written},
               "flop": op_flop(func, args, kwargs, out), "attention": attention_flop(func, args, kwargs) is not None,
               "index": None if name not in INDEX else {
                   "op": name, "shapes": [list(t.shape) for t in ins + outs],
                   "activation": any(t.numel() for t in outs) and any(self.activation_sized(t) for t in ins + outs)}}
        rec["made"] = {k[0] for k in rec["outs"]}
        g = self.draw
        if g is not None and name in DRAW_FOLD and g["phase"] == rec["phase"] and rec["ins"] & g["made"]:
            self.merge(g, rec)  # applied by the open dropout kernel
            return
        if name in DRAW or name in DROPOUT_KERNELS:
            cast, self.pending = self.pending, None
            self.close_draw()
            g = {"phase": rec["phase"], "anchor": name, "reads": {}, "outs": {}, "made": set()}
            if cast is not None and cast["phase"] == rec["phase"] and rec["ins"] & cast["made"]:
                self.merge(g, cast)  # the cast into the dropout (a half x scaled in fp32 on the CPU)
            elif cast is not None:
                self.commit(cast)
            self.merge(g, rec)
            self.draw = g
            return
        self.close_draw()
        if name == "_to_copy":
            self.pending = rec  # a cast: part of the dropout kernel if the next op is one
            return
        self.commit(rec)

    @staticmethod
    def merge(g, rec):
        g["reads"].update({k: b for k, b in rec["reads"].items() if k[0] not in g["made"]})
        g["made"] |= rec["made"]
        g["outs"].update(rec["outs"])

    def commit(self, rec):
        wrote = sum(b for _, b in rec["outs"].values())
        self.stats.add_kernel(rec["phase"], rec["name"], rec["flop"], sum(rec["reads"].values()), wrote)
        if rec["attention"]:
            self.stats.attention_flop += rec["flop"]
        if rec["index"]:
            self.stats.index_ops.append(rec["index"] | {"phase": rec["phase"]})

    def close_draw(self):
        """End the open dropout kernel (reads from outside it; writes what it made that is still alive) and
        commit a pending cast."""
        if self.pending is not None:
            cast, self.pending = self.pending, None
            self.commit(cast)
        g, self.draw = self.draw, None
        if g is None:
            return
        alive = sum(b for ref, b in g["outs"].values() if ref() is not None)
        back = g["anchor"] == "native_dropout_backward"
        self.stats.add_kernel(g["phase"], "dropout backward (fused)" if back else "dropout (fused)", 0,
                              sum(g["reads"].values()), alive)
        self.stats.dropouts += not back

    def activation_sized(self, t):
        if self.activation is None:
            return False
        tokens, hidden, weight_shapes = self.activation
        return t.numel() >= tokens * hidden and tuple(t.shape) not in weight_shapes

    def fields(self):
        """The counted step as JSON fields (copies: counting stops here, so what runs after, e.g. a method's
        summary(), is not counted into them)."""
        self.close_draw()
        self.on = False
        s = self.stats
        total = lambda d: sum(d.values())  # noqa: E731
        flop, moved = total(s.flop), total(s.read) + total(s.written)
        roof = {g: {"flop_ms": 1e3 * flop / (pk["tflops"] * 1e12), "bytes_ms": 1e3 * moved / (pk["tbps"] * 1e12),
                    "kernel_sum_ms": 1e3 * s.kernel_time[g]} for g, pk in PEAKS.items()}
        for r in roof.values():
            r["roofline_ms"] = max(r["flop_ms"], r["bytes_ms"])
        return {"kernels": total(s.kernels), "kernels_by_phase": dict(s.kernels), "flop": flop,
                "flop_by_phase": dict(s.flop),
                "attention_flop": s.attention_flop, "bytes_read": total(s.read), "bytes_written": total(s.written),
                "bytes_by_phase": {p: s.read[p] + s.written[p] for p in PHASES}, "host_syncs": total(s.syncs),
                "syncs": dict(s.syncs), "dropout_kernels": s.dropouts, "index_ops": len(s.index_ops),
                "activation_index_ops": sum(i["activation"] for i in s.index_ops),
                "index_op_examples": s.index_ops[:8], "roofline": roof,
                "top_ops": dict(sorted(s.ops.items(), key=lambda kv: -kv[1])[:25]), "peaks": PEAKS}


# ----------------------------------------------------------------------------------------- a layer

class PlainLoRA(nn.Module):
    """The plain LoRA layer (loralib's / PEFT's form): base(x) + B(A(nn.Dropout(x)))·s, A and B fp32."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) / r)
        self.drop, self.scaling = nn.Dropout(dropout), alpha / r

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scaling


def make_layer(kind, base, r=8, p=0.05, seed=0):
    """One adapter layer of `kind` around `base` (out × in): plain, lora, pilora (stage 2: half the rows
    dominant, r′ = 2), taso (every 8th row and column), spsft (every 4th row)."""
    import pilora
    import spsft
    import taso
    g = torch.Generator().manual_seed(seed)
    m, n = base.out_features, base.in_features
    if kind == "plain":
        return PlainLoRA(base, r, 2 * r, p)
    if kind == "lora":
        return common.LoRALinear(base, r, 2 * r, p)
    if kind == "pilora":
        return pilora.PiLoRALinear(base, torch.randperm(m, generator=g)[:m // 2], r, 2, 2 * r, p, generator=g)
    if kind == "taso":
        return taso.TASOLinear(base, torch.arange(0, m, 8), torch.arange(0, n, 8), r, 2 * r, p)
    if kind == "spsft":
        return spsft.SPSFTLinear(base, torch.arange(0, m, 4))
    raise ValueError(f"unknown layer kind {kind!r}")


LAYERS = ["plain", "lora", "pilora", "taso", "spsft"]


def count_layer(kind, shape=(2, 256, 512), out_features=384, r=8, p=0.05, autocast=True, seed=0):
    """One adapter layer's forward + backward on fake tensors: x (shape, bf16, requiring grad) through the
    layer (bf16 frozen base, fp32 trainable tensors) under CPU bf16 autocast, then backward of a given output
    gradient. `kind`: a make_layer kind, or a function base -> layer. Returns the counter's fields plus
    `index_op_list` (every index op with its tensor shapes and whether one is activation-sized: ≥ tokens × min(in, out)
    elements, not weight-shaped) and `tokens`, `in_features`, `out_features`."""
    torch.manual_seed(seed)
    base = nn.Linear(shape[-1], out_features, bias=False).to(torch.bfloat16)
    layer = make_layer(kind, base, r, p, seed) if isinstance(kind, str) else kind(base)
    layer.train()
    for mod in layer.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is not None and t.is_floating_point() and t.requires_grad:
                    store[k] = nn.Parameter(t.detach().float())
    tokens = math.prod(shape[:-1])
    counter = StepCounter((tokens, min(shape[-1], out_features), {(out_features, shape[-1]), (shape[-1], out_features)}))
    from torch._subclasses.fake_tensor import FakeTensorMode
    fake = FakeTensorMode(allow_non_fake_inputs=False)
    with fake, counter:
        for mod in layer.modules():
            for store in (mod._parameters, mod._buffers):
                for k, t in store.items():
                    if t is not None:
                        f = fake.from_tensor(t)
                        store[k] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
        x = torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(*shape[:-1], out_features, dtype=torch.bfloat16)
        counter.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext(), counter.modules(layer):
            y = layer(x)
        y.backward(g)
        counter.close_draw()
        row = counter.fields()
        row["index_op_list"] = counter.stats.index_ops
        row["trace"] = counter.stats.trace
    row.pop("index_op_examples")
    return row | {"layer": kind if isinstance(kind, str) else getattr(kind, "__name__", "custom"), "tokens": tokens,
                  "in_features": shape[-1], "out_features": out_features, "r": r, "p": p}


# ------------------------------------------------------------------------------------------- a row

def count_row(name, model_name, seq, mbs, ckpt, seed=0):
    """One efficiency row's optimizer step counted (memory.count_row with a StepCounter, one warm-up step)."""
    c = StepCounter()
    c.always = False
    return memory.count_row(name, model_name, seq, mbs, ckpt, steps=1, warmup=1, seed=seed, top=3, counter=c,
                            foreach=True)


def commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "common.py", "g2r2.py", "pilora.py", "taso.py",
                                "spsft.py", "train.py", "bench/count.py", "bench/memory.py", "bench/efficiency.py"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + (" + uncommitted changes to " + ", ".join(line.split()[-1] for line in dirty.splitlines())
                      if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-7b-shape")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--grad_ckpt", choices=["off", "on", "both"], default="both")
    p.add_argument("--rows", nargs="+", default=list(efficiency.ROWS), help=f"of: {' '.join(efficiency.ROWS)}")
    p.add_argument("--layers", action="store_true", help="also count one adapter layer of each kind "
                   "(2 × 256 × 512, r = 8, p = 0.05, bf16 autocast)")
    p.add_argument("--no_rows", action="store_true", help="only --layers")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--commit", help="the commit counted (default: this checkout's HEAD and its uncommitted "
                   "changes; give it when counting an exported tree, e.g. `git archive HEAD`)")
    a = p.parse_args(argv)
    unknown = [r for r in a.rows if r not in efficiency.ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {' '.join(efficiency.ROWS)}")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = parse_args(argv)
    import transformers
    res = {"counter": "bench/count.py", "command": "python bench/count.py " + " ".join(argv), "commit": a.commit or commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "model": a.model, "seq_len": a.seq_len, "micro_batch_size": a.micro_batch_size, "peaks": PEAKS,
           "rows": [], "layers": []}
    t0 = time.time()

    def save():
        res["wall_s"] = time.time() - t0
        if a.json:
            os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
            efficiency.write_json(res, a.json)
    if a.layers:
        for kind in LAYERS:
            try:
                row = count_layer(kind)
            except Exception as e:  # noqa: BLE001 (recorded: a layer whose constructor changed)
                row = {"layer": kind, "error": f"{type(e).__name__}: {e}"}
            res["layers"].append(row)
            print(format_layer(row), flush=True)
        save()
    rows = [] if a.no_rows else a.rows
    if not efficiency.have_peft() and any(efficiency.ROWS[r][0] == "peft" for r in rows):
        print("peft is not installed: skipping the PEFT rows")
        rows = [r for r in rows if efficiency.ROWS[r][0] != "peft"]
    for ckpt in {"off": [False], "on": [True], "both": [False, True]}[a.grad_ckpt]:
        for name in rows:
            try:
                row = count_row(name, a.model, a.seq_len, a.micro_batch_size, ckpt)
            except Exception as e:  # noqa: BLE001 (recorded, the next row runs)
                row = {"row": name, "model": a.model, "seq_len": a.seq_len, "grad_ckpt": ckpt,
                       "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            res["rows"].append(row)
            print(format_row(row), flush=True)
            save()
    if a.json:
        print(f"wrote {a.json} ({time.time() - t0:.0f} s)")
    return res


def format_layer(r):
    if "error" in r:
        return f"layer {r['layer']:<7} {r['error']}"
    return (f"layer {r['layer']:<7} kernels {r['kernels']:3d}  written {r['bytes_written'] / 2 ** 20:7.2f} MiB  "
            f"read {r['bytes_read'] / 2 ** 20:7.2f} MiB  index ops {r['index_ops']} "
            f"({r['activation_index_ops']} activation-sized)  dropouts {r['dropout_kernels']}")


def format_row(r):
    head = f"{r['row']:<20} ckpt {int(bool(r['grad_ckpt']))}"
    if "error" in r:
        return f"{head}: {r['error']}"
    h = r["roofline"]
    return (f"{head} kernels {r['kernels']:7,d}  GB {(r['bytes_read'] + r['bytes_written']) / 1e9:8.1f}  "
            f"TFLOP {r['flop'] / 1e12:7.2f}  syncs {r['host_syncs']:3d}  index {r['index_ops']:5d} "
            f"({r['activation_index_ops']} act)  roofline H100 {h['H100']['roofline_ms']:7.1f} ms "
            f"H200 {h['H200']['roofline_ms']:7.1f} ms  ({r['count_s']:.0f} s)")


if __name__ == "__main__":
    main()
