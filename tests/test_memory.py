"""bench/memory.py (issue 15): the fake-tensor count against hand computation and against the CPU allocator on
real tensors, and the memory cuts it led to (memory-free adapter dropout, chunked LM-head loss) against the
plain versions they replace.
"""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import efficiency  # noqa: E402
import memory  # noqa: E402

# every method and stage: LoRA (ours and PEFT's), TASO, SPSFT with its Taylor pass, G²R² warmup (exact
# capture) and refinement, PiLoRA stage 1 and 2
ROWS = ["peft-lora-r8", "lora-r8", "taso-r8", "spsft-r128-taylor", "g2r2-warmup", "g2r2-refine", "pilora-s1-K1",
        "pilora-s2"]
SHAPE, SEQ = "llama-h128-l2-v512", 64


def test_counter_by_hand():
    """Storages count once (views, in-place), frees subtract, the peak and what is alive at it."""
    with memory.counting() as c:
        x = torch.empty(1000)                      # 4000 B
        assert c.live == 4000
        x.t_()
        v = x.view(10, 100)[2:]                    # views share x's storage
        x.mul_(2)                                  # in place
        assert c.live == 4000
        c.reset(record=True)
        y = (x * 2).to(torch.bfloat16)             # 4000 B temporary, 2000 B kept
        assert c.live == 6000 and c.peak == 10000
        z = torch.empty(500, dtype=torch.float64)  # 4000 B
        del y
        assert c.live == 8000 and c.peak == 10000
        top = c.top()
        assert [t["bytes"] for t in top] == [4000, 4000, 2000]  # x, the fp32 x * 2, the bf16 copy
        assert top[2]["dtype"] == "bfloat16" and top[1]["op"] == "mul"
        del z, v
        assert c.live == 4000


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("row", ROWS)
def test_count_matches_cpu_allocator(row, ckpt):
    """Fake count vs real execution of the same row (same loop, bf16 autocast) measured as the efficiency suite
    does on CPU (torch.profiler allocator events). Tolerance: 3 % + 96 KiB on the step's peak above its start.
    What the count cannot see is kernel scratch memory (CPU SDPA's backward buffers: ~70 KiB at this
    shape, all of the gap with checkpointing) and PiLoRA's data-chosen dominant rows (the count assumes half)."""
    fake = memory.count_row(row, SHAPE, SEQ, 1, ckpt)
    real = memory.count_row(row, SHAPE, SEQ, 1, ckpt, fake=False)
    counted, measured = fake["peak_bytes"] - fake["start_bytes"], real["profiled_step_delta"]
    assert abs(counted - measured) <= 0.03 * measured + 96 * 1024, (counted, measured)
    # the no-grad forward: exact
    assert fake["model_bytes"] - fake["base_bytes"] == real["profiled_model_delta"]
    # what is alive between steps: parameters, buffers, AdamW state, batch (+ the method's own tensors)
    assert fake["start_bytes"] >= real["profiled_start_bytes"]
    if row != "pilora-s2":  # the counter itself on real tensors sees the same (a few scalars apart)
        assert abs(fake["start_bytes"] - real["start_bytes"]) <= 1024
    assert fake["trainable_params"] == real["trainable_params"] or row == "pilora-s2"
    assert fake["attention"][0] == "_scaled_dot_product_flash_attention_for_cpu"  # no T × T matrix


