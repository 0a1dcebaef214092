"""PiLoRA (pilora.py) against brute force: Eq 7 by finite differences and full autograd (float64),
Eq 8 scores and hit counts by loops, the τ partition on hand examples, the Eq 9–10 masked forward
against a dense loop-built M ⊗ B (lean and plain forms), group isolation, the Eq 11 merge, the parameter
count, the saved tensors, a planted-signal recovery, and two-stage bf16 + checkpointed runs that resume
exactly mid-stage-1 and mid-stage-2."""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import pilora  # noqa: E402
import train  # noqa: E402
from models import build_tiny  # noqa: E402
from helpers import llama_batches  # noqa: E402


def random_layer(m, n, dominant, r, r_supp, alpha=6.0, dtype=torch.float64, seed=0):
    """A PiLoRALinear with random (nonzero) B_d, B_s, in `dtype`."""
    torch.manual_seed(seed)
    layer = pilora.PiLoRALinear(nn.Linear(n, m), torch.tensor(dominant), r, r_supp, alpha).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    return layer


# ------------------------------------------------------------------------ Eq 7–8, hit counting

def test_eq7_is_the_first_order_change_of_BA_per_minus_eta_float64():
    g = torch.Generator().manual_seed(0)
    m, n, r = 7, 5, 3
    W0, X, Y = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((m, n), (11, n), (11, m)))
    A = torch.randn(r, n, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(m, r, generator=g, dtype=torch.float64, requires_grad=True)
    (torch.tanh(X @ (W0 + B @ A).T) * Y).sum().backward()
    GA, GB = A.grad, B.grad
    G = pilora.reconstructed_grad(A.detach(), B.detach(), GA, GB)
    A, B = A.detach(), B.detach()
    second = float((GB @ GA).abs().max())
    for eta in (1e-2, 1e-4, 1e-6):
        dW = (B - eta * GB) @ (A - eta * GA) - B @ A  # one SGD step on A and B (Eq 3–4)
        error = float((dW / -eta - G).abs().max())
        assert error == pytest.approx(eta * second, rel=1e-3)  # → 0 as O(η): only Eq 5's η² term is left
    loops = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            loops[i, j] = sum(B[i, k] * GA[k, j] + GB[i, k] * A[k, j] for k in range(r))
    torch.testing.assert_close(G, loops, rtol=1e-12, atol=1e-12)


def test_scores_from_a_lora_layer_match_full_autograd_and_loops_float64():
    """Gᴬ, Gᴮ from a real LoRALinear backward equal s·BᵀG_W, s·G_W Aᵀ with G_W = ∂L/∂W by dense
    autograd; neuron_scores (row chunks) equals Σ_j |G̃_ij| summed by loops (Eq 8)."""
    torch.manual_seed(0)
    m, n, r = 9, 6, 3
    layer = common.LoRALinear(nn.Linear(n, m), r, alpha=6.0).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x, y = torch.randn(4, 5, n, dtype=torch.float64), torch.randn(4, 5, m, dtype=torch.float64)
    (torch.sin(layer(x)) * y).sum().backward()
    W = (layer.base.weight + layer.delta_weight()).detach().requires_grad_(True)
    (torch.sin(F.linear(x, W, layer.base.bias)) * y).sum().backward()
    s, A, B = layer.scaling, layer.lora_A.detach(), layer.lora_B.detach()
    torch.testing.assert_close(layer.lora_A.grad, s * B.T @ W.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, s * W.grad @ A.T, rtol=1e-10, atol=1e-12)
    G = pilora.reconstructed_grad(A, B, layer.lora_A.grad, layer.lora_B.grad)
    want = torch.tensor([sum(abs(float(G[i, j])) for j in range(n)) for i in range(m)], dtype=torch.float64)
    for max_elems in (n, 2 * n + 1, 10 ** 6):  # 1 row, 2 rows, all rows per chunk
        got = pilora.neuron_scores(A, B, layer.lora_A.grad, layer.lora_B.grad, max_elems=max_elems)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_hit_counting_matches_loops():
    g = torch.Generator().manual_seed(0)
    H = torch.zeros(13, dtype=torch.long)
    want = [0] * 13
    for _ in range(6):
        S = torch.rand(13, generator=g) ** 3
        H = pilora.count_hits(H, S)
        mean = sum(float(v) for v in S) / 13
        want = [h + (1 if float(v) > mean else 0) for h, v in zip(want, S)]
    assert H.tolist() == want and 0 < sum(want) < 6 * 13
    assert pilora.count_hits(torch.zeros(4, dtype=torch.long), torch.ones(4)).tolist() == [0] * 4  # none > mean


def test_method_scores_every_interval_in_stage1_only():
    """after_backward: hits/scores of every target from its own .grad at steps 0, K, 2K, … < phase."""
    model = build_tiny("tiny-llama")
    table5 = [n for n in common.linear_names(model)
              if n.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")]
    method = pilora.PiLoRA(r=4, interval=2, phase=3, total_steps=6)
    method.attach(model)
    assert method.names == table5 and len(table5) == 10  # LLaMA placement of Table 5
    with torch.no_grad():
        for layer in common.adapters(model, common.LoRALinear).values():
            layer.lora_B.normal_(std=0.1)
    want = {n: [0] * method.shapes[n][0] for n in method.names}
    for step, batch in enumerate(llama_batches(4)):
        model(**batch).loss.backward()
        method.after_backward(step)
        if step % 2 == 0 and step < 3:
            for n in method.names:
                mod = model.get_submodule(n)
                G = (mod.lora_B @ mod.lora_A.grad + mod.lora_B.grad @ mod.lora_A).detach()
                S = G.abs().sum(1)
                torch.testing.assert_close(method.scores[n], S, rtol=1e-5, atol=1e-9)
                want[n] = [h + int(v > S.mean()) for h, v in zip(want[n], method.scores[n])]
        model.zero_grad(set_to_none=True)
        if method.after_step(step):
            break
    assert step == 2 and method.stage == "stage2" and method.scorings == 2
    assert all(method.hits[n].tolist() == want[n] for n in method.names)


# ---------------------------------------------------------------------------------- the partition

H = torch.tensor([5, 0, 3, 3, 1, 8])
S = torch.tensor([0.1, 0.9, 0.2, 0.7, 0.3, 0.05])


def test_importance_order_matches_python_sort():
    g = torch.Generator().manual_seed(0)
    h, s = torch.randint(0, 4, (40,), generator=g), torch.randint(0, 3, (40,), generator=g).float()
    want = sorted(range(40), key=lambda i: (-int(h[i]), -float(s[i]), i))
    assert pilora.importance_order(h, s).tolist() == want


@pytest.mark.parametrize("tau,want", [
    (0.7, [0, 3, 5]),        # ΣH = 20, 0.7·20 = 14: cumulative 8, 13, 16 → rows 5, 0, 3
    (0.65, [0, 5]),          # 13 reached exactly by 8 + 5
    (0.05, [5]),
    (1.0, [0, 2, 3, 4, 5]),  # τ = 1: every row with H > 0
])
def test_partition_hand_example(tau, want):
    assert pilora.select_rows(H, S, tau).tolist() == want
    assert pilora.dominant_size(H, S, tau) == len(want)


def test_dominant_size_equals_exact_rational_count_and_is_guarded_against_float_round_up():
    """|M| = the fewest rows (decreasing H) with cumulative hits ≥ τ·ΣH, counted in exact fractions."""
    from fractions import Fraction
    H1 = torch.tensor([7] * 14 + [2])  # ΣH = 100, 0.07 · 100 = 7.000000000000001 in floats
    assert pilora.dominant_size(H1, torch.zeros(15), 0.07) == 1  # row 0 alone holds 7 hits
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        h = torch.randint(0, 12, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        tau = ("0.07", "0.1", "0.3", "0.35", "0.7", "0.75", "0.9", "1.0")[trial % 8]
        need, cum, k = Fraction(tau) * int(h.sum()), 0, 0
        for v in sorted(h.tolist(), reverse=True):
            if cum >= need or not need:
                break
            cum, k = cum + v, k + 1
        assert pilora.dominant_size(h, torch.zeros(len(h)), float(tau)) == k, (h.tolist(), tau)


def test_partition_ties_use_last_score_then_row_index():
    assert pilora.select_rows(H, S[[0, 1, 3, 2, 4, 5]], 0.7).tolist() == [0, 2, 5]  # the 3 vs 3 tie flips
    assert pilora.select_rows(torch.tensor([2, 2, 2, 2]), torch.tensor([.1, .4, .3, .2]), 0.5).tolist() == [1, 2]
    assert pilora.select_rows(torch.tensor([2, 2, 2, 2]), torch.ones(4), 0.5).tolist() == [0, 1]
    assert pilora.select_rows(torch.zeros(5, dtype=torch.long), torch.rand(5), 0.7).tolist() == []  # no hits


def test_partition_ablations():
    assert pilora.select_rows(H, S, 0.7, "top-half").tolist() == [0, 3, 5]
    assert pilora.select_rows(torch.arange(9), torch.zeros(9), 0.7, "top-half").tolist() == [5, 6, 7, 8]
    h, s = torch.randint(0, 9, (200,)), torch.rand(200)
    runs = [pilora.select_rows(h, s, 0.7, "random", torch.Generator().manual_seed(k)) for k in (0, 0, 1)]
    for rows in runs:
        assert len(rows) == 200 // 2 and len(set(rows.tolist())) == len(rows)  # Table 4: top-half's count
        assert torch.equal(rows, rows.sort().values)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(ValueError, match="`partition`"):
        pilora.select_rows(H, S, 0.7, "bottom")


# ------------------------------------------------------------------- the two-group layer, Eq 9–11

def dense_mask_mapping(mask, B):
    """M ⊗ B of Eq 9 by a loop: row i is M_i · B[k(i) − 1] with k(i) = Σ_{j≤i} M_j (1-based count)."""
    rows, k = [], 0
    for i in range(len(mask)):
        k += int(mask[i])
        rows.append(B[k - 1] if mask[i] else torch.zeros_like(B[0]))
    return torch.stack(rows)


@pytest.mark.parametrize("lean", [True, False])
def test_masked_forward_and_grads_equal_dense_reconstruction_float64(lean):
    m, n, r, rs = 11, 7, 3, 2
    dominant = [1, 4, 5, 9]
    layer = random_layer(m, n, dominant, r, rs)
    layer.lean = lean
    mask = torch.zeros(m, dtype=torch.bool)
    mask[dominant] = True
    assert layer.lora_B_d.shape == (4, r) and layer.lora_A_d.shape == (r, n)
    assert layer.lora_B_s.shape == (7, rs) and layer.lora_A_s.shape == (rs, n)
    x = torch.randn(2, 5, n, dtype=torch.float64, requires_grad=True)
    h = layer(x)
    ref_params = [p.detach().clone().requires_grad_(True)
                  for p in (layer.lora_A_d, layer.lora_B_d, layer.lora_A_s, layer.lora_B_s)]
    Ad, Bd, As, Bs = ref_params
    x2 = x.detach().clone().requires_grad_(True)
    s = layer.scaling
    W = layer.base.weight + s * dense_mask_mapping(mask, Bd) @ Ad + s * dense_mask_mapping(~mask, Bs) @ As  # Eq 10
    ref = F.linear(x2, W, layer.base.bias)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    (h * g).sum().backward()
    (ref * g).sum().backward()
    for p, q in zip((layer.lora_A_d, layer.lora_B_d, layer.lora_A_s, layer.lora_B_s), ref_params):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    assert layer.base.weight.grad is None


@pytest.mark.parametrize("lean", [True, False])
def test_groups_are_isolated(lean):
    """Supplementary rows get exactly nothing from the dominant adapter, and vice versa."""
    layer = random_layer(10, 6, [0, 2, 3, 8], 3, 1)
    layer.lean = lean
    x = torch.randn(3, 6, dtype=torch.float64)
    out = layer(x)
    layer(x)[:, layer.idx_s].sum().backward()
    assert not layer.lora_A_d.grad.any() and not layer.lora_B_d.grad.any()
    assert layer.lora_B_s.grad.any()
    layer.zero_grad()
    layer(x)[:, layer.idx_d].sum().backward()
    assert not layer.lora_A_s.grad.any() and not layer.lora_B_s.grad.any()
    with torch.no_grad():
        layer.lora_B_d.add_(1.0)
        layer.lora_A_d.mul_(3.0)
        moved = layer(x)
    assert torch.equal(moved[:, layer.idx_s], out[:, layer.idx_s]) and not torch.equal(moved, out)
    with torch.no_grad():
        layer.lora_B_s.add_(1.0)
        moved2 = layer(x)
    assert torch.equal(moved2[:, layer.idx_d], moved[:, layer.idx_d])


@pytest.mark.parametrize("r_supp", [2, 0])
def test_merge_equals_forward_and_frozen_rows_stay_bit_identical(r_supp):
    layer = random_layer(12, 8, [3, 4, 10], 4, r_supp, dtype=torch.float32)
    merged = layer.merge()
    x = torch.randn(5, 8)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)  # Eq 11
    assert isinstance(merged, nn.Linear) and not merged.weight.requires_grad
    if r_supp == 0:
        assert layer.lora_A_s is None
        assert torch.equal(merged.weight[layer.idx_s], layer.base.weight[layer.idx_s])
    bf = random_layer(12, 8, [3, 4, 10], 4, r_supp, dtype=torch.float32)
    bf.base.to(torch.bfloat16)
    mask = torch.isin(torch.arange(12), bf.idx_d)
    exact = bf.base.weight.double() + bf.scaling * dense_mask_mapping(mask, bf.lora_B_d.double()) @ bf.lora_A_d.double()
    if r_supp:
        exact += bf.scaling * dense_mask_mapping(~mask, bf.lora_B_s.double()) @ bf.lora_A_s.double()
    w = bf.merge().weight
    assert w.dtype == torch.bfloat16  # summed in fp32, cast once: within half a bf16 ulp of the exact sum
    torch.testing.assert_close(w.double(), exact.detach(), rtol=2 ** -8 + 1e-6, atol=0)


@pytest.mark.parametrize("m,n,k,r,rs", [(12, 8, 3, 4, 2), (20, 9, 13, 5, 1), (12, 8, 5, 4, 0), (6, 6, 0, 2, 1)])
def test_param_count_formula(m, n, k, r, rs):
    layer = pilora.PiLoRALinear(nn.Linear(n, m), torch.arange(k) * (m // max(k, 1)), r, rs, 8.0)
    got = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert got == pilora.param_count(m, n, k, r, rs)
    if 0 < k < m:
        assert got == k * r + r * n + (m - k) * rs + rs * n


def test_lean_forward_saves_no_tokens_by_block_tensor():
    """Only x, the padded factors and the rank-sized Ax are saved; a compact block output (tokens × |M|) is
    not. The same hook does catch it when the scatter is written with index_add (negative control)."""
    m, n, r, rs, tokens = 24, 20, 3, 2, 2 * 13
    layer = random_layer(m, n, list(range(0, 24, 3)), r, rs, dtype=torch.float32)
    blocks = (len(layer.idx_d), len(layer.idx_s))

    def saved_shapes(fn):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            fn().sum().backward()
        return saved

    def is_block(s):
        return len(s) >= 2 and s[-1] in blocks and torch.Size(s).numel() == tokens * s[-1]

    for autocast in (False, True):
        x = torch.randn(2, 13, n)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            shapes = saved_shapes(lambda: layer(x))
        assert not [s for s in shapes if is_block(s)], shapes
        assert (2, 13, r + rs) in shapes or (26, r + rs) in shapes  # LoRA's own A x, tokens × (r + r′)

    def index_add_forward():
        y = F.linear(F.linear(x, layer.lora_A_d), layer.lora_B_d)
        return layer.base(x).index_add(-1, layer.idx_d, y)
    assert [s for s in saved_shapes(index_add_forward) if is_block(s)]


# ------------------------------------------------------------------------------ the method object

class Toy(nn.Module):
    """One linear layer `proj` trained by MSE toward a teacher."""

    def __init__(self, m, n):
        super().__init__()
        self.proj = nn.Linear(n, m)

    def forward(self, x, y):
        return SimpleNamespace(loss=F.mse_loss(self.proj(x), y))


def planted_run(partition, m=48, n=16, planted=12, phase=30):
    torch.manual_seed(0)
    model = Toy(m, n)
    P = torch.randperm(m)[:planted].sort().values
    W = model.proj.weight.detach().clone()
    W[P] += torch.randn(planted, n)  # the target update touches only the rows P
    method = pilora.PiLoRA(r=4, alpha=8.0, dropout=0.0, targets=["proj"], seed=1, interval=3,
                           phase=phase, partition=partition, total_steps=phase + 5)
    method.attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(phase):
        x = torch.randn(64, n)
        y = F.linear(x, W, model.proj.base.bias) + 0.1 * torch.randn(64, m)
        model(x, y).loss.backward()
        method.after_backward(step)
        opt.step()
        switched = method.after_step(step)
        opt.zero_grad(set_to_none=True)
    assert switched and method.stage == "stage2"
    M = set(method.dominant["proj"].tolist())
    return len(M & set(P.tolist())) / len(M), len(M & set(P.tolist())) / planted, method


def test_planted_signal_is_recovered_by_hits_and_not_by_random():
    precision, recall, method = planted_run("hits")
    assert precision >= 0.9 and recall >= 0.5, (precision, recall)
    assert method.summary()["dominant_rows"]["proj"] < 48 // 2
    precision_random, _, _ = planted_run("random")
    assert precision_random <= 0.5, precision_random


def test_plot_writes_the_partition_picture_or_returns_none_without_matplotlib(tmp_path):
    _, _, method = planted_run("hits", phase=6)
    import plots
    path = plots.plot(method, str(tmp_path))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert path is None
    else:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_keywords_raise_at_construction():
    for kw, match in [(dict(tau=1.5), "`tau` must be in"), (dict(interval=0), "`interval`"),
                      (dict(partition="half"), "`partition`"), (dict(r_supp=9), "`r_supp`"),
                      (dict(phase=0), "`phase`")]:
        with pytest.raises(ValueError, match=match):
            pilora.PiLoRA(**{"r": 8, "phase": 5, **kw})
    with pytest.raises(ValueError, match="pass a smaller `phase`"):
        pilora.PiLoRA(phase=10, total_steps=10)
    with pytest.raises(ValueError, match="pass `phase`"):
        pilora.PiLoRA()


def test_defaults_r_supp_by_task_and_epoch_phase():
    llama = pilora.PiLoRA(total_steps=30, steps_per_epoch=10, causal=True)
    bert = pilora.PiLoRA(total_steps=30, steps_per_epoch=10)
    assert (llama.r_supp, bert.r_supp, llama.phase) == (2, 1, 10)  # Tables 5–7, App. A.4
    short = pilora.PiLoRA(total_steps=9, steps_per_epoch=10)
    assert short.phase == 4  # a 9-step run: one epoch would leave no stage 2, so half the run


def test_stage1_comes_before_the_epochs_of_stage2():
    """Alg. 1: one epoch of stage 1, then stage 2 for --epochs (extend); without extend (--max_steps,
    own loops) and with stage1_in_epochs total_steps is the whole run."""
    kw = dict(total_steps=30, steps_per_epoch=10)  # the trainer's count: --epochs 3 of 10 steps
    assert pilora.PiLoRA(**kw, extend=True).run_steps(30) == 40
    assert pilora.PiLoRA(**kw, extend=True, phase=4).run_steps(30) == 34
    assert pilora.PiLoRA(**kw).run_steps(30) == 30
    assert pilora.PiLoRA(**kw, extend=True, stage1_in_epochs=True).run_steps(30) == 30
    assert common.LoRA().run_steps(30) == 30  # other methods: the trainer's count


def test_train_main_runs_one_epoch_of_stage1_then_the_epochs_of_stage2(tmp_path):
    argv = ["--method", "pilora", "--model", "tiny-llama", "--max_len", "256", "--batch_size", "2",
            "--micro_batch_size", "2", "--max_samples", "8", "--eval_limit", "1", "--epochs", "2",
            "--pilora_interval", "1", "--dropout", "0.0"]
    s = train.main(argv + ["--output_dir", str(tmp_path / "a")])  # 4 steps per epoch
    assert (s["steps"], s["phase_steps"], s["stage_times_s"].keys() >= {"stage1", "stage2"}) == (12, 4, True)
    assert len(s["losses"]) == 12 and s["scorings"] == 4
    s = train.main(argv + ["--output_dir", str(tmp_path / "b"), "--pilora_stage1_in_epochs"])
    assert (s["steps"], s["phase_steps"]) == (8, 4)
    s = train.main(argv + ["--output_dir", str(tmp_path / "c"), "--max_steps", "6"])
    assert (s["steps"], s["phase_steps"]) == (6, 4)


def test_stage2_starts_from_theta0_outputs_and_head_values():
    """Alg. 1 line 15: right after the switch the model computes what the pretrained model computes
    (fresh B = 0) and its heads hold their values from before stage 1, though stage 1 moved both."""
    import copy
    torch.manual_seed(0)
    model = build_tiny("tiny-bert", num_labels=3)
    model.config.use_cache = False
    theta0 = copy.deepcopy(model).eval()
    method = pilora.PiLoRA(r=4, phase=2, interval=1, dropout=0.0, total_steps=4, heads=["classifier"])
    method.attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 260, (4, 10), generator=g)
    for step in range(2):
        model(input_ids=x, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
        method.after_backward(step)
        opt.step()
        if step == 0:
            model.eval()
            with torch.no_grad():
                moved = model(input_ids=x).logits
            model.train()
        switched = method.after_step(step)
        opt.zero_grad(set_to_none=True)
    assert switched and method.stage == "stage2"
    model.eval()
    with torch.no_grad():
        want, got = theta0(input_ids=x).logits, model(input_ids=x).logits
    assert not torch.allclose(moved, want, atol=1e-3)  # stage 1 did change the function
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    ref = dict(theta0.named_parameters())
    heads = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert heads and all(torch.equal(dict(model.named_parameters())[n], ref[n]) for n in heads)


def test_warm_start_keeps_dominant_rows_of_the_stage1_update():
    model = build_tiny("tiny-llama")
    method = pilora.PiLoRA(r=4, phase=1, total_steps=3, warm_start=True)
    method.attach(model)
    with torch.no_grad():
        for layer in common.adapters(model, common.LoRALinear).values():
            layer.lora_B.normal_()
    before = {n: m.delta_weight() for n, m in common.adapters(model, common.LoRALinear).items()}
    model(**llama_batches(1)[0]).loss.backward()
    method.after_backward(0)
    assert method.after_step(0)
    for n, layer in common.adapters(model, pilora.PiLoRALinear).items():
        delta = layer.merge().weight - layer.base.weight
        torch.testing.assert_close(delta[layer.idx_d], before[n][layer.idx_d], rtol=1e-5, atol=1e-6)
        assert not delta[layer.idx_s].any()  # B_s starts at zero


# -------------------------------------------------- two stages under bf16 autocast + checkpointing

def rebuild_optimizer(model, old):
    """train.py's rule: AdamW over what trains now; surviving tensors keep their state."""
    new = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for p in new.param_groups[0]["params"]:
        if p in old.state:
            new.state[p] = old.state[p]
    return new


def run(name, steps, kw, stop_at=None, ckpt=None):
    """A hand loop in train.py's hook order. Returns (losses, checkpoint at stop_at, model, method)."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    model = build_tiny(name, num_labels=3)
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if name == "tiny-llama":
        data = llama_batches(steps, seed=7)
    else:
        g = torch.Generator().manual_seed(7)
        data = [dict(input_ids=torch.randint(0, 260, (4, 10), generator=g), labels=torch.tensor([0, 1, 2, 1]))
                for _ in range(steps)]
    method = pilora.PiLoRA(**kw, total_steps=steps, causal=name == "tiny-llama",
                           heads=["classifier"] if name != "tiny-llama" else ())
    with ctx:
        method.attach(model, iter(()), state=None if ckpt is None else ckpt["method"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start, losses, out = 0, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["trainable"], strict=False)
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
    for step in range(start, steps):
        for g in opt.param_groups:  # the trainer's schedule counts from schedule_start
            g["lr"] = 1e-2 * min(1.0, (step - method.schedule_start + 1) / 2)
        with ctx:
            loss = model(**data[step]).loss
        loss.backward()
        method.after_backward(step)
        opt.step()
        if method.after_step(step):
            assert step + 1 == kw["phase"] and method.schedule_start == step + 1
            old_ids = {id(p) for p in opt.param_groups[0]["params"]}
            opt = rebuild_optimizer(model, opt)
            now = opt.param_groups[0]["params"]
            assert [p for p in now if id(p) in old_ids] == []  # stage-1 adapters (and reset heads) dropped
            assert {id(p) for p in now} == {id(p) for p in model.parameters() if p.requires_grad}
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if stop_at == step + 1:
            out = {"trainable": {n: t.clone() for n, t in train.trainable_state_dict(model).items()},
                   "optimizer": opt.state_dict(), "method": method.state_dict(), "step": step + 1,
                   "rng": torch.get_rng_state()}
            break
    return losses, out, model, method


@pytest.mark.parametrize("name,kw", [
    ("tiny-llama", dict(r=4, dropout=0.1, interval=2, phase=4)),
    ("tiny-bert", dict(r=4, dropout=0.1, interval=1, phase=3, partition="top-half")),
])
def test_two_stage_bf16_checkpointed_run_resumes_exactly_and_merges(name, kw):
    steps = 7
    full, _, model, method = run(name, steps, kw)
    assert all(torch.isfinite(torch.tensor(full))) and method.stage == "stage2"
    for stop in (2, kw["phase"], 5):  # mid-stage-1, right after the switch, mid-stage-2
        head, ckpt, _, _ = run(name, steps, kw, stop_at=stop)
        tail, _, _, resumed = run(name, steps, kw, ckpt=ckpt)
        assert head + tail == full, stop
        assert resumed.summary() == method.summary()
    layers = common.adapters(model, pilora.PiLoRALinear)
    assert len(layers) == len(method.names) and not common.adapters(model, common.LoRALinear)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert all(layer.lora_B_d.abs().sum() > 0 for layer in layers.values() if layer.lora_B_d is not None)
    s = method.summary()
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    assert s["pilora_params"] == trainable and s["param_ratio"] == trainable / s["lora_params"]
    assert sum(s["dominant_rows"].values()) == sum(len(layer.idx_d) for layer in layers.values())
    # merge (Eq 11): the exported plain model computes what the adapted one does (fp32, eval)
    model.eval()
    batch = llama_batches(1, seed=9)[0] if name == "tiny-llama" else \
        dict(input_ids=torch.randint(0, 260, (2, 10)), labels=torch.tensor([0, 2]))
    with torch.no_grad():
        want = model(**batch).logits
        method.export(model)
        got = model(**batch).logits
    assert not common.adapters(model, pilora.PiLoRALinear)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_train_main_two_stages_resume_mid_stage1_and_mid_stage2_and_eval_only(tmp_path):
    from safetensors.torch import load_file
    argv = ["--method", "pilora", "--model", "tiny-llama", "--max_len", "256", "--batch_size", "2",
            "--micro_batch_size", "1", "--max_samples", "24", "--eval_limit", "2", "--lr", "1e-3",
            "--max_steps", "6", "--pilora_phase", "3", "--pilora_interval", "2", "--r", "8", "--pilora_r_supp", "1",
            "--dtype", "bf16", "--grad_ckpt", "--dropout", "0.1"]
    full = train.main(argv + ["--output_dir", str(tmp_path / "a")])
    assert full["stage"] == "stage2" and full["scorings"] == 2 and all(torch.isfinite(torch.tensor(full["losses"])))
    assert full["trainable_params_start"] == full["lora_params"]  # stage 1: rank-r LoRA (no heads here)
    assert full["trainable_params_end"] == full["pilora_params"] < full["lora_params"]  # r = 8, r′ = 1
    b = ["--output_dir", str(tmp_path / "b"), "--save_every", "1"]
    assert train.main(argv + b + ["--stop_after", "2"])["stopped_at"] == 2  # mid-stage-1
    assert train.main(argv + b + ["--resume", "--stop_after", "5"])["stopped_at"] == 5  # mid-stage-2
    resumed = train.main(argv + b + ["--resume"])
    assert resumed["losses"] == full["losses"]
    assert resumed["dominant_rows"] == full["dominant_rows"]
    tensors = load_file(tmp_path / "a" / "adapter.safetensors")
    assert {n.rpartition(".")[2] for n in tensors} == {"lora_A_d", "lora_B_d", "lora_A_s", "lora_B_s"}
    assert all(t.any() for n, t in tensors.items() if n.endswith("lora_B_d"))  # the rebuilt optimizer trains them
    model, method = build_tiny("tiny-llama"), pilora.PiLoRA(r=8, phase=1)  # --eval_only --adapter: rebuild, no scoring
    train.load_adapter(model, method, tmp_path / "a")
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], t) for n, t in tensors.items())
    assert method.summary()["dominant_rows"] == full["dominant_rows"] and method.r_supp == 1
