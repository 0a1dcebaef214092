"""common.py against brute force: LoRA forward / merge, compact-block scatter and merge, targets, EMA."""
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import g2r2  # noqa: E402
import spsft  # noqa: E402
import train  # noqa: E402
from helpers import params_per_module  # noqa: E402
from models import build_tiny  # noqa: E402


def lora_layer(d_in=12, d_out=10, r=3, alpha=6.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).to(dtype)
    layer = common.LoRALinear(base, r, alpha)
    layer.to(dtype)  # float64 for exact comparisons (the layer itself creates fp32 adapters)
    with torch.no_grad():
        layer.lora_B.normal_()  # B starts at zero; make the update non-trivial
    return layer


def test_lora_init_and_dtypes():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = common.LoRALinear(base, 4, 8.0)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (8, 4)
    assert torch.all(layer.lora_B == 0) and layer.scaling == 2.0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=√5) on fan_in 16
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert not base.weight.requires_grad and base.weight.dtype == torch.bfloat16


def test_lora_forward_equals_explicit_sum():
    layer = lora_layer()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    W, b, A, B, s = layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling
    ref = torch.zeros(2, 5, 10, dtype=torch.float64)
    for i in range(2):
        for t in range(5):
            ref[i, t] = W @ x[i, t] + b + s * (B @ (A @ x[i, t]))
    assert torch.allclose(layer(x), ref, atol=1e-12)
    assert torch.allclose(layer.delta_weight(), s * B @ A)


def test_merge_equals_forward_fp32():
    layer = lora_layer(dtype=torch.float32)
    x = torch.randn(4, 12)
    w0 = layer.base.weight.detach().clone()
    merged = layer.merge()
    assert torch.equal(layer.base.weight, w0)  # merging never mutates the base layer
    assert type(merged) is nn.Linear and not merged.weight.requires_grad
    assert torch.allclose(merged(x), layer(x), atol=1e-5)


