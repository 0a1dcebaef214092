"""TASO (taso.py) against brute force: naive float64 autograd importance, explicit-loop core regions,
dense ΔW forward/merge (lean and plain forms), saved tensors, a planted block, and tiny-llama runs under bf16 + checkpointing."""
import copy
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import params_per_module  # noqa: E402
import common  # noqa: E402
import taso  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402


def lm_batches(n, seed=0, bsz=2, T=12, prompt=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 260, (bsz, T), generator=g)
        labels = ids.clone()
        labels[:, :prompt] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def ckpt(model):
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


# ----------------------------------------------------------------------------- importance (T1)

def test_importance_matches_naive_float64_and_is_memory_lean():
    model = models.build_tiny("tiny-llama").double()
    names = common.find_targets(model)
    ws = [model.get_submodule(n).weight for n in names]
    bs = lm_batches(3)
    per_batch = []  # naive: full autograd gradient of every target, batch by batch
    for w in ws:
        w.requires_grad_(True)
    for b in bs:
        per_batch.append(torch.autograd.grad(model(**b).loss, ws))
    common.prepare(model)
    model.train()

    live = []  # how many target .grad tensors exist whenever one is accumulated

    def spy(w):
        live.append(sum(x.grad is not None for x in ws))
    spies = []
    for w in ws:
        w.requires_grad_(True)
        spies.append(w.register_post_accumulate_grad_hook(spy))
        w.requires_grad_(False)
    weights = dict(zip(names, ws))
    wg, used = taso.gradient_importance(model, weights, iter(bs), n_batches=64, metric="wg")
    for h in spies:
        h.remove()
    assert used == 3  # fewer than 64 when the iterator ends
    assert live == [1] * (3 * len(ws))  # never more than the one being folded in
    assert all(w.grad is None and not w.requires_grad for w in ws)
    assert all(m.training for m in model.modules())
    for i, n in enumerate(names):
        G = sum(g[i] for g in per_batch)
        ref = (ws[i].detach() * G).abs()
        assert wg[n].dtype == torch.float64
        torch.testing.assert_close(wg[n], ref, rtol=1e-9, atol=1e-14)
    g2, used = taso.gradient_importance(model, weights, iter(bs), n_batches=2, metric="g")
    assert used == 2
    for i, n in enumerate(names):
        torch.testing.assert_close(g2[n], (per_batch[0][i] + per_batch[1][i]).abs(), rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("groups", [2, 3, 50])
def test_score_groups_give_the_naive_importance(groups):
    """--taso_score_groups: the targets scored in runs of layers, one pass over the same batches each (an
    iterator, consumed once): still the naive float64 |W ⊙ Σ_b G_b| of every target."""
    model = models.build_tiny("tiny-llama").double()
    names = common.find_targets(model)
    ws = [model.get_submodule(n).weight.requires_grad_(True) for n in names]
    bs = lm_batches(3)
    per_batch = [torch.autograd.grad(model(**b).loss, ws) for b in bs]
    common.prepare(model)
    method = taso.TASO(r=4, calib_batches=3, score_groups=groups)
    method.names = names
    assert len(common.weight_groups(dict(zip(names, ws)), groups)) == min(groups, len(names))
    got = dict(method.score(model, {n: model.get_submodule(n) for n in names}, iter(bs)))
    assert list(got) == names and method.calib_used == 3
    for i, n in enumerate(names):
        ref = (ws[i].detach() * sum(g[i] for g in per_batch)).abs()
        torch.testing.assert_close(got[n], ref, rtol=1e-9, atol=1e-14)


def test_importance_of_a_bf16_model_is_summed_in_fp32():
    """Weights and gradients in bf16 (a bf16 run on GPU): |W ⊙ Σ_b G_b| against the same bf16
    gradients summed in float64; a bf16 buffer would be off by ~1e-2 relative."""
    model = models.build_tiny("tiny-llama").to(torch.bfloat16)
    names = common.find_targets(model)[:4]
    ws = [model.get_submodule(n).weight for n in names]
    bs = lm_batches(12, seed=5)
    for w in ws:
        w.requires_grad_(True)
    per_batch = [torch.autograd.grad(model(**b).loss, ws) for b in bs]  # bf16, batch by batch
    common.prepare(model)
    wg, used = taso.gradient_importance(model, dict(zip(names, ws)), iter(bs), metric="wg")
    assert used == 12
    for i, n in enumerate(names):
        ref = (ws[i].detach().double() * sum(g[i].double() for g in per_batch)).abs()
        assert wg[n].dtype == torch.float32
        torch.testing.assert_close(wg[n].double(), ref, rtol=1e-5, atol=1e-12)


def test_importance_pass_restores_heads_no_dropout_with_checkpointing():
    model = ckpt(models.build_tiny("tiny-bert", num_labels=2))  # hidden dropout 0.1, a trainable head
    common.prepare(model, ["classifier"])
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 260, (4, 10), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1, 0])}
    weights = {n: model.get_submodule(n).weight for n in common.find_targets(model)}
    calls = [0]
    query = model.bert.encoder.layer[0].attention.self.query
    query.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    s1, _ = taso.gradient_importance(model, weights, iter([b, b]), metric="wg")
    assert calls[0] == 2 * 2  # two batches, each forward recomputed in backward: checkpointing really ran
    s2, _ = taso.gradient_importance(model, weights, iter([b, b]), metric="wg")
    for n in weights:  # dropout off: the same batches give the same scores
        assert torch.equal(s1[n], s2[n]) and s1[n].abs().sum() > 0
    head = model.classifier.weight
    assert head.requires_grad and head.grad is None  # the pass left no gradient on the head
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match="no batches"):
        taso.gradient_importance(model, weights, iter([]))


