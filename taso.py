"""TASO: a sparse LoRA whose structure is fixed before training by the task's importance map.

Paper: Miao, Liu et al., "TASO: Task-Aligned Sparse Optimization for Parameter-Efficient Model
Adaptation", arXiv 2509.17688 (EMNLP 2025). The full method section was not available to us; what
follows is ../shared/papers/taso-notes.md, which marks what the paper states and what is our reading.
The paper's equation numbers are unknown, so the equations are numbered here (T1–T7):

  §1 importance (stated)        T1  I = |W ⊙ G|,  G = Σ_b ∂L_b/∂W over N calibration batches
  §2 core regions (stated)      T2  S_ij = 1 if I_ij is among the top k% entries of I, else 0
                                T3  u_i = mean_j S_ij (rows),  v_j = mean_i S_ij (columns)
                                T4  R = top ⌈p·out⌉ rows by u,  C = top ⌈p·in⌉ columns by v
  §3 sparse LoRA (stated)       T5  y = W x + s · scatter_R( B_R ( A_C x[..., C] ) ),  s = α / r
                                T6  merge: W[R][:, C] += s · B_R A_C
  §4 LR scaling (formula ours)  T7  lr_TASO = lr · ρ^(-1/2),  ρ = p

B_R (|R| × r, zeros) and A_C (r × |C|, Kaiming-uniform over the kept columns) are the trained tensors; each step
builds from them A (r × in) zero outside C and B (out × r) zero outside R, and T5 runs as one LoRA pair
s·B A x: no out × in matrix, no index op on activations (the attention / MLP builds its modules' at once:
TASOLinear.padded, common.together). Trainable parameters per matrix: r·(|R| + |C|);
with the defaults r = 8, p = 1/r that is out + in, the budget of dense LoRA with rank 1.

Our readings and deviations (each is a keyword of TASO):
- N = 64 batches (or the whole iterator if shorter); gradients summed, |·| taken after the sum; no
  optimizer step. The pass holds one weight-sized fp32 buffer per target (also for a bf16 model: summed
  in bf16, issue 18 measured a min overlap of 0.875 against fp64) and frees each `.grad` as soon as
  it is accumulated; dropout is switched off for it (the importance of the pretrained model, not of a
  random sub-network) while gradient checkpointing stays on. `score_groups` = G runs the pass
  once per run of about 1/G of the target weights (common.weight_groups): 1/G of those buffers at a
  time, the same importance, G passes over the same batches (each backward stops at its lowest layer).
- k = 1 %, p = 1/r; row/column ties broken by summed importance, then by the lower index.
- T7 scales the LR of the adapter tensors only (B_R, A_C); trained heads keep the base LR.
- A_C is Kaiming-uniform over its own fan-in |C|, so its entries are √(in/|C|) larger than a dense
  LoRA A's (√8 at p = 1/8); B_R = 0 keeps ΔW = 0 at step 0.
- ρ = p in T7; `lr_scale="linear"` uses ρ^(-1), `"none"` uses 1.
- Adapter dropout acts on the full x (the one LoRA pair reads x): the same distribution as dropping x[..., C].
- Ablations: `metric` g|w|random replace T1 by |G|, |W| or uniform noise (w and random need no
  pass); `select` rows|cols choose only that axis by T3–T4 and draw the other at random with
  the same size, so every variant has the same shape and budget (keeping the other axis whole
  cannot: r·(|R| + in) > r·p·(out + in) whenever p ≤ 1/2 and out ≤ in).
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


# ----------------------------------------------------------------------- the block-sparse LoRA layer

class TASOLinear(nn.Module):
    """A frozen `base` Linear plus s·scatter_R(B_R(A_C x[..., C])) (T5); taso_A, taso_B in fp32."""
    lean = True  # T5 as one LoRA pair on the padded factors(); False: gather and scatter, as written

    def __init__(self, base: nn.Linear, rows, cols, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        common.check_linear(base)
        common.check_lora(r, alpha, dropout)
        common.check_rank(base, r)
        rows, cols = common.check_index(rows, base.out_features, "rows"), common.check_index(cols, base.in_features, "cols")
        common.need(len(rows) and len(cols), f"`rows` and `cols` must not be empty, got {len(rows)} and {len(cols)}")
        self.base = base.requires_grad_(False)
        dev = base.weight.device
        self.register_buffer("rows", rows.to(dev, torch.long))  # R, sorted
        self.register_buffer("cols", cols.to(dev, torch.long))  # C, sorted
        self.taso_A = nn.Parameter(torch.empty(r, len(cols), device=dev, dtype=torch.float32))  # A_C
        self.taso_B = nn.Parameter(torch.zeros(len(rows), r, device=dev, dtype=torch.float32))  # B_R
        nn.init.kaiming_uniform_(self.taso_A, a=math.sqrt(5))  # fan-in = |C|
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.prebuilt = None  # factors() as padded() built them for the module holding this one (common.together)

    def forward(self, x):
        if self.lean:  # one LoRA pair on full x: no index op on x
            A, B = self.prebuilt or self.factors()
            ax, = common.dropout_linear(x, self.dropout, A)  # (..., r)
            return common.add_lora(self.base(x), ax, B, self.scaling)  # W x + s·B A x, in the base's dtype
        y = F.linear(F.linear(self.dropout(x)[..., self.cols], self.taso_A), self.taso_B) * self.scaling  # (..., |R|)
        return self.base(x).index_add(-1, self.rows, y)  # T5: W x + s·scatter_R(B_R A_C x[..., C])

    def factors(self):
        """A (r × in) zero outside the columns C, B (out × r) zero outside the rows R, built from A_C, B_R:
        s·B A is T5's update as one dense LoRA pair."""
        A, B = self.taso_A, self.taso_B
        return (A.new_zeros(len(A), self.base.in_features).index_copy_(1, self.cols, A),
                B.new_zeros(self.base.out_features, B.shape[1]).index_copy_(0, self.rows, B))

    @staticmethod
    def padded(layers, cache):
        """[L.factors() for L in layers] at once (common.together: an attention's or MLP's): each layer's Aᵀ
        (in × r) and B (out × r) are consecutive row blocks of one zero matrix of r columns; A_Cᵀ goes to its rows
        C and B_R to its rows R in one index_copy_, cast once. Layers of different r: one by one."""
        if len({L.taso_A.shape[0] for L in layers}) > 1:
            return [L.factors() for L in layers]
        sizes = [n for L in layers for n in (L.base.in_features, L.base.out_features)]  # Aᵀ, B of each layer
        idx = [i for L in layers for i in (L.cols, L.rows)]
        pos, = common.row_positions(cache, [idx], sizes)
        src = torch.cat([t for L in layers for t in (L.taso_A.T, L.taso_B)])  # (Σ |C| + |R|) × r
        src = common.cast(src, src)  # the compute dtype (autocast's), once for all
        P = src.new_zeros(sum(sizes), src.shape[1]).index_copy_(0, pos, src).split(sizes)
        return [(At.T, B) for At, B in zip(P[::2], P[1::2])]

    def merge(self) -> nn.Linear:  # T6: W[R][:, C] += s·B_R A_C, in fp32
        delta = self.scaling * (self.taso_B @ self.taso_A)  # (|R|, |C|)
        return common.merged_linear(self.base, delta, rows=self.rows, cols=self.cols)

    def lora_factors(self):
        """T5 as a rank-r LoRA for PEFT (factors(), fp32, detached), α = s·r."""
        A, B = (t.detach().float() for t in self.factors())
        return A, B, self.scaling * len(A)


