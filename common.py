"""What two or more methods share: the LoRA layer and its lean dropout, target discovery, merging, the
scoring-pass helpers, and the Method interface (hooks, misuse checks) with plain LoRA (`--method lora`) as
the baseline.

LoRA (Hu et al. 2021; G²R² Eq 1–3): h = W₀x + s·B A x with A (r × in, Kaiming-uniform a=√5),
B (out × r, zeros) and s = α / r. PyTorch layout throughout: a weight is (out × in).
"""
import itertools
import math
import weakref
from collections.abc import Mapping
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.checkpoint import checkpoint

# Default targets by module-name suffix, per architecture (config.model_type). `--targets` overrides.
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEBERTA = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
           "output.dense"]
BERT = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
VIT = BERT + ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
              "mlp.fc1", "mlp.fc2"]  # transformers ≥ 5 names ViT's layers like this
DEFAULT_TARGETS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "deberta-v2": DEBERTA,
                   "vit": VIT, "bert": BERT, "roberta": BERT}


class UserError(ValueError):
    """Bad input (a flag, file, folder, model, checkpoint): train.py prints `error: <message>` and
    exits 2. The message is one line, what is wrong then `; ` and the fix."""


def need(ok, message):
    """A bad constructor argument: ValueError(message), which names the keyword in backticks (`r`);
    train.py writes the flag (--r) in its place."""
    if not ok:
        raise ValueError(message)


def check_lora(r, alpha, dropout):
    """LoRA's rank r (int ≥ 1), α (finite, > 0) and adapter dropout p (in [0, 1))."""
    need(isinstance(r, int) and r >= 1, f"`r` (the rank) must be an integer >= 1, got {r!r}")
    need(isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0,
         f"`alpha` must be a finite number > 0 (s = alpha / r), got {alpha!r}")
    need(isinstance(dropout, (int, float)) and 0 <= dropout < 1, f"`dropout` must be in [0, 1), got {dropout!r}")


def check_names(value, kw):
    """`value` as a list of module-name suffixes (None stays None); a bare string is refused."""
    ok = value is None or (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value))
    need(ok, f"`{kw}` must be a list of module-name suffixes, e.g. [\"q_proj\", \"v_proj\"], got {value!r}")
    return None if value is None else list(value)


def check_linear(base):
    need(isinstance(base, nn.Linear), f"`base` must be an nn.Linear, got {type(base).__name__}")


def check_index(idx, size, kw):
    """idx as a sorted long tensor of distinct indices in [0, size)."""
    idx = torch.as_tensor(idx, dtype=torch.long).flatten()
    ok = bool(((idx >= 0) & (idx < size)).all()) and len(idx.unique()) == len(idx)
    need(ok, f"`{kw}` must hold distinct indices in [0, {size}), got {idx.tolist()[:8]}")
    return idx.sort().values


# ----------------------------------------------------------------------------- the LoRA layer

class LoRALinear(nn.Module):
    """A frozen `base` Linear plus s·B(A(dropout(x))); A, B in fp32, computed under the caller's autocast."""
    lean = True  # False: the plain line of Eq 3 (its nn.Dropout keeps a mask and a dropped copy of x)

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_linear(base)
        check_lora(r, alpha, dropout)
        check_rank(base, r)
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        if not self.lean:
            return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling  # Eq 3
        h = self.base(x)
        ax, = dropout_linear(x, self.dropout, self.lora_A)  # A dropout(x), keeping neither mask nor copy
        return add_lora(h, ax, self.lora_B, self.scaling)  # the same sum, the B product in one kernel

    def delta_weight(self):
        return (self.lora_B @ self.lora_A).mul_(self.scaling)  # (out, in), fp32, one out × in tensor

    def merge(self) -> nn.Linear:
        return merged_linear(self.base, self.delta_weight())

    def lora_factors(self):
        """(A, B, α) in PEFT's LoRA layout (ΔW = (α / rank)·B A): this layer's own factors."""
        return self.lora_A.detach().float(), self.lora_B.detach().float(), self.scaling * self.lora_A.shape[0]