# ------------------------------------------------------------------------ core regions (T2–T4)

def ref_core(I, p, k):
    """Explicit loops: mark the top ⌈k·numel⌉ entries, count per row / column, sort by
    (count desc, summed importance desc, index asc)."""
    out, inn = I.shape
    vals = I.tolist()
    entries = sorted(((vals[i][j], i, j) for i in range(out) for j in range(inn)), reverse=True)
    marked = {(i, j) for _, i, j in entries[:math.ceil(k * out * inn - 1e-9)]}
    u = [sum((i, j) in marked for j in range(inn)) for i in range(out)]
    v = [sum((i, j) in marked for i in range(out)) for j in range(inn)]
    rs = [sum(vals[i]) for i in range(out)]
    cs = [sum(vals[i][j] for i in range(out)) for j in range(inn)]
    R = sorted(range(out), key=lambda i: (-u[i], -rs[i], i))[:math.ceil(p * out - 1e-9)]
    C = sorted(range(inn), key=lambda j: (-v[j], -cs[j], j))[:math.ceil(p * inn - 1e-9)]
    return sorted(R), sorted(C)


def test_core_regions_planted_rows_cols_and_loop():
    g = torch.Generator().manual_seed(0)
    I = torch.randperm(16 * 20, generator=g).float().view(16, 20) + 1  # distinct integers
    rows, cols = [3, 9], [4, 13, 17]
    I[rows] += 1000
    I[:, cols] += 1000
    k = (2 * 20 + 3 * 16 - 6) / (16 * 20)  # exactly the planted cross is marked
    R, C = taso.core_regions(I, 0.125, k)
    assert R.tolist() == rows and C.tolist() == cols  # ⌈2⌉ rows, ⌈2.5⌉ = 3 columns
    assert (R.tolist(), C.tolist()) == ref_core(I, 0.125, k)
    for seed in range(6):  # random matrices, several p and k, against the loops
        g = torch.Generator().manual_seed(seed)
        out, inn = 8 + seed, 13 - seed
        I = torch.randperm(out * inn, generator=g).float().view(out, inn)
        I = I ** (1 + seed % 3)  # more or less peaked
        for p in (0.1, 0.25, 0.5):
            for k in (0.01, 0.05, 0.3):
                R, C = taso.core_regions(I, p, k)
                assert (R.tolist(), C.tolist()) == ref_core(I, p, k)


