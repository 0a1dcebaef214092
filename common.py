"""What two or more methods share: the LoRA layer, target discovery, the "mask mapping" scatter of
compact row blocks, merging, an EMA, parameter counting, and the Method interface with plain LoRA
(`--method lora`) as the baseline.

LoRA (Hu et al. 2021; G²R² Eq 1–3): h = W₀x + s·B A x with A (r × in, Kaiming-uniform a=√5),
B (out × r, zeros) and s = α / r. PyTorch layout throughout: a weight is (out × in).
"""
import hashlib
import math
import os
from contextlib import contextmanager
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
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
# New task heads are trained fully and saved with the adapter (never adapted, never frozen).
HEAD_NAMES = ("classifier", "score", "pooler.dense")


class UserError(ValueError):
    """Bad input (a flag, file, folder, model, checkpoint): train.py prints `error: <message>` and
    exits 2. The message is one line, what is wrong then `; ` and the fix."""


# ----------------------------------------------------------------------------- the LoRA layer

class LoRALinear(nn.Module):
    """A frozen `base` Linear plus s·B(A(dropout(x))); A, B in fp32, computed under the caller's autocast."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_rank(base, r)
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def lora_delta(self, x, dropout=True):
        """s·B A dropout(x), (..., out). Same dtype as x; no explicit fp32 copy of x under autocast, no kept
        dropped copy (dropout_linear). dropout=False: x is already dropped."""
        ax, = dropout_linear(x, self.dropout if dropout else None, self.lora_A)  # (..., r)
        return (F.linear(ax, self.lora_B) * self.scaling).to(x.dtype)  # (..., out)

    def forward(self, x):
        return self.base(x) + self.lora_delta(x)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A).mul_(self.scaling)  # (out, in), fp32, one out × in tensor

    def merge(self) -> nn.Linear:
        return merged_linear(self.base, self.delta_weight())

    def lora_factors(self):
        """(A, B, α) in PEFT's LoRA layout (ΔW = (α / rank)·B A): this layer's own factors."""
        return self.lora_A.detach().float(), self.lora_B.detach().float(), self.scaling * self.lora_A.shape[0]


def adapter_input(x, weight):
    """x as F.linear(x, weight) wants it: unchanged under autocast (autocast casts both operands),
    cast to the adapter's dtype otherwise (a bf16 model run without autocast)."""
    if torch.is_autocast_enabled(x.device.type) or x.dtype == weight.dtype:
        return x
    return x.to(weight.dtype)


def dropout_linear(x, dropout, *weights):
    """(F.linear(d, w) for w in weights) with d = dropout(x), one mask for all: what nn.Dropout followed by the
    adapter's first projection computes (the same draws from the same RNG state, CPU-exact), without the
    memory. Autograd keeps x (shared by every adapter reading it, and by nothing when x is the base layer's
    input: a frozen matmul saves only its weight), the weights and the RNG state — not d and not the mask,
    which backward draws again. `dropout`: an nn.Dropout (active while training), nn.Identity or None."""
    p = active_p(dropout)
    if p == 0 or not weights:
        return tuple(F.linear(adapter_input(x, w), w) for w in weights)
    return _DropoutLinear.apply(x, p, *weights)


def active_p(dropout):
    """The drop probability `dropout` applies now: p of an nn.Dropout in training mode, else 0."""
    return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _dropout_scale(x, p):
    """The mask / (1 − p) that nn.Dropout multiplies x by (CPU: bernoulli_ on a tensor like x, then the divide),
    in fp32 at least: 1 / (1 − p) rounded to bf16 would bias every kept value (+0.2 % at p = 0.05)."""
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, torch.float32)).bernoulli_(1 - p).div_(1 - p)


def _generator(device):
    return torch.default_generator if device.type == "cpu" else torch.cuda.default_generators[
        device.index if device.index is not None else torch.cuda.current_device()]


def rng_state(device):
    """The state of `device`'s default generator: what dropout_linear draws its mask from next."""
    return _generator(device).get_state()


def dropout_scale_again(x, p, state):
    """The mask / (1 − p) that dropout_linear drew for x from generator `state` (rng_state before the call),
    drawn again; the generator's own stream is left where it was."""
    gen = _generator(x.device)
    now = gen.get_state()
    gen.set_state(state)
    try:
        return _dropout_scale(x, p)
    finally:
        gen.set_state(now)