# ------------------------------------------ lean machinery: adapter dropout that keeps no mask, no copy
# What it saves: nn.Dropout's mask and dropped copy of x per adapter input; in kernels, one fused dropout per
# adapter input, each adapter weight cast once per forward, and B's product, scale and sum as one addmm
# (add_lora). Plain form: base(x) + F.linear(F.linear(nn.Dropout(p)(x), A), B)·s (LoRALinear's `lean = False`
# branch; tests/test_memory.py: values, gradients and saved bytes against it; tests/test_count.py: kernels).

def dropout_linear(x, dropout, *weights):
    """(F.linear(d, w) for w in weights) with d = dropout(x), one mask for all: what nn.Dropout followed by the
    adapter's first projection computes (the same draws from the same RNG state), without the memory. Autograd
    keeps x (shared by every adapter reading it, and by nothing when x is the base layer's input: a frozen
    matmul saves only its weight), the cast weights and the RNG state — not d and not the mask, which backward
    draws again. `dropout`: an nn.Dropout (active while training), nn.Identity or None. Under torch.compile the
    plain form runs (no generator state calls in a traced region; the compiler fuses and recomputes itself)."""
    p = active_p(dropout)
    if p == 0 or not weights or torch.compiler.is_compiling():
        xd = F.dropout(x, p) if p else x
        return tuple(F.linear(xd.to(w.dtype), w) for w in [cast(w, x) for w in weights])
    return _DropoutLinear.apply(x, p, *weights)


def add_lora(h, ax, B, s):
    """h + s·(ax Bᵀ) in h's dtype: the adapter's second product, its scale and the sum with the base output as
    one torch.addmm (one kernel, no (..., out) temporaries) when h, ax and B compute in one dtype (autocast, or
    one dtype throughout); else one by one, as the plain form."""
    B = cast(B, ax)
    if h.dtype == ax.dtype == B.dtype:
        return torch.addmm(h.reshape(-1, h.shape[-1]), ax.reshape(-1, ax.shape[-1]), B.T, alpha=s).view(h.shape)
    return h + (F.linear(ax, B) * s).to(h.dtype)


def active_p(dropout):
    """The drop probability `dropout` applies now: p of an nn.Dropout in training mode, else 0."""
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def cast(w, x):
    """w as F.linear(x, w) computes with it: an fp32 w in autocast's dtype under autocast (cast once here, so
    the same copy serves forward and backward), else w itself (x is then cast to w's dtype)."""
    if torch.is_autocast_enabled(x.device.type) and w.dtype == torch.float32:
        return w.to(torch.get_autocast_dtype(x.device.type))
    return w


def _dropout(x, p):
    """(x·mask / (1 − p), mask), one fused kernel on CUDA (torch.native_dropout, nn.Dropout's own kernel there),
    scaled in fp32. Its CPU kernel would round 1 / (1 − p) to a half x's dtype (+0.2 % at p = 0.05 in bf16), so
    a half x is scaled in fp32 there (the same mask: CPU draws do not depend on the dtype)."""
    if half_on_cpu(x):
        y, mask = torch.native_dropout(x.float(), p, True)
        return y.to(x.dtype), mask
    return torch.native_dropout(x, p, True)


def _dropout_backward(g, mask, p):
    """∂L/∂x of _dropout: g·mask / (1 − p) (one kernel; fp32 scale on the CPU, as _dropout)."""
    if half_on_cpu(g):
        return torch.ops.aten.native_dropout_backward(g.float(), mask, 1 / (1 - p)).to(g.dtype)
    return torch.ops.aten.native_dropout_backward(g, mask, 1 / (1 - p))


def half_on_cpu(x):
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _generator(device):
    return torch.default_generator if device.type == "cpu" else torch.cuda.default_generators[
        device.index if device.index is not None else torch.cuda.current_device()]


def rng_state(device):
    """The state of `device`'s default generator: what dropout_linear draws its mask from next."""
    return _generator(device).get_state()


def dropout_again(x, p, state):
    """(d, mask) that dropout_linear drew for x from generator `state` (rng_state before the call), drawn again;
    the generator's own stream is left where it was."""
    gen = _generator(x.device)
    now = gen.get_state()
    gen.set_state(state)
    try:
        return _dropout(x, p)
    finally:
        gen.set_state(now)