def test_core_regions_tie_breaking():
    I = torch.tensor([[9., 0, 0, 0, 1],
                      [8., 5, 0, 0, 0],    # 2 marked, sum 13
                      [6., 7, 0, 0, 3],    # 2 marked, sum 16: wins the row tie
                      [0., 0, 0, 0, 0.5]])
    k = 5 / 20  # marks 9, 8, 7, 6, 5
    assert [t.tolist() for t in taso.core_regions(I, 0.25, k)] == [[2], [0, 1]]
    # p = 0.5: columns 2, 3, 4 tie at 0 marks; column 4 has the larger importance sum
    assert [t.tolist() for t in taso.core_regions(I, 0.5, k)] == [[1, 2], [0, 1, 4]]
    assert [t.tolist() for t in taso.core_regions(I, 0.5, k)] == list(ref_core(I, 0.5, k))
    J = torch.tensor([[0., 0, 0], [5, 4, 0], [5, 4, 0], [0, 0, 1]])  # rows 1, 2 tie completely
    assert taso.core_regions(J, 0.25, 4 / 12)[0].tolist() == [1]  # lower index


def test_select_rows_cols_same_budget():
    g = torch.Generator().manual_seed(3)
    I = torch.rand(24, 40, generator=g)
    R, C = taso.core_regions(I, 0.25, 0.05)
    Rr, Cr = taso.core_regions(I, 0.25, 0.05, "rows", torch.Generator().manual_seed(7))
    Rc, Cc = taso.core_regions(I, 0.25, 0.05, "cols", torch.Generator().manual_seed(7))
    assert torch.equal(Rr, R) and torch.equal(Cc, C)  # the chosen axis is the importance one
    assert len(Cr) == len(C) == 10 and len(Rc) == len(R) == 6  # same shape, same budget
    for idx, n in ((Cr, 40), (Rc, 24)):
        assert idx.unique().numel() == len(idx) and torch.equal(idx, idx.sort().values) and idx.max() < n
    assert not torch.equal(Cr, C)  # the other axis is random ...
    again = taso.core_regions(I, 0.25, 0.05, "rows", torch.Generator().manual_seed(7))[1]
    assert torch.equal(again, Cr)  # ... and seeded


# ----------------------------------------------------------------- block-sparse layer (T5, T6)

def make_layer(dtype=torch.float64, seed=0, r=3, dropout=0.0):
    torch.manual_seed(seed)
    base = nn.Linear(20, 16).to(dtype)
    R, C = torch.tensor([1, 4, 5, 11, 15]), torch.tensor([0, 2, 3, 7, 8, 12, 19])
    layer = taso.TASOLinear(base, R, C, r=r, alpha=6.0, dropout=dropout)
    with torch.no_grad():
        layer.taso_B.normal_()  # nonzero B so ΔW ≠ 0
    return layer.to(dtype), R, C


