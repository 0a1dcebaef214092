"""bench/count.py (issue 31): the step counter against hand counts, and the kernel / byte bounds the lean
adapter paths must keep (our LoRA layer against the plain one; no activation-sized index op in PiLoRA, TASO,
SPSFT). Fake tensors only: the counts do not depend on the CPU's kernels."""
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import count  # noqa: E402
import memory  # noqa: E402


def counted(fn, activation=None):
    """fn() run on fake tensors under a StepCounter that starts counting at the call; its fields."""
    c = count.StepCounter(activation)
    with memory.counting(counter=c):
        setup = fn()
        c.reset()
        keep = setup()  # noqa: F841 (alive while the counter closes: what a real caller keeps)
        c.close_draw()
        return c.fields(), c.stats.trace


# ------------------------------------------------------------------------------- the counter by hand

def test_matmul_flop_and_bytes_by_hand():
    """(3 × 4) @ (4 × 5) in fp32: one kernel, 3·5 outputs of 4 multiply-adds = 120 FLOP, reads 12 + 20
    floats, writes 15."""
    def setup():
        a, b = torch.randn(3, 4), torch.randn(4, 5)
        return lambda: a @ b
    f, trace = counted(setup)
    assert f["kernels"] == 1 and [t[1] for t in trace] == ["mm"]
    assert f["flop"] == 2 * 3 * 5 * 4
    assert f["bytes_read"] == (12 + 20) * 4 and f["bytes_written"] == 15 * 4
    h = f["roofline"]["H100"]
    assert h["roofline_ms"] == max(h["flop_ms"], h["bytes_ms"]) and h["kernel_sum_ms"] >= h["roofline_ms"]


def test_batched_matmul_and_linear_flop():
    """bmm of 2 × (3 × 4) @ (4 × 6): 2·2·3·6·4; a Linear 7 → 5 on 3 rows with bias (addmm): 2·3·5·7."""
    def setup():
        a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 6)
        lin, x = nn.Linear(7, 5), torch.randn(3, 7)
        return lambda: (torch.bmm(a, b), lin(x))
    f, _ = counted(setup)
    assert f["flop"] == 2 * 2 * 3 * 6 * 4 + 2 * 3 * 5 * 7
    assert f["kernels"] == 2


def test_views_and_allocations_are_not_kernels():
    def setup():
        x = torch.randn(4, 6)

        def run():
            v = x.t()[1:]
            w = x.view(2, 12).expand(3, 2, 12)
            e = torch.empty(100)
            return v, w, e, x.unsqueeze(0).transpose(1, 2).detach()
        return run
    f, trace = counted(setup)
    assert f["kernels"] == 0 and trace == [] and f["bytes_read"] == f["bytes_written"] == 0


def test_in_place_and_copy_bytes():
    """x.add_(1): reads and writes x once; y.copy_(x): reads x, writes y (its old values are not read);
    x * x reads x once."""
    def setup():
        x, y = torch.randn(10), torch.randn(10)

        def run():
            x.add_(1)
            y.copy_(x)
            return x * x
        return run
    f, trace = counted(setup)
    assert [t[1] for t in trace] == ["add_", "copy_", "mul"]
    assert [(t[3], t[4]) for t in trace] == [(40, 40), (40, 40), (40, 40)]


def test_dropout_is_one_kernel():
    """nn.Dropout on the CPU dispatches bernoulli_, div_ and mul: one fused kernel (native_dropout on CUDA),
    reading x and writing the dropped copy and the mask autograd keeps; native_dropout itself is one too."""
    def setup():
        x = torch.randn(8, 16, requires_grad=True)
        drop = nn.Dropout(0.25)
        return lambda: drop(x)
    f, trace = counted(setup)
    assert f["kernels"] == 1 and f["dropout_kernels"] == 1 and trace[0][1] == "dropout (fused)"
    assert trace[0][3] == 8 * 16 * 4                  # x read once
    assert trace[0][4] == 2 * 8 * 16 * 4              # the dropped copy and the (fp32) mask kept for backward

    def setup2():
        x = torch.randn(8, 16)
        return lambda: torch.native_dropout(x, 0.25, True)
    f, trace = counted(setup2)
    assert f["kernels"] == 1 and f["dropout_kernels"] == 1
    assert trace[0][4] == 8 * 16 * 4 + 8 * 16         # fp32 output + bool mask


