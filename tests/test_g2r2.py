"""g2r2.py against brute force: exact / paper ∂ℒ/∂ΔW, Eq 5–10, the Eq 12 schedule, the three stages on
tiny-llama (zeroing, removal, optimizer, resume), and a planted-signal task."""
import copy
import io
import math
import os
import sys
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import g2r2  # noqa: E402
import train  # noqa: E402
from models import build_tiny  # noqa: E402

BF16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def tiny_llama(ckpt=False):
    model = build_tiny("tiny-llama")
    model.config.use_cache = False
    if ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def lm_batch(seed, n=2, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 260, (n, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


class DenseDelta(nn.Module):
    """Reference: W₀ + D with D an explicit parameter, so D.grad is ∂ℒ/∂ΔW by plain autograd."""

    def __init__(self, base, delta):
        super().__init__()
        self.base = base
        self.D = nn.Parameter(delta.detach().clone())

    def forward(self, x):
        return F.linear(x, self.base.weight + self.D, self.base.bias)


# ------------------------------------------------------------------ exact ∂ℒ/∂ΔW (Eq 5 input)

@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
@pytest.mark.parametrize("ckpt,micro", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_exact_grad_equals_autograd_of_explicit_delta(ckpt, micro, lean, monkeypatch):
    """plain (ExactGrad.lean False): the whole summed gradient is formed, checked entry by entry; lean: with
    one micro-batch ΣS is taken from blocks of rows in the backward (no whole gradient to check), Eq 5–7 below."""
    monkeypatch.setattr(g2r2.ExactGrad, "lean", lean)
    model = tiny_llama(ckpt)
    meth = g2r2.G2R2(dropout=0.0, total_steps=10, warmup=2, prune=2, micro_batches=micro)
    meth.attach(model)
    model.double()
    torch.manual_seed(1)
    for L in meth.layers:
        with torch.no_grad():
            L.lora_B.normal_(0, 0.3)  # ΔW ≠ 0 so that ΣS is non-trivial
    ref = copy.deepcopy(model)
    for n in meth.names:
        L = ref.get_submodule(n)
        common.replace_module(ref, n, DenseDelta(L.base, L.delta_weight()))
    grads, calls, orig = {}, [0], meth.exact.reduce

    def spy(i):  # the summed out × in gradient just before it is reduced to ΣS and freed
        grads[i] = meth.exact.grad[i].clone()
        orig(i)
    meth.exact.reduce = spy
    meth.layers[0].register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    for k in range(micro):
        model(**lm_batch(k)).loss.backward()
        ref(**lm_batch(k)).loss.backward()
    assert calls[0] == micro * (2 if ckpt else 1)  # checkpointing really recomputed the forward
    meth.after_backward(0)
    assert len(grads) == (0 if lean and micro == 1 else len(meth.names))
    for i, n in enumerate(meth.names):
        G = ref.get_submodule(n).D.grad
        assert i not in grads or torch.allclose(grads[i], G, rtol=1e-9, atol=1e-12), n
        S = (G * ref.get_submodule(n).D).abs().sum()  # Eq 5 summed, brute force
        assert torch.allclose(meth.exact.s_sum[i], S, rtol=1e-9)
        assert meth.R_bar[i] == pytest.approx(G.numel() / S.item(), rel=1e-9)  # Eq 7, first value
    assert all(g is None for g in meth.exact.grad)  # buffers freed


class SharedProj(nn.Module):
    """One Linear applied twice per forward, as DeBERTa-v3 applies query_proj / key_proj to the hidden states
    and again to the relative position embeddings (share_att_key); the second use optionally checkpointed."""

    def __init__(self, ckpt=False):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.ckpt = nn.Linear(6, 5).double(), ckpt

    def forward(self, x, y):
        second = (torch.utils.checkpoint.checkpoint(self.proj, y, use_reentrant=False) if self.ckpt
                  else self.proj(y))
        return (self.proj(x) ** 2).sum() + (second * torch.linspace(-1, 1, 5, dtype=x.dtype)).sum()


@pytest.mark.parametrize("ckpt,micro", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_exact_grad_of_a_module_used_twice_per_forward(ckpt, micro):
    model = SharedProj(ckpt)
    meth = g2r2.G2R2(r=2, dropout=0.0, targets=["proj"], total_steps=10, warmup=2, prune=2,
                     micro_batches=micro)
    meth.attach(model)
    model.double()
    with torch.no_grad():
        meth.layers[0].lora_B.normal_(0, 0.3)
    ref = copy.deepcopy(model)
    ref.proj = DenseDelta(ref.proj.base, meth.layers[0].delta_weight())
    g = torch.Generator().manual_seed(3)
    for _ in range(micro):
        x, y = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
        model(x, y).backward()
        ref(x, y).backward()
    meth.after_backward(0)
    S = (ref.proj.D.grad * ref.proj.D).abs().sum()  # Eq 5 on the gradient summed over both uses, brute force
    assert torch.allclose(meth.exact.s_sum[0], S, rtol=1e-9)


def test_exact_refuses_more_backward_passes_than_micro_batches():
    model = tiny_llama()
    meth = g2r2.G2R2(dropout=0.0, total_steps=10, warmup=2, prune=2)  # 1 micro-batch
    meth.attach(model)
    model(**lm_batch(0)).loss.backward()
    with pytest.raises(RuntimeError, match="micro_batches"):
        model(**lm_batch(1)).loss.backward()


class Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched while active, by name (native_dropout: one mask draw)."""

    def __init__(self):
        super().__init__()
        self.n = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        self.n[name] = self.n.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [False, True])
def test_scored_layer_equals_plain_eq3_draws_once_and_saves_no_new_tensor(autocast):
    """With the capture armed, the layer computes what the plain line of Eq 3 computes (values and gradients,
    nn.Dropout from the same RNG state), draws its dropout mask as often as an unscored lean step (forward, and
    once in backward for ∂x, ∂A and the capture together), and autograd keeps storages of the sizes it keeps
    without the capture: less than nn.Dropout + LoRA, which keeps the dropped copy and the mask."""
    base = nn.Linear(16, 12)
    layer = g2r2.G2R2Linear(base, 4, 8.0, dropout=0.1)
    with torch.no_grad():
        layer.lora_B.normal_()
    x0, seen = torch.randn(3, 5, 16), []

    def step(sink, lean=True):
        layer.sink, layer.lean, ptrs = sink, lean, []
        x = x0.clone().requires_grad_()
        pack = lambda t: ptrs.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())) or t
        torch.manual_seed(0)
        with Ops() as ops:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), BF16() if autocast else nullcontext():
                h = layer(x)
            (h.float() * torch.linspace(-1, 1, 12)).sum().backward()
        out = [h.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad]
        layer.lora_A.grad = layer.lora_B.grad = None
        return out, ptrs, ops.n.get("native_dropout", 0)
    plain, plain_saved, _ = step(None, lean=False)
    lean, lean_saved, lean_draws = step(None)
    scored, scored_saved, scored_draws = step(lambda g, x, AB: seen.append((g, x)))
    for a, b in zip(scored, plain):
        tol = 2e-2 if autocast else 1e-6  # bf16: the plain line's own rounding (it adds in bf16, lean in fp32)
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    assert all(torch.equal(a, b) for a, b in zip(scored, lean))  # bit for bit the unscored lean step
    assert len(seen) == 1 and scored_draws == lean_draws == 2
    g, xd = seen[0]
    torch.manual_seed(0)
    assert torch.equal(xd, nn.functional.dropout(x0, 0.1))  # x_in: the forward's mask
    assert sorted(b for _, b in set(scored_saved)) == sorted(b for _, b in set(lean_saved))
    assert sum(b for _, b in set(scored_saved)) < sum(b for _, b in set(plain_saved))


class DenseDeltaDropped(nn.Module):
    """Reference for a LoRA layer with dropout: W₀x + D·dropout(x), D an explicit parameter (D.grad is
    ∂ℒ/∂ΔW by plain autograd) and nn.Dropout drawing what dropout_linear draws on CPU."""

    def __init__(self, base, delta, p):
        super().__init__()
        self.base, self.drop = base, nn.Dropout(p)
        self.D = nn.Parameter(delta.detach().clone())

    def forward(self, x):
        return self.base(x) + F.linear(self.drop(x), self.D)


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "checkpointed"])
def test_exact_grad_with_dropout_uses_the_forward_mask(ckpt, lean, monkeypatch):
    """Dropout 0.3 on every adapter: the captured ∂ℒ/∂ΔW (mask drawn again in backward) equals autograd's
    D.grad of the dense reference that drops x with nn.Dropout from the same RNG stream (lean: its ΣS)."""
    monkeypatch.setattr(g2r2.ExactGrad, "lean", lean)
    model = tiny_llama(ckpt)
    meth = g2r2.G2R2(dropout=0.3, total_steps=10, warmup=2, prune=2, micro_batches=1)
    meth.attach(model)
    model.double()
    torch.manual_seed(1)
    for L in meth.layers:
        with torch.no_grad():
            L.lora_B.normal_(0, 0.3)
    ref = copy.deepcopy(model)
    for n in meth.names:
        L = ref.get_submodule(n)
        common.replace_module(ref, n, DenseDeltaDropped(L.base, L.delta_weight(), 0.3))
    undropped = copy.deepcopy(ref)
    for n in meth.names:
        undropped.get_submodule(n).drop.p = 0.0
    grads, orig = {}, meth.exact.reduce

    def spy(i):
        grads[i] = meth.exact.grad[i].clone()
        orig(i)
    meth.exact.reduce = spy
    for net in (model, ref):
        torch.manual_seed(7)
        net(**lm_batch(0)).loss.backward()
    meth.after_backward(0)
    assert len(grads) == (0 if lean else len(meth.names))
    for i, n in enumerate(meth.names):
        G = ref.get_submodule(n).D.grad
        assert i not in grads or torch.allclose(grads[i], G, rtol=1e-9, atol=1e-12), n
        assert torch.allclose(meth.exact.s_sum[i], (G * ref.get_submodule(n).D).abs().sum(), rtol=1e-9), n
    undropped(**lm_batch(0)).loss.backward()
    first = meth.names[0]
    assert not torch.allclose(undropped.get_submodule(first).D.grad, ref.get_submodule(first).D.grad)  # dropout mattered


# --------------------------------------------------------------------------- paper estimator (Eq 6)

def test_paper_grad_is_exact_for_rank_one_single_output():
    torch.manual_seed(0)
    layer = g2r2.G2R2Linear(nn.Linear(5, 1), r=1, alpha=3.0).double()
    with torch.no_grad():
        layer.lora_B.fill_(0.7)
    x = torch.randn(7, 5, dtype=torch.float64)
    out = layer(x)
    torch.sin(out).sum().backward()
    D = nn.Parameter(layer.delta_weight().detach())
    torch.sin(F.linear(x, layer.base.weight + D, layer.base.bias)).sum().backward()
    est = g2r2.paper_grad(layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.scaling)
    assert torch.allclose(est, D.grad, atol=1e-12)


def test_paper_grad_against_loops_with_guard():
    torch.manual_seed(0)
    out, inp, r, s = 4, 6, 3, 2.0
    A, B, gA = torch.randn(r, inp, dtype=torch.float64), torch.randn(out, r, dtype=torch.float64), \
        torch.randn(r, inp, dtype=torch.float64)
    B[1, 2] = 0.0
    B[3, 0] = 1e-12
    ref = torch.zeros(out, inp, dtype=torch.float64)
    for j in range(out):
        for i in range(inp):
            for m in range(r):
                if abs(s * B[j, m]) > 1e-8:
                    ref[j, i] += gA[m, i] / (s * B[j, m])
    est = g2r2.paper_grad(A, B, gA, s)
    assert torch.isfinite(est).all() and torch.allclose(est, ref)
    zero = g2r2.paper_grad(A, torch.zeros(out, r, dtype=torch.float64), gA, s)  # LoRA at step 0
    assert torch.all(zero == 0)


@pytest.mark.parametrize("score", ["paper", "product"])
def test_paper_and_product_scorers_against_hand_computation(score):
    """One scored step through the method: R̄ (= R at the first value) against loops over the layer's
    A, B and their gradients. paper: R = d·k / Σ|Ĝ ⊙ ΔW| with Ĝ_ji = Σ_m gA_mi / (s·B_jm) (Eq 5–7);
    product: R(A)·R(B) = (|A| / Σ|gA ⊙ A|)·(|B| / Σ|gB ⊙ B|)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    meth = g2r2.G2R2(r=2, alpha=3.0, dropout=0.0, targets=["0", "2"], total_steps=10, warmup=3,
                     prune=2, score=score)
    meth.attach(model)
    with torch.no_grad():
        for L in meth.layers:
            L.lora_B.normal_()
    model(torch.randn(6, 5)).pow(2).sum().backward()
    meth.after_backward(0)
    for i, L in enumerate(meth.layers):
        A, B, s = L.lora_A.tolist(), L.lora_B.tolist(), L.scaling
        gA, gB = L.lora_A.grad.tolist(), L.lora_B.grad.tolist()
        r, out, inn = len(A), len(B), len(A[0])
        if score == "paper":
            total = 0.0
            for j in range(out):
                for c in range(inn):
                    G = sum(gA[m][c] / (s * B[j][m]) for m in range(r))
                    dW = s * sum(B[j][m] * A[m][c] for m in range(r))
                    total += abs(G * dW)
            want = out * inn / total
        else:
            SA = sum(abs(gA[m][c] * A[m][c]) for m in range(r) for c in range(inn))
            SB = sum(abs(gB[j][m] * B[j][m]) for j in range(out) for m in range(r))
            want = (r * inn / SA) * (out * r / SB)
        assert meth.R_bar[i] == pytest.approx(want, rel=1e-5)
        assert meth.U_bar[i] == 0.0 and meth.R_hat[i] == 0.0  # first value: Ū = 0


# ------------------------------------------------------------------- Eq 5, 7 and Eq 8–10

def test_sensitivity_and_redundancy_double_loop():
    torch.manual_seed(0)
    G, W = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    total = 0.0
    for i in range(5):
        for j in range(7):
            total += abs(G[i, j].item() * W[i, j].item())
    S = g2r2.sensitivity(G, W)
    assert g2r2.redundancy(S.sum(), W.numel()) == pytest.approx(35 / total, rel=1e-12)
    assert g2r2.redundancy(torch.tensor(0.0), 35) is None  # ΔW = 0: undefined, skipped
    assert g2r2.redundancy(torch.tensor(float("nan")), 35) is None


def test_smoothing_against_hand_computation():
    b1, b2 = 0.85, 0.95
    rb = ub = None
    hand_rb = hand_ub = None
    for r in [2.0, 4.0, 1.0, 3.5]:
        rb, ub, rh = g2r2.smooth(rb, ub, r, b1, b2)
        hand_rb = r if hand_rb is None else b1 * hand_rb + (1 - b1) * r
        u = abs(r - hand_rb)
        hand_ub = u if hand_ub is None else b2 * hand_ub + (1 - b2) * u
        assert rb == pytest.approx(hand_rb, rel=1e-12) and ub == pytest.approx(hand_ub, rel=1e-12)
        assert rh == pytest.approx(hand_rb * hand_ub, rel=1e-12)
    assert hand_ub > 0


# --------------------------------------------------------------------------------- Eq 12

def test_retention_schedule_endpoints_monotone_and_counts():
    T_w, T_p, p0, pf, M = 5, 8, 0.9, 0.2, 10
    ps = [g2r2.retention(t, T_w, T_p, p0, pf) for t in range(30)]
    assert ps[:T_w] == [p0] * T_w and ps[T_w] == pytest.approx(p0) and ps[T_w + T_p:] == [pf] * (30 - T_w - T_p)
    assert all(a >= b for a, b in zip(ps, ps[1:])) and all(pf <= p <= p0 for p in ps)
    t = T_w + 3
    assert ps[t] == pytest.approx(pf + (p0 - pf) * (1 - 3 / T_p) ** 3)
    ks = [g2r2.n_keep(p, M) for p in ps]
    assert ks[0] == 9 and ks[-1] == 2 and all(a >= b for a, b in zip(ks, ks[1:]))
    assert g2r2.n_keep(0.7, 10) == 7 and g2r2.n_keep(0.2, 7) == 2 and g2r2.n_keep(1.0, 7) == 7
    assert g2r2.n_keep(0.07, 100) == 7  # 0.07·100 = 7.000000000000001: the tolerance keeps 7
    assert g2r2.select([3.0, None, 1.0, 1.0], [0, 1, 2, 3], 2) == {2, 3}  # ties by index, unscored last


def test_flag_validation():
    with pytest.raises(ValueError, match="p0"):
        g2r2.G2R2(total_steps=100, p0=0.5, pf=0.6)
    with pytest.raises(ValueError, match="p0"):
        g2r2.G2R2(total_steps=100, pf=0.0)
    with pytest.raises(ValueError, match="lower `warmup`"):
        g2r2.G2R2(total_steps=100, warmup=60, prune=40)
    with pytest.raises(ValueError, match="score_every"):
        g2r2.G2R2(total_steps=100, score_every=0)
    m = g2r2.G2R2(total_steps=200)  # defaults: Table 10's 10% / 10% / 80%
    assert (m.T_w, m.T_p) == (20, 20)


# ------------------------------------------------------------- three stages on tiny-llama

def build_optimizer(model, old=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.1)
    if old is not None:
        for p in opt.param_groups[0]["params"]:
            if p in old.state:
                opt.state[p] = old.state[p]
    return opt


def run(model, meth, opt, start, stop, micro=2, check=None):
    """The trainer's hook order (train.py), bf16 autocast on CPU."""
    losses = []
    for step in range(start, stop):
        total = 0.0
        for k in range(micro):
            with BF16():
                loss = model(**lm_batch(1000 * step + k)).loss / micro
            loss.backward()
            total += loss.item()
        meth.after_backward(step)
        opt.step()
        if meth.after_step(step):
            opt = build_optimizer(model, opt)
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if check:
            check(step, opt)
    return losses, opt


def test_three_stages_tiny_llama_and_resume_mid_pruning():
    T, T_w, T_p, pf = 14, 3, 5, 0.2
    kw = dict(dropout=0.05, total_steps=T, warmup=T_w, prune=T_p, pf=pf, micro_batches=2)
    torch.manual_seed(0)
    model = tiny_llama(ckpt=True)
    meth = g2r2.G2R2(**kw)
    with BF16():
        meth.attach(model)
    M = len(meth.names)
    assert M == 10  # Q, K, V, Up, Down × 2 layers (Table 9)
    ab = {n: (L.lora_A, L.lora_B) for n, L in zip(meth.names, meth.layers)}
    opt = build_optimizer(model)
    snap = {}
    # oracle of which modules are pruned: R = d·k / ΣS of each step (ΣS checked against autograd in
    # test_exact_grad_...), smoothed by hand (Eq 8–10), the highest R̂ pruned down to ⌈p·M⌉ (Eq 11–12)
    sums, hand, live_before = {}, {}, [list(range(M))]
    numel = [L.base.weight.numel() for L in meth.layers]  # d·k of Eq 7
    orig_after_backward = meth.after_backward

    def after_backward(step):
        orig_after_backward(step)
        sums[step] = {i: float(v) for i, v in meth.exact.s_sum.items()}
    meth.after_backward = after_backward

    def check_pruned(step):
        for i, v in sums.get(step, {}).items():
            if v > 0:
                R = numel[i] / v
                Rb, Ub = hand.get(i, (None, None))
                Rb = R if Rb is None else 0.85 * Rb + 0.15 * R
                Ub = abs(R - Rb) if Ub is None else 0.95 * Ub + 0.05 * abs(R - Rb)
                hand[i] = (Rb, Ub)
        if T_w <= step < T_w + T_p:
            p = pf + (1 - pf) * (1 - (step + 1 - T_w) / T_p) ** 3
            k = min(M, math.ceil(round(p * M, 9)))
            R_hat = {i: hand[i][0] * hand[i][1] if i in hand else math.inf for i in live_before[0]}
            want = sorted(live_before[0], key=lambda i: (R_hat[i], i))[:k]
            assert meth.retained() == sorted(want), step
            gone = set(live_before[0]) - set(want)
            assert all(R_hat[i] >= R_hat[j] for i in gone for j in want)  # the most redundant went
        live_before[0] = meth.retained()

    def check(step, opt):
        check_pruned(step)
        live = meth.retained()
        assert len(live) == g2r2.n_keep(g2r2.retention(step + 1, T_w, T_p, 1.0, pf), M)
        for i in meth.pruned_at:  # pruned: A and B exactly zero (weight decay, Adam moments)
            A, B = ab[meth.names[i]]
            assert torch.all(A == 0) and torch.all(B == 0)
        if step == T_w + 2:  # checkpoint mid-pruning, as train.py writes it
            snap.update(trainable={n: p.detach().clone() for n, p in train.trainable_state_dict(model).items()},
                        optimizer=copy.deepcopy(opt.state_dict()), method=copy.deepcopy(meth.state_dict()),
                        rng=torch.get_rng_state())
            assert 0 < len(meth.pruned_at) < M - g2r2.n_keep(pf, M) and meth.stage == "prune"
        if step >= T_w + T_p - 1:
            pruned_ids = {id(t) for i in meth.pruned_at for t in ab[meth.names[i]]}
            assert not pruned_ids & {id(p) for g in opt.param_groups for p in g["params"]}
            assert not pruned_ids & {id(p) for p in opt.state}
            for i in meth.pruned_at:
                assert type(model.get_submodule(meth.names[i])) is nn.Linear
            trainable, _ = train.count_params(model)
            assert trainable == sum(L.lora_A.numel() + L.lora_B.numel() for L in meth.layers if L is not None)
    losses, opt = run(model, meth, opt, 0, T, check=check)
    assert all(math.isfinite(x) for x in losses)
    assert len(hand) == M and any(meth.pruned_at.values())  # every module was scored; pruning happened
    assert len(meth.retained()) == math.ceil(pf * M) and meth.stage == "refine"
    s = meth.summary()
    assert s["adapter_params_end"] == train.count_params(model)[0] < s["adapter_params_start"]
    assert len(s["retained_modules"]) + len(s["pruned_at_step"]) == M

    # resume from the mid-pruning checkpoint into a fresh model: identical losses and structure
    model2 = tiny_llama(ckpt=True)
    meth2 = g2r2.G2R2(**kw)
    with BF16():
        meth2.attach(model2, state=snap["method"])
    model2.load_state_dict(snap["trainable"], strict=False)
    opt2 = build_optimizer(model2)
    opt2.load_state_dict(snap["optimizer"])
    torch.set_rng_state(snap["rng"])
    losses2, _ = run(model2, meth2, opt2, T_w + 3, T)
    assert losses2 == losses[T_w + 3:]
    assert meth2.summary() == s
    # and after refinement: the structure (plain base Linears) comes back from the state alone
    model3 = tiny_llama()
    g2r2.G2R2(**kw).attach(model3, state=meth.state_dict())
    assert [type(m) for m in model3.modules()] == [type(m) for m in model.modules()]


def test_export_merges_retained_only():
    torch.manual_seed(0)
    model = tiny_llama()
    meth = g2r2.G2R2(dropout=0.0, total_steps=8, warmup=2, prune=3, pf=0.3,
                     score="paper")
    meth.attach(model)
    for step in range(5):  # stop inside refinement's first step
        model(**lm_batch(step)).loss.backward()
        meth.after_backward(step)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad.sign()
        meth.after_step(step)
        model.zero_grad(set_to_none=True)
    assert meth.refined and len(meth.retained()) == 3
    model.eval()
    x = lm_batch(99)["input_ids"]
    with torch.no_grad():
        before = model(input_ids=x).logits
        meth.export(model)
        after = model(input_ids=x).logits
    assert not common.adapters(model, g2r2.G2R2Linear)
    assert torch.allclose(before, after, atol=1e-5)


def test_module_without_gradient_does_not_crash():
    class Three(nn.Module):  # the loss never reads `b`
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            self.b(x)
            return self.a(x) + self.c(x)
    for score in g2r2.SCORES:
        torch.manual_seed(0)
        model = Three()
        meth = g2r2.G2R2(r=2, dropout=0.0, targets=["a", "b", "c"], total_steps=10, warmup=3,
                         prune=2, pf=0.5, score=score)
        meth.attach(model)
        opt = build_optimizer(model)
        for step in range(10):
            model(torch.randn(4, 6)).pow(2).mean().backward()
            meth.after_backward(step)
            opt.step()
            if meth.after_step(step):
                opt = build_optimizer(model, opt)
            opt.zero_grad(set_to_none=True)
        if score != "random":
            assert meth.R_hat[1] is None and meth.summary()["retained_modules"] == ["a", "c"]


# ------------------------------------------------------------------------ planted signal

class Planted(nn.Module):
    """Eight modules in 4 layers × {q, v}, each writing its own block of the output."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(16, 4), "v": nn.Linear(16, 4)})
                                    for _ in range(4))

    def forward(self, x):
        return torch.cat([blk[k](x) for blk in self.layers for k in ("q", "v")], -1)


PLANTED = {"layers.1.q", "layers.3.v"}


def planted_run(score, seed, T=60):
    """Targets = base model + a rank-2 change in PLANTED only, plus noise: the other six modules see
    gradients of pure noise and cannot lower the expected loss."""
    torch.manual_seed(seed)
    model = Planted()
    with torch.no_grad():
        X = torch.randn(512, 16)
        Y = model(X) + 0.3 * torch.randn(512, 32)
        for name in PLANTED:
            l, k = int(name.split(".")[1]), name.split(".")[2]
            col = 8 * l + (0 if k == "q" else 4)
            Y[:, col:col + 4] += X @ (0.5 * torch.randn(4, 2) @ torch.randn(2, 16)).T
    meth = g2r2.G2R2(r=2, alpha=2.0, dropout=0.0, targets=["q", "v"], seed=seed, total_steps=T,
                     warmup=20, prune=20, pf=0.25, score=score)
    meth.attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(seed)
    for step in range(T):
        idx = torch.randint(0, 512, (32,), generator=g)
        ((model(X[idx]) - Y[idx]) ** 2).mean().backward()
        meth.after_backward(step)
        opt.step()
        if meth.after_step(step):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        opt.zero_grad(set_to_none=True)
    kept = set(meth.summary()["retained_modules"])
    assert len(kept) == 2
    return len(kept & PLANTED)


def test_planted_signal_is_retained_and_random_does_worse():
    exact = [planted_run("exact", s) for s in range(3)]
    rand = [planted_run("random", s) for s in range(3)]
    assert sum(exact) >= 5  # of 6 planted slots over three seeds
    assert sum(rand) < sum(exact)


# --------------------------------------------------------------------- through train.main

def test_train_main_three_stages_and_resume(tmp_path):
    argv = ["--method", "g2r2", "--model", "tiny-llama", "--data", "builtin", "--max_steps", "10",
            "--batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-2", "--dtype", "bf16", "--grad_ckpt",
            "--eval_every", "0", "--max_samples", "64", "--eval_limit", "1",
            "--g2r2_warmup", "3", "--g2r2_prune", "4", "--save_every", "5"]
    full = train.main(argv + ["--output_dir", str(tmp_path / "full")])
    assert full["modules"] == 10 and len(full["retained_modules"]) == 2
    assert full["trainable_params_end"] == full["adapter_params_end"] < full["trainable_params_start"]
    assert all(math.isfinite(x) for x in full["losses"])
    ck = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    assert len(ck["optimizer"]["state"]) == 2 * 2  # A and B of the two retained modules only
    part = tmp_path / "part"
    train.main(argv + ["--output_dir", str(part), "--stop_after", "5"])  # step 5 is mid-pruning
    resumed = train.main(argv + ["--output_dir", str(part), "--resume"])
    assert resumed["losses"] == full["losses"]
    assert resumed["retained_modules"] == full["retained_modules"]
    assert resumed["pruned_at_step"] == full["pruned_at_step"]


# ------------------------------------------------------------ own-loop mistakes (issue 32), save / load

def own_loop(meth, model, steps, order="right", micro=1, stop=None):
    """A 20-line loop on tiny-llama in fp32; order "late": the hooks after optimizer.step() + zero_grad()."""
    opt = torch.optim.AdamW(meth.param_groups(1e-2), lr=1e-2)
    for step in range(steps if stop is None else stop):
        for k in range(micro):
            model(**lm_batch(100 * step + k)).loss.backward()
        if order == "right":
            meth.after_backward(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if order == "late":
            meth.after_backward(step)
        if meth.after_step(step):
            opt = torch.optim.AdamW(meth.param_groups(1e-2), lr=1e-2)
    return opt


@pytest.mark.parametrize("score", ["paper", "product", "exact"])
def test_scoring_from_missing_gradients_names_the_hook_order(score):
    """paper / product read .grad, which zero_grad() has cleared; exact with no backward pass of this step."""
    meth = g2r2.G2R2(dropout=0.0, total_steps=10, warmup=3, prune=2, score=score)
    model = tiny_llama()
    meth.attach(model)
    with pytest.raises(RuntimeError, match=r"after loss.backward\(\) and before optimizer.step\(\)"):
        if score == "exact":
            meth.after_backward(0)  # called before the step's backward
        own_loop(meth, model, 2, order="late")


def test_warmup_too_short_to_rank_warns_with_the_numbers():
    """T_w = 1: step 0 scores ΔW = 0 (B = 0), step 1 is pruning: every R̂ is 0 or missing, modules go by index."""
    meth = g2r2.G2R2(dropout=0.0, total_steps=6, warmup=1, prune=2)
    model = tiny_llama()
    meth.attach(model)
    with pytest.warns(UserWarning, match=r"pruned by index; give `warmup` more steps \(T_w = 1 now, score_every = 1\)"):
        own_loop(meth, model, 2)


def test_export_before_refinement_warns_total_steps_counts_optimizer_steps():
    """total_steps given in micro-batches (4 × 5 instead of 5): the run ends mid-pruning and never refines."""
    meth = g2r2.G2R2(dropout=0.0, total_steps=20, warmup=2, prune=6, micro_batches=4)
    model = tiny_llama()
    meth.attach(model)
    own_loop(meth, model, 5, micro=4)
    assert not meth.refined and meth.stage == "prune" and 0 < len(meth.pruned_at) < 8
    with pytest.warns(UserWarning, match=r"after 5 of total_steps=20 optimizer steps, in prune with \d+ of 10 "
                                         r"modules live .* not micro-batches \(the last step ran 4 forward passes\)"):
        meth.export(model)


def test_forgetting_after_step_names_after_step():
    meth = g2r2.G2R2(dropout=0.0, total_steps=10, warmup=3, prune=2)
    model = tiny_llama()
    meth.attach(model)
    model(**lm_batch(0)).loss.backward()
    meth.after_backward(0)
    with pytest.raises(RuntimeError, match=r"call method.after_step\(step\) after optimizer.step\(\)"):
        model(**lm_batch(1)).loss.backward()


def test_one_method_object_on_two_models_and_a_state_of_another_method_refuse():
    meth = g2r2.G2R2(dropout=0.0, total_steps=10, warmup=3, prune=2)
    meth.attach(tiny_llama())
    with pytest.raises(RuntimeError, match="attached to a model already; build a new method object"):
        meth.attach(tiny_llama())
    other = common.LoRA(r=2)
    other.attach(tiny_llama())
    with pytest.raises(common.UserError, match="saved by LoRA, not G2R2"):
        g2r2.G2R2(dropout=0.0, total_steps=10, warmup=3, prune=2).attach(tiny_llama(), state=other.state_dict())


@pytest.mark.parametrize("stop", [4, 7], ids=["mid-pruning", "refined"])
def test_own_loop_state_dict_reload_gives_equal_logits(stop):
    """method.state_dict() -> attach(fresh model, state=...): the same modules pruned / removed, the same tensors,
    the same logits; a state saved from other targets refuses."""
    kw = dict(dropout=0.05, total_steps=10, warmup=2, prune=4, pf=0.3)
    meth, model = g2r2.G2R2(**kw), tiny_llama()
    meth.attach(model)
    own_loop(meth, model, 10, stop=stop)
    assert (0 < len(meth.pruned_at) and not meth.refined) if stop == 4 else meth.refined
    buf = io.BytesIO()
    torch.save(meth.state_dict(), buf)  # as a file for another process: plain tensors and containers only
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    fresh, meth2 = tiny_llama(), g2r2.G2R2(**kw)
    meth2.attach(fresh, state=state)
    ids = lm_batch(7)["input_ids"]
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    assert meth2.summary() == meth.summary() and meth2.next_step == stop
    with pytest.raises(ValueError, match="adapts other modules"):
        g2r2.G2R2(**kw, targets=["q_proj"]).attach(tiny_llama(), state=state)


def test_exact_sum_of_a_bf16_model_in_blocks_against_float64(monkeypatch):
    """A bf16 model's one-micro-batch ΣS (Eq 5): ∂ℒ/∂ΔW and ΔW blocks in bf16, summed in fp32, within bf16's
    rounding of the float64 Σ|G ⊙ ΔW| (G = Σ_tokens δ ⊗ x by explicit float64 products), over two row blocks."""
    monkeypatch.setattr(g2r2, "blocks", lambda L: [(0, 20), (20, 48)])
    L = g2r2.G2R2Linear(nn.Linear(64, 48).to(torch.bfloat16), 4, 8.0)
    with torch.no_grad():
        L.lora_B.normal_()
    g = torch.Generator().manual_seed(1)
    d = torch.randn(60, 48, generator=g).to(torch.bfloat16)
    x = torch.randn(60, 64, generator=g).to(torch.bfloat16)
    got = g2r2.s_sum_rows(lambda a, b: g2r2.exact_grad(d[:, a:b], x, torch.bfloat16, out=torch.bfloat16), L)
    G = torch.einsum("to,ti->oi", d.double(), x.double())
    want = (G * (L.scaling * L.lora_B.double() @ L.lora_A.double())).abs().sum()
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-2 * want.item()


def test_scored_bf16_layer_hands_its_forward_factors_to_the_sum():
    """A bf16 model under bf16 autocast: the scored backward hands its forward's bf16 A and B to ΣS (Eq 5), which
    then equals s_sum_rows casting them itself, bit for bit, from the same δ_out and x_in."""
    L = g2r2.G2R2Linear(nn.Linear(64, 48).to(torch.bfloat16), 4, 8.0)
    with torch.no_grad():
        L.lora_B.normal_()
    ex = g2r2.ExactGrad([L], 1)
    ex.arm(True)
    ex.forwards, seen, capture = 1, [], ex.capture
    ex.capture = lambda i, d, x, AB=None: seen.append((d, x, AB)) or capture(i, d, x, AB)
    x = torch.randn(2, 30, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = L(x)
    (h.float() * torch.linspace(-1, 1, 48)).sum().backward()
    d, xi, AB = seen[0]
    assert [t.dtype for t in AB] == [torch.bfloat16, torch.bfloat16]
    d = d.reshape(-1, 48)
    want = g2r2.s_sum_rows(lambda a, b: g2r2.exact_grad(d[:, a:b], xi, torch.bfloat16, out=torch.bfloat16), L)
    assert torch.equal(ex.s_sum[0], want) and want > 0
