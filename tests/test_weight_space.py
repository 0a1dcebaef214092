"""PiLoRA stage 2 and TASO in weight space (issue 31): each layer's lean branch (one LoRA pair on zero-padded
factors built from the compact blocks) against its plain branch (the paper's equation: PiLoRA's two masked
terms, TASO's gather and scatter), forward and gradients of every trainable tensor, with and without dropout
(same RNG seed) and non-reentrant checkpointing; under bf16 autocast within the plain form's own rounding
(both against the plain form in float64). The kernels on activation-sized tensors are counted: the lean
branches run no more than a LoRA layer does (no index op on x, no second pair of matmuls); the plain ones do not.
And torch.compile traces the lean layers without a graph break."""
import collections
import os
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import pilora  # noqa: E402
import taso  # noqa: E402

M, N = 16, 12  # small weights, many tokens: every weight-sized tensor is smaller than any activation


def make(kind, dropout=0.0, dtype=torch.float64, r=3):
    torch.manual_seed(0)
    base = nn.Linear(N, M)
    if kind == "pilora":
        layer = pilora.PiLoRALinear(base, [1, 4, 5, 9, 13], r, 2, 6.0, dropout)
    else:
        layer = taso.TASOLinear(base, [1, 4, 5, 11, 15], [0, 2, 3, 7, 8], r, 6.0, dropout)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()  # B ≠ 0: a real update
    return layer.to(dtype)


def trainable(layer):
    return [p for p in layer.parameters() if p.requires_grad]


def run(layer, lean, x, gy, ckpt=False, seed=1, autocast=False):
    """(output, ∂x, grads of every trainable tensor) of one forward + backward, the mask drawn from `seed`."""
    layer.lean = lean
    for p in trainable(layer):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
    (y.float() * gy).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in trainable(layer)]