def in_backward():
    """True inside a backward pass, where non-reentrant checkpointing recomputes forwards (G²R² counts a
    layer's uses outside them). No public PyTorch API tells a recompute from a forward; this is the private
    test torch.utils.checkpoint itself makes. tests/test_common.py fails if its meaning changes."""
    return torch._C._current_graph_task_id() != -1


class _DropoutLinear(torch.autograd.Function):
    """dropout_linear's autograd: saves x, the cast weights and the generator state; backward redraws the mask."""

    @staticmethod
    def forward(ctx, x, p, *weights):
        ctx.p, ctx.state = p, rng_state(x.device)
        xd, _ = _dropout(x, p)  # the mask is dropped here and drawn again in backward
        ws = [cast(w, x) for w in weights]
        ctx.save_for_backward(x, *ws)
        return tuple(F.linear(xd.to(w.dtype), w) for w in ws)

    @staticmethod
    def backward(ctx, *grads):
        x, *ws = ctx.saved_tensors
        xd, mask = dropout_again(x, ctx.p, ctx.state)  # the forward's mask again
        gx, gws = None, []
        for g, w, need in zip(grads, ws, ctx.needs_input_grad[2:]):
            if g is None:
                gws.append(None)
                continue
            gws.append(g.reshape(-1, g.shape[-1]).T @ xd.reshape(-1, x.shape[-1]).to(g.dtype) if need else None)
            if ctx.needs_input_grad[0]:
                gi = g @ w.to(g.dtype)  # (..., in)
                gx = gi if gx is None else gx + gi
        if gx is not None:
            gx = _dropout_backward(gx, mask, ctx.p).to(x.dtype)
        return (gx, None, *gws)


# ----------------------------- lean machinery: a module's zero-padded factors built at once (PiLoRA, TASO)
# PiLoRA stage 2 and TASO run one LoRA pair on zero-padded factors built from compact blocks: a few small kernels
# per adapter and forward. The module holding them (Llama: attention, MLP) builds all of its adapters' at once in
# a forward pre-hook (the class's padded(): one cat and cast of every block, a scatter per row group), inside the
# checkpointed decoder layer, so a recompute builds them again. Plain form: each adapter's factors().

def together(model, cls):
    """Has every module of `model` holding `cls` adapters build their padded factors in one cls.padded(layers,
    cache) before its forward, each adapter's forward taking its pair (`prebuilt`, dropped after the holder's
    forward). A holder that is never called (a ModuleList) or is traced by torch.compile leaves each adapter to
    build its own. A second call adds no hook."""
    for parent in model.modules():
        done = parent.__dict__.get("_together", ())
        if cls not in done and any(isinstance(m, cls) for m in parent.children()):
            parent._together = {*done, cls}
            parent.register_forward_pre_hook(partial(_build, cls, {}))
            parent.register_forward_hook(partial(_drop, cls), always_call=True)


def _build(cls, cache, parent, args):
    layers = [m for m in parent.children() if isinstance(m, cls) and m.lean]
    if layers and not torch.compiler.is_compiling():
        for L, AB in zip(layers, cls.padded(layers, cache)):
            L.prebuilt = AB


def _drop(cls, parent, args, out):
    for m in parent.children():
        if isinstance(m, cls) and m.prebuilt is not None:
            m.prebuilt = None


def row_positions(cache, index_lists, sizes):
    """For each list of index buffers (one per block of `sizes` rows, the blocks stacked end to end): the rows
    they name in the stack, cat(idx_k + start of block k). Kept in `cache` while the buffers are the same
    tensors at the same version (a move to another device or a write into one makes them again)."""
    stamp = [(b, b._version) for idx in index_lists for b in idx]
    old = cache.get("stamp")
    if old is None or len(old) != len(stamp) or any(a is not b or u != v for (a, u), (b, v) in zip(old, stamp)):
        starts = [0, *itertools.accumulate(sizes)]
        with torch.no_grad():
            cache.update(stamp=stamp, value=[torch.cat([i + o for i, o in zip(idx, starts)]) for idx in index_lists])
    return cache["value"]