@pytest.mark.parametrize("lean", [True, False])
def test_forward_equals_dense_delta_grads_only_into_blocks(lean):
    layer, R, C = make_layer()
    layer.lean = lean
    assert layer.taso_A.shape == (3, 7) and layer.taso_B.shape == (5, 3)
    W, b, A, B, s = layer.base.weight, layer.base.bias, layer.taso_A, layer.taso_B, layer.scaling
    dW = torch.zeros(16, 20, dtype=torch.float64)  # explicit, zeros outside R × C
    for i, row in enumerate(R.tolist()):
        for j, col in enumerate(C.tolist()):
            dW[row, col] = s * sum(B[i, q].item() * A[q, j].item() for q in range(3))
    x = torch.randn(2, 6, 20, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, W + dW, b), rtol=1e-12, atol=1e-12)
    off = [i for i in range(16) if i not in R.tolist()]
    assert torch.equal(y[..., off], layer.base(x)[..., off])
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    assert W.grad is None and b.grad is None
    # reference gradients: the same A, B placed into full-size matrices by differentiable indexing
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    Bf = torch.zeros(16, 3, dtype=torch.float64).index_put((R,), B2)
    Af = torch.zeros(3, 20, dtype=torch.float64).index_put((torch.arange(3)[:, None], C[None, :]), A2)
    (F.linear(x2, W.detach() + s * Bf @ Af, b.detach()) * gy).sum().backward()
    for got, ref in ((A.grad, A2.grad), (B.grad, B2.grad), (x.grad, x2.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["taso_A", "taso_B"]


def test_merge_equals_forward():
    layer, R, C = make_layer(torch.float32, seed=1)
    x = torch.randn(3, 5, 20)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=1e-5)
    outside = torch.ones(16, 20, dtype=torch.bool)
    outside[R[:, None], C[None, :]] = False
    assert torch.equal(merged.weight[outside], layer.base.weight[outside])  # bit-identical outside R × C
    bf, _, _ = make_layer(torch.float32, seed=1)
    bf.base.to(torch.bfloat16)  # bf16 base: the block is added in fp32 and cast once
    expect = bf.base.weight.float()
    for i, row in enumerate(R.tolist()):  # the block s·B_R A_C, entry by entry, added in fp32
        for j, col in enumerate(C.tolist()):
            expect[row, col] += bf.scaling * (bf.taso_B[i] @ bf.taso_A[:, j]).detach()
    assert torch.equal(bf.merge().weight, expect.to(torch.bfloat16))


@pytest.mark.parametrize("autocast", [False, True])
def test_no_tokens_by_rows_tensor_saved(autocast):
    layer, R, C = make_layer(torch.float32, seed=2)
    x = torch.randn(2, 16, 20, requires_grad=True)  # T = 32 tokens, inside a network
    T, out, inn, r = 32, 16, 20, 3
    saved = []

    def pack(t):
        saved.append(t)
        return t
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.float().sum().backward()
    sizes = [t.numel() for t in saved]
    assert T * len(R) not in sizes  # the compact output B_R A_C x_C (tokens × |R|) is not kept
    assert T * len(C) not in sizes and T * inn in sizes  # nor x[..., C]: x itself (as LoRA keeps it)
    assert r * inn in sizes and out * r in sizes  # the zero-padded A and B, rank-sized
    full = [t for t in saved if t.numel() == out * inn]
    assert len(full) == 1  # W for the base matmul, nothing else out × in (no dense mask)
    if not autocast:
        assert full[0].data_ptr() == layer.base.weight.data_ptr()
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)


# ------------------------------------------------------------------- method: params, LR (T7)

def test_param_count_summary_and_lr_groups():
    model = models.build_tiny("tiny-bert", num_labels=3)  # has a head that keeps lr × 1
    m = taso.TASO(metric="w", heads=["classifier"])  # r = 8, p = 1/8: out + in per matrix
    m.attach(model, iter([]))
    per = params_per_module(model, m.prefix)
    mods = common.adapters(model, taso.TASOLinear)
    assert set(per) == set(mods) == set(m.names) and len(mods) == 12
    for n, mod in mods.items():
        out, inn = mod.base.out_features, mod.base.in_features
        assert (len(mod.rows), len(mod.cols)) == (math.ceil(out / 8), math.ceil(inn / 8))
        assert per[n] == 8 * (len(mod.rows) + len(mod.cols)) == out + inn
    s = m.summary()
    dense = sum(mod.base.in_features + mod.base.out_features for mod in mods.values())
    assert s["taso_params"] == sum(per.values()) == s["lora_r1_params"] == dense
    assert s["lora_r8_params"] == 8 * dense and s["core_rows_cols"][n] == [len(mod.rows), len(mod.cols)]
    assert s["importance_buffer_bytes"] == 0  # |W| needs no pass
    m4 = taso.TASO(r=4, density=0.3, metric="random")
    m4.attach(models.build_tiny("tiny-llama"), iter([]))
    for n, mod in common.adapters(m4.model, taso.TASOLinear).items():
        out, inn = mod.base.out_features, mod.base.in_features
        assert mod.taso_A.numel() + mod.taso_B.numel() == 4 * (math.ceil(0.3 * out) + math.ceil(0.3 * inn))
    for rule, p, expect in (("sqrt", None, 8 ** 0.5), ("linear", None, 8.0), ("none", None, 1.0),
                            ("sqrt", 0.25, 2.0), ("linear", 0.25, 4.0)):
        m = taso.TASO(metric="w", lr_scale=rule, density=p, heads=["classifier"])
        model = m.attach(models.build_tiny("tiny-bert", num_labels=3), iter([]))
        assert m.summary()["lr_scale"] == pytest.approx(expect)
        opt = train.build_optimizer(model, m, SimpleNamespace(lr=1e-3, weight_decay=0.0))  # the trainer's
        scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
        for n, prm in model.named_parameters():
            if prm.requires_grad:
                want = expect if n.rpartition(".")[2].startswith("taso_") else 1.0
                assert scale[id(prm)] == pytest.approx(want), n
        assert any(n.startswith("classifier") for n, prm in model.named_parameters() if prm.requires_grad)