@pytest.mark.parametrize("kind", ["pilora", "taso"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("ckpt", [False, True])
def test_lean_equals_plain(kind, dtype, tol, dropout, ckpt):
    layer = make(kind, dropout, dtype)
    x, gy = torch.randn(2, 7, N, dtype=dtype), torch.randn(2, 7, M, dtype=dtype)
    plain = run(layer, False, x, gy)
    lean = run(layer, True, x, gy, ckpt)
    assert len(plain) == 2 + len(trainable(layer)) and all(t is not None for t in lean + plain)
    for a, b in zip(lean, plain):  # relative to each tensor's largest entry
        torch.testing.assert_close(a, b, rtol=0, atol=tol * float(b.abs().max()))
    if dropout:  # the mask matters: another seed gives another output
        assert not torch.allclose(run(layer, True, x, gy, seed=2)[0], plain[0])


@pytest.mark.parametrize("kind", ["pilora", "taso"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lean_under_bf16_autocast_is_within_the_plain_forms_rounding(kind, dropout):
    """Both branches under bf16 autocast (fp32 tensors, checkpointed lean) against the plain one in float64:
    the lean branch's error is at most twice the plain branch's own, per output and per gradient."""
    layer = make(kind, dropout, torch.float32)
    x, gy = torch.randn(2, 64, N), torch.randn(2, 64, M)
    plain = run(layer, False, x, gy, autocast=True)
    lean = run(layer, True, x, gy, ckpt=True, autocast=True)
    assert lean[0].dtype == plain[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in lean[2:])  # trainable tensors stay fp32
    ref = run(layer.double(), False, x.double(), gy.double())
    for a, b, want in zip(lean, plain, ref):
        plain_err = float((b.double() - want).abs().max())
        assert 0 < plain_err < 0.05 * float(want.abs().max())  # bf16 really rounded, and only rounded
        assert float((a.double() - want).abs().max()) <= 2 * plain_err


class Ops(TorchDispatchMode):
    """The ops dispatched on activation-sized tensors (any input or output with >= `tokens` entries)."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens, self.ops = tokens, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if not func.is_view and max(sizes, default=0) >= self.tokens:
            self.ops[func.__name__.split(".")[0]] += 1
        return out


def activation_ops(layer, lean=True):
    """Forward + backward of one layer at (2 × 128 tokens, bf16 autocast, dropout active)."""
    if hasattr(layer, "lean"):
        layer.lean = lean
    x = torch.randn(2, 128, N, requires_grad=True)
    counter = Ops(2 * 128)
    with counter, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    return counter.ops


@pytest.mark.parametrize("kind", ["pilora", "taso"])
def test_lean_runs_the_kernels_of_one_lora_layer_on_activations(kind):
    layer = make(kind, 0.05, torch.float32)
    assert max(p.numel() for p in trainable(layer)) * 4 < 2 * 128  # the weight-space ops stay below the bar
    torch.manual_seed(0)
    lora = activation_ops(common.LoRALinear(nn.Linear(N, M), 3, 6.0, 0.05))
    lean, plain = activation_ops(layer), activation_ops(layer, lean=False)
    assert not lean - lora, (lean, lora)  # no op, and no op more often, than in the LoRA layer
    assert not [op for op in lean if "index" in op or "scatter" in op or "gather" in op]
    assert plain - lora  # the counter does see the plain form's: PiLoRA's second pair of matmuls, TASO's indexing
    assert plain["mm"] > lora["mm"] if kind == "pilora" else [op for op in plain if "index" in op]


@pytest.mark.parametrize("kind", ["pilora", "taso"])
def test_lean_layers_trace_without_graph_breaks(kind):
    layer = make(kind, 0.1, torch.float32)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(torch.randn(2, 5, N))
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("kind", ["pilora", "taso"])
def test_padded_factors_hold_the_compact_blocks_and_zeros_elsewhere(kind):
    """factors() by a loop over the rows / columns: the dense pair s·B A is the layer's update (merge)."""
    layer = make(kind)
    A, B = (t.detach() for t in layer.factors())
    if kind == "pilora":
        Ad, Bd, As, Bs = layer.lora_A_d, layer.lora_B_d, layer.lora_A_s, layer.lora_B_s
        r = len(Ad)
        assert torch.equal(A, torch.cat([Ad, As]))
        for i in range(M):
            d, s = layer.idx_d.tolist(), layer.idx_s.tolist()
            want = torch.cat([Bd[d.index(i)], torch.zeros(2)]) if i in d else torch.cat([torch.zeros(r), Bs[s.index(i)]])
            assert torch.equal(B[i], want.to(B.dtype))
    else:
        R, C = layer.rows.tolist(), layer.cols.tolist()
        for j in range(N):
            assert torch.equal(A[:, j], layer.taso_A[:, C.index(j)] if j in C else torch.zeros(3, dtype=A.dtype))
        for i in range(M):
            assert torch.equal(B[i], layer.taso_B[R.index(i)] if i in R else torch.zeros(3, dtype=B.dtype))
    merged, want = layer.merge().weight - layer.base.weight, layer.scaling * B @ A
    torch.testing.assert_close(merged, want, rtol=0, atol=1e-6 * float(want.abs().max()))  # merged in fp32


# ------------------------------------------------- a parent's factors built at once (common.together)

class Parent(nn.Module):
    """Three adapters under one parent, as an MLP's: a and b read x (N → M), c reads their product (M → N)."""

    def __init__(self, kind, dropout, dtype):
        super().__init__()
        torch.manual_seed(0)
        if kind == "pilora":
            new = lambda m, n, rows: pilora.PiLoRALinear(nn.Linear(n, m), rows, 3, 2, 6.0, dropout)  # noqa: E731
        else:
            new = lambda m, n, rows: taso.TASOLinear(nn.Linear(n, m), rows, [0, 2, 3, 7, 8], 3, 6.0, dropout)  # noqa: E731
        self.a, self.b, self.c = new(M, N, [1, 4, 5, 9, 13]), new(M, N, [0, 2, 3, 6, 14]), new(N, M, [1, 2, 10])
        with torch.no_grad():
            for p in trainable(self):
                p.normal_()
        self.to(dtype)

    def forward(self, x):
        return self.c(self.a(x) * torch.tanh(self.b(x)))


def run_parent(par, x, ckpt=False, autocast=False, lean=True):
    for m in (par.a, par.b, par.c):
        m.lean = lean
    for p in trainable(par):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = checkpoint(par, x, use_reentrant=False) if ckpt else par(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in trainable(par)]


@pytest.mark.parametrize("kind", ["pilora", "taso"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_parent_builds_its_adapters_factors_at_once(kind, ckpt, autocast, monkeypatch):
    """common.together: the parent's pre-hook builds every adapter's padded factors in one padded() call and the
    adapters' forwards take them (their own factors() is never called), dropped after the parent's forward.
    Output, ∂x and every gradient against each adapter building its own (fp32 tensors, dropout, checkpointed
    parent): within 1e-6 in fp32 (TASO's A is a transposed view: another GEMM layout); under bf16 autocast
    within twice the own build's error against the plain form in float64."""
    cls = pilora.PiLoRALinear if kind == "pilora" else taso.TASOLinear
    x = torch.randn(2, 7, N)
    own = run_parent(Parent(kind, 0.2, torch.float32), x, ckpt, autocast)
    par = Parent(kind, 0.2, torch.float32)
    common.together(par, cls)
    common.together(par, cls)  # a second call adds no hook
    assert len(par._forward_pre_hooks) == 1
    calls = []
    real = cls.padded
    monkeypatch.setattr(cls, "padded", staticmethod(lambda layers, cache: calls.append(len(layers)) or real(layers, cache)))
    monkeypatch.setattr(cls, "factors", lambda self: pytest.fail("an adapter built its own factors"))
    both = run_parent(par, x, ckpt, autocast)
    assert calls == [3] * (2 if ckpt else 1)  # once per forward (and once more in checkpointing's recompute)
    assert all(m.prebuilt is None for m in (par.a, par.b, par.c))
    assert len(both) == len(own) == 2 + len(trainable(par)) and all(g is not None for g in both)
    ref = run_parent(Parent(kind, 0.2, torch.float64), x.double(), lean=False) if autocast else own
    for a, b, want in zip(both, own, ref):
        assert a.dtype == b.dtype
        if autocast:
            assert float((a.double() - want).abs().max()) <= 2 * float((b.double() - want).abs().max())
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("kind", ["pilora", "taso"])
def test_parent_built_together_equals_the_plain_form_in_float64(kind):
    """The same parent in float64: built together against every adapter's plain branch (the paper's equation)."""
    par = Parent(kind, 0.0, torch.float64)
    x = torch.randn(2, 7, N, dtype=torch.float64)
    plain = run_parent(par, x, lean=False)
    common.together(par, type(par.a))
    for a, b in zip(run_parent(par, x, ckpt=True), plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * float(b.abs().max()))


def test_together_drops_the_pairs_when_the_parent_fails_and_follows_its_buffers():
    """A parent whose forward raises leaves no pair behind (the next call outside builds afresh), and an index
    buffer written in place (or moved) makes the cached positions again: the built factors follow factors()."""
    par = Parent("taso", 0.0, torch.float32)
    common.together(par, taso.TASOLinear)
    par.register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        par(torch.randn(3, N))
    assert all(m.prebuilt is None for m in (par.a, par.b, par.c))
    cache = {}
    layers = [par.a, par.b, par.c]
    first = taso.TASOLinear.padded(layers, cache)
    for (A, B), L in zip(first, layers):
        assert all(torch.equal(u, v) for u, v in zip((A, B), L.factors()))
    with torch.no_grad():
        par.b.rows.copy_(torch.tensor([1, 3, 7, 8, 15]))
    for (A, B), L in zip(taso.TASOLinear.padded(layers, cache), layers):
        assert all(torch.equal(u, v) for u, v in zip((A, B), L.factors()))


def test_layers_of_different_ranks_or_groups_build_one_by_one():
    """padded() of layers whose ranks (TASO) or groups (PiLoRA: one with no supplementary rows) differ gives each
    its own factors()."""
    t = [taso.TASOLinear(nn.Linear(N, M), [1, 2], [3, 4], r, 2.0) for r in (2, 3)]
    p = [pilora.PiLoRALinear(nn.Linear(N, M), rows, 3, 2, 6.0) for rows in ([1, 2], list(range(M)))]
    for cls, layers in ((taso.TASOLinear, t), (pilora.PiLoRALinear, p)):
        for (A, B), L in zip(cls.padded(layers, {}), layers):
            assert all(torch.equal(u, v) for u, v in zip((A, B), L.factors()))


@pytest.mark.parametrize("kind", ["pilora", "taso"])
def test_holder_with_its_hooks_traces_without_graph_breaks(kind):
    """torch.compile of a module holding the adapters, together() hooks and all: one graph (the hooks step
    aside while traced and each adapter builds its own factors, which the compiler fuses)."""
    par = Parent(kind, 0.1, torch.float32)
    common.together(par, type(par.a))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(par)(torch.randn(2, 5, N))
    torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