def check_rank(base: nn.Linear, r: int):
    if not 1 <= r <= min(base.in_features, base.out_features):
        raise UserError(f"rank {r} does not fit a {base.out_features}x{base.in_features} layer; "
                        f"pass `r` between 1 and {min(base.in_features, base.out_features)}")


def check_fraction(name: str, value: float):
    need(isinstance(value, (int, float)) and 0 < value <= 1, f"`{name}` must be in (0, 1], got {value!r}")


# ------------------------------------------------------------------------------------ merge

def merged_linear(base: nn.Linear, delta, rows=None, cols=None) -> nn.Linear:
    """A plain Linear with weight W + delta placed at rows × cols (all when None), computed in fp32
    and cast once to W's dtype. Rows / columns outside the block are bit-identical to W."""
    w = base.weight.detach().to(torch.float32, copy=True)  # never write into the base weight
    d = delta.detach().float()
    if rows is not None and cols is not None:
        w[rows.unsqueeze(1), cols.unsqueeze(0)] += d
    elif rows is not None:
        w[rows] += d
    elif cols is not None:
        w[:, cols] += d
    else:
        w += d
    new = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                    device=w.device, dtype=base.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if base.bias is not None:
            new.bias.copy_(base.bias)
    return new.requires_grad_(False)


# --------------------------------------------------------------------------- finding the targets

def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_targets(model, targets=None, defaults=DEFAULT_TARGETS, heads=()):
    """Names of the nn.Linear modules whose name ends with one of `targets` (a list of suffixes,
    matched on whole dotted components); architecture defaults when None. Heads are never targets."""
    if targets is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind not in defaults:
            raise UserError(f"no default targets for model type {kind!r}; pass `targets` "
                            f"(this model's linear layers end in: {', '.join(suffixes(model))})")
        targets = defaults[kind]
    names = [n for n in linear_names(model)
             if any(n == t or n.endswith("." + t) for t in targets) and not is_head(n, heads)]
    if not names:
        raise UserError(f"no linear layer matches targets {list(targets)}; pass `targets` with "
                        f"some of this model's linear-layer suffixes: {', '.join(suffixes(model))}")
    return names


def suffixes(model):
    seen = []
    for n in linear_names(model):
        s = ".".join(p for p in n.split(".")[-2:] if not p.isdigit())
        if s not in seen:
            seen.append(s)
    return seen


def is_head(name, heads):
    """True when module or tensor `name` is (in) one of the modules named by `heads` (suffixes)."""
    return any(name == h or name.startswith(h + ".") or name.endswith("." + h) or ("." + h + ".") in name
               for h in heads)


def replace_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare(model, heads=(), method=None, state=None):
    """Freeze every base weight; the modules named by `heads` (a new task head, e.g. ["classifier"])
    stay trainable and are saved with the adapter. Every attach starts here: a model that holds adapters
    already (ours or PEFT's), a `method` object attached before and another method's `state` are refused."""
    if method is not None and method.model is not None:
        raise RuntimeError(f"this {type(method).__name__} object is attached to a model already; build a new "
                           f"method object for each model (and each run)")
    if method is not None and state is not None and state.get("method", type(method).__name__) != type(method).__name__:
        raise UserError(f"the state was saved by {state['method']}, not {type(method).__name__}; attach it with "
                        f"the method (and settings) that saved it")
    held = [n for n, m in model.named_modules() if (hasattr(m, "base") and hasattr(m, "merge"))
            or type(m).__module__.startswith("peft.")]
    if held:
        raise UserError(f"the model holds adapters already ({held[0] or type(model).__name__}, {len(held)} modules); "
                        f"attach to the plain base model (for PEFT: model.merge_and_unload() or unload() first)")
    for n, p in model.named_parameters():
        p.requires_grad_(is_head(n, heads))
    return model