def test_dropout_then_matmul_is_two_kernels():
    """The draw ends at the first op that is not its own elementwise application."""
    def setup():
        x, w = torch.randn(8, 16), torch.randn(4, 16)
        return lambda: F.linear(F.dropout(x, 0.5), w)
    f, trace = counted(setup)
    assert [t[1] for t in trace] == ["dropout (fused)", "mm"]


def test_host_syncs():
    """.item() and nonzero make the host wait; sum is a kernel, not a sync."""
    def setup():
        x = torch.randn(10)

        def run():
            s = x.sum().item()
            return s, (x > 0).nonzero()
        return run
    f, _ = counted(setup)
    assert f["host_syncs"] == 2 and f["syncs"] == {"_local_scalar_dense": 1, "nonzero": 1}


def test_causal_attention_flop_by_loops():
    """SDPA forward, causal: each head multiplies q_i·k_j and p_ij·v_j for the pairs j ≤ i, 2 FLOP per
    multiply-add over d = 4 (q·k) and d_v = 4 (p·v); backward 2.5× the forward (five matmuls to two)."""
    B, H, T, D = 1, 2, 8, 4
    pairs = sum(1 for i in range(T) for j in range(T) if j <= i)
    fwd = B * H * pairs * (2 * D + 2 * D)

    def setup():
        q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))

        def run():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.sum().backward()
        return run
    f, _ = counted(setup)
    assert f["attention_flop"] == fwd + int(2.5 * fwd)


def test_index_ops_are_listed_with_activation_size():
    """An index_select over a (tokens × features) tensor is activation-sized; one over a small factor is not,
    nor one that selects nothing (HF's logits_to_keep of no position)."""
    def setup():
        x, a, idx = torch.randn(2, 16, 32), torch.randn(4, 32), torch.arange(0, 32, 4)
        none = torch.zeros(0, dtype=torch.long)
        return lambda: (x.index_select(-1, idx), a.index_select(-1, idx), x[:, none])
    f, _ = counted(setup, activation=(32, 32, {(32, 32)}))
    assert f["index_ops"] == 3 and f["activation_index_ops"] == 1


# ------------------------------------------------------------------------------- the lean-path bounds

def x_bytes(r):
    return r["tokens"] * r["in_features"] * 2  # bf16 x


def test_lora_layer_no_more_than_plain():
    """Issue 31: common.LoRALinear's forward + backward (2 × 256 × 512 → 384, r = 8, p = 0.05, bf16 autocast)
    runs no more kernels and writes no more bytes than the plain layer (nn.Dropout + two F.linear), the mask
    redraw that saves its memory included: the B product, its scale and the sum are one addmm (add_lora)."""
    ours, plain = count.count_layer("lora"), count.count_layer("plain")
    assert ours["kernels"] <= plain["kernels"], (ours["kernels"], plain["kernels"], ours["top_ops"])
    assert ours["bytes_written"] <= plain["bytes_written"], (ours["bytes_written"], plain["bytes_written"])
    assert ours["dropout_kernels"] == 2 and ours["top_ops"].get("addmm") == 1, ours["top_ops"]


@pytest.mark.parametrize("kind", ["pilora", "taso"])
def test_compact_layers_index_no_activation(kind):
    """Issue 31: PiLoRA stage 2 and TASO compute their compact blocks without an index op on a (tokens ×
    features) tensor (weight space: zero-padded factors built from the blocks). SPSFT keeps its row scatter:
    at 7B layer shapes it counts fewer bytes than a zero-padded W_f or a one-hot M (spsft.SPSFTLinear's
    docstring; the issue: keep whichever measures leaner)."""
    r = count.count_layer(kind)
    bad = [i for i in r["index_op_list"] if i["activation"]]
    assert not bad, bad


