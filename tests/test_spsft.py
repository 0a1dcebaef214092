"""SPSFT (spsft.py) against brute force: dense M W_f forward, full-autograd Taylor scores, explicit
per-class Quantiles-Mean, sorted selection, saved tensors vs LoRA, merge, and bf16 + checkpointing
runs that resume exactly."""
import io
import math
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import spsft  # noqa: E402
import train  # noqa: E402
from models import build_tiny  # noqa: E402
from helpers import llama_batches  # noqa: E402


def vit_batches(labels, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [dict(pixel_values=torch.randn(len(y), 3, 32, 32, generator=g).to(dtype), labels=torch.tensor(y))
            for y in labels]


def target_weights(model, names=None):
    names = names or common.find_targets(model)
    return {n: model.get_submodule(n).weight for n in names}


# ----------------------------------------------------------------------------- adapter layer, Eq 5

def test_forward_and_grads_equal_dense_W_plus_M_Wf_float64():
    torch.manual_seed(0)
    d_out, d_in, r = 24, 10, 5
    base = nn.Linear(d_in, d_out, dtype=torch.float64)
    idx = torch.tensor([1, 4, 7, 18, 23])
    layer = spsft.SPSFTLinear(base, idx)
    assert layer.spsft_W_f.dtype == torch.float32 and not layer.spsft_W_f.any()  # fp32 zeros (§3.1)
    layer.spsft_W_f = nn.Parameter(torch.randn(r, d_in, dtype=torch.float64))
    M = torch.zeros(d_out, r, dtype=torch.float64)
    for j in range(r):
        M[idx[j], j] = 1.0  # M_{i_j j} = 1
    x = torch.randn(3, 7, d_in, dtype=torch.float64, requires_grad=True)
    h = layer(x)
    W_f = layer.spsft_W_f.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = F.linear(x2, base.weight + M @ W_f, base.bias)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    (h * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(layer.spsft_W_f.grad, W_f.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    assert base.weight.grad is None and base.bias.grad is None  # only W_f (and x) get gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_adds_rows_in_fp32_and_leaves_other_rows_bit_identical(dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 40, dtype=dtype).requires_grad_(False)
    idx = torch.tensor([0, 3, 9, 39])
    layer = spsft.SPSFTLinear(base, idx)
    with torch.no_grad():
        layer.spsft_W_f.normal_()
    merged = layer.merge()
    w, wm = base.weight, merged.weight
    assert wm.dtype == dtype and not wm.requires_grad
    out = torch.ones(40, dtype=torch.bool)
    out[idx] = False
    assert torch.equal(wm[out], w[out])  # rows outside idx: bit-identical
    assert torch.equal(wm[idx], (w.float()[idx] + layer.spsft_W_f.detach()).to(dtype))  # one cast from fp32
    assert torch.equal(merged.bias, base.bias)
    if dtype == torch.float32:
        x = torch.randn(5, 16)
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_saved_tensors_spsft_keeps_no_tokens_by_r_tensor_but_equal_param_lora_does():
    torch.manual_seed(0)
    d, rows, tokens = 64, 16, 3 * 37
    base = nn.Linear(d, d).requires_grad_(False)
    sp = spsft.SPSFTLinear(base, torch.arange(0, d, 4))
    lora = common.LoRALinear(base, rows * d // (d + d), 16.0, 0.0)  # same trainable params: 16·64 = 8·(64+64)
    assert sp.spsft_W_f.numel() == lora.lora_A.numel() + lora.lora_B.numel()
    for autocast in (False, True):
        for x_grad in (False, True):  # an input that requires grad (any layer but the first) needs W, W_f too
            for layer, k in ((sp, rows), (lora, lora.lora_A.shape[0])):
                saved = []
                x = torch.randn(3, 37, d, requires_grad=x_grad)
                with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        layer(x).sum().backward()
                act = [t for t in saved if t.numel() == tokens * k and t.shape[-1] == k]  # a tokens × r activation
                if layer is sp:
                    assert not act, [tuple(t.shape) for t in saved]
                    weights = d * d + rows * d if x_grad else 0  # W and W_f for ∂ℒ/∂x
                    assert sum(t.numel() for t in saved) == x.numel() + rows + weights  # x, idx, nothing else
                else:
                    assert act, [tuple(t.shape) for t in saved]


# ----------------------------------------------------------------------------- importance, §3.2 / App. A

def test_l2_rows_is_the_row_norm():
    w = torch.randn(7, 5)
    ref = torch.tensor([sum(float(v) ** 2 for v in row) ** 0.5 for row in w])
    torch.testing.assert_close(spsft.l2_rows(w), ref)


@pytest.mark.parametrize("groups", [1, 3], ids=["one-pass", "score-groups-3"])
def test_taylor_scores_equal_formula_on_full_autograd_gradients(groups):
    """(--spsft_score_groups: the same scores, the weights scored in runs of layers, a pass each.)"""
    model = build_tiny("tiny-llama").double()
    weights = target_weights(model)
    batches = llama_batches(3)
    # naive: one backward of the mean batch loss, every gradient at once
    for w in weights.values():
        w.requires_grad_(True)
    loss = sum(model(**b).loss for b in batches) / len(batches)
    grads = torch.autograd.grad(loss, list(weights.values()))
    for w in weights.values():
        w.requires_grad_(False)
    ref = {}
    for (n, w), g in zip(weights.items(), grads):  # η_i = Σ_j |g_ij w_ij|, an explicit loop
        ref[n] = torch.tensor([sum(abs(a * b) for a, b in zip(gi, wi)) for gi, wi in zip(g.tolist(), w.tolist())],
                              dtype=torch.float64)
    common.prepare(model)
    eta = spsft.row_importance(model, weights, batches, "taylor", groups)
    assert set(eta) == set(weights)
    for n in weights:
        torch.testing.assert_close(eta[n].double(), ref[n], rtol=1e-5, atol=1e-12)
        assert weights[n].grad is None and not weights[n].requires_grad  # nothing left behind
    assert all(p.grad is None for p in model.parameters())


def bert_batches(sizes, seed=3, labels=3):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(0, 260, (k, 9), generator=g),
                 labels=torch.randint(0, labels, (k,), generator=g)) for k in sizes]


def loop_taylor(model, weights, batch):
    """η_i = Σ_j |g_ij w_ij| by a loop over one dense autograd gradient of model(**batch).loss."""
    for w in weights.values():
        w.requires_grad_(True)
    grads = torch.autograd.grad(model(**batch).loss, list(weights.values()))
    for w in weights.values():
        w.requires_grad_(False)
    return {n: torch.tensor([sum(abs(a * b) for a, b in zip(gi, wi)) for gi, wi in zip(g.tolist(), w.tolist())],
                            dtype=torch.float64) for (n, w), g in zip(weights.items(), grads)}


def test_taylor_mean_over_x_is_per_example_with_a_short_last_batch():
    """Batches of 4, 4, 2 examples score like one batch of all 10: the mean over examples, not over batches."""
    model = build_tiny("tiny-bert", num_labels=3).double().eval()
    weights = target_weights(model, ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense"])
    batches = bert_batches([4, 4, 2])
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    ref = loop_taylor(model, weights, whole)
    common.prepare(model)
    eta = spsft.row_importance(model, weights, batches, "taylor")
    for n in weights:
        torch.testing.assert_close(eta[n].double(), ref[n], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kind", ["taylor", "qm_taylor"])
def test_taylor_passes_score_with_dropout_off_and_restore_training_mode(kind):
    """tiny-bert has dropout 0.1: in train mode two passes must agree with each other and with eval mode."""
    model = build_tiny("tiny-bert", num_labels=3).double()
    assert model.config.hidden_dropout_prob > 0
    common.prepare(model)
    weights = target_weights(model)
    batches = bert_batches([6, 6])
    model.eval()
    want = spsft.row_importance(model, weights, batches, kind)
    model.train()
    for _ in range(2):
        got = spsft.row_importance(model, weights, batches, kind)
        assert all(torch.equal(got[n], want[n]) for n in weights)
    assert all(m.training for m in model.modules())  # train mode restored everywhere


def test_method_files_import_no_tqdm_or_transformers():
    """A copy-paster's plain PyTorch model needs neither: progress bars are the caller's (issue 32)."""
    import ast
    for f in ("spsft.py", "g2r2.py"):
        tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "..", f)).read())
        mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not mods & {"tqdm", "transformers"}, (f, mods)


@pytest.mark.parametrize("groups", [1, 3], ids=["one-pass", "score-groups-3"])
def test_qm_taylor_equals_explicit_per_class_loop_and_quantiles(groups):
    model = build_tiny("tiny-vit", num_labels=4).double()
    labels = [[0, 1, 3, 1, 0], [3, 3, 1, 0]]  # class 2 absent: left out of the quantiles
    batches = vit_batches(labels, dtype=torch.float64)
    weights = target_weights(model)
    eta_t = {n: [] for n in weights}
    for t in (0, 1, 3):
        pix = torch.cat([b["pixel_values"][b["labels"] == t] for b in batches])
        for w in weights.values():
            w.requires_grad_(True)
        loss = model(pixel_values=pix, labels=torch.full((len(pix),), t)).loss  # L(D^t, F)
        grads = torch.autograd.grad(loss, list(weights.values()))
        for (n, w), g in zip(weights.items(), grads):
            eta_t[n].append((g * w).abs().sum(1).detach())  # Eq 6 in App. A's per-element form
    for w in weights.values():
        w.requires_grad_(False)
    ref = {}
    for n, v in eta_t.items():
        v = torch.stack(v)  # (classes, d_out)
        qm = []
        for i in range(v.shape[1]):
            s = sorted(v[:, i].tolist())
            qs = []
            for k in range(11):  # Q_k, linear interpolation
                pos = k / 10 * (len(s) - 1)
                lo = int(pos)
                hi = min(lo + 1, len(s) - 1)
                qs.append(s[lo] + (pos - lo) * (s[hi] - s[lo]))
            assert qs[5] == pytest.approx(torch.quantile(v[:, i], 0.5).item())
            qm.append(sum(qs) / 11)  # Eq 7
        ref[n] = torch.tensor(qm, dtype=torch.float64)
    common.prepare(model)
    eta = spsft.row_importance(model, weights, batches, "qm_taylor", groups)
    for n in weights:
        torch.testing.assert_close(eta[n].double(), ref[n], rtol=1e-5, atol=1e-12)
    # and it is not plain Taylor
    plain = spsft.row_importance(model, weights, batches, "taylor")
    assert any(not torch.allclose(eta[n], plain[n]) for n in weights)


def test_qm_taylor_refuses_tasks_without_class_labels():
    with pytest.raises(ValueError, match="qm_taylor needs one class label"):
        spsft.SPSFT(importance="qm_taylor", rows=4).attach(build_tiny("tiny-llama"), iter(llama_batches(2)))
    reg = build_tiny("tiny-vit", num_labels=1)
    reg.config.problem_type = "regression"
    b = dict(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.randn(2))
    with pytest.raises(ValueError, match="use `importance` taylor or l2"):
        spsft.SPSFT(importance="qm_taylor", rows=4).attach(reg, iter([b]))


# ----------------------------------------------------------------------------- selection, §3.1

def test_top_rows_matches_sorting_and_breaks_ties_by_lower_index():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(50, generator=g)
    ref = sorted(sorted(range(50), key=lambda i: -float(s[i]))[:7])
    assert spsft.top_rows(s, 7).tolist() == ref
    ties = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5, 3.0])
    assert spsft.top_rows(ties, 4).tolist() == [1, 2, 3, 7]  # the three 3.0s, then the first 2.0
    assert spsft.top_rows(torch.zeros(10), 3).tolist() == [0, 1, 2]


