"""PiLoRA: Parameter-Importance-Aware LoRA (paper 001: §3.2–3.3, Algorithm 1, App. A.2, A.4).

Stage 1 (Alg. 1 lines 3–13): a standard rank-r LoRA (common.LoRALinear) on the targets (LLaMA: Q, K, V,
Up, Down per Table 5; encoders / ViT: common's defaults). Every K = `interval` optimizer steps
(t mod K == 0, from t = 0), between backward and the optimizer step, each module's reconstructed
full-weight gradient G̃ = B·Gᴬ + Gᴮ·A (Eq 7, derived in App. A.2) gives neuron (row) scores
S_i = Σ_j |G̃_ij| (Eq 8), and every row with S_i above the mean of S over its matrix gets a hit:
H_i += 1 (Alg. 1 lines 10–12). Stage 1 lasts `phase` steps (default one epoch, App. A.4); with `extend`
(train.py's --epochs) stage 2 then runs for the trainer's epochs of its own (Alg. 1 line 19), so the run is
one epoch longer than --epochs says. Otherwise (own loops, --max_steps) `total_steps` is the whole run.

Partition (line 14): the dominant set M is the smallest set of rows, taken in decreasing H, whose
cumulative hit count reaches τ·ΣH (`tau`, 0.7: where Fig. 6 saturates). Table 4's ablations:
`random` (⌊m/2⌋ rows drawn uniformly: Table 4 gives it top-half's parameter count, 0.66 %) and `top-half`
(the ⌊m/2⌋ highest rows in that order).

Stage 2 (lines 15–23): a fresh two-group LoRA on Θ₀ (the stage-1 adapters are discarded):
h = W₀x + s·(M ⊗ B_d)A_d x + s·(M̄ ⊗ B_s)A_s x (Eq 10); B_d |M| × r, A_d r × n, B_s (m−|M|) × r′, A_s r′ × n
train. Each step builds the mask mapping M ⊗ B (Eq 9, m × r) from them and runs Eq 10 as one LoRA pair,
[M ⊗ B_d, M̄ ⊗ B_s]·[A_d; A_s] x: no m × n matrix, no index op on activations (the attention / MLP
builds its modules' at once: PiLoRALinear.padded, common.together). Merge (Eq 11):
W′ = W₀ + s(M ⊗ B_d)A_d + s(M̄ ⊗ B_s)A_s, in fp32, into a plain Linear (no extra latency).

Readings of the paper and deviations:
- K = 10 is ours: Alg. 1 names the interval K but the paper gives no value.
  With a one-epoch stage 1 of N steps that is N / 10 scorings; an interval of 1 scores every step.
- G̃ is Eq 7 without LoRA's scaling s. The model computes s·BA, so the exact first-order change of ΔW
  is s·(B Gᴬ + Gᴮ A); a positive per-matrix constant changes neither the hits (S against its own mean)
  nor the tie order. Gᴬ, Gᴮ are the step's gradients summed over micro-batches, before clipping.
- G̃ is never held whole: the scores are taken in blocks of rows of G̃ (neuron_scores).
- "Consistently engaged" (§3.3) is read as Fig. 6's cumulative threshold with a 1e-9 tolerance, as
  G²R²'s ⌈p·M⌉ (τ = 0.07, ΣH = 100 keeps 1 row with 7 hits, not 2); rows with equal hit counts are
  ordered by their last score S_i, then by row index.
- Both groups use the same s = α / r (the paper does not say how the rank-r′ group is scaled: α / r′ would
  make a supplementary row's update r / r′ = 16× larger at r = 32, r′ = 2), and share one dropout of x.
  r′ = 0 freezes the supplementary rows (Fig. 4's left point); a group with no rows (|M| = 0 or m) gets no adapter.
- Stage 2 starts from Θ₀ (Alg. 1 line 15): new adapters with standard init (A Kaiming, B = 0) drawn
  from a generator seeded with `seed`, and task heads reset to their values at attach (new tensors, so
  their Adam state goes too). `warm_start` instead copies B_d = B[M], A_d = A from stage 1 (so
  the dominant rows keep exactly their stage-1 update s·B[M]A), starts the supplementary group fresh
  (B_s = 0) and keeps the heads with their Adam state.
- The LR schedule restarts at stage 2 with its own warmup (schedule_start): stage 2 is a new
  fine-tuning run of new zero-initialised adapters with empty Adam moments, as stage 1 was.
- Steps: with `extend` stage 1 comes before the epochs of stage 2 (Alg. 1); `stage1_in_epochs` instead
  carves stage 1 out of them (the run is `total_steps` long in all, as without `extend`). When the run
  is fixed and at most one epoch long, the default stage length falls back to half the run, so that a
  stage 2 exists; an explicit `phase` that leaves no stage 2 is an error.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

TARGETS = {**common.DEFAULT_TARGETS, "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]}  # Table 5
PARTITIONS = ("hits", "random", "top-half")


# -------------------------------------------------------------- stage 1: importance scores (§3.2)

def reconstructed_grad(A, B, GA, GB):
    """G̃ = B·Gᴬ + Gᴮ·A (Eq 7), out × in: the first-order change of BA per unit of −η."""
    return B @ GA + GB @ A


def row_scores(G):
    """S_i = Σ_j |G̃_ij| (Eq 8, Alg. 1 line 9): one score per output neuron."""
    return G.abs().sum(dim=1)


def neuron_scores(A, B, GA, GB, max_elems=2 ** 24):
    """S (Eq 8) of G̃ (Eq 7), G̃ taken a block of rows (at most max_elems entries) at a time: the m × n
    gradient is never held whole. Equal to row_scores(reconstructed_grad(A, B, GA, GB))."""
    step = max(1, max_elems // A.shape[1])
    return torch.cat([row_scores(reconstructed_grad(A, B[i:i + step], GA, GB[i:i + step]))  # Eq 7–8, rows i..
                      for i in range(0, len(B), step)])


def count_hits(H, S):
    """H_i + 1 where S_i exceeds the mean of S (Alg. 1 lines 10–12)."""
    return H + (S > S.mean()).long()


# ------------------------------------------------------------------- partition into two groups (§3.3)

def importance_order(H, S):
    """Rows by decreasing hit count; equal H by decreasing last score S, then by row index."""
    order = torch.argsort(-S.double(), stable=True)
    return order[torch.argsort(-H[order], stable=True)]


def dominant_size(H, S, tau):
    """|M|: the fewest rows, in importance order, whose hits reach τ·ΣH (0 when nothing was hit)."""
    # "consistently engaged" (§3.3) read as Fig. 6's cumulative importance threshold over hit counts
    if H.sum() == 0:
        return 0
    need = math.ceil(tau * int(H.sum()) - 1e-9)  # hits to reach (1e-9 against float round-up, as g2r2.n_keep)
    cum = torch.cumsum(H[importance_order(H, S)], 0)
    return int((cum < need).sum()) + 1


def select_rows(H, S, tau, how="hits", generator=None):
    """The dominant rows M (ascending indices) by the hit rule or Table 4's ablations."""
    if how == "top-half":
        rows = importance_order(H, S)[:len(H) // 2]
    elif how == "random":  # Table 4: the parameter count of top-half, so ⌊m/2⌋ rows
        rows = torch.randperm(len(H), generator=generator)[:len(H) // 2]
    elif how == "hits":
        rows = importance_order(H, S)[:dominant_size(H, S, tau)]
    else:
        raise ValueError(f"`partition` must be one of {', '.join(PARTITIONS)}, got {how!r}")
    return rows.sort().values


# ------------------------------------------------------------- stage 2: the adapter layer (Eq 9–11)

def mask_map(B, idx, m):
    """M ⊗ B (Eq 9): the m × r matrix with B's row k in row idx[k] (ascending: k = k(i) − 1), zero elsewhere."""
    return B.new_zeros(m, B.shape[1]).index_copy_(0, idx, B)


class PiLoRALinear(nn.Module):
    """A frozen `base` (m × n) plus two compact LoRAs (Eq 10): rank r on the dominant rows idx_d
    (B_d: |M| × r, A_d: r × n) and rank r′ on the others idx_s (B_s: (m−|M|) × r′, A_s: r′ × n)."""
    lean = True  # Eq 10 as one LoRA pair on the padded factors(); False: term by term, as written

    def __init__(self, base: nn.Linear, dominant, r, r_supp, alpha, dropout=0.0, generator=None):
        super().__init__()
        common.check_linear(base)
        common.check_lora(r, alpha, dropout)
        common.need(isinstance(r_supp, int) and 0 <= r_supp, f"`r_supp` (r′) must be an integer >= 0, got {r_supp!r}")
        self.base = base.requires_grad_(False)
        m, n, dev = base.out_features, base.in_features, base.weight.device
        mask = torch.zeros(m, dtype=torch.bool)
        mask[common.check_index(torch.as_tensor(dominant).cpu(), m, "dominant")] = True  # M
        self.register_buffer("idx_d", mask.nonzero().flatten().to(dev))  # M, ascending (Eq 9's k(i))
        self.register_buffer("idx_s", (~mask).nonzero().flatten().to(dev))  # M̄
        self.r, self.r_supp, self.scaling = r, r_supp, alpha / r  # one s = α / r for both groups
        self.lora_A_d, self.lora_B_d = new_adapter(len(self.idx_d), r, n, dev, generator)
        self.lora_A_s, self.lora_B_s = new_adapter(len(self.idx_s), r_supp, n, dev, generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.prebuilt = None  # factors() as padded() built them for the module holding this one (common.together)

    def groups(self):
        """(A, B, rows) of each group that has an adapter."""
        return [(A, B, idx) for A, B, idx in ((self.lora_A_d, self.lora_B_d, self.idx_d),
                                              (self.lora_A_s, self.lora_B_s, self.idx_s)) if A is not None]

    def forward(self, x):
        m, gs = self.base.out_features, self.groups()
        if not gs:  # |M| = 0 and r′ = 0: nothing trains here
            return self.base(x)
        if self.lean:  # one dropout, one A and one B matmul for both groups, no index op on x
            A, B = self.prebuilt or self.factors()
            ax, = common.dropout_linear(x, self.dropout, A)  # (..., r + r′)
            return common.add_lora(self.base(x), ax, B, self.scaling)  # W₀x + s·B A x, in the base's dtype
        d = self.dropout(x)  # Eq 10: h = W₀x + s(M ⊗ B_d)A_d x + s(M̄ ⊗ B_s)A_s x
        return self.base(x) + sum(F.linear(F.linear(d, A), mask_map(B, idx, m)) * self.scaling for A, B, idx in gs)

    def factors(self):
        """Eq 10's two terms as one product: A = [A_d; A_s] ((r + r′) × n), B = [M ⊗ B_d, M̄ ⊗ B_s]
        (m × (r + r′): B_d in rows M, columns :r; B_s in rows M̄, columns r:), built from the compact blocks."""
        gs, m = self.groups(), self.base.out_features
        return torch.cat([A for A, _, _ in gs]), torch.cat([mask_map(B, idx, m) for _, B, idx in gs], 1)

    @staticmethod
    def padded(layers, cache):
        """[L.factors() for L in layers] at once (common.together): every block in one cat and one cast, each
        layer's [A_d; A_s] a run of it; for each group g, every M ⊗ B_g (Eq 9) a block of rows of one zero matrix
        (Σm rows, one index_copy_), the groups side by side. Layers whose groups differ: one by one."""
        ranks = {tuple(len(A) for A, _, _ in L.groups()) for L in layers}
        if len(ranks) > 1 or ranks == {()}:
            return [L.factors() if L.groups() else None for L in layers]
        ranks, ms = next(iter(ranks)), [L.base.out_features for L in layers]
        per = list(zip(*[L.groups() for L in layers]))  # per group (d, then s): each layer's (A, B, rows)
        pos = common.row_positions(cache, [[i for _, _, i in g] for g in per], ms)
        blocks = [A for L in layers for A, _, _ in L.groups()] + [B for g in per for _, B, _ in g]
        src = torch.cat([t.reshape(-1) for t in blocks])
        src = common.cast(src, src).split([sum(ranks) * L.base.in_features for L in layers] +
                                          [sum(B.numel() for _, B, _ in g) for g in per])
        A, Bg = src[:len(layers)], src[len(layers):]
        B = [b.new_zeros(sum(ms), r).index_copy_(0, p, b.view(-1, r)) for b, p, r in zip(Bg, pos, ranks)]
        B = (torch.cat(B, 1) if len(B) > 1 else B[0]).split(ms)
        return [(a.view(sum(ranks), -1), b) for a, b in zip(A, B)]

    def merge(self) -> nn.Linear:
        """W′ = W₀ + s(M ⊗ B_d)A_d + s(M̄ ⊗ B_s)A_s (Eq 11) = W₀ + s·B A with factors(), summed in fp32."""
        f = self.lora_factors()  # None: no adapter, W′ = W₀
        return common.merged_linear(self.base, 0 * self.base.weight if f is None else self.scaling * (f[1] @ f[0]))

    def lora_factors(self):
        """factors() for PEFT, fp32, detached: one rank-(r + r′) LoRA with s = α / r kept, so α_PEFT = s·(r + r′).
        None when neither group has an adapter (the module carries no update)."""
        if not self.groups():
            return None
        A, B = (t.detach().float() for t in self.factors())
        return A, B, self.scaling * len(A)


def new_adapter(rows, rank, n, device, generator=None):
    """(A, B) with LoRA's init (A Kaiming-uniform a=√5, B zeros), or (None, None) when empty."""
    if rows == 0 or rank == 0:
        return None, None
    A = nn.init.kaiming_uniform_(torch.empty(rank, n, dtype=torch.float32), a=math.sqrt(5), generator=generator)
    return nn.Parameter(A.to(device)), nn.Parameter(torch.zeros(rows, rank, device=device))


def param_count(m, n, k, r, r_supp):
    """Trainable parameters of one PiLoRA matrix with |M| = k: k·r + r·n + (m−k)·r′ + r′·n."""
    return (k * r + r * n if k else 0) + ((m - k) * r_supp + r_supp * n if m - k else 0)


# ------------------------------------------------------------------------------- the method object

class PiLoRA(common.Method):
    """Stage 1: LoRA + hit counting; after `phase` steps, partition and switch to PiLoRALinear."""
    prefix = "lora_"  # stage 1: LoRALinear's lora_A/B; stage 2: lora_A_d, lora_B_d, lora_A_s, lora_B_s

    def __init__(self, *, r=8, alpha=16.0, dropout=0.05, targets=None, heads=(), seed=0, phase=None,
                 steps_per_epoch=None, total_steps=None, extend=False, stage1_in_epochs=False, interval=10,
                 tau=0.7, partition="hits", r_supp=None, causal=False, warm_start=False):
        """phase            stage-1 length in optimizer steps; None: one epoch, `steps_per_epoch` (App. A.4)
        total_steps      optimizer steps of the whole run (checks that a stage 2 exists); with `extend`, of
                         stage 2, which then follows stage 1 (Alg. 1; train.py's --epochs): run_steps() is the run
        stage1_in_epochs with `extend`: take stage 1 out of total_steps instead
        interval         K: score every K optimizer steps in stage 1 (Alg. 1 line 7; K = 10 is ours)
        tau              τ: the dominant rows hold this fraction of all hits (Fig. 6), in (0, 1]
        partition        "hits" (§3.3), or Table 4's ablations "random", "top-half"
        r_supp           r′ of the supplementary rows, 0 <= r′ <= r; None: 2 if `causal` else 1 (Tables 5–7)
        causal           the model is a causal LM (only chooses r′'s default)
        warm_start       stage 2 starts from B[M], A of stage 1 on the dominant rows and keeps the heads
        r, alpha, dropout, targets, heads: LoRA's (common.LoRA), both stages; seed: stage 2's init and `random`."""
        common.check_lora(r, alpha, dropout)
        common.need(isinstance(interval, int) and interval >= 1, f"`interval` must be an integer >= 1 step, got {interval!r}")
        common.need(phase is None or (isinstance(phase, int) and phase >= 1), f"`phase` must be an integer >= 1 step, got {phase!r}")
        common.check_fraction("tau", tau)
        common.need(partition in PARTITIONS, f"`partition` must be one of {', '.join(PARTITIONS)}, got {partition!r}")
        r_supp = (2 if causal else 1) if r_supp is None else r_supp  # Tables 5–7: 2 for the LLMs, 1 for RoBERTa, ViT
        common.need(isinstance(r_supp, int) and 0 <= r_supp <= r, f"`r_supp` must be between 0 and `r` ({r}), got {r_supp!r}")
        stage1 = phase or steps_per_epoch
        common.need(stage1 is not None, "PiLoRA needs its stage-1 length: pass `phase` (optimizer steps) or "
                    "`steps_per_epoch` (stage 1 is then one epoch)")
        if total_steps is not None and extend and not stage1_in_epochs:
            total_steps += stage1  # Alg. 1: stage 1, then stage 2 for the trainer's epochs
        self.r, self.alpha, self.dropout, self.seed = r, alpha, dropout, seed
        self.targets, self.heads = common.check_names(targets, "targets"), common.check_names(heads, "heads")
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.interval, self.tau, self.partition, self.r_supp, self.warm_start = interval, tau, partition, r_supp, warm_start
        self.phase = self.stage1_length(phase)
        self.stage, self.schedule_start, self.scorings, self.scored = "stage1", 0, 0, -1
        self.dominant = None

    def attach(self, model, batches=(), state=None):
        common.prepare(model, self.heads, self, state)
        self.names = common.find_targets(model, self.targets, defaults=TARGETS, heads=self.heads)
        base = {n: model.get_submodule(n) for n in self.names}
        self.shapes = {n: (b.out_features, b.in_features) for n, b in base.items()}
        if state is None:
            self.hits = {n: torch.zeros(m, dtype=torch.long, device=base[n].weight.device)  # on the model's
                         for n, (m, _) in self.shapes.items()}  # device: scoring never waits for the host
            self.scores = {n: torch.zeros(m, device=base[n].weight.device) for n, (m, _) in self.shapes.items()}
            self.heads0 = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
        elif {n: len(h) for n, h in state["hits"].items()} != {n: m for n, (m, _) in self.shapes.items()}:
            raise common.UserError("the PiLoRA state does not fit this model (other targets or rows); attach it "
                                   "to the model it was saved from, with the same `targets`")
        else:
            for k in ("stage", "phase", "r_supp", "scorings", "schedule_start", "hits", "scores", "heads0",
                      "dominant", "next_step", "scored"):
                setattr(self, k, state[k])
        if self.stage == "stage1":
            for n in self.names:
                common.replace_module(model, n, common.LoRALinear(base[n], self.r, self.alpha, self.dropout))
        else:  # attached() loads the trained tensors; a private generator leaves the global RNG alone
            g = torch.Generator().manual_seed(self.seed)
            for n in self.names:
                common.replace_module(model, n, PiLoRALinear(base[n], self.dominant[n], self.r, self.r_supp,
                                                             self.alpha, self.dropout, g))
            common.together(model, PiLoRALinear)
        return self.attached(model, state)

    def run_steps(self, steps):
        """The whole run: `total_steps` (with `extend`, stage 1 plus stage 2's), else the loop's `steps`."""
        return steps if self.total_steps is None else self.total_steps

    def stage1_length(self, phase):
        T, epoch = self.total_steps, self.steps_per_epoch
        if phase is not None:
            common.need(T is None or phase < T, f"`phase` {phase} leaves no stage 2 in {T} steps; pass a smaller "
                        f"`phase` or train longer")
            return phase
        if T is not None and epoch >= T:
            common.need(T >= 2, "PiLoRA needs >= 2 steps (one per stage); pass a larger `total_steps`")
            print(f"pilora: one epoch ({epoch} steps) leaves no stage 2 in {T} steps; stage 1 takes {T // 2} "
                  f"(set `phase`)")
            return T // 2
        return epoch

    @torch.no_grad()
    def after_backward(self, step):
        self.check_step(step, "after_backward", exact=True)
        if self.stage != "stage1" or step % self.interval:  # Alg. 1 line 7: t mod K == 0
            return
        self.scored, S = step, None
        for n in self.names:
            mod = self.model.get_submodule(n)
            A, B = mod.lora_A, mod.lora_B
            if A.grad is None or B.grad is None:
                continue
            S = neuron_scores(A.float(), B.float(), A.grad.float(), B.grad.float())  # Eq 7–8, per module
            self.hits[n] = count_hits(self.hits[n].to(S.device), S)  # .to: a no-op but after a resume
            self.scores[n] = S
        common.need_grads(S is not None and bool(S.any()), "PiLoRA", step)  # one sync: the last module's scores
        self.scorings += 1

    def after_step(self, step):
        self.check_step(step, "after_step", exact=True)
        self.next_step = step + 1
        if self.stage == "stage1" and step % self.interval == 0 and self.scored != step:
            raise RuntimeError(f"PiLoRA: step {step} counts hits but after_backward({step}) was not called; call "
                               f"method.after_backward(step) after the backward passes, before optimizer.step()")
        if self.stage != "stage1" or step + 1 < self.phase:
            return False
        before = self.trainable()
        self.switch()
        self.changed(before)
        self.schedule_start = step + 1  # stage 2: a fresh warmup + decay for the fresh adapters
        return True

    @torch.no_grad()
    def switch(self):
        """Alg. 1 lines 14–18: partition every matrix and replace its LoRA by a two-group PiLoRA on Θ₀."""
        g = torch.Generator().manual_seed(self.seed)
        self.dominant = {}
        for n in self.names:
            old = self.model.get_submodule(n)
            self.dominant[n] = select_rows(self.hits[n].cpu(), self.scores[n].cpu(), self.tau, self.partition, g)
            new = PiLoRALinear(old.base, self.dominant[n], self.r, self.r_supp, self.alpha, self.dropout, g)
            if self.warm_start and new.lora_A_d is not None:
                new.lora_A_d.copy_(old.lora_A)
                new.lora_B_d.copy_(old.lora_B[new.idx_d])
            common.replace_module(self.model, n, new)
        common.together(self.model, PiLoRALinear)  # each attention / MLP builds its adapters' factors at once
        if not self.warm_start:  # back to Θ₀: heads as at attach, as new tensors
            for name, p0 in self.heads0.items():
                old = self.model.get_parameter(name)
                common.replace_module(self.model, name, nn.Parameter(p0.to(device=old.device, dtype=old.dtype)))
        self.heads0 = None
        self.stage = "stage2"

    def choices(self):
        cpu = lambda d: {n: t.cpu() for n, t in d.items()}  # noqa: E731
        return {**super().choices(), "stage": self.stage, "phase": self.phase, "r_supp": self.r_supp,
                "scorings": self.scorings, "schedule_start": self.schedule_start, "next_step": self.next_step,
                "scored": self.scored, "heads0": self.heads0, "dominant": self.dominant,
                "hits": cpu(self.hits), "scores": cpu(self.scores)}

    def summary(self):
        out = {"r": self.r, "alpha": self.alpha, "r_supp": self.r_supp, "tau": self.tau,
               "partition": self.partition, "interval": self.interval, "phase_steps": self.phase,
               "scorings": self.scorings, "stage": self.stage, "warm_start": self.warm_start,
               "adapted_modules": len(self.names)}
        lora = sum(self.r * (m + n) for m, n in self.shapes.values())
        out["lora_params"] = lora  # the rank-r LoRA of stage 1
        if self.dominant is not None:
            k = {name: len(idx) for name, idx in self.dominant.items()}
            pilora = sum(param_count(m, n, k[name], self.r, self.r_supp) for name, (m, n) in self.shapes.items())
            out.update(dominant_rows=k, rows={name: m for name, (m, _) in self.shapes.items()},
                       dominant_fraction=sum(k.values()) / sum(m for m, _ in self.shapes.values()),
                       pilora_params=pilora, param_ratio=pilora / lora)
        return out
