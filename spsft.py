"""SPSFT: structured-pruning-based sparse fine-tuning of selected output rows ("PruFT" in the authors' code).

Paper: ../shared/papers/004_584a2078842cda78.txt. Per target weight W (d_out × d_in):
  §3.2, App. A  score every output neuron (row) i: ℓ2  η_i = ‖W_i‖₂ (data-free; the paper's choice for
                LLMs, §5.3), Taylor  η_i = Σ_j |mean_x ∂ℒ/∂w_ij · w_ij| (App. A, last line), or
                Quantiles-Mean Taylor (Eq 6–7): class-wise η_i^t from the loss of class t alone, then
                the mean of the 0 %, 10 %, …, 100 % quantiles of {η_i^t}_t.
  §3.1          keep the top-r rows i_1 … i_r; W_f ∈ ℝ^{r × d_in} starts at zero; M ∈ {0,1}^{d_out × r}
                with M_{i_j j} = 1 places them, so Ŵ = W + M W_f (Eq 1 with W_s = M W_f).
  Eq 5          h = f(W, x) + f(M W_f, x) = base(x) + M (W_f x): W_f x is scattered into the selected
                output features in place (scatter_rows), so autograd keeps x and W_f
                only, never the tokens × r activation W_f x that LoRA keeps as A x (§5.4, App. D.4).
                The plain form (`lean = False`): F.linear(x, M W_f) with M dense, tested equal.
  §4.2, §5.3    all attention + MLP linear layers, or MLP only (`mlp_only`, the "FA" rows of
                Tables 6–9: attention frozen). Heads (`heads`) train fully. No dropout.
  Merge         W[idx] += W_f in fp32, cast once: a plain Linear, no extra latency.

Deviations and readings:
- W_f starts at zero (§3.1, so Ŵ = W at step 0); the authors' code is reported (issue 18) to draw its
  rows Kaiming-uniform instead.
- Parameter dependencies (§4.3, App. B: fine-tuning dependent columns of the next layer together) are
  out of scope: the paper's own conclusion (§5.2, Tables 4–5) is not to search for them.
- Scores use the weight row only; biases are neither scored nor tuned (W_f is r × d_in, §3.1).
- Against LoRA, the summary reports the rank-matched LoRA: the rank whose Σ r·(d_in + d_out) over
  the targets is nearest SPSFT's parameter count.
- Eq 7's quantiles are linear-interpolation quantiles over the classes seen.
- Eq 6 writes η_i^t = |wᵀ∇_w L(D^t)| (|·| of the sum over j); we use App. A's final per-element form
  Σ_j |w_j ∂L(D^t)/∂w_j| for both Taylor variants, so QM-Taylor differs from Taylor only by the class split.
- "mean over x" is the mean over calibration examples: each batch's loss weighted by its number of
  examples (Taylor; a short last batch counts for what it holds) and the mean loss over the class-t
  examples (QM-Taylor, each class-t sub-batch weighted by its size); classes absent from the
  calibration batches are left out of the quantiles. For causal LMs a batch's loss is its token mean.
- Both Taylor passes score with dropout off (eval mode, gradient checkpointing kept): the importance
  of the pretrained model, not of one random sub-network.
- `ratio`: the paper gives no rounding ("approximately 5 %", §4.2); r = ratio·d_out rounded
  to the nearest whole row, halves up (2.5 → 3), at least 1.
- The gradient mean sits inside |·|, so Taylor holds one fp32 gradient sum per target matrix until the
  last calibration batch: the memory of dense fine-tuning's gradients, which is why §5.3 uses ℓ2 for
  LLMs. `score_groups` = G keeps 1/G of it at a time (G passes over the same batches, the same rows).
- `norms` (optional, §1.1 bullet 2) trains every LayerNorm / RMSNorm affine vector in full
  (d values each) instead of selecting elements of them.
- Rows come from `rows` / `ratio` (LoRA's r, alpha, dropout are not SPSFT's); Table 8 pairs SPSFT r with LoRA r/2.
"""
import math
import time
from collections import Counter
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

IMPORTANCE = ("l2", "taylor", "qm_taylor")


# ----------------------------------------------------------------------------- the adapter layer

