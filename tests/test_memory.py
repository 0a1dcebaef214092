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
import models  # noqa: E402
import train  # noqa: E402

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


def check_against_real(fake, real, exact=True):
    """What holds on any CPU (Intel, AMD, ARM; any thread count), for a row counted on fake tensors and run on
    real ones: (1) the counter on the real tensors sees what it counts on fake ones, to 32 KiB (exact=False: a
    row whose structure depends on values, PiLoRA's dominant rows, which the fake count assumes are half);
    (2) the counter's step peak holds at least every tensor autograd saves for backward (outside checkpointed
    layers; an independent count: saved_tensors_hooks on the real step); (3) it is at most what the CPU
    allocator saw (torch.profiler's events) + 3 % + 32 KiB: the allocator also holds kernel scratch (MKL's int32
    buffer in bernoulli_, oneDNN's convolution and SDPA workspaces), which differs per CPU and thread count, so
    how far below the allocator the count falls is measured by `bench/memory.py --validate`, not bounded here
    (on an AMD EPYC the allocator saw 2.0× the count of G²R²'s checkpointed ViT step; the old two-sided
    bound, count ≥ allocator − 20 %, held on the Intel machines the suite ran on before)."""
    counted, on_real, measured = (fake["peak_bytes"] - fake["start_bytes"], real["peak_bytes"] - real["start_bytes"],
                                  real["profiled_step_delta"])
    if exact:
        assert abs(counted - on_real) <= 32 * 1024, (counted, on_real)
        assert abs(fake["start_bytes"] - real["start_bytes"]) <= 1024  # a few scalars apart
        assert fake["trainable_params"] == real["trainable_params"] > 0
        assert fake["model_bytes"] == real["model_bytes"]  # the no-grad forward
    assert on_real >= real["saved_bytes"] > 0, (on_real, real["saved_bytes"])
    assert on_real <= 1.03 * measured + 32 * 1024, (on_real, measured)
    assert real["model_bytes"] - real["base_bytes"] <= real["profiled_model_delta"]
    # what is alive between steps: parameters, buffers, AdamW state, batch (+ the method's own tensors)
    assert fake["start_bytes"] >= real["profiled_start_bytes"]


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("row", ROWS)
def test_count_matches_real_tensors(row, ckpt):
    """The fake count of a LLaMA row against the same row run for real (same loop, bf16 autocast), by what holds
    on any CPU (check_against_real); SDPA runs its fused CPU kernel, which keeps no T × T matrix."""
    if row.startswith("peft"):
        pytest.importorskip("peft", reason="the PEFT row needs peft (optional: pip install -r bench/requirements.txt)")
    fake = memory.count_row(row, SHAPE, SEQ, 1, ckpt, cuda=False)  # the real run's CPU dropout
    real = memory.count_row(row, SHAPE, SEQ, 1, ckpt, fake=False)
    check_against_real(fake, real, exact=row != "pilora-s2")
    assert fake["attention"][0] == "_scaled_dot_product_flash_attention_for_cpu"  # no T × T matrix