def test_ratio_rounds_to_the_nearest_row_halves_up():
    """r = ⌊ratio·d_out + ½⌋ (≥ 1) by exact fractions: 2.5 → 3, 4.5 → 5 (not Python's round-half-even)."""
    from fractions import Fraction
    assert spsft.rows_for(50, 7, ratio=0.05) == 3 and spsft.rows_for(90, 7, ratio=0.05) == 5
    for ratio in ("0.05", "0.025", "0.1", "0.15", "0.25", "0.35", "0.45", "0.5", "0.125"):
        for d_out in list(range(1, 120)) + [4096, 11008]:
            q = Fraction(ratio) * d_out
            want = max(1, math.floor(q + Fraction(1, 2)))
            assert spsft.rows_for(d_out, 3, ratio=float(ratio)) == want, (ratio, d_out)


def test_ratio_to_rows_on_non_square_matrices():
    for d_out, d_in, ratio in [(128, 64, 0.05), (64, 128, 0.05), (64, 256, 0.025), (352, 64, 0.05)]:
        r = spsft.rows_for(d_out, d_in, ratio=ratio)
        want = ratio * d_out * d_in  # parameters asked for; r whole rows of d_in each come nearest
        assert all(abs(r * d_in - want) <= abs(k * d_in - want) for k in range(1, d_out + 1))
    assert spsft.rows_for(128, 64, ratio=0.05) == 6 and spsft.rows_for(64, 128, ratio=0.05) == 3
    assert spsft.rows_for(10, 999, ratio=0.001) == 1  # at least one row
    assert spsft.rows_for(64, 32, rows=128) == 64 and spsft.rows_for(64, 32, rows=5) == 5