class SPSFTLinear(nn.Module):
    """A frozen `base` Linear plus the selected rows' update: h = W x + M (W_f x) (Eq 5). The lean scatter is kept
    over weight-space forms by counted bytes (bench/count.py count_layer, fwd + bwd, bf16, r 128, 2048 tokens; GB
    read + written, scatter / W + zero-padded W_f / one-hot M matmul): 4096² 0.297 / 0.316 / 0.333, 11008 × 4096
    0.552 / 0.740 / 0.648, 4096 × 11008 0.653 / 0.762 / 0.689; kernels 10 / 9 / 11 (no GPU measured it)."""
    lean = True  # False: the plain line of Eq 5, F.linear(x, M W_f) with M dense (an out × in product)

    def __init__(self, base: nn.Linear, idx: torch.Tensor):
        super().__init__()
        common.check_linear(base)
        idx = common.check_index(idx, base.out_features, "idx")
        common.need(len(idx) > 0, "`idx` (the selected rows) must not be empty")
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.register_buffer("idx", idx.to(device=dev, dtype=torch.long))  # i_1 … i_r, saved with the model
        self.spsft_W_f = nn.Parameter(torch.zeros(len(idx), base.in_features, device=dev,
                                                  dtype=torch.float32))  # §3.1: zeros, so Ŵ = W at step 0

    def forward(self, x):
        if not self.lean:
            return self.base(x) + F.linear(x, self.M() @ self.spsft_W_f)                 # Eq 5
        w = common.cast(self.spsft_W_f, x)  # W_f in autocast's dtype (cast once)
        out, y = self.base(x), F.linear(x.to(w.dtype), w)                             # W x, W_f x
        return scatter_rows(out, self.idx, y.to(out.dtype))                    # Eq 5: W x + M (W_f x)

    def M(self):
        """The row selection M ∈ {0,1}^{d_out × r}, M_{i_j j} = 1 (§3.1), in W_f's dtype."""
        return F.one_hot(self.idx, self.base.out_features).T.to(self.spsft_W_f.dtype)

    def merge(self) -> nn.Linear:
        return common.merged_linear(self.base, self.spsft_W_f, rows=self.idx)          # W + M W_f

    def lora_factors(self):
        """M W_f as a rank-|rows| LoRA for PEFT: B = M, A = W_f, α = r (scaling 1)."""
        return self.spsft_W_f.detach().float(), self.M().detach(), float(len(self.idx))


# ------------------------------------------------------- lean machinery: the row scatter M (W_f x)

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
    """The mask mapping M y (Eq 5): add compact outputs y (..., |idx|)
    into the output features idx of out (..., d_out), in place. Autograd saves only idx, never y (the
    autograd form `out.index_add(-1, idx, y)` saves y: ../shared/notes/scatter-saved-tensors.md), and
    the in-place index_add_ / index_select pair runs ~4× faster on CPU than `out[..., idx] += y`."""
    if torch.compiler.is_compiling():  # the compiler chooses what to save (it cannot trace mark_dirty's in-place form)
        return out.index_add(-1, idx, y)
    return _ScatterRows.apply(out, idx, y)


# ----------------------------------------------------------------------------- importance (§3.2)

def l2_rows(w):
    """Magnitude importance ‖W_i‖₂ of every row (App. A, last line)."""
    return w.detach().float().norm(dim=1)


def taylor_rows(g, w):
    """Taylor importance Σ_j |g_ij · w_ij| of every row, g the mean loss gradient (App. A; Eq 6 per class)."""
    return (g.float() * w.detach().float()).abs().sum(dim=1)


def quantiles_mean(eta_t):
    """Eq 7: the mean of the 0 %, 10 %, …, 100 % quantiles over classes of eta_t (p classes × d_out)."""
    q = torch.linspace(0, 1, 11, dtype=eta_t.dtype, device=eta_t.device)
    return torch.quantile(eta_t, q, dim=0).mean(dim=0)