class _DropoutLinear(torch.autograd.Function):
    """dropout_linear's autograd: saves x, the weights and the generator state; backward redraws the mask."""

    @staticmethod
    def forward(ctx, x, p, *weights):
        ctx.p, ctx.state = p, rng_state(x.device)
        xd = (x * _dropout_scale(x, p)).to(x.dtype)  # one rounding of the exact product
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(adapter_input(xd, w), w) for w in weights)  # under the caller's autocast

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        scale = dropout_scale_again(x, ctx.p, ctx.state)  # the forward's mask again
        xd = (x * scale).to(x.dtype)
        gx, gws = None, []
        for g, w, need in zip(grads, weights, ctx.needs_input_grad[2:]):
            if g is None:
                gws.append(None)
                continue
            gws.append(g.reshape(-1, g.shape[-1]).T @ xd.to(g.dtype).reshape(-1, x.shape[-1]) if need else None)
            if ctx.needs_input_grad[0]:
                gi = g @ w.to(g.dtype)  # (..., in)
                gx = gi if gx is None else gx + gi
        if gx is not None:
            gx = (gx.to(scale.dtype) * scale).to(x.dtype)
        return (gx, None, *gws)


def check_rank(base: nn.Linear, r: int):
    if not 1 <= r <= min(base.in_features, base.out_features):
        raise UserError(f"rank {r} does not fit a {base.out_features}x{base.in_features} layer; "
                        f"pass --r between 1 and {min(base.in_features, base.out_features)}")


def check_fraction(name: str, value: float):
    if not 0 < value <= 1:
        raise UserError(f"--{name} must be in (0, 1], got {value}")


# ----------------------------------------------------------------- compact blocks: scatter, merge

class _ScatterRows(torch.autograd.Function):
    """out[..., idx] += y in place; backward: ∂out passes through, ∂y = ∂out[..., idx]. Saves only idx."""

    @staticmethod
    def forward(ctx, out, idx, y):
        ctx.mark_dirty(out)
        ctx.save_for_backward(idx)
        return out.index_add_(-1, idx, y)

    @staticmethod
    def backward(ctx, grad):
        idx, = ctx.saved_tensors
        return grad, None, grad.index_select(-1, idx)


def scatter_rows(out, idx, y):
    """The mask mapping M y (PiLoRA Eq 9, SPSFT Eq 5, TASO scatter_R): add compact outputs y (..., |idx|)
    into the output features idx of out (..., d_out), in place. Autograd saves only idx, never y (the
    autograd form `out.index_add(-1, idx, y)` saves y: ../shared/notes/scatter-saved-tensors.md), and
    the in-place index_add_ / index_select pair runs ~4× faster on CPU than `out[..., idx] += y`."""
    return _ScatterRows.apply(out, idx, y)


def gather_cols(x, idx):
    """x[..., idx]: the input columns a compact block reads (TASO A_C). index_select saves only idx for
    backward (its backward is an index_add, ~10 % faster on CPU than x[..., idx]'s index_put)."""
    return x.index_select(-1, idx)


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


def ema(avg, x, beta):
    """Exponential moving average beta·avg + (1 − beta)·x; the first value starts the average."""
    return x.clone() if avg is None else beta * avg + (1 - beta) * x


# --------------------------------------------------------------------------- finding the targets

def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def find_targets(model, targets=None, defaults=DEFAULT_TARGETS):
    """Names of the nn.Linear modules whose name ends with one of `targets` (a list of suffixes,
    matched on whole dotted components); architecture defaults when None. Heads are never targets."""
    if targets is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind not in defaults:
            raise UserError(f"no default targets for model type {kind!r}; pass --targets "
                            f"(this model's linear layers end in: {', '.join(suffixes(model))})")
        targets = defaults[kind]
    names = [n for n in linear_names(model)
             if any(n == t or n.endswith("." + t) for t in targets) and not is_head(n)]
    if not names:
        raise UserError(f"no linear layer matches targets {list(targets)}; pass --targets with "
                        f"some of this model's linear-layer suffixes: {', '.join(suffixes(model))}")
    return names


def suffixes(model):
    seen = []
    for n in linear_names(model):
        s = ".".join(p for p in n.split(".")[-2:] if not p.isdigit())
        if s not in seen:
            seen.append(s)
    return seen


def is_head(name):
    return any(name == h or name.startswith(h + ".") or name.endswith("." + h) or ("." + h + ".") in name
               for h in HEAD_NAMES)