def test_main_writes_rows(tmp_path):
    out = tmp_path / "m.json"
    rows = memory.main(["--model", "tiny-llama", "--seq_len", "16", "--grad_ckpt", "both", "--rows", "lora-r8",
                        "spsft-r128", "lora-r64", "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r["row"], r["grad_ckpt"]) for r in rows] == [(n, c) for c in (False, True)
                                                          for n in ("lora-r8", "spsft-r128", "lora-r64")]
    for r in rows:
        if r["row"] == "lora-r64":
            assert "does not fit" in r["error"]
            continue
        for k in ("row", "grad_ckpt", "seq_len", "trainable_params", "peak_bytes", "model_bytes", "aux_bytes"):
            assert k in r
        assert r["aux_bytes"] == r["peak_bytes"] - r["model_bytes"] > 0
        assert r["model_bytes"] > r["base_bytes"] > 0
        assert r["top"] and r["top"][0]["bytes"] >= r["top"][-1]["bytes"]


def test_bad_row_is_one_line():
    with pytest.raises(SystemExit):
        memory.parse_args(["--rows", "nope"])
    assert set(efficiency.ROWS) >= set(ROWS)


# ---------------------------------------------------- memory-free adapter dropout (common.dropout_linear)

def plain_dropout_linear(x, p, weights):
    """nn.Dropout then each weight's matmul: the reference dropout_linear must reproduce."""
    d = torch.nn.Dropout(p)(x)
    return [d @ w.T for w in weights]


def leaves(shape_x=(2, 7, 12), rs=(3, 2), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, dtype=dtype, generator=g).requires_grad_()
    ws = [torch.randn(r, shape_x[-1], dtype=dtype, generator=g).requires_grad_() for r in rs]
    return x, ws


def grads_of(fn, x, ws, seed):
    torch.manual_seed(seed)
    outs = fn(x, ws)
    g = torch.Generator().manual_seed(9)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=g)).sum() for o in outs)
    gx, *gws = torch.autograd.grad(loss, [x, *ws])
    return [o.detach() for o in outs], gx, gws, torch.rand(3)  # the RNG stream after the call


@pytest.mark.parametrize("rs", [(3,), (3, 2)], ids=["one", "two-share-a-mask"])
def test_dropout_linear_equals_nn_dropout(rs):
    """Same values, same gradients, same RNG stream afterwards as nn.Dropout + matmul, in float64."""
    x, ws = leaves(rs=rs)
    drop = torch.nn.Dropout(0.3)
    ref = grads_of(lambda x, ws: plain_dropout_linear(x, 0.3, ws), x, ws, seed=5)
    got = grads_of(lambda x, ws: common.dropout_linear(x, drop, *ws), x, ws, seed=5)
    for a, b in zip(ref[0], got[0]):
        assert torch.equal(a, b)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(ref[2], got[2]):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert torch.equal(ref[3], got[3])
    assert (ref[0][0] != x.detach() @ ws[0].detach().T).any()  # dropout was active


def test_dropout_linear_saves_no_copy():
    """Autograd keeps only x and the weights (nn.Dropout + matmul keeps the dropped copy and the mask too)."""
    x, ws = leaves(rs=(3, 2), dtype=torch.float32)
    mine, plain = [], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: mine.append(t) or t, lambda t: t):
        common.dropout_linear(x, torch.nn.Dropout(0.3), *ws)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t) or t, lambda t: t):
        plain_dropout_linear(x, 0.3, ws)
    own = {t.untyped_storage().data_ptr() for t in [x, *ws]}
    assert {t.untyped_storage().data_ptr() for t in mine} == own
    assert {t.untyped_storage().data_ptr() for t in plain} - own  # the reference keeps something else


def test_dropout_linear_bf16_autocast_and_checkpoint():
    """Under bf16 autocast, and recomputed by non-reentrant checkpointing: the plain path's values and grads."""
    from torch.utils.checkpoint import checkpoint
    x, ws = leaves(shape_x=(2, 16, 32), rs=(4,), dtype=torch.float32)
    drop = torch.nn.Dropout(0.2)

    def run(fn, ckpt):
        def f(x, ws):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return checkpoint(fn, x, *ws, use_reentrant=False) if ckpt else fn(x, *ws)
        return grads_of(lambda x, ws: [f(x, ws)], x, ws, seed=3)
    ref = run(lambda x, w: plain_dropout_linear(x, 0.2, [w])[0], False)
    for ckpt in (False, True):
        got = run(lambda x, w: common.dropout_linear(x, drop, w)[0], ckpt)
        assert got[0][0].dtype == torch.bfloat16 and torch.equal(got[0][0], ref[0][0])
        torch.testing.assert_close(got[1], ref[1], rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(got[2][0], ref[2][0], rtol=1e-2, atol=1e-2)


def test_dropout_linear_inactive_in_eval():
    x, ws = leaves(rs=(3,))
    drop = torch.nn.Dropout(0.5).eval()
    assert torch.equal(common.dropout_linear(x, drop, *ws)[0], x @ ws[0].T)
    assert torch.equal(common.dropout_linear(x, None, *ws)[0], x @ ws[0].T)