def taylor_pass(model, weights, terms):
    """Row scores taylor_rows(g, W) for every W in `weights` {name: Parameter}, where g is the gradient
    of Σ_k c_k · loss(batch_k) over `terms` [(batch, c)] (summed over the processes under torchrun before
    the |·|), with dropout off (common.scoring_mode). Each gradient is folded into an fp32 sum as it is
    produced and the model's .grad is freed."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    gsum = {}

    def hook_for(name):
        def hook(p):
            g = p.grad.float()  # the model's .grad is handed over (or cast) and then dropped
            p.grad = None
            gsum[name] = gsum.pop(name).add_(g) if name in gsum else g
        return hook

    handles = [w.requires_grad_(True).register_post_accumulate_grad_hook(hook_for(n)) for n, w in weights.items()]
    try:
        with torch.enable_grad(), common.scoring_mode(model):
            for batch, c in terms:
                (common.task_loss(model, batch) * c).backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        for w in weights.values():
            w.grad = None
    zeros = lambda w: torch.zeros(w.shape, device=w.device)  # a weight no term reached
    return {n: taylor_rows(common.all_reduce(gsum.pop(n) if n in gsum else zeros(w)), w) for n, w in weights.items()}


def class_labels(batches, model):
    """The 1-D integer class labels of every batch; a ValueError for tasks without classes."""
    problem = getattr(getattr(model, "config", None), "problem_type", None)
    for b in batches:
        y = b.get("labels")
        if y is None:
            raise common.UserError("attach(model, batches): a calibration batch has no `labels`; put each "
                                   "example's class in its batch as `labels` (Eq 6 splits the loss by class)")
        if y.dim() != 1 or y.is_floating_point() or problem in ("regression", "multi_label_classification"):
            raise ValueError(f"`importance` qm_taylor needs one class label per example (Eq 6), but this "
                             f"task's labels have shape {tuple(y.shape)}; use `importance` taylor or l2")
    return [b["labels"] for b in batches]


def num_examples(batch):
    return next(v for v in batch.values() if torch.is_tensor(v) and v.dim() > 0).shape[0]


def sub_batch(batch, mask):
    n = len(mask)
    return {k: v[mask] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v for k, v in batch.items()}


def row_importance(model, weights, batches, kind, groups=1):
    """{name: η (d_out,)} for every weight, by `kind` in IMPORTANCE, on the calibration `batches` (a list);
    the gradient passes run once per group of weights (common.weight_groups)."""
    if kind != "l2" and groups > 1:
        return {n: eta for part in common.weight_groups(weights, groups)
                for n, eta in row_importance(model, part, batches, kind).items()}
    if kind == "l2":
        return {n: l2_rows(w) for n, w in weights.items()}
    if not all(isinstance(b, Mapping) for b in batches):  # refused with what attach expects
        common.task_loss(model, next(b for b in batches if not isinstance(b, Mapping)))
    sizes = [num_examples(b) for b in batches]
    labels = class_labels(batches, model) if kind == "qm_taylor" else []
    here = Counter(v for y in labels for v in y[y >= 0].tolist())  # class -> its examples in these batches
    shares = common.all_gather((sum(sizes), here))  # torchrun: every process's share of the batches
    total, n_t = sum(k for k, _ in shares), sum((c for _, c in shares), Counter())
    if not total:
        raise ValueError(f"`importance` {kind} needs calibration batches; give attach() some (or use l2)")
    if kind == "taylor":  # mean over x: each batch's mean loss weighted by its share of the examples
        return taylor_pass(model, weights, [(b, k / total) for b, k in zip(batches, sizes)])
    eta_t = {n: [] for n in weights}
    for t in sorted(n_t):  # Eq 6: η_i^t from L(D^t, F), the mean loss over the class-t examples
        terms = [(sub_batch(b, y == t), int((y == t).sum()) / n_t[t]) for b, y in zip(batches, labels) if (y == t).any()]
        for n, s in taylor_pass(model, weights, terms).items():
            eta_t[n].append(s)
    return {n: quantiles_mean(torch.stack(v)) for n, v in eta_t.items()}  # Eq 7


# ----------------------------------------------------------------------------- selection (§3.1)

def rows_for(d_out, d_in, rows=128, ratio=None):
    """r for one matrix: `ratio` of its d_out·d_in parameters as whole rows of d_in each, i.e. ratio·d_out
    rounded to the nearest row with halves up (2.5 → 3; ≥ 1), else `rows` (≤ d_out)."""
    if ratio is not None:
        return min(d_out, max(1, math.floor(round(ratio * d_out, 9) + 0.5)))  # round(·, 9): float noise
    return min(d_out, rows)


def top_rows(scores, r):
    """Indices of the r largest scores, ascending; ties go to the lower index (stable sort)."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    return order[:r].sort().values


def same_dtype(module, args, out):
    """Forward hook of a trained norm: its output in its input's dtype. RMSNorm returns weight · x̂, so an
    fp32 weight (trainable tensors are fp32) in a bf16 model would make every following layer's input fp32."""
    return out.to(args[0].dtype) if torch.is_tensor(out) and args and torch.is_tensor(args[0]) else out


def is_attention(name):
    return any("attn" in part or "attention" in part for part in name.split("."))


# ----------------------------------------------------------------------------- the method