def test_bad_flags():
    with pytest.raises(ValueError, match="`density` must be in"):
        taso.TASO(density=2)
    with pytest.raises(ValueError, match="`topk` must be in"):
        taso.TASO(topk=0)
    with pytest.raises(ValueError, match="`metric`"):
        taso.TASO(metric="fisher")
    with pytest.raises(ValueError, match="`calib_batches`"):
        taso.TASO(calib_batches=0)


# ---------------------------------------------------------------------------- planted signal

class Toy(nn.Module):
    """One Linear regressing onto a teacher W* = W + ΔW; ΔW lives on rows R* × columns C*."""

    def __init__(self, d=64):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x, y):
        return SimpleNamespace(loss=F.mse_loss(self.proj(x), y))


def planted(d=64, n=8, seed=0):
    torch.manual_seed(seed)
    toy = Toy(d)
    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(d, generator=g)[:n].sort().values
    cols = torch.randperm(d, generator=g)[:n].sort().values
    W = toy.proj.weight.detach()
    Wt = W.clone()
    u, v = (torch.rand(2, n, generator=g) + 1) * (torch.randint(0, 2, (2, n), generator=g) * 2 - 1)
    Wt[rows[:, None], cols[None, :]] += u[:, None] * v[None, :] / 2  # rank 1, |entries| in [0.5, 2]
    batches = []
    for _ in range(8):
        x = torch.randn(64, d, generator=g)
        batches.append({"x": x, "y": F.linear(x, Wt, toy.proj.bias.detach())})
    return toy, rows, cols, batches


@pytest.mark.parametrize("metric", ["wg", "g", "random"])
def test_planted_block_found_and_random_is_not(metric):
    toy, rows, cols, batches = planted()
    m = taso.TASO(targets=["proj"], dropout=0.0, metric=metric, topk=0.01, seed=0)
    m.attach(toy, iter(batches))
    R, C = set(m.rows["proj"].tolist()), set(m.cols["proj"].tolist())
    hit_r, hit_c = len(R & set(rows.tolist())), len(C & set(cols.tolist()))
    start = sum(float(toy(**b).loss.detach()) for b in batches)
    opt = torch.optim.Adam(m.param_groups(3e-2))  # T7: lr · ρ^(-1/2) on B_R, A_C
    for step in range(150):
        opt.zero_grad()
        toy(**batches[step % 8]).loss.backward()
        opt.step()
    end = sum(float(toy(**b).loss.detach()) for b in batches)
    if metric != "random":
        assert hit_r == 8 and hit_c == 8
        assert end < 0.01 * start  # the block can represent the update
    else:
        assert hit_r <= 3 and hit_c <= 3
        assert end > 0.5 * start


# ------------------------------------------------------------------------ tiny-llama end to end