def test_merge_casts_once_from_fp32():
    torch.manual_seed(1)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = common.LoRALinear(base, 2, 4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merge()
    expect = (base.weight.float() + layer.delta_weight()).to(torch.bfloat16)
    assert merged.weight.dtype == torch.bfloat16 and torch.equal(merged.weight, expect)


def test_bf16_base_without_autocast_runs_and_keeps_dtype():
    base = nn.Linear(8, 6).to(torch.bfloat16)
    layer = common.LoRALinear(base, 2, 4.0)
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_dropout_only_on_adapter_input():
    torch.manual_seed(0)
    layer = common.LoRALinear(nn.Linear(8, 6), 2, 4.0, dropout=0.9)
    x = torch.randn(5, 8)
    # with B = 0 the output must be exactly the base output even though dropout is active
    assert torch.equal(layer.train()(x), layer.base(x))


def test_rank_and_fraction_errors():
    with pytest.raises(ValueError, match="`r` between 1 and 4"):
        common.LoRALinear(nn.Linear(4, 8), 5, 1.0)
    with pytest.raises(ValueError, match=r"`foo` must be in \(0, 1\]"):
        common.check_fraction("foo", 1.5)
    with pytest.raises(ValueError):
        common.check_fraction("foo", 0.0)
    common.check_fraction("foo", 1.0)


def test_scatter_rows_equals_dense_mapping_and_saves_no_block():
    torch.manual_seed(0)
    T, d_in, d_out = 7, 6, 9
    idx = torch.tensor([7, 1, 4])
    x = torch.randn(T, d_in, dtype=torch.float64)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    Wf = torch.randn(3, d_in, dtype=torch.float64, requires_grad=True)
    M = torch.zeros(d_out, 3, dtype=torch.float64)  # explicit 0/1 mapping matrix
    for k, i in enumerate(idx.tolist()):
        M[i, k] = 1.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = spsft.scatter_rows(F.linear(x, W), idx, F.linear(x, Wf))
    ref = F.linear(x, W + M @ Wf.detach())
    assert torch.allclose(out, ref, atol=1e-12)
    assert (T, 3) not in saved  # the compact block y = W_f x is not kept for backward
    g = torch.randn_like(out)
    (gWf,) = torch.autograd.grad(out, Wf, g)
    assert torch.allclose(gWf, (M.T @ g.T) @ x, atol=1e-12)
    xg, Wg = x.clone().requires_grad_(), W.clone().requires_grad_()  # gradients through the base output too
    out = spsft.scatter_rows(F.linear(xg, Wg), idx, F.linear(xg, Wf))
    gx, gW, gWf = torch.autograd.grad(out, (xg, Wg, Wf), g)
    assert torch.allclose(gx, g @ (W + M @ Wf.detach()), atol=1e-12)
    assert torch.allclose(gW, g.T @ x, atol=1e-12) and torch.allclose(gWf, (M.T @ g.T) @ x, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 base output, fp32 block: dtype of out kept
        out = spsft.scatter_rows(F.linear(x.float(), W.float()), idx, F.linear(x.float(), Wf.float()))
    assert out.dtype == torch.bfloat16 and out.requires_grad


@pytest.mark.parametrize("mode", ["rows", "cols", "both"])
def test_merged_linear_block(mode):
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    rows = torch.tensor([4, 0]) if mode != "cols" else None
    cols = torch.tensor([1, 6, 3]) if mode != "rows" else None
    shape = (2 if rows is not None else 5, 3 if cols is not None else 7)
    delta = torch.randn(shape)
    new = common.merged_linear(base, delta, rows, cols)
    ref = base.weight.detach().clone()
    for a in range(shape[0]):
        for b in range(shape[1]):
            i = rows[a] if rows is not None else a
            j = cols[b] if cols is not None else b
            ref[i, j] += delta[a, b]
    assert torch.allclose(new.weight, ref) and torch.equal(new.bias, base.bias)
    untouched = torch.ones(5, 7, dtype=torch.bool)
    if rows is not None and cols is not None:
        untouched[rows.unsqueeze(1), cols.unsqueeze(0)] = False
    elif rows is not None:
        untouched[rows] = False
    else:
        untouched[:, cols] = False
    assert torch.equal(new.weight[untouched], base.weight[untouched])  # bit-identical outside the block


def test_ema_by_hand():
    a = g2r2.ema(None, 2.0, 0.85)
    assert a == 2.0
    a = g2r2.ema(a, 4.0, 0.85)
    assert a == 0.85 * 2 + 0.15 * 4


def test_targets_per_architecture():
    llama = common.find_targets(build_tiny("tiny-llama"))
    assert len(llama) == 2 * 7 and all(n.rsplit(".", 1)[1] in common.LLAMA for n in llama)
    for name in ("tiny-deberta", "tiny-bert", "tiny-vit"):
        model = build_tiny(name)
        found = common.find_targets(model)
        linear = common.linear_names(model)
        assert len(found) == 2 * 6, name
        assert all("pooler" not in n and "classifier" not in n for n in found)
        assert [n for n in linear if n not in found] in (["classifier"], ["pooler.dense", "classifier"],
                                                          ["bert.pooler.dense", "classifier"])


def test_targets_override_and_errors():
    model = build_tiny("tiny-llama")
    assert common.find_targets(model, ["v_proj"]) == ["model.layers.0.self_attn.v_proj",
                                                      "model.layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="q_proj.*lm_head"):
        common.find_targets(model, ["qproj"])
    with pytest.raises(ValueError, match="pass `targets`"):
        common.find_targets(nn.Sequential(nn.Linear(2, 2)))


def test_lora_attach_counts_and_state_filter():
    model = build_tiny("tiny-deberta")
    method = common.LoRA(r=4, alpha=8, dropout=0.0, heads=["classifier", "pooler.dense"])
    method.attach(model)
    per = params_per_module(model, "lora_")
    assert len(per) == 12
    for name, n in per.items():
        base = model.get_submodule(name).base
        assert n == 4 * (base.in_features + base.out_features)
    trainable, total = train.count_params(model)
    heads = sum(p.numel() for n, p in model.named_parameters() if "pooler" in n or "classifier" in n)
    assert trainable == sum(per.values()) + heads
    assert set(train.trainable_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_grads_under_bf16_autocast_and_checkpointing():
    model = build_tiny("tiny-llama")
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    common.LoRA(r=4).attach(model)
    model.train()
    x = torch.randint(0, 260, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    loss.backward()
    layers = common.adapters(model, common.LoRALinear)
    assert len(layers) == 14
    for name, m in layers.items():
        assert m.lora_B.dtype == torch.float32 and m.lora_B.grad is not None, name
        assert m.lora_B.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_merge_adapters_whole_model():
    model = build_tiny("tiny-llama")
    common.LoRA(r=4, dropout=0.0).attach(model)
    for m in common.adapters(model, common.LoRALinear).values():
        with torch.no_grad():
            m.lora_B.normal_(std=0.1)
    model.eval()
    x = torch.randint(0, 260, (2, 12))
    before = model(input_ids=x).logits
    common.merge_adapters(model)
    assert not common.adapters(model, common.LoRALinear)
    assert torch.allclose(model(input_ids=x).logits, before, atol=1e-5)


def test_in_backward_tells_a_checkpoint_recompute_from_a_forward():
    """common.in_backward rests on a private PyTorch call: False in forward (with or without grad), True in a
    backward hook and in the forward that non-reentrant checkpointing recomputes inside backward."""
    import torch.utils.checkpoint as cp
    seen = []
    lin = nn.Linear(4, 4)
    lin.register_forward_pre_hook(lambda m, a: seen.append(common.in_backward()))
    x = torch.randn(2, 4, requires_grad=True)
    with torch.no_grad():
        lin(x)
    y = cp.checkpoint(lin, x, use_reentrant=False)
    y.register_hook(lambda g: seen.append(common.in_backward()))
    y.sum().backward()
    assert seen == [False, False, True, True]  # no_grad forward, checkpointed forward, grad hook, recompute
    assert common.in_backward() is False


@pytest.mark.parametrize("case", ["fp32", "bf16-base", "autocast"])
def test_add_lora_against_float64(case):
    """add_lora(h, ax, B, s) = h + s·ax Bᵀ (the addmm, or one by one when the dtypes differ), values and
    gradients against float64 autograd of the sum as written; in h's dtype."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    ax = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    B = torch.randn(7, 3, generator=g, dtype=torch.float64)
    s = 0.75
    ref = [t.clone().requires_grad_() for t in (h, ax, B)]
    want = ref[0] + s * torch.einsum("btr,or->bto", ref[1], ref[2])
    hd = torch.bfloat16 if case == "bf16-base" else (torch.bfloat16 if case == "autocast" else torch.float32)
    ad = torch.bfloat16 if case == "autocast" else torch.float32
    ins = [h.to(hd).requires_grad_(), ax.to(ad).requires_grad_(), B.float().requires_grad_()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        out = common.add_lora(*ins, s)
    assert out.dtype == hd and out.shape == want.shape
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want.backward(up)
    out.backward(up.to(out.dtype))
    tol = 1e-5 if case == "fp32" else 5e-2
    torch.testing.assert_close(out.double(), want.detach(), rtol=tol, atol=tol)
    for t, r in zip(ins, ref):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=tol, atol=tol * 10)