def task_loss(model, batch):
    """model(**batch).loss for a scoring pass, refusing what attach(model, batches) cannot score."""
    if not isinstance(batch, Mapping):
        raise UserError(f"attach(model, batches) got a batch of type {type(batch).__name__}; give each batch as "
                        f"a dict of model inputs with labels, e.g. dict(input_ids=..., labels=...), so that "
                        f"model(**batch).loss is the task loss")
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise UserError(f"attach(model, batches): model(**batch) returned no loss (batch keys: "
                        f"{', '.join(batch)}); put the targets in each batch as `labels`")
    return loss


def need_grads(ok, who, step):
    """A scoring or stage decision about to be made from gradients that are all missing or zero."""
    if not ok:
        raise RuntimeError(f"{who}: the gradients of step {step} are all missing or zero; call "
                           f"method.after_backward(step) after loss.backward() and before optimizer.step() and "
                           f"optimizer.zero_grad()")


@contextmanager
def scoring_mode(model):
    """eval() for an importance pass (no dropout: the importance of the pretrained model, not of a random
    sub-network), every module, checkpointed layers included: HF checkpoints a layer only in training mode,
    and a layer's own functional dropout (OPT, BART) reads that same flag, so a checkpointed layer is run
    in eval mode through checkpoint() here instead. Training flags and forwards are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True and  # transformers'
              any(c.__name__ == "GradientCheckpointingLayer" for c in type(m).__mro__)]  # without importing it
    model.eval()
    for m in layers:  # an instance attribute shadows the class's forward until deleted
        m.forward = partial(checkpoint, m.forward, use_reentrant=False)
    try:
        yield model
    finally:
        for m in layers:
            del m.forward
        for m, t in modes.items():
            m.training = t


def weight_groups(weights, groups):
    """`weights` ({name: tensor}, model order) cut into `groups` runs of consecutive weights with about
    equal numbers of elements. An importance pass run once per run holds its fp32 sums for one run at a
    time (peak ÷ groups) and gives the same scores: a weight's gradient does not depend on which other
    weights require one. The price: one more pass over the calibration batches per run."""
    names, total = list(weights), sum(w.numel() for w in weights.values())
    if groups >= len(names):
        return [{n: weights[n]} for n in names]
    out, seen = [{} for _ in range(groups)], 0
    for n in names:
        out[min(len(out) - 1, (2 * seen + weights[n].numel()) * len(out) // max(2 * total, 1))][n] = weights[n]
        seen += weights[n].numel()
    return [g for g in out if g]


# --------------------------------------------------------------------------- adapters in a model

def merge_adapters(model):
    """Replace every adapter layer (anything with a .merge()) by its merged plain Linear, in place."""
    for name, mod in list(model.named_modules()):
        if name and hasattr(mod, "merge") and hasattr(mod, "base"):
            replace_module(model, name, mod.merge())
    return model


def adapters(model, cls):
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


# ------------------------------------------------- data parallel (torchrun + DDP, see train.py)
# Under torchrun every process holds a share of each step's (and each scoring pass's) batches: batch k
# goes to process k mod world size. DDP sums the gradients (it does not average them), so a quantity a
# method computes from its own batches is a partial sum and all_reduce() makes it the one-process value.

def world():
    """(rank, world size) of this process: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_len(n):
    """How many of n batches dealt out in turn (batch k to process k mod world size) this process gets."""
    rank, size = world()
    return len(range(rank, n, size))


def all_reduce(t):
    """t summed over the processes, in place (a no-op in one process); returns t."""
    if world()[1] == 1:
        return t
    x = t.to("cuda") if dist.get_backend() == "nccl" else t  # NCCL reduces GPU tensors only
    dist.all_reduce(x)
    if x is not t:
        t.copy_(x)
    return t