def copy_batches(n, seed=0, bsz=4, half=6):
    """A learnable task: the response repeats the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, 40, (bsz, half), generator=g)
        ids = torch.cat([p, p], 1)
        labels = ids.clone()
        labels[:, :half] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def run_loop(steps, start=0, state=None, batches=None, seed=0):
    """The trainer's hook order by hand, bf16 autocast + non-reentrant checkpointing."""
    model = ckpt(models.build_tiny("tiny-llama"))
    model.train()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    data = copy_batches(4)
    m = taso.TASO(seed=seed, calib_batches=4)
    torch.manual_seed(seed)
    with ctx:
        m.attach(model, iter(data) if state is None else batches, state=None if state is None else state["method"])
    opt = train.build_optimizer(model, m, SimpleNamespace(lr=1e-2, weight_decay=0.0))
    if state is not None:
        model.load_state_dict(state["trainable"], strict=False)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    losses, saved = [], None
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * g["lr_scale"]
        with ctx:
            loss = model(**data[step % 4]).loss
        loss.backward()
        m.after_backward(step)
        opt.step()
        m.after_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step + 1 == 4:
            saved = {"trainable": {k: v.clone() for k, v in train.trainable_state_dict(model).items()},
                     "optimizer": copy.deepcopy(opt.state_dict()), "method": m.state_dict(),
                     "rng": torch.get_rng_state()}
    return losses, saved, m, model


def test_tiny_llama_bf16_ckpt_trains_and_resumes():
    losses, saved, m, model = run_loop(12)
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) < sum(losses[:4])  # same four batches, later pass is lower
    assert m.summary()["calib_batches"] == 4
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)

    def no_scoring():
        raise AssertionError("resume must not re-score")
        yield
    resumed, _, m2, model2 = run_loop(12, start=4, state=saved, batches=no_scoring())
    assert resumed == losses[4:]
    for n in m.rows:
        assert torch.equal(m.rows[n], m2.rows[n]) and torch.equal(m.cols[n], m2.cols[n])


def test_train_main_bf16_ckpt_resume_and_merge(tmp_path):
    argv = ["--method", "taso", "--model", "tiny-llama", "--data", "builtin", "--max_steps", "8",
            "--batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-2", "--dtype", "bf16", "--grad_ckpt",
            "--taso_calib_batches", "4", "--save_every", "4", "--eval_limit", "2", "--warmup", "0",
            "--schedule", "constant"]
    full = train.main(argv + ["--output_dir", str(tmp_path / "a"), "--merge"])
    assert all(math.isfinite(x) for x in full["losses"])
    assert sum(full["losses"][-4:]) / 4 < full["losses"][0]
    assert full["calib_batches"] == 4 and full["importance_time_s"] > 0
    assert full["taso_params"] == full["lora_r1_params"] == full["trainable_params_start"]
    tiny = models.build_tiny("tiny-llama")  # the pass's fp32 sums: 4 bytes per target weight entry
    entries = sum(tiny.get_submodule(n).weight.numel() for n in common.find_targets(tiny))
    assert full["importance_buffer_bytes"] == 4 * entries
    train.main(argv + ["--output_dir", str(tmp_path / "b"), "--stop_after", "4"])
    resumed = train.main(argv + ["--output_dir", str(tmp_path / "b"), "--resume"])
    assert resumed["losses"] == full["losses"]
    # the merged model computes what the adapter model computes
    import transformers
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "merged")).eval()
    model = models.cast_parameters(models.build_tiny("tiny-llama", dtype=torch.bfloat16), torch.float32)  # bf16 run
    train.load_adapter(model, taso.TASO(), str(tmp_path / "a"))
    ids = torch.randint(0, 260, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)


def test_score_groups_fix_the_same_regions():
    """attach with --taso_score_groups 3 and 1 on the same model and batches: the same R and C everywhere."""
    got = []
    for groups in (1, 3):
        model = models.build_tiny("tiny-llama")
        method = taso.TASO(r=4, calib_batches=3, score_groups=groups)
        method.attach(model, iter(lm_batches(3)))
        got.append((method.rows, method.cols))
    for a, b in zip(*got):
        assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