def test_weight_space_steps_within_their_kernel_targets():
    """Issue 31 item 5 on the counter, small Llama shape: a PiLoRA stage-2 step dispatches <= 1.05× the kernels
    of a LoRA r = 32 one and a TASO step no more than a LoRA r = 1 one, with and without checkpointing (each
    attention and MLP builds its adapters' padded factors at once, common.together; one module at a time they
    counted 1.19× / 1.24× and 1.18× / 1.21× here)."""
    res = count.main(["--model", "llama-h128-l2-v512", "--seq_len", "32", "--grad_ckpt", "both", "--rows",
                      "lora-r1", "taso-r8", "lora-r32-qkvud", "pilora-s2"])
    k = {(r["row"], r["grad_ckpt"]): r["kernels"] for r in res["rows"]}
    for ckpt in (False, True):
        assert k["taso-r8", ckpt] <= k["lora-r1", ckpt], k
        assert k["pilora-s2", ckpt] <= 1.05 * k["lora-r32-qkvud", ckpt], k


def test_count_row_small_shape(tmp_path):
    """A whole step of a row: the phases add up, matmul FLOP include the frozen GEMMs' forward
    (2 · tokens · weights at least), the loop's loss read is one host sync; the CLI writes the JSON."""
    out = tmp_path / "count.json"
    res = count.main(["--model", "llama-h128-l2-v512", "--seq_len", "32", "--grad_ckpt", "off", "--rows", "lora-r8",
                      "--json", str(out)])
    row = res["rows"][0]
    assert "error" not in row, row
    assert sum(row["kernels_by_phase"].values()) == row["kernels"] > 0
    linear = 2 * (4 * 128 * 128 + 3 * 128 * 512) + 512 * 128  # 2 layers (q k v o, gate up down) + lm_head
    assert row["flop_by_phase"]["forward"] >= 2 * 32 * linear
    assert row["syncs"].get("_local_scalar_dense") == 1
    # attention as the GPU runs it on an all-ones batch: causal SDPA, 2 layers × 2 heads × d 64 (loops: j ≤ i)
    fwd = 2 * sum(1 for i in range(32) for j in range(32) if j <= i) * (2 * 64 + 2 * 64)
    assert row["attention_flop"] == 2 * (fwd + int(2.5 * fwd))
    assert json.loads(out.read_text())["rows"][0]["kernels"] == row["kernels"]


def test_g2r2_scoring_step_one_host_sync():
    """A G²R² scoring step reads its ΣS to the host once for all modules (one .cpu().tolist()), beside the
    loop's loss read; R̄, Ū, R̂ (Eq 8–10) are Python floats, no op per module (the count found 161 syncs)."""
    res = count.main(["--model", "llama-h128-l2-v512", "--seq_len", "32", "--grad_ckpt", "off", "--rows",
                      "g2r2-warmup", "g2r2-warmup-paper"])
    for row in res["rows"]:
        assert "error" not in row, row
        assert row["host_syncs"] == 2, (row["row"], row["syncs"])


def scored_layer(base):
    """A G²R² layer whose next backward is an exact scoring (lean ExactGrad, one micro-batch)."""
    import g2r2
    layer = g2r2.G2R2Linear(base, 8, 16, 0.05)
    layer.exact = g2r2.ExactGrad([layer], 1)  # kept on the layer: the sink holds it weakly
    layer.exact.arm(True)
    layer.exact.forwards = 1
    return layer


def test_g2r2_scored_layer_casts_its_factors_once(monkeypatch):
    """A scored G²R² layer casts A and B as often as a LoRA layer, however many row blocks Eq 5 is taken in (3
    blocks here against 1): its forward casts A once (dropout_linear takes the cast copy) and ΔW's blocks reuse
    the forward's bf16 A and B."""
    import g2r2
    one = count.count_layer(scored_layer)
    real = g2r2.blocks
    monkeypatch.setattr(g2r2, "blocks", lambda L: real(L, max_elems=L.base.in_features * 128))  # 384 rows: 3 blocks
    three = count.count_layer(scored_layer)
    casts = lambda r: sum(op == "_to_copy" for _, op, *_ in r["trace"])  # noqa: E731
    assert three["top_ops"]["mm"] == one["top_ops"]["mm"] + 4, (one["top_ops"], three["top_ops"])  # 2 GEMMs a block
    assert casts(three) == casts(one), (one["trace"], three["trace"])
    lora = count.count_layer("lora")
    assert casts(one) == casts(lora), (one["trace"], lora["trace"])  # the blocks reuse the forward's A and B