def test_bad_flags_raise_one_line_errors():
    for kw, msg in [(dict(rows=0), "`rows`"), (dict(ratio=2.0), "`ratio`"),
                    (dict(importance="fisher"), "`importance`"),
                    (dict(calib_batches=0), "`calib_batches`")]:
        with pytest.raises(ValueError, match=msg):
            spsft.SPSFT(**kw)


# ----------------------------------------------------------------------------- the method on a model

def test_attach_trains_only_W_f_and_heads_mlp_only_and_norms():
    model = build_tiny("tiny-vit", num_labels=3)
    mlp = sorted(n for n in common.find_targets(model) if "mlp" in n)
    m = spsft.SPSFT(rows=6, mlp_only=True, heads=["classifier"])
    m.attach(model, iter(()))
    layers = common.adapters(model, spsft.SPSFTLinear)
    assert sorted(layers) == mlp and len(mlp) == 4
    for n, layer in layers.items():  # l2 selection, brute force: sort rows by (-‖W_i‖, i), keep 6
        norms = [sum(v * v for v in row) ** 0.5 for row in layer.base.weight.tolist()]
        assert layer.idx.tolist() == sorted(sorted(range(len(norms)), key=lambda i: (-norms[i], i))[:6])
    batch = vit_batches([[0, 1, 2]])[0]
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n + ".spsft_W_f" for n in layers} | {"classifier.weight", "classifier.bias"}
    s = m.summary()
    assert s["spsft_params"] == 2 * (6 * 64 + 6 * 128) == train.count_params(model)[0] - 3 * 64 - 3
    sides = 2 * (64 + 128 + 128 + 64)  # Σ (d_in + d_out): LoRA's params per unit of rank
    assert s["lora_rank_matched"] == min(range(1, 64), key=lambda k: abs(k * sides - s["spsft_params"])) == 3
    assert s["lora_params_matched"] == 3 * sides
    normed = build_tiny("tiny-llama")
    spsft.SPSFT(rows=4, norms=True).attach(normed, iter(()))
    trained = {n for n, p in normed.named_parameters() if p.requires_grad}
    norm_names = {n for n, _ in normed.named_parameters() if "norm" in n}
    assert len(norm_names) == 5 and trained == norm_names | {n for n in trained if n.endswith(".spsft_W_f")}