def all_gather(obj):
    """[obj of process 0, obj of process 1, ...] for a picklable obj; [obj] in one process."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------- method interface

class Method:
    """The hooks a training loop calls, identical in every method file (examples/own_loop.py):

    attach(model, batches, state=None)  inject adapters; may run a scoring pass on `batches` (an
                                        iterator of ready batches, `model(**batch).loss` is the task
                                        loss). With `state` (from state_dict()) restore, don't score.
    after_backward(step)                gradients of optimizer step `step` (0, 1, 2, ...) are complete
                                        (all micro-batches), before clipping and optimizer.step().
    after_step(step) -> bool            after optimizer.step(); True when the set of trainable tensors
                                        changed: rebuild the optimizer (and its LR scheduler) over
                                        param_groups(lr); trainable() lists the tensors (for clipping).
    state_dict()                        everything attach(state=...) needs to rebuild this run:
                                        choices() and the trainable tensors ("tensors").
    choices()                           the method's name and decisions (rows, columns, modules,
                                        stage), no tensor it trains: a checkpoint's, saved beside them.
    export(model)                       merge adapters into plain Linears (no extra latency).
    summary()                           the method's fields of summary.json (plots.py draws its state).

    `prefix` names the method's trainable tensors; `lr_scale` multiplies their learning rate;
    `schedule_start` is the step at which the current learning-rate schedule (warmup) began; `stage` is
    shown in the progress bar; `unused_params`: some trainable tensors may get no gradient in a step
    (DDP's find_unused_parameters). `run_steps(steps)` is the number of optimizer steps the run takes
    given the loop's count (PiLoRA's stage 1 may add its own). Constructors take keywords only, named by
    the paper and checked at once (ValueError naming the keyword); train.py maps its flags to them.
    Misuse is loud: hooks before attach; a step that goes back; the first optimizer step after attach, and
    the first after a True from after_step, that lacks the method's tensors (or keeps dropped ones), loses
    its learning-rate scale, or (after a True) drops the LR scheduler that drove the old optimizer. A correct
    loop pays an int compare per hook and one set of tensor ids at those two steps.
    """
    prefix = "lora_"
    lr_scale = 1.0
    schedule_start = 0
    stage = "train"
    unused_params = False
    model = None
    next_step = 0  # the step the next hook call is for: after_step(t) sets t + 1
    _held = None   # what the watched optimizer step lacked ([problems], [fixes]), until the next hook
    _sched = False  # the watched optimizer had an LR scheduler (torch's schedulers set "initial_lr")
    _handle = None  # the optimizer step post-hook while watching

    def run_steps(self, steps):
        return steps

    def after_backward(self, step):
        self.check_step(step, "after_backward")

    def after_step(self, step):
        self.check_step(step, "after_step")
        self.next_step = step + 1
        return False

    def attached(self, model, state=None):
        """The end of every attach: the method belongs to `model` now; a `state` from state_dict() loads
        the trainable tensors it carries. Arms the check of the first optimizer step."""
        self.model = model
        tensors = None if state is None else state.get("tensors")
        if tensors is not None:
            mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
            bad = sorted(set(mine) ^ set(tensors)) or [n for n in mine if mine[n].shape != tensors[n].shape]
            if bad:
                raise UserError(f"the state does not fit this model ({bad[0]}: {len(bad)} tensors differ); attach "
                                f"it to the model it was saved from, with the same method settings")
            with torch.no_grad():
                for n, p in mine.items():
                    p.copy_(tensors[n])
        self.watch()
        return model

    def trainable(self):
        """The tensors that train now (adapters and heads): what the optimizer must hold."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}: call attach(model) first")
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameters(self):
        """trainable(), refused when the method scales its tensors' learning rate (use param_groups(lr))."""
        if self.lr_scale != 1:
            raise RuntimeError(f"{type(self).__name__} trains its tensors at {self.lr_scale:.4g}x the learning rate; "
                               f"build the optimizer over method.param_groups(lr) (clip over method.trainable())")
        return self.trainable()

    def param_groups(self, lr, weight_decay=0.0):
        """trainable() as AdamW groups: decay for matrices, none for vectors; the method's tensors (leaf
        name starts with `prefix`) at lr · lr_scale. Each group carries its "lr_scale"."""
        groups = {}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                scale = self.lr_scale if n.rpartition(".")[2].startswith(self.prefix) else 1.0
                groups.setdefault((scale, weight_decay if p.dim() >= 2 else 0.0), []).append(p)
        return [{"params": ps, "lr": lr * s, "lr_scale": s, "weight_decay": d} for (s, d), ps in groups.items()]

    def check_step(self, step, hook, exact=False):
        """Hooks get the 0-based optimizer step counting up (exact: each step once, after_step included)."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.{hook}({step}): call method.attach(model) first")
        if step < self.next_step or (exact and step > self.next_step):
            raise RuntimeError(f"{type(self).__name__}.{hook}({step}): expected step {self.next_step}; call "
                               f"after_backward(step) then after_step(step) once per optimizer step, step = 0, 1, ...")
        if self._held is not None:  # the watched step came: stop watching (removed here, not while torch runs hooks)
            held, self._held = self._held, None
            self._handle = self._handle.remove()
            if held[0]:
                raise RuntimeError(f"{type(self).__name__}: the optimizer step {' and '.join(held[0])}; {'; '.join(held[1])}")

    def changed(self, before):
        """after_step is about to return True; `before` were the trainable tensors until now."""
        self.watch(before)

    def watch(self, before=()):
        """The next optimizer step that holds a tensor of this model (a torch step post-hook; other models'
        optimizers pass) notes what it lacks; the next hook raises with the fix."""
        now = {id(p) for p in self.trainable()}
        ours = {id(p) for n, p in self.model.named_parameters() if p.requires_grad
                and n.rpartition(".")[2].startswith(self.prefix)}
        left = {id(p) for p in before} - now
        model = {id(p) for p in self.model.parameters()} | left
        change, me = bool(before), weakref.ref(self)  # the hook must not keep the method (and its model) alive

        def note(opt, args, kwargs):
            self = me()
            if self is None:
                return
            group = {id(p): g for g in opt.param_groups for p in g["params"]}
            if self._held is not None or not model & group.keys():
                return
            missing, stale = len(now - group.keys()), len(left & group.keys())
            lost = sum(group[i].get("lr_scale", 1.0) != self.lr_scale for i in ours & group.keys())
            sched = any("initial_lr" in g for g in opt.param_groups)
            whats = [what for what, bad in (
                (f"lacks {missing} of the {len(now)} tensors that train now", missing),
                (f"holds {stale} tensors that left", stale),
                (f"runs {lost} of the method's tensors without its learning-rate scale {self.lr_scale:.4g}", lost)) if bad]
            fixes = ["rebuild the optimizer over method.param_groups(lr)" + " when after_step() returns True" * change] * bool(whats)
            if change and self._sched and not sched:
                whats.append("has no LR scheduler while the optimizer before had one")
                fixes.append("rebuild the LR scheduler over the new optimizer too (its schedule from method.schedule_start)")
            self._held = (whats, fixes)
            self._sched = sched
        if self._handle is not None:
            self._handle.remove()
        self._handle = register_optimizer_step_post_hook(note)
        weakref.finalize(self, self._handle.remove)

    def state_dict(self):
        """What attach(model, state=...) needs to rebuild this run: choices() and the trainable tensors."""
        return {**self.choices(),
                "tensors": {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}}

    def choices(self):
        """The method's name; each method adds its decisions (rows, columns, modules, stage)."""
        return {"method": type(self).__name__}

    def export(self, model):
        return merge_adapters(model)

    def summary(self):
        return {}


class LoRA(Method):
    """Plain LoRA on the targets: the baseline every benchmark compares against.

    r, alpha, dropout  rank r, α (s = α / r) and the adapter's input dropout (Hu et al. 2021)
    targets            module-name suffixes to adapt (None: common.DEFAULT_TARGETS for the model type)
    heads              module names that train fully (a new task head, e.g. ["classifier"]); never adapted
    """

    def __init__(self, *, r=8, alpha=16.0, dropout=0.05, targets=None, heads=()):
        check_lora(r, alpha, dropout)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.targets, self.heads = check_names(targets, "targets"), check_names(heads, "heads")

    def attach(self, model, batches=(), state=None):
        prepare(model, self.heads, self, state)
        self.names = find_targets(model, self.targets, heads=self.heads)
        for n in self.names:
            replace_module(model, n, LoRALinear(model.get_submodule(n), self.r, self.alpha, self.dropout))
        return self.attached(model, state)

    def summary(self):
        return {"r": self.r, "alpha": self.alpha, "adapted_modules": len(self.names)}