def test_report_section_verdicts(tmp_path):
    """bench/report.py's issue-31 section: the counter's verdict holds kernels and bytes to the baseline's ×
    the time target (0.90× met at 0.90; 1.10× missed at 1.05, with the op that grew); without a CUDA pairs JSON
    every GPU cell says not measured, with one the pair's interval decides."""
    import report

    def row(name, kernels, nbytes, ops):
        roof = {g: {"roofline_ms": 1.0, "kernel_sum_ms": 2.0} for g in count.PEAKS}
        return {"row": name, "grad_ckpt": False, "kernels": kernels, "bytes_read": nbytes, "bytes_written": 0,
                "flop": 1e12, "host_syncs": 1, "index_ops": 0, "activation_index_ops": 0, "dropout_kernels": 0,
                "kernels_by_phase": {p: 0 for p in count.PHASES} | {"forward": kernels}, "top_ops": ops,
                "roofline": roof, "aux_bytes": nbytes}
    run = {"commit": "abc1234", "date": "2026-12-07 15:00 UTC", "torch": "2.13", "transformers": "5.23",
           "model": "llama-7b-shape", "seq_len": 2048, "micro_batch_size": 1, "peaks": count.PEAKS,
           "command": "python bench/count.py --json x.json", "layers": [],
           "rows": [row("lora-r8", 90, 90, {"mm": 50}), row("peft-lora-r8", 100, 100, {"mm": 50}),
                    row("pilora-s2", 110, 100, {"mm": 50, "index_select": 20}),
                    row("lora-r32-qkvud", 100, 100, {"mm": 50})]}
    path = tmp_path / "count-x.json"
    path.write_text(json.dumps(run))
    text = "\n".join(report.count_section([str(path)]))
    line = lambda label: next(x for x in text.splitlines() if x.startswith(f"| {label}"))  # noqa: E731
    assert "commit abc1234" in text and "Not measured for the new code" in text
    assert "kernels 0.90×, bytes 0.90× **met**" in line("lora-r8 vs PEFT: step ≤ 0.90× (no checkpointing)")
    miss = line("PiLoRA stage 2 vs LoRA r=32: step ≤ 1.05× (no checkpointing)")
    assert "kernels 1.10×, bytes 1.00× **missed**" in miss and "`index_select` +20" in miss
    assert "| not measured |" in miss
    pairs = {"check": "pairs", "device": "cuda", "device_name": "H100", "date": "2026-12-08 10:00 UTC",
             "pairs": [{"pair": "x", "row": "lora-r8", "baseline": "peft-lora-r8", "grad_ckpt": False, "ratio": 0.85,
                        "low": 0.84, "high": 0.86, "verdict": "met", "a": {}, "b": {}}]}
    (tmp_path / "pairs-x.json").write_text(json.dumps(pairs))
    text = "\n".join(report.count_section([str(path), str(tmp_path / "pairs-x.json")]))
    assert "0.850× [0.840, 0.860] **met**" in line("lora-r8 vs PEFT: step ≤ 0.90× (no checkpointing)")
    assert "Not measured for the new code" not in text


def test_fields_are_a_snapshot():
    """What runs after fields() (count_row reads a method's summary() then, which may call .item()) is not
    counted into the fields already taken."""
    c = count.StepCounter()
    with memory.counting(counter=c):
        x = torch.randn(4)
        c.reset()
        x.sum().item()
        f = c.fields()
        x.sum().item()
    assert f["host_syncs"] == 1 and f["syncs"] == {"_local_scalar_dense": 1} and f["kernels"] == 1