class SPSFT(common.Method):
    """Score neurons once at attach, tune the top-r rows of every target through W_f, merge at export."""
    prefix = "spsft_"

    def __init__(self, *, targets=None, heads=(), importance="l2", rows=128, ratio=None, calib_batches=8,
                 mlp_only=False, norms=False, score_groups=1):
        """importance     neuron score η: "l2" (data-free), "taylor" (App. A), "qm_taylor" (Eq 6–7, classification)
        rows           r: rows tuned per matrix (the paper's Llama setting r = 128, Tables 6–10)
        ratio          instead of `rows`: this fraction of each matrix's parameters as whole rows (paper: 0.05)
        calib_batches  batches of attach's iterator for taylor / qm_taylor
        score_groups   taylor / qm_taylor: score the targets in this many runs of layers, one pass each
        mlp_only       adapt MLP layers only, attention frozen (the "FA" setting, §5.3)
        norms          also train every LayerNorm / RMSNorm affine vector in full (§1.1)
        targets, heads: as LoRA's (common.LoRA)."""
        common.need(importance in IMPORTANCE, f"`importance` must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
        common.need(isinstance(rows, int) and rows >= 1, f"`rows` must be an integer >= 1, got {rows!r}")
        if ratio is not None:
            common.check_fraction("ratio", ratio)
        common.need(isinstance(calib_batches, int) and calib_batches >= 1,
                    f"`calib_batches` must be an integer >= 1, got {calib_batches!r}")
        common.need(isinstance(score_groups, int) and score_groups >= 1,
                    f"`score_groups` must be an integer >= 1, got {score_groups!r}")
        self.targets, self.heads = common.check_names(targets, "targets"), common.check_names(heads, "heads")
        self.importance, self.rows, self.ratio, self.score_groups = importance, rows, ratio, score_groups
        self.calib_batches, self.mlp_only, self.norms = calib_batches, mlp_only, norms
        self.importance_time_s = 0.0

    def attach(self, model, batches=(), state=None):
        common.prepare(model, self.heads, self, state)
        names = [n for n in common.find_targets(model, self.targets, heads=self.heads)
                 if not (self.mlp_only and is_attention(n))]
        if not names:
            raise ValueError("`mlp_only` left no target; drop it or pass MLP layers in `targets`")
        if state is not None:  # resume: the saved rows, no re-scoring
            if sorted(state["idx"]) != sorted(names):
                raise ValueError("the saved state's SPSFT layers differ from `targets` / `mlp_only`; "
                                 "restore it with the settings of the original run")
            idx = {n: torch.as_tensor(state["idx"][n]) for n in names}
            self.importance_time_s = state["importance_time_s"]
        else:
            weights = {n: model.get_submodule(n).weight for n in names}
            calib = [] if self.importance == "l2" else [b for _, b in zip(range(common.shard_len(self.calib_batches)), batches)]
            t0 = time.perf_counter()
            eta = row_importance(model, weights, calib, self.importance, self.score_groups)
            idx = {n: top_rows(eta[n], rows_for(*w.shape, rows=self.rows, ratio=self.ratio)) for n, w in weights.items()}
            self.importance_time_s = time.perf_counter() - t0  # scoring + selection (top_rows syncs a GPU)
        for n in names:
            common.replace_module(model, n, SPSFTLinear(model.get_submodule(n), idx[n]))
        if self.norms:  # §1.1: normalisation layers' affine vectors, trained in full
            for mod in model.modules():
                if "Norm" in type(mod).__name__:
                    for p in mod.parameters(recurse=False):
                        p.requires_grad_(True)
                    mod.register_forward_hook(same_dtype)  # an fp32 vector must not turn the stream fp32
        self.layers = {n: model.get_submodule(n) for n in names}
        self.shapes = {n: tuple(L.base.weight.shape) for n, L in self.layers.items()}  # (d_out, d_in)
        return self.attached(model, state)

    @property
    def idx(self):
        """{target: its rows}, read from the layers' buffers (which model.load_state_dict restores)."""
        return {n: L.idx.cpu() for n, L in self.layers.items()}

    def choices(self):
        return {**super().choices(), "idx": self.idx, "importance_time_s": self.importance_time_s}

    def summary(self):
        params = sum(len(i) * self.shapes[n][1] for n, i in self.idx.items())   # Σ r · d_in
        sides = sum(d_out + d_in for d_out, d_in in self.shapes.values())       # Σ (d_in + d_out)
        rank = max(1, round(params / sides))  # the LoRA rank whose Σ rank·(d_in + d_out) is nearest SPSFT's params
        return {"importance": self.importance, "importance_time_s": round(self.importance_time_s, 4),
                "adapted_modules": len(self.idx), "mlp_only": self.mlp_only,
                "rows_per_matrix": {n: len(i) for n, i in self.idx.items()},
                "spsft_params": params, "lora_rank_matched": rank, "lora_params_matched": rank * sides}