def replace_module(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prepare(model):
    """Freeze every base weight; heads (HEAD_NAMES) stay trainable and are saved with the adapter."""
    for n, p in model.named_parameters():
        p.requires_grad_(is_head(n))
    return model


@contextmanager
def scoring_mode(model):
    """eval() for an importance pass (no dropout: the importance of the pretrained model, not of a random
    sub-network), every module, checkpointed layers included: HF checkpoints a layer only in training mode,
    and a layer's own functional dropout (OPT, BART) reads that same flag, so a checkpointed layer is run
    in eval mode through checkpoint() here instead. Training flags and forwards are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
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


# ------------------------------------------------------------------------------- bookkeeping

def count_params(model):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def params_per_module(model, prefix):
    """{module name: trainable params in tensors named prefix*} for every adapted module."""
    out = {}
    for n, p in model.named_parameters():
        mod, _, leaf = n.rpartition(".")
        if p.requires_grad and leaf.startswith(prefix):
            out[mod] = out.get(mod, 0) + p.numel()
    return out


def trainable_state_dict(model):
    """The tensors a run trains (adapters and heads), detached, as saved in adapter.safetensors."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


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


def check_same(decision, what):
    """Assert that a decision (tensors, lists, dicts of them) is identical on every process: methods
    call it where they fix rows, regions or pruned modules. Skipped under python -O and in one process."""
    if __debug__ and world()[1] > 1:
        plain = lambda x: (x.tolist() if torch.is_tensor(x) else {k: plain(v) for k, v in x.items()}
                           if isinstance(x, dict) else [plain(v) for v in x] if isinstance(x, (list, tuple)) else x)
        digests = all_gather(hashlib.sha256(repr(plain(decision)).encode()).hexdigest())
        if len(set(digests)) > 1:
            raise RuntimeError(f"{what} differ between processes (digests {digests}); the all-reduce "
                               f"before this decision is missing or the processes ran different code")


# ---------------------------------------------------------------------------- method interface

class Method:
    """The hooks train.py calls, identical in every method file:

    attach(model, batches, state=None)  inject adapters; may run a scoring pass on `batches` (an
                                        iterator of ready batches, `model(**batch).loss` is the task
                                        loss). With `state` (from state_dict()) restore, don't score.
    after_backward(step)                gradients of optimizer step `step` are complete (all micro-batches).
    after_step(step) -> bool            after optimizer.step(); True when the set of trainable tensors
                                        changed and the trainer must rebuild its optimizer.
    state_dict()                        everything attach(state=...) needs to rebuild this run.
    export(model)                       merge adapters into plain Linears (no extra latency).
                                        (Adapter layers carry .merge() and .lora_factors(): the PEFT
                                        export, save_peft, and merge_adapters walk them; no hook needed.)
    summary() / plot(out_dir)           the method's fields of summary.json, its optional picture.

    `prefix` names the method's trainable tensors; `lr_scale` multiplies their learning rate;
    `schedule_start` is the step at which the current learning-rate schedule (warmup) began;
    `stage` is shown in the progress bar; `unused_params` says that some trainable tensors may get no
    gradient in a step (under torchrun DDP then looks for them: find_unused_parameters). Constructors
    take keyword arguments named as the CLI flags (train.py calls Method(**vars(args), total_steps=..., steps_per_epoch=...)); `run_steps(steps)` is
    the number of optimizer steps the run takes given the trainer's count (--max_steps, else --epochs
    epochs); a method with steps of its own (PiLoRA's stage 1) adds them there.
    """
    prefix = "lora_"
    lr_scale = 1.0
    schedule_start = 0
    stage = "train"
    unused_params = False

    def run_steps(self, steps):
        return steps

    def after_backward(self, step):
        pass

    def after_step(self, step):
        return False

    def state_dict(self):
        return {}

    def export(self, model):
        return merge_adapters(model)

    def summary(self):
        return {}

    def plot(self, out_dir):
        return None


class LoRA(Method):
    """Plain LoRA on the targets: the baseline every benchmark compares against."""

    def __init__(self, r=8, alpha=16.0, dropout=0.05, targets=None, **unused):
        self.r, self.alpha, self.dropout, self.targets = r, alpha, dropout, targets

    def attach(self, model, batches=(), state=None):
        prepare(model)
        self.names = find_targets(model, self.targets)
        for n in self.names:
            replace_module(model, n, LoRALinear(model.get_submodule(n), self.r, self.alpha, self.dropout))
        self.model = model
        return model

    def summary(self):
        return {"r": self.r, "alpha": self.alpha, "adapted_modules": len(self.names)}


# ------------------------------------------------------------------- pictures (optional matplotlib)

def pyplot():
    """matplotlib.pyplot on the file backend, or None when matplotlib (optional) is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, out_dir, name, dpi=120):
    """Write fig to out_dir/name (tight layout), close it, return the path."""
    import matplotlib.pyplot as plt
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
