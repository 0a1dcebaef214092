"""G²R²: Gradient-Guided Redundancy Reduction (paper 000, §3, Alg. 1, App. A.1, A.7).

Plain LoRA (Eq 1–3) is put on every target module; a gradient-based redundancy score per module
(Eq 4–7) is smoothed (Eq 8–10); in three stages (Alg. 1) all modules train (warmup), the most
redundant ones are zeroed progressively on a cubic schedule (Eq 12, pruning), and at the end of
pruning they are deleted: the plain base Linear takes their place and their tensors leave the
optimizer (refinement), which is where the memory and time savings come from.

Layout: PyTorch keeps ΔW = s·B A as (out × in); the paper writes L = A B as (in × out), so the
paper's A is our Aᵀ and its B is our Bᵀ (its B starts at zero, as ours does). S and R do not
depend on whether s is folded into L (S = |∂ℒ/∂l · l| is scale invariant), so L = ΔW = s·B A here.

Estimators of ∂ℒ/∂ΔW for Eq 5 (`score`), one function each (`s_sum_*`, `random_R`):
  exact    ∂ℒ/∂ΔW = Σ_tokens δ_out ⊗ x_in per module, summed over the micro-batches of one optimizer step
           before the |·| of Eq 5 (not in the paper; how it is taken without a dense ΔW is at the end of
           this file, "Lean machinery").
  paper    Eq 6 as printed, Σ_m (1/B_mj)·∂ℒ/∂A_im (exact only when r = 1 and the layer has one
           output); B starts at zero, so entries with |B| ≤ eps count as 0 (the term is 0/0 there).
  random   R ~ U(0, 1) per module and step (Table 4 ablation).
  product  R(A)·R(B), Eq 7 applied to each factor with its own gradient (Table 4 ablation).

Deviations and readings (each also beside its line):
  - Eq 12 as printed exceeds p_0 at t = t_i; we use the AdaLoRA form it cites, with t_i = T_w and
    T − t_i − t_f = T_p, and evaluate it at t + 1 after optimizer step t so the last pruning step
    reaches p_f exactly and refinement starts with ⌈p_f·M⌉ modules.
  - R is undefined when ΣS = 0 (ΔW = 0, e.g. at step 0 since B = 0) or when a module got no gradient:
    that module's averages are not updated that step. A module never scored ranks as most redundant.
  - Pruning is monotone: a zeroed module has ΔW = 0, hence S = 0 and no score, so it is not re-ranked.
    A pruned module's branch is skipped in forward from the step it is pruned (bit-identical to
    adding B A x = 0), so its tensors get no gradient and AdamW leaves them (and their moments)
    alone; they are also zeroed again after every optimizer step.
  - Eq 11 (the update rule [A, B] ← [0, 0] outside the lowest p^t %; unnumbered in our copy, between
    Eq 10 and 12) is applied after the optimizer step. At the end of pruning a pruned module is replaced
    by its plain base Linear and its tensors leave the optimizer (§3.3.2).
  - A module applied more than once per forward (DeBERTa-v3's query_proj / key_proj, reused on the
    relative position embeddings with share_att_key) gets ∂ℒ/∂ΔW summed over all its uses before the
    |·| of Eq 5: uses are counted in its forwards outside a checkpoint's recompute, and the module
    reduces once every use came back.
  - The EMAs of Eq 8–9 start at their first value (the paper gives no R̄⁰, Ū⁰): a module scored once
    has R̄ = R, U = 0, so Ū = 0 and R̂ = 0, the least redundant possible, and is kept until it is
    scored again (with score_every = K, at its next scoring); a warmup too short for any R̂ > 0 warns.
"""
import math
import warnings
import weakref

import torch

import common