# ------------------------------------------------------------------------------- importance (§1)

def gradient_importance(model, weights, batches, n_batches=64, metric="wg"):
    """T1 over at most `n_batches` batches: ({name: |W ⊙ Σ_b G_b|} (or |Σ_b G_b| for metric "g")
    in fp32, or W's dtype if wider; batches used). One such buffer per weight; each .grad is folded in and
    freed as soon as it is accumulated, so full-size gradients never all exist at once. No optimizer
    step; dropout off (common.scoring_mode); every requires_grad flag and training mode is restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    bufs, hooks = {}, []

    def fold(name):
        def hook(w):  # Σ_b W ⊙ G_b = W ⊙ Σ_b G_b (metric "g": Σ_b G_b), then the .grad is freed
            bufs[name].addcmul_(w.grad, w) if metric == "wg" else bufs[name].add_(w.grad)
            w.grad = None
        return hook

    model.requires_grad_(False)
    try:
        for name, w in weights.items():
            bufs[name] = torch.zeros_like(w, dtype=torch.promote_types(w.dtype, torch.float32))  # ≥ fp32
            w.grad = None
            w.requires_grad_(True)
            hooks.append(w.register_post_accumulate_grad_hook(fold(name)))
        used = 0
        with torch.enable_grad(), common.scoring_mode(model):
            for _, batch in zip(range(n_batches), batches):
                loss = common.task_loss(model, batch)
                if not torch.isfinite(loss):
                    raise ValueError(f"TASO's importance pass got loss {float(loss)} on calibration batch "
                                     f"{used}; check the data (no target tokens left? keep longer sequences)")
                loss.backward()
                used += 1
    finally:
        for h in hooks:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
    if used == 0:
        raise ValueError("TASO's importance pass got no batches; give attach() calibration batches "
                         "or pass `metric`=\"w\" (no pass)")
    for b in bufs.values():  # torchrun: Σ_b over all processes' batches before the |·| of T1
        common.all_reduce(b)
    return {n: b.abs_() for n, b in bufs.items()}, used


# ---------------------------------------------------------------------------- core regions (§2)

def ceil_frac(frac, n):
    """⌈frac·n⌉ without float noise (0.1·30 is 3.0000000000000004), at least 1."""
    return max(1, math.ceil(round(frac * n, 9)))


def topk_mask(I, k):
    """T2: S (bool, same shape as I), True on the ⌈k·numel⌉ largest entries."""
    S = torch.zeros(I.numel(), dtype=torch.bool, device=I.device)
    S[I.flatten().topk(ceil_frac(k, I.numel())).indices] = True
    return S.view_as(I)


def top_lines(score, tiebreak, n):
    """Indices of the n largest `score`, ties by larger `tiebreak`, then lower index; sorted."""
    order = tiebreak.argsort(descending=True, stable=True)
    order = order[score[order].argsort(descending=True, stable=True)]
    return order[:n].sort().values


def core_regions(I, p, k, select="both", generator=None):
    """T2–T4 for one importance matrix I (out × in): core rows R and columns C (sorted indices).
    select "rows" / "cols": only that axis by importance, the other uniformly random, same size."""
    I = I.float()
    S = topk_mask(I, k).float()                                        # T2
    u, v = S.mean(1), S.mean(0)                                        # T3
    n_r, n_c = ceil_frac(p, I.shape[0]), ceil_frac(p, I.shape[1])
    R = top_lines(u, I.sum(1), n_r)                                    # T4
    C = top_lines(v, I.sum(0), n_c)
    if select == "cols":
        R = torch.randperm(I.shape[0], generator=generator)[:n_r].sort().values.to(I.device)
    if select == "rows":
        C = torch.randperm(I.shape[1], generator=generator)[:n_c].sort().values.to(I.device)
    return R, C


def lr_multiplier(p, rule):
    """T7: ρ^(-1/2) ("sqrt"), ρ^(-1) ("linear") or 1 ("none"), ρ = p."""
    return {"sqrt": p ** -0.5, "linear": 1.0 / p, "none": 1.0}[rule]


# ---------------------------------------------------------------------------------- the method

class TASO(common.Method):
    """Score the targets once (§1), fix their core blocks (§2), train compact B_R, A_C (§3)."""
    prefix = "taso_"

    def __init__(self, *, r=8, alpha=16.0, dropout=0.05, targets=None, heads=(), seed=0, calib_batches=64,
                 topk=0.01, density=None, metric="wg", select="both", lr_scale="sqrt", score_groups=1):
        """calib_batches  N: batches summed for the importance pass T1 (fewer if attach's iterator is shorter)
        topk           k: fraction of entries marked in S (T2), in (0, 1]
        density        p: fraction of rows and of columns kept (T4), in (0, 1]; None: 1/r
        metric         importance: "wg" |W⊙G| (T1), "g" |G|, "w" |W| or "random"
        select         "both" axes by importance, or only "rows" / "cols" (the other random, same size)
        lr_scale       T7's rule for the adapters' lr multiplier: "sqrt" p^-1/2, "linear" p^-1 or "none"
        score_groups   score the targets in this many runs of layers, one pass each (1/G of the sums at a time)
        r, alpha, dropout, targets, heads: LoRA's (common.LoRA) on the compact block; seed: the random draws."""
        common.check_lora(r, alpha, dropout)
        common.need(isinstance(calib_batches, int) and calib_batches >= 1,
                    f"`calib_batches` must be an integer >= 1, got {calib_batches!r}")
        common.need(isinstance(score_groups, int) and score_groups >= 1,
                    f"`score_groups` must be an integer >= 1, got {score_groups!r}")
        for kw, value, allowed in [("metric", metric, ("wg", "g", "w", "random")),
                                   ("select", select, ("both", "rows", "cols")),
                                   ("lr_scale", lr_scale, ("sqrt", "linear", "none"))]:
            common.need(value in allowed, f"`{kw}` must be one of {', '.join(allowed)}, got {value!r}")
        self.p = 1.0 / r if density is None else density
        common.check_fraction("density", self.p)
        common.check_fraction("topk", topk)
        self.r, self.alpha, self.dropout, self.seed = r, alpha, dropout, seed
        self.targets, self.heads = common.check_names(targets, "targets"), common.check_names(heads, "heads")
        self.calib_batches, self.topk, self.score_groups = calib_batches, topk, score_groups
        self.metric, self.select, self.lr_rule = metric, select, lr_scale
        self.lr_scale = lr_multiplier(self.p, lr_scale)  # T7: trainer gives taso_* lr·lr_scale
        self.importance_time_s, self.calib_used, self.example = 0.0, 0, None

    def attach(self, model, batches=(), state=None):
        common.prepare(model, self.heads, self, state)
        self.names = common.find_targets(model, self.targets, heads=self.heads)
        bases = {n: model.get_submodule(n) for n in self.names}
        self.shapes = {n: tuple(m.weight.shape) for n, m in bases.items()}
        if state is not None:  # resume: the saved structure, no re-scoring
            if state.get("shapes", self.shapes) != self.shapes or sorted(state["rows"]) != sorted(self.names):
                raise common.UserError("the TASO state does not fit this model (other targets or sizes); attach it "
                                       "to the model it was saved from, with the same `targets`")
            self.rows, self.cols = dict(state["rows"]), dict(state["cols"])
            self.importance_time_s, self.calib_used = state["importance_time_s"], state["calib_batches"]
        else:
            gen = torch.Generator().manual_seed(self.seed)
            self.rows, self.cols = {}, {}
            for n, I in self.score(model, bases, batches):  # one run of layers at a time
                R, C = core_regions(I, self.p, self.topk, self.select, gen)
                self.rows[n], self.cols[n] = R.cpu(), C.cpu()
        for n in self.names:
            common.replace_module(model, n, TASOLinear(bases[n], self.rows[n], self.cols[n],
                                                       self.r, self.alpha, self.dropout))
        common.together(model, TASOLinear)  # each attention / MLP builds its adapters' factors at once
        return self.attached(model, state)

    def score(self, model, bases, batches):
        """(name, importance matrix) of every target in order, by the chosen metric (T1); with
        score_groups > 1 one run of layers is scored, handed out and dropped before the next.
        Times the passes."""
        weights = {n: m.weight for n, m in bases.items()}
        dev = next(iter(weights.values())).device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        parts = common.weight_groups(weights, self.score_groups) if self.metric in ("wg", "g") else [weights]
        n_batches = common.shard_len(self.calib_batches)  # torchrun: this process's share of N
        if len(parts) > 1:  # the same batches for every run of layers
            batches = [b for _, b in zip(range(n_batches), batches)]
        gen = torch.Generator().manual_seed(self.seed + 1)
        self.importance_time_s = 0.0
        for part in parts:
            sync()
            t0 = time.perf_counter()
            if self.metric in ("wg", "g"):
                scores, used = gradient_importance(model, part, iter(batches), n_batches, self.metric)
                self.calib_used = int(common.all_reduce(torch.tensor(used)))  # torchrun: all processes' batches
            elif self.metric == "w":
                scores = {n: w.detach().abs() for n, w in part.items()}
            else:
                scores = {n: torch.rand(w.shape, generator=gen).to(dev) for n, w in part.items()}
            sync()
            self.importance_time_s += time.perf_counter() - t0
            if self.names[0] in scores:
                self.example = (self.names[0], scores[self.names[0]].float().cpu())
            for n in part:
                yield n, scores.pop(n)

    def choices(self):
        return {**super().choices(), "rows": self.rows, "cols": self.cols, "shapes": self.shapes,
                "importance_time_s": self.importance_time_s, "calib_batches": self.calib_used}

    def summary(self):
        mods = common.adapters(self.model, TASOLinear)
        dense = sum(m.base.in_features + m.base.out_features for m in mods.values())
        return {"r": self.r, "alpha": self.alpha, "density": self.p, "topk": self.topk,
                "metric": self.metric, "select": self.select, "lr_scale_rule": self.lr_rule,
                "lr_scale": self.lr_scale, "adapted_modules": len(mods),
                "core_rows_cols": {n: [len(m.rows), len(m.cols)] for n, m in mods.items()},
                "taso_params": sum(m.taso_A.numel() + m.taso_B.numel() for m in mods.values()),
                "lora_r1_params": dense, "lora_r8_params": 8 * dense,
                "importance_time_s": self.importance_time_s, "calib_batches": self.calib_used,
                "importance_buffer_bytes": sum(m.base.weight.numel() * torch.promote_types(
                    m.base.weight.dtype, torch.float32).itemsize for m in mods.values()) * (self.metric in ("wg", "g"))}