def test_resume_state_rebuilds_rows_without_scoring():
    model = build_tiny("tiny-llama")
    m = spsft.SPSFT(importance="taylor", rows=5, calib_batches=2)
    m.attach(model, iter(llama_batches(2)))
    state = m.state_dict()

    def no_batches():
        raise AssertionError("resume must not score")
        yield

    fresh = build_tiny("tiny-llama")
    m2 = spsft.SPSFT(importance="taylor", rows=5)
    m2.attach(fresh, no_batches(), state=state)
    a, b = common.adapters(model, spsft.SPSFTLinear), common.adapters(fresh, spsft.SPSFTLinear)
    assert all(torch.equal(a[n].idx, b[n].idx) for n in a)
    assert m2.summary() == m.summary()


def run(name, steps, kw, stop_at=None, state=None, seed=0):
    """A hand loop in train.py's hook order under bf16 autocast + non-reentrant checkpointing.
    Returns (losses, checkpoint at stop_at, model, method)."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    model = build_tiny(name, num_labels=3)
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    data = llama_batches(steps + 2, seed=7) if name == "tiny-llama" else \
        vit_batches([[i % 3, (i + 1) % 3, (i + 2) % 3, i % 3] for i in range(steps + 2)], seed=7)
    method = spsft.SPSFT(**kw)
    with ctx:
        method.attach(model, iter(data), state=None if state is None else state["method"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    start = 0
    if state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
    losses, ckpt = [], None
    for step in range(start, steps):
        with ctx:
            loss = model(**data[step]).loss
        loss.backward()
        method.after_backward(step)
        opt.step()
        assert not method.after_step(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if stop_at == step + 1:
            ckpt = {"trainable": {n: t.clone() for n, t in train.trainable_state_dict(model).items()},
                    "optimizer": opt.state_dict(), "method": method.state_dict(), "step": step + 1}
            break
    return losses, ckpt, model, method


@pytest.mark.parametrize("name,kw", [
    ("tiny-llama", dict(importance="taylor", rows=8, calib_batches=2)),
    ("tiny-vit", dict(importance="qm_taylor", ratio=0.05, calib_batches=2)),
])
def test_bf16_checkpointed_training_resumes_exactly_and_merges(name, kw):
    steps = 5
    full, _, model, method = run(name, steps, kw)
    assert all(torch.isfinite(torch.tensor(full)))
    head, ckpt, _, _ = run(name, steps, kw, stop_at=2)
    tail, _, _, _ = run(name, steps, kw, state=ckpt)
    assert head + tail == full  # exactly the uninterrupted losses
    layers = common.adapters(model, spsft.SPSFTLinear)
    assert all(layer.spsft_W_f.dtype == torch.float32 and layer.spsft_W_f.abs().sum() > 0 for layer in layers.values())
    assert method.summary()["importance_time_s"] > 0
    # merge: the exported plain model computes what the adapted one does (fp32, eval)
    model.eval()
    batch = llama_batches(1, seed=9)[0] if name == "tiny-llama" else vit_batches([[0, 1]], seed=9)[0]
    with torch.no_grad():
        want = model(**batch).logits
        weights = {n: (layer.base.weight.clone(), layer.idx.clone()) for n, layer in layers.items()}
        method.export(model)
        got = model(**batch).logits
    assert not common.adapters(model, spsft.SPSFTLinear)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for n, (w, idx) in weights.items():
        keep = torch.ones(len(w), dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(model.get_submodule(n).weight[keep], w[keep])


# ----------------------------------------------------------------------------- through train.main

TRAIN = ["--method", "spsft", "--max_len", "256", "--batch_size", "4", "--micro_batch_size", "2",
         "--max_samples", "24", "--eval_limit", "4", "--lr", "1e-3", "--dtype", "bf16", "--grad_ckpt",
         "--max_steps", "4", "--save_every", "2", "--spsft_calib_batches", "2"]


def train_and_resume(tmp_path, extra):
    full = train.main(TRAIN + extra + ["--output_dir", str(tmp_path / "full"), "--merge"])
    stopped = train.main(TRAIN + extra + ["--output_dir", str(tmp_path / "cut"), "--stop_after", "2"])
    resumed = train.main(TRAIN + extra + ["--output_dir", str(tmp_path / "cut"), "--resume"])
    assert stopped["losses"] == full["losses"][:2] and resumed["losses"] == full["losses"]
    assert resumed["rows_per_matrix"] == full["rows_per_matrix"]
    assert os.path.isdir(tmp_path / "full" / "merged")
    return full


def test_train_main_tiny_llama_taylor_bf16_checkpointing_resume(tmp_path):
    s = train_and_resume(tmp_path, ["--model", "tiny-llama", "--spsft_importance", "taylor", "--spsft_rows", "8"])
    assert set(s["rows_per_matrix"].values()) == {8} and len(s["rows_per_matrix"]) == 14
    assert s["spsft_params"] == s["trainable_params_start"] == s["trainable_params_end"]  # W_f only (no head)
    assert s["spsft_params"] == 2 * 8 * (64 * 6 + 128)  # q,k,v,o,gate,up read 64 inputs; down reads 128
    assert s["importance_time_s"] > 0


def test_train_main_tiny_vit_qm_taylor_mlp_only_resume(tmp_path):
    pytest.importorskip("PIL", reason="an imagefolder of PNGs needs Pillow")
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("test", 2)):
        for c in ("cat", "dog", "owl"):
            os.makedirs(tmp_path / "img" / split / c)
            for i in range(n):
                px = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / "img" / split / c / f"{i}.png")
    s = train_and_resume(tmp_path, ["--model", "tiny-vit", "--data", str(tmp_path / "img"),
                                    "--spsft_importance", "qm_taylor", "--spsft_ratio", "0.05",
                                    "--spsft_mlp_only"])
    assert sorted(s["rows_per_matrix"].values()) == [3, 3, 6, 6]  # fc2 64 × 0.05 → 3, fc1 128 × 0.05 → 6
    assert s["trainable_params_start"] == s["spsft_params"] + 3 * 64 + 3  # + the classifier head


# ----------------------------------------------------------------------------- lean / plain, issue 32

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_forward_equals_the_plain_line_of_eq5(dtype):
    """layer.lean = False: W x + F.linear(x, M W_f) with M dense; the lean scatter gives the same values and
    gradients (fp32 <= 1e-6, float64 <= 1e-12)."""
    torch.manual_seed(0)
    layer = spsft.SPSFTLinear(nn.Linear(10, 24, dtype=dtype), torch.tensor([2, 5, 11, 23]))
    layer.spsft_W_f = nn.Parameter(torch.randn(4, 10, dtype=dtype))
    x0, g = torch.randn(3, 7, 10, dtype=dtype), torch.randn(3, 7, 24, dtype=dtype)
    out = {}
    for lean in (True, False):
        layer.lean, x = lean, x0.clone().requires_grad_()
        h = layer(x)
        (h * g).sum().backward()
        out[lean] = (h.detach(), x.grad, layer.spsft_W_f.grad)
        layer.spsft_W_f.grad = None
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def bert():
    return build_tiny("tiny-bert", num_labels=3)


@pytest.mark.parametrize("batches,importance,match", [
    ([(torch.randint(0, 260, (2, 9)), torch.tensor([0, 1]))], "taylor", "got a batch of type tuple; give each batch as a dict"),
    ([dict(input_ids=torch.randint(0, 260, (2, 9)))], "taylor", "returned no loss .* put the targets in each batch as `labels`"),
    ([dict(input_ids=torch.randint(0, 260, (2, 9)))], "qm_taylor", "a calibration batch has no `labels`; put each example's class"),
], ids=["tuple", "no-labels-taylor", "no-labels-qm"])
def test_wrong_batches_fail_with_what_attach_expects(batches, importance, match):
    with pytest.raises(common.UserError, match=match):
        spsft.SPSFT(importance=importance, rows=4, calib_batches=1).attach(bert(), iter(batches))


def test_a_state_of_another_method_or_another_object_refuses():
    lora = common.LoRA(r=2)
    lora.attach(bert())
    with pytest.raises(common.UserError, match="saved by LoRA, not SPSFT"):
        spsft.SPSFT(rows=4).attach(bert(), state=lora.state_dict())
    m = spsft.SPSFT(rows=4)
    m.attach(bert())
    with pytest.raises(RuntimeError, match="attached to a model already"):
        m.attach(bert())


@pytest.mark.parametrize("kw", [dict(importance="l2", rows=5), dict(importance="taylor", rows=5, calib_batches=2),
                                dict(importance="qm_taylor", rows=5, calib_batches=2)], ids=["l2", "taylor", "qm_taylor"])
def test_own_loop_reload_gives_equal_logits(kw):
    """Train two steps; then (a) attach(fresh, state=method.state_dict()) and (b) a fresh attach scored on other
    batches, then fresh.load_state_dict(model.state_dict()): the persistent row indices come back with W_f, so the
    logits are equal (with non-persistent indices (b) kept the other rows: the logits were off)."""
    calib = bert_batches([4, 4], seed=3)
    model, m = bert(), spsft.SPSFT(**kw)
    m.attach(model, iter(calib))
    opt = torch.optim.AdamW(m.param_groups(1e-2), lr=1e-2)
    for b in bert_batches([4, 4], seed=5):
        model(**b).loss.backward()
        m.after_backward(m.next_step)
        opt.step()
        opt.zero_grad()
        m.after_step(m.next_step)
    model.eval()
    ids = bert_batches([3], seed=9)[0]["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    a, ma = bert().eval(), spsft.SPSFT(**kw)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)  # as a file for another process: plain tensors and containers only
    ma.attach(a, state=torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    b, mb = bert().eval(), spsft.SPSFT(**kw)
    mb.attach(b, iter(bert_batches([4, 4], labels=2, seed=11)))  # other batches: other Taylor rows
    changed = any(not torch.equal(mb.idx[n], m.idx[n]) for n in m.idx)
    assert changed or kw["importance"] == "l2"
    b.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, want)
        assert torch.equal(b(input_ids=ids).logits, want)
    assert all(torch.equal(mb.idx[n], m.idx[n]) for n in m.idx)  # the method reads the restored rows
    assert mb.state_dict()["idx"].keys() == m.idx.keys()