SCORES = ("exact", "paper", "random", "product")
# Paper's LLaMA targets (Table 9: Q, K, V, Up, Down); DeBERTa: all linear layers (common.DEBERTA).
TARGETS = {**common.DEFAULT_TARGETS, "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}


# ------------------------------------------------------------------------ the adapter (Eq 1–3)

class G2R2Linear(common.LoRALinear):
    """LoRA h = W₀x + s·B A x (Eq 3) that can be pruned (Eq 11: its branch is skipped). While `sink` is set
    (exact scoring), the adapter term's backward also reports (δ_out, x_in) to it (Lean machinery, below)."""

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__(base, r, alpha, dropout)
        self.pruned, self.calls = False, 0  # calls: uses in this step's forwards (DeBERTa-v3 reuses query_proj)
        self.sink = None  # exact scoring armed: a function of (δ_out, x_in, (A, B)), see ExactGrad.arm

    def forward(self, x):
        if self.pruned:
            return self.base(x)                                        # Eq 11: [A, B] = [0, 0] adds nothing
        if self.sink is not None and torch.is_grad_enabled():          # exact scoring: Eq 3, reported
            self.calls += not common.in_backward()  # a checkpoint's recompute brings no new use
            return _Reported.apply(self.base(x), x, self.lora_A, self.lora_B, self)
        return super().forward(x)                                      # Eq 3: h = W₀x + s·B A x

    def lora_factors(self):
        """A pruned module carries no update: absent from the PEFT export (None)."""
        return None if self.pruned else super().lora_factors()


# ---------------------------------------------------------- sensitivity and redundancy (Eq 4–7)

def sensitivity(grad, weight):
    """S(l_ij) = |∂ℒ/∂l_ij · l_ij| (Eq 5, first-order Taylor of Eq 4)."""
    return (grad * weight).abs()


def blocks(L, max_elems=2 ** 24):
    """(a, b): the row ranges of module L's out × in matrices, at most max_elems entries each."""
    out, k = L.base.out_features, max(1, max_elems // L.base.in_features)
    return [(a, min(a + k, out)) for a in range(0, out, k)]


def s_sum_rows(rows, L, AB=None):
    """ΣS = Σ_ij S(l_ij) = ‖G ⊙ ΔW‖₁ (Eq 5) of module L, G = ∂ℒ/∂ΔW with rows(a, b) its rows a..b (a fresh tensor or
    a buffer it may overwrite), a block of rows of G and of ΔW = s·B A at a time; s > 0 leaves the |·|. The blocks
    in G's dtype (a bf16 model's: bf16 products, half the bytes of fp32 ones), the sum in fp32. AB: A and B in
    the blocks' dtype (the scored forward's copies), else L's own (a block of another dtype casts them)."""
    A, B = (L.lora_A, L.lora_B) if AB is None else AB
    with torch.no_grad():
        def norm(G, a, b):  # ‖G ⊙ B[a:b] A‖₁ of one block, accumulated in fp32 (float64 stays float64)
            G.mul_(B[a:b].to(G.dtype) @ A.to(G.dtype))
            return torch.linalg.vector_norm(G, 1, dtype=torch.promote_types(G.dtype, torch.float32))
        parts = [norm(rows(a, b), a, b) for a, b in blocks(L)]
        return L.scaling * (parts[0] if len(parts) == 1 else torch.stack(parts).sum())


def paper_grad(A, B, grad_A, scaling, eps=1e-8):
    """Eq 6 as printed, in our layout: ∂ℒ/∂ΔW_ji ≈ Σ_m ∂ℒ/∂A_mi / (s·B_jm), (out, in).
    Guard: a term whose |s·B_jm| ≤ eps counts 0 (B starts at zero; there the chain rule gives 0/0)."""
    sB = scaling * B
    inv = torch.where(sB.abs() > eps, sB.reciprocal(), torch.zeros_like(sB))  # 1/(s·B_jm), guarded
    return inv @ grad_A  # Eq 6


def redundancy(s_sum, numel):
    """R(L) = d·k / Σ_ij S(l_ij) (Eq 7); None where undefined (ΣS = 0 or not finite)."""
    s_sum = float(s_sum)
    return numel / s_sum if s_sum > 0 and math.isfinite(s_sum) else None


def s_sum_paper(L):
    """ΣS of module L (Eq 5) with ∂ℒ/∂ΔW from Eq 6 (by blocks of rows: s_sum_rows), (1,); None without a gradient."""
    if L.lora_A.grad is None or L.lora_B.grad is None:
        return None
    return s_sum_rows(lambda a, b: paper_grad(L.lora_A, L.lora_B[a:b], L.lora_A.grad, L.scaling), L).reshape(1)


def s_sum_product(L):
    """(ΣS(A), ΣS(B)) of module L, Eq 5 on each factor with its own gradient (Table 4); None without one."""
    if L.lora_A.grad is None or L.lora_B.grad is None:
        return None
    with torch.no_grad():
        return torch.stack([sensitivity(L.lora_A.grad, L.lora_A).sum(), sensitivity(L.lora_B.grad, L.lora_B).sum()])


def random_R(seed, step, live, M):
    """R ~ U(0, 1) per live module (Table 4's random ablation), a function of (seed, step): resume-safe."""
    u = torch.rand(M, generator=torch.Generator().manual_seed(seed * 1_000_003 + step), dtype=torch.float64)
    return {i: float(u[i]) for i in live}


def ema(avg, x, beta):
    """Exponential moving average beta·avg + (1 − beta)·x; the first value starts the average."""
    return x if avg is None else beta * avg + (1 - beta) * x


def smooth(R_bar, U_bar, R, beta1, beta2):
    """Eq 8–10: R̄ ← β1 R̄ + (1−β1) R;  U = |R − R̄|;  Ū ← β2 Ū + (1−β2) U;  R̂ = R̄·Ū (Python floats: no
    device op). Averages start at their first value (ema), so after one scoring R̄ = R, Ū = 0 and R̂ = 0."""
    R_bar = ema(R_bar, R, beta1)             # Eq 8
    U_bar = ema(U_bar, abs(R - R_bar), beta2)  # Eq 9
    return R_bar, U_bar, R_bar * U_bar              # Eq 10


# ------------------------------------------------------------------ schedule and selection

def retention(t, T_w, T_p, p0, pf):
    """p(t) (Eq 12, App. A.1): p_0 before T_w, cubic decay to p_f reached at T_w + T_p, p_f after."""
    if t < T_w:
        return p0
    if t >= T_w + T_p:
        return pf
    # Eq 12 as printed has (t − t_i − t_f) in the numerator and exceeds p_0 at t = t_i (sign typo);
    # this is the AdaLoRA schedule it cites, with t_i = T_w and T − t_i − t_f = T_p.
    return pf + (p0 - pf) * (1 - (t - T_w) / T_p) ** 3  # Eq 12


def n_keep(p, M):
    """⌈p·M⌉ modules retained (1e-9 tolerance against float round-up)."""
    return min(M, math.ceil(p * M - 1e-9))


def select(R_hat, live, k):
    """The k live modules of lowest R̂ (ascending, ties by index; None = never scored = last)."""
    key = lambda i: (math.inf if R_hat[i] is None else R_hat[i], i)
    return set(sorted(live, key=key)[:k])


def stage_length(value, total, kw):
    common.need(isinstance(value, (int, float)) and value >= 0,
                f"`{kw}` must be >= 0 (steps if >= 1, fraction of the steps if < 1), got {value!r}")
    return int(round(value)) if value >= 1 else int(round(value * total))


# ----------------------------------------------------------------------------- the method

class G2R2(common.Method):
    """Warmup (score), progressive pruning (score, zero), refinement (pruned modules removed)."""
    unused_params = True  # a pruned module skips its branch until refinement removes it

    def __init__(self, *, total_steps=None, r=8, alpha=16.0, dropout=0.05, targets=None, heads=(), seed=0,
                 warmup=0.1, prune=0.1, p0=1.0, pf=0.2, beta1=0.85, beta2=0.95, score="exact", score_every=1,
                 micro_batches=1):
        """total_steps   T, optimizer steps of the whole run (required: the stages are cut from it)
        warmup, prune    T_w and T_p (App. A.1): steps if >= 1, else fractions of T; refinement is the rest
        p0, pf           retention p_0 at the start and p_f at the end of pruning (Eq 12), 0 < p_f <= p_0 <= 1
        beta1, beta2     β1, β2 of the EMAs of R and U (Eq 8–9), in [0, 1)
        score            estimator of ∂ℒ/∂ΔW: "exact", "paper" (Eq 6), "random", "product" (Table 4)
        score_every      K: score every K optimizer steps during warmup and pruning
        micro_batches    backward passes per optimizer step (gradient accumulation): `exact` sums them
        r, alpha, dropout, targets, heads: LoRA's (common.LoRA); seed: the `random` ablation's draws."""
        common.check_lora(r, alpha, dropout)
        common.need(isinstance(total_steps, int) and total_steps >= 1,
                    f"G2R2 needs `total_steps`, the run's optimizer steps (an integer >= 1), got {total_steps!r}; "
                    f"pass it (a Trainer with num_train_epochs: len(train_dataloader) // accumulation × epochs)")
        common.need(isinstance(p0, (int, float)) and isinstance(pf, (int, float)) and 0 < pf <= p0 <= 1,
                    f"`pf` and `p0` must satisfy 0 < pf <= p0 <= 1, got p0={p0}, pf={pf}")
        for kw, b in (("beta1", beta1), ("beta2", beta2)):
            common.need(isinstance(b, (int, float)) and 0 <= b < 1, f"`{kw}` must be in [0, 1), got {b!r}")
        common.need(score in SCORES, f"`score` must be one of {', '.join(SCORES)}, got {score!r}")
        common.need(isinstance(score_every, int) and score_every >= 1, f"`score_every` must be an integer >= 1, got {score_every!r}")
        common.need(isinstance(micro_batches, int) and micro_batches >= 1,
                    f"`micro_batches` must be an integer >= 1, got {micro_batches!r}")
        self.T = self.total_steps = total_steps
        self.T_w = stage_length(warmup, total_steps, "warmup")
        self.T_p = max(1, stage_length(prune, total_steps, "prune"))
        common.need(self.T_w + self.T_p < self.T, f"warmup + pruning must leave refinement steps: T_w={self.T_w} + "
                    f"T_p={self.T_p} >= {self.T} total steps; lower `warmup` / `prune`")
        self.r, self.alpha, self.dropout, self.seed = r, alpha, dropout, seed
        self.targets, self.heads = common.check_names(targets, "targets"), common.check_names(heads, "heads")
        self.p0, self.pf, self.beta1, self.beta2 = p0, pf, beta1, beta2
        self.score, self.score_every = score, score_every
        # micro-batches per optimizer step and process (torchrun): backward passes `exact` sums before the abs
        self.micro_batches = max(1, micro_batches // common.world()[1])
        self.scored = -1  # the last step after_backward scored

    # -- stages
    def stage_of(self, t):
        return "warmup" if t < self.T_w else "prune" if t < self.T_w + self.T_p else "refine"

    def scores_at(self, t):
        return t < self.T_w + self.T_p and t % self.score_every == 0

    # -- hooks
    def attach(self, model, batches=(), state=None):
        common.prepare(model, self.heads, self, state)
        model.register_forward_pre_hook(_weak_hook(self))  # weakly: no model <-> method cycle
        self.names = common.find_targets(model, self.targets, defaults=TARGETS, heads=self.heads)
        self.layers = [G2R2Linear(model.get_submodule(n), self.r, self.alpha, self.dropout) for n in self.names]
        for n, layer in zip(self.names, self.layers):
            common.replace_module(model, n, layer)
        self.exact = ExactGrad(self.layers, self.micro_batches)
        self.numel = [layer.base.weight.numel() for layer in self.layers]  # d·k of Eq 7
        self.adapter_params = [layer.lora_A.numel() + layer.lora_B.numel() for layer in self.layers]
        self.R_bar, self.U_bar, self.R_hat = ([None] * len(self.names) for _ in range(3))
        self.pruned_at = {}  # module index -> optimizer step after which it was zeroed
        self.refined, self.next_step, self.closing, self.forwards = False, 0, False, 0
        if state is not None:
            self.load_state(state, model)
        self.stage = state["stage"] if state is not None else self.stage_of(0)
        self.set_sinks(self.next_step)
        return self.attached(model, state)

    def after_backward(self, step):
        """Score the live modules: R (Eq 7) by the chosen estimator, smoothed into R̂ (Eq 8–10)."""
        self.check_step(step, "after_backward", exact=True)
        self.closing = True  # until after_step(step)
        if not self.scores_at(step):
            return
        self.scored = step
        live = self.retained()
        R = random_R(self.seed, step, live, len(self.names)) if self.score == "random" else self.redundancies(live, step)
        for i, R_i in R.items():
            if R_i is not None:
                self.R_bar[i], self.U_bar[i], self.R_hat[i] = smooth(
                    self.R_bar[i], self.U_bar[i], float(R_i), self.beta1, self.beta2)

    def redundancies(self, live, step):
        """{module: R (Eq 7) or None} of the live modules that got a gradient, from their ΣS (Eq 5). Refused
        when no live module got one (the hooks called after optimizer.step() and zero_grad())."""
        if self.score == "exact":
            common.need_grads(any(self.exact.seen[i] for i in live), "G2R2", step)
            sums, norm = self.exact.s_sums(live), []
        else:
            grads = [g for i in live if (g := self.layers[i].lora_B.grad) is not None]
            common.need_grads(grads, "G2R2", step)
            estimator = s_sum_paper if self.score == "paper" else s_sum_product
            sums = {i: s for i in live if (s := estimator(self.layers[i])) is not None}
            norm = [torch.stack(torch._foreach_norm(grads)).sum().reshape(1)]  # Σ‖∂ℒ/∂B‖: 0 after zero_grad()
        values = torch.cat([*sums.values(), *norm]).cpu().tolist() if sums or norm else []  # fp32 → float: exact
        if norm:  # one host sync for both
            common.need_grads(values.pop() > 0, "G2R2", step)
        width = len(values) // max(1, len(sums))  # ΣS per module: 1 value, (ΣS(A), ΣS(B)) for product
        values = [values[k * width:(k + 1) * width] for k in range(len(sums))]
        R = {}
        for i, v in zip(sums, values):
            if self.score == "product":  # R(A)·R(B), Eq 7 on each factor
                ra, rb = redundancy(v[0], self.layers[i].lora_A.numel()), redundancy(v[1], self.layers[i].lora_B.numel())
                R[i] = None if ra is None or rb is None else ra * rb
            else:
                R[i] = redundancy(v[0], self.numel[i])  # Eq 7
        return R

    def after_step(self, step):
        """Eq 11–12 after optimizer step t: keep the ⌈p(t+1)·M⌉ live modules of lowest R̂, zero the others;
        at the end of pruning remove them (refinement). True when the trainable set changed."""
        self.check_step(step, "after_step", exact=True)
        if self.scores_at(step) and self.scored != step:
            raise RuntimeError(f"G2R2: step {step} scores the modules but after_backward({step}) was not called; "
                               f"call method.after_backward(step) after the backward passes, before optimizer.step()")
        self.stage = self.stage_of(step)  # the stage this step belonged to (progress bar, stage times)
        self.next_step, self.closing, self.forwards = step + 1, False, self.exact.forwards
        changed = False
        if self.T_w <= step < self.T_w + self.T_p and not self.refined:
            live = self.retained()
            R_hat = self.R_hat  # Eq 10, per module (None: never scored)
            if step == self.T_w and not any(R_hat[i] for i in live):
                warnings.warn(f"G2R2: at the first pruning step ({step}) no module has R̂ > 0 (R̂ needs two scorings with "
                              f"ΔW ≠ 0; ΔW = 0 at step 0): modules are pruned by index; give `warmup` more steps "
                              f"(T_w = {self.T_w} now, score_every = {self.score_every})")
            p = retention(step + 1, self.T_w, self.T_p, self.p0, self.pf)  # Eq 12, after step t
            keep = select(R_hat, live, n_keep(p, len(self.names)))  # Eq 11: the lowest p^t % by R̂ keep training
            for i in sorted(set(live) - keep):
                self.pruned_at[i] = step
                self.prune(i)
            for i in self.pruned_at:  # Eq 11: [A, B] ← [0, 0] outside the lowest p^t %, after the step (§3.3.2)
                self.zero(i)
            if step + 1 == self.T_w + self.T_p:
                before = self.trainable()
                self.refine(self.model)
                self.changed(before)
                changed = True
        self.set_sinks(step + 1)
        return changed

    def prune(self, i):
        self.layers[i].pruned, self.layers[i].sink = True, None
        self.zero(i)

    def zero(self, i):
        with torch.no_grad():
            self.layers[i].lora_A.zero_(), self.layers[i].lora_B.zero_()

    def refine(self, model):
        """End of pruning: put the plain base Linear back in place of each pruned module; its tensors
        leave the trainable set (the trainer rebuilds AdamW without them and their state)."""
        for i in [i for i in self.pruned_at if self.layers[i] is not None]:
            common.replace_module(model, self.names[i], self.layers[i].requires_grad_(False).base)
            self.layers[i] = None
        self.refined = True

    # -- bookkeeping
    def retained(self):
        return [i for i in range(len(self.names)) if i not in self.pruned_at]

    def choices(self):
        return {**super().choices(), "names": self.names, "r_bar": list(self.R_bar), "u_bar": list(self.U_bar),
                "pruned_at": dict(self.pruned_at), "refined": self.refined,
                "next_step": self.next_step, "scored": self.scored, "stage": self.stage}

    def load_state(self, state, model):
        if state["names"] != self.names:
            raise ValueError("the saved state adapts other modules than this model and `targets`; "
                             "restore it into the model and targets it was trained with")
        f = lambda v: None if v is None else float(v)
        self.R_bar, self.U_bar = [f(v) for v in state["r_bar"]], [f(v) for v in state["u_bar"]]
        self.R_hat = [None if a is None or b is None else a * b for a, b in zip(self.R_bar, self.U_bar)]
        self.pruned_at = {int(i): s for i, s in state["pruned_at"].items()}
        self.next_step, self.scored = state["next_step"], state.get("scored", state["next_step"] - 1)
        for i in self.pruned_at:
            self.prune(i)
        if state["refined"]:
            self.refine(model)

    def export(self, model):
        """Merge the retained modules; warns when the run ended before refinement (`total_steps` too long)."""
        if not self.refined:
            warnings.warn(f"G2R2: exported after {self.next_step} of total_steps={self.T} optimizer steps, in {self.stage} "
                          f"with {len(self.retained())} of {len(self.names)} modules live (pruning ends after step "
                          f"{self.T_w + self.T_p - 1}); total_steps counts optimizer steps, not micro-batches "
                          f"(the last step ran {self.forwards} forward passes)")
            for i in self.pruned_at:
                common.replace_module(model, self.names[i], self.layers[i].base)
        return common.merge_adapters(model)

    def summary(self):
        kept = self.retained()
        return {"g2r2": {"score": self.score, "score_every": self.score_every, "T_w": self.T_w, "T_p": self.T_p,
                         "p0": self.p0, "pf": self.pf, "beta1": self.beta1, "beta2": self.beta2},
                "modules": len(self.names), "retained_modules": [self.names[i] for i in kept],
                "pruned_at_step": {self.names[i]: s for i, s in sorted(self.pruned_at.items())},
                "adapter_params_start": sum(self.adapter_params),
                "adapter_params_end": sum(self.adapter_params[i] for i in kept),
                "r_hat": dict(zip(self.names, self.R_hat))}

    # -- the exact estimator (its state and capture: ExactGrad, Lean machinery below)
    def set_sinks(self, t):
        """Arm the exact-gradient capture of the live modules for step t (armed steps cost a matmul)."""
        self.exact.arm(self.score == "exact" and self.scores_at(t) and not self.refined)

    def count_forward(self, module, args):
        """Forward pre-hook of the model: counts the step's micro-batches (not evaluation, not a recompute)."""
        if not torch.is_grad_enabled() or common.in_backward():
            return
        if self.closing:
            raise RuntimeError(f"G2R2: a training forward pass after after_backward({self.next_step}) and before "
                               f"after_step({self.next_step}); call method.after_step(step) after optimizer.step(), "
                               f"once per optimizer step")
        self.exact.forwards += 1
        if self.exact.forwards > self.micro_batches and any(L is not None and L.sink is not None for L in self.layers):
            raise RuntimeError(f"G2R2 exact scoring: more than {self.micro_batches} forward passes in one optimizer "
                               f"step; call after_backward(step) and after_step(step) once per optimizer step, and pass "
                               f"`micro_batches` = backward passes per optimizer step")


# ------------------------------------------------- Lean machinery: the exact ∂ℒ/∂ΔW without a dense ΔW
# What it saves: an out × in parameter D = ΔW and its gradient per module (plain equivalent, the tests'
# reference: h = W₀x + D x_in with D a leaf, ∂ℒ/∂ΔW = D.grad). Instead ∂ℒ/∂ΔW = Σ_tokens δ_out ⊗ x_in is
# formed in the adapter term's backward (_Reported: from the mask it draws again anyway, keeping what LoRA
# keeps) and summed over the step's micro-batches before the |·| of Eq 5. With one micro-batch ΣS is taken
# there by blocks of rows (s_sum_rows: ≤ 2^24 entries of ∂ℒ/∂ΔW and of ΔW, in a bf16 model's dtype): counted
# (bench/count.py count_layer, bf16, 2048 tokens, 4096², r 8) 22 kernels / 0.70 GB a scored layer step, against
# 26 / 1.37 GB through a whole fp32 buffer (lean = False; LoRA: 18 / 0.43). With k > 1 (or torchrun, until
# after_backward sums over the processes) each live module keeps an out × in fp32 buffer through the step (18 GB
# at Llama-2-7B QKVUD: use score="paper" if that does not fit). A checkpoint's recompute is not a use (common.in_backward); a bf16
# model's GEMM takes bf16 operands, accumulated in fp32 (exact_grad).

class ExactGrad:
    """The exact estimator's per-step state for `layers` (G2R2.layers, a removed module None): backward passes
    seen, gradient buffers, ΣS. `lean` False: always a whole out × in buffer first (the plain form, tests)."""
    lean = True

    def __init__(self, layers, micro_batches):
        self.layers, self.micro_batches, self.torchrun = layers, micro_batches, common.world()[1] > 1
        self.arm(False)

    def arm(self, on):
        """A new step: empty buffers; the live layers' sinks set (on) or cleared."""
        M = len(self.layers)
        self.grad = [None] * M   # per-module ∂ℒ/∂ΔW buffer (micro_batches > 1, a reused module, torchrun)
        self.seen = [0] * M      # backward passes seen this step
        self.s_sum = {}          # module -> ΣS of this step
        self.forwards = 0        # model forwards (micro-batches) run this step
        me = weakref.ref(self)
        for i, L in enumerate(self.layers):
            if L is not None:
                L.sink = (lambda g, x, AB, i=i: me().capture(i, g, x, AB)) if on and not L.pruned else None
                L.calls = 0

    def capture(self, i, delta_out, x, AB=None):
        """Backward of module i: this use's Σ δ_out ⊗ x_in by blocks of rows, reduced to ΣS at once when it is the
        step's only one (lean), else added to the buffer, reduced when every use of every micro-batch came back.
        AB: the forward's copies of A and B (in autocast's dtype), for ΔW's blocks (cast once here if need be)."""
        L, dtype = self.layers[i], self.layers[i].base.weight.dtype  # bf16 operands for a bf16 model
        d, xi = delta_out.reshape(-1, delta_out.shape[-1]).to(dtype), x.reshape(-1, x.shape[-1]).to(dtype)
        self.seen[i] += 1
        done = self.forwards == self.micro_batches and self.seen[i] == L.calls and not self.torchrun
        rows = lambda a, b, out=torch.float32: exact_grad(d[:, a:b], xi, dtype, out)  # rows a..b of ∂ℒ/∂ΔW, (b − a, in)
        if self.lean and done and self.grad[i] is None:  # ΣS at once, in the model's dtype (fp32 accumulation)
            AB = tuple(t.to(dtype) for t in AB or (L.lora_A, L.lora_B))  # a no-op for a bf16 model under autocast
            self.s_sum[i] = s_sum_rows(lambda a, b: rows(a, b, dtype), L, AB)
            return
        buf = self.grad[i] = L.lora_A.new_zeros(L.base.weight.shape) if self.grad[i] is None else self.grad[i]
        for a, b in blocks(L):
            buf[a:b] += rows(a, b)
        if done:  # torchrun: s_sums reduces
            self.reduce(i)

    def reduce(self, i):
        """ΣS of module i from its summed gradient (Eq 5; under torchrun summed over the processes first)."""
        L = self.layers[i]
        if self.torchrun:
            G = self.grad[i] if self.grad[i] is not None else L.lora_A.new_zeros(L.base.weight.shape)
            self.grad[i] = common.all_reduce(G)
        self.s_sum[i] = s_sum_rows(lambda a, b: self.grad[i][a:b], L)
        self.grad[i] = None

    def s_sums(self, live):
        """{module: ΣS (1,)}, reducing what capture() has not (fewer micro-batches than expected, torchrun)."""
        for i in [i for i in live if self.grad[i] is not None or self.torchrun]:
            self.reduce(i)
        return {i: v.reshape(1) for i, v in self.s_sum.items()}


class _Reported(torch.autograd.Function):
    """h + s·B A dropout(x), the values and gradients of LoRALinear.forward; its backward also hands
    (δ_out, x_in) to `layer.sink`: δ_out = ∂ℒ/∂h (the same at the adapter's output as at the layer's) and
    x_in = dropout(x), from the mask backward draws again for ∂x and ∂A anyway (common.dropout_again): one
    draw, as in an unscored step; and the cast A and B, which ΔW's blocks reuse. Autograd keeps what LoRA keeps
    (x, the cast A and B, A x_in). Backward runs once per backward pass, also when checkpointing recomputes the
    forward."""

    @staticmethod
    def forward(ctx, h, x, A, B, layer):
        ctx.p, ctx.state = common.active_p(layer.dropout), common.rng_state(x.device)
        A = common.cast(A, x)  # once: dropout_linear and backward use this copy
        ax, = common.dropout_linear(x, layer.dropout, A)  # A x_in, (..., r), under the caller's autocast
        B = common.cast(B, ax)
        ctx.save_for_backward(x, A, B, ax)
        ctx.s, ctx.sink = layer.scaling, layer.sink
        return common.add_lora(h, ax, B, layer.scaling)  # h = W₀x + s·B A x_in, (..., out)

    @staticmethod
    def backward(ctx, delta):
        x, A, B, ax = ctx.saved_tensors
        xd, mask = common.dropout_again(x, ctx.p, ctx.state) if ctx.p else (x, None)  # x_in, the forward's mask
        ctx.sink(delta, xd, (A, B))
        g = delta.to(ax.dtype) * ctx.s  # ∂ℒ/∂(B A x_in), (..., out)
        ga = g @ B  # (..., r)
        gB = g.reshape(-1, g.shape[-1]).T @ ax.reshape(-1, ax.shape[-1])
        gA = ga.reshape(-1, ga.shape[-1]).T @ xd.reshape(-1, x.shape[-1]).to(ga.dtype)
        gx = ga @ A.to(ga.dtype) if ctx.needs_input_grad[1] else None  # (..., in)
        if gx is not None and mask is not None:
            gx = common._dropout_backward(gx, mask, ctx.p)
        return delta, None if gx is None else gx.to(x.dtype), gA, gB, None


def exact_grad(delta_out, x, dtype=torch.float32, out=torch.float32):
    """∂ℒ/∂ΔW = Σ_tokens δ_out ⊗ x_in, (out, in), in `out` (fp32: summed over micro-batches; the model's dtype:
    reduced at once). The operands in `dtype`, the base model's: a bf16 model's GEMM runs on bf16 operands,
    accumulated in fp32 (on CUDA tensor cores, written out in `out`; on CPU rounded to bf16 once, then widened),
    not as an fp32 GEMM (~3x a LoRA step at 7B shape on CUDA cores)."""
    d, xi = delta_out.reshape(-1, delta_out.shape[-1]).to(dtype).T, x.reshape(-1, x.shape[-1]).to(dtype)
    if dtype not in (torch.bfloat16, torch.float16) or out == dtype:
        return d @ xi
    if d.is_cuda:
        return torch.mm(d, xi, out_dtype=torch.float32)
    return (d @ xi).float()


def _weak_hook(method):
    """method.count_forward as a model hook holding the method weakly: model and method are freed by reference
    counting, not a gc pass. A no-op once the method is gone and on a copy of the model (copy.deepcopy)."""
    me = weakref.ref(method)

    def hook(module, args):
        m = me()
        if m is not None and module is m.model:
            m.count_forward(module, args)
    return hook