def test_cuda_dropout_counts_the_dropout_in_xs_dtype():
    """memory.cuda_dropout: common._dropout of a bf16 x on the CPU writes fp32 tensors (its CPU-only round trip),
    under cuda_dropout none (CUDA's kernel runs in x's dtype), and afterwards the CPU path is back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen |= {t.dtype for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)}
            return out

    def written():
        mode = Dtypes()
        mode.seen = set()
        with mode:
            common._dropout(torch.randn(4, 8, dtype=torch.bfloat16), 0.1)
        return mode.seen
    assert torch.float32 in written()
    with memory.cuda_dropout():
        assert torch.float32 not in written()
    assert torch.float32 in written()


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


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_linear_backward_reuses_the_forward_mask(device, ckpt):
    """On any device (CUDA's generator too): backward redraws exactly the forward's mask, even when other
    draws happen in between. With W = I among the weights the forward output is the dropped x itself, so the
    mask is read off it and the gradients are checked against the hand formulas: ∂x = (Σ g_i W_i) ⊙ m/(1−p),
    ∂W_i = g_iᵀ (x ⊙ m/(1−p)) — in float64 on CPU, float32 on CUDA."""
    from torch.utils.checkpoint import checkpoint
    dtype = torch.float64 if device == "cpu" else torch.float32
    p, d = 0.4, 24
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, d, dtype=dtype, generator=gen).to(device).requires_grad_()
    eye = torch.eye(d, dtype=dtype, device=device).requires_grad_()
    w = torch.randn(4, d, dtype=dtype, generator=gen).to(device).requires_grad_()
    drop = torch.nn.Dropout(p)
    fn = lambda x, eye, w: common.dropout_linear(x, drop, eye, w)  # noqa: E731
    torch.manual_seed(1)
    xd, y = checkpoint(fn, x, eye, w, use_reentrant=False) if ckpt else fn(x, eye, w)
    scale = (xd.detach() != 0).to(dtype) / (1 - p)  # the mask, read off the output (x has no zeros)
    assert 0 < (scale == 0).sum() < scale.numel()
    torch.testing.assert_close(xd.detach(), x.detach() * scale)
    torch.testing.assert_close(y.detach(), xd.detach() @ w.detach().T)
    torch.rand(1000, device=device)  # other draws between forward and backward
    g1, g2 = torch.randn(xd.shape, dtype=dtype, generator=gen).to(device), \
        torch.randn(y.shape, dtype=dtype, generator=gen).to(device)
    (xd * g1).sum().add((y * g2).sum()).backward()
    torch.testing.assert_close(x.grad, (g1 @ eye.detach() + g2 @ w.detach()) * scale)
    torch.testing.assert_close(w.grad, g2.reshape(-1, 4).T @ (x.detach() * scale).reshape(-1, d))
    torch.testing.assert_close(eye.grad, g1.reshape(-1, d).T @ (x.detach() * scale).reshape(-1, d))


def test_dropout_linear_inactive_in_eval():
    x, ws = leaves(rs=(3,))
    drop = torch.nn.Dropout(0.5).eval()
    assert torch.equal(common.dropout_linear(x, drop, *ws)[0], x @ ws[0].T)
    assert torch.equal(common.dropout_linear(x, None, *ws)[0], x @ ws[0].T)


# ------------------------------------------------------- chunked LM head + cross-entropy (train.causal_loss)

def lora_tiny(ckpt=False):
    model = models.build_tiny("tiny-llama")
    if ckpt:
        models.enable_checkpointing(model)
    common.LoRA(r=4, dropout=0.0).attach(model)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B starts at 0: give A a gradient
    return model


def loss_and_grads(model, fn):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 260, (3, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100   # prompt
    labels[1, :] = -100    # an example with no target token: whole chunks ignored
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    n = int((labels[:, 1:] != -100).sum())
    model.zero_grad(set_to_none=True)
    loss = fn(model, batch, n)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("chunk", [1, 5, 33, 4096])
def test_causal_loss_equals_hf_loss(chunk, ckpt):
    """Same value and gradients as the model's own loss (HF: logits.float(), shift, summed CE / num items)."""
    model = lora_tiny(ckpt)
    ref, ref_g = loss_and_grads(model, lambda m, b, n: m(**b, num_items_in_batch=torch.tensor(n)).loss)
    got, got_g = loss_and_grads(model, lambda m, b, n: train.causal_loss(m, b, n, chunk=chunk))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert ref_g.keys() == got_g.keys() and len(ref_g) == 28
    for k in ref_g:
        torch.testing.assert_close(got_g[k], ref_g[k], rtol=1e-5, atol=1e-7)


def test_causal_loss_keeps_one_chunk_of_logits():
    """Counted: the plain loss holds (tokens × vocab) fp32 tensors at its peak; the chunked one holds none
    larger than a chunk's."""
    seq, vocab, chunk = 256, 8192, 64

    def peak_top(fn):
        with memory.counting() as c:
            model = memory.build_model(f"llama-h64-l1-v{vocab}", dtype=torch.float32)
            common.LoRA(r=4, dropout=0.0).attach(model)
            ids = torch.randint(0, vocab, (1, seq))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            c.reset(record=True)
            fn(model, batch, seq - 1).backward()
            return c.peak, c.top(3)  # same model and batch in both: absolute peaks compare
    plain = peak_top(lambda m, b, n: m(**b, num_items_in_batch=torch.tensor(n)).loss)
    chunked = peak_top(lambda m, b, n: train.causal_loss(m, b, n, chunk=chunk))
    assert plain[1][0]["bytes"] >= seq * vocab * 4
    assert chunked[1][0]["bytes"] <= chunk * vocab * 4
    assert chunked[0] < plain[0] - seq * vocab * 4


def test_classification_shape_counts():
    """DeBERTa-v2 (train.py's classification branch): counted through the same rows; LLaMA-only targets refuse."""
    rows = memory.main(["--model", "tiny-deberta", "--seq_len", "16", "--grad_ckpt", "on", "--rows", "lora-r8",
                        "lora-r8-qkvud"])
    assert rows[0]["aux_bytes"] > 0 and rows[0]["trainable_params"] > 0
    assert "no linear layer matches" in rows[1]["error"]


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("row", ["lora-r8", "spsft-r128-taylor", "g2r2-warmup", "pilora-s1-K1"])
def test_image_model_count_matches_real(row, ckpt):
    """ViT (train.py's image task: pixel_values, the model's own loss) counted as the LLaMA rows are and checked
    the same way (check_against_real); the patch convolution's oneDNN scratch is only on the allocator's side."""
    fake = memory.count_row(row, "tiny-vit", 0, 2, ckpt, cuda=False)
    real = memory.count_row(row, "tiny-vit", 0, 2, ckpt, fake=False)
    assert fake["seq_len"] == (32 // 8) ** 2 + 1  # patches + [CLS], from the image size
    check_against_real(fake, real)


def test_report_sets_the_count_beside_the_gpu(tmp_path):
    """bench/report.py: a CUDA efficiency row and a counted row of the same (row, shape, seq, mode) land in
    one "Validation on the GPU" line with their ratio (hand numbers: 3 GiB counted / 4 GiB measured)."""
    import report
    gib = 2 ** 30
    counted = [{"row": "lora-r8", "model": "llama-7b-shape", "seq_len": 2048, "grad_ckpt": False,
                "trainable_params": 1, "peak_bytes": 15 * gib, "model_bytes": 12 * gib, "aux_bytes": 3 * gib}]
    measured = {("lora-r8", "llama-7b-shape", 2048, False): {"peak_bytes": 16 * gib, "aux_bytes": 4 * gib}}
    (tmp_path / "memory-x.json").write_text(json.dumps(counted))
    lines = report.memory_section([str(tmp_path / "memory-x.json")], measured=measured)
    i = lines.index("### Validation on the GPU: counted vs `torch.cuda.max_memory_allocated`")
    row = next(x for x in lines[i:] if x.startswith("| `lora-r8`"))
    assert "| 15.00 | 16.00 | 0.94× | 3.00 | 4.00 | 0.75× |" in row
    assert not any("Validation on the GPU" in x for x in report.memory_section([str(tmp_path / "memory-x.json")]))


@pytest.mark.parametrize("row", ["taso-r8", "spsft-r128-taylor"])
def test_score_groups_cut_the_importance_pass_peak(row):
    """Counted: scoring in 4 runs of layers (--*_score_groups 4) lowers the attach peak by at least half the
    fp32 sums of all target weights (ideally 3/4 of them), and picks the same structure (trainable count)."""
    one = memory.count_row(row, SHAPE, SEQ, 1, True)
    four = memory.count_row(row + "-g4", SHAPE, SEQ, 1, True)
    sums = 4 * one["target_weight_numel"]
    assert one["attach_peak_bytes"] - four["attach_peak_bytes"] >= 0.5 * sums
    assert four["trainable_params"] == one["trainable_params"] and four["model_bytes"] == one["model_bytes"]
