"""CI smoke test of the benchmark harness (bench/efficiency.py, bench/report.py) on tiny-llama, 2 steps.

No timed assertions: times are only checked to be positive and consistent with tokens/s. peft and
matplotlib are optional: without peft the PEFT rows are skipped, without matplotlib no chart is drawn.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import efficiency  # noqa: E402
import report  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

HAVE_PEFT = efficiency.have_peft()
ROWS = ["peft-lora-r8", "lora-r8", "lora-r1", "taso-r8", "spsft-r128", "lora-r8-qkvud", "g2r2-warmup", "g2r2-refine",
        "lora-r32-qkvud", "pilora-s2", "lora-r64"]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run.json"
    argv = ["--model", "tiny-llama", "--seq_len", "16", "--steps", "2", "--warmup_steps", "1", "--grad_ckpt",
            "both", "--calib_batches", "2", "--rows", *ROWS, "--out", str(out)]
    res = efficiency.main(argv)
    with open(out) as f:
        assert json.load(f)["rows"] == res["rows"]  # what was returned is what was written
    return res


def rows_by(result):
    return {(r["row"], r["grad_ckpt"]): r for r in result["rows"]}


def attached(method):
    model = models.build_tiny("tiny-llama")
    method.attach(model, [])
    return model


def test_rows_present_and_sane(result):
    got = rows_by(result)
    expected = [r for r in ROWS if HAVE_PEFT or not r.startswith("peft")]
    assert sorted({k[0] for k in got}) == sorted(expected)
    assert {k[1] for k in got} == {False, True}
    total = train.count_params(models.build_tiny("tiny-llama"))[1]
    for (name, ckpt), r in got.items():
        if name == "lora-r64":  # r = 64 does not fit tiny-llama's 32-feature k/v projections
            assert "does not fit" in r["error"]
            continue
        assert r["total_params"] == total
        assert all(t > 0 for t in r["step_times_s"]) and len(r["step_times_s"]) == 2
        assert r["tokens_per_s"] == pytest.approx(16 / r["step_time_median_s"])
        assert r["mfu"] is None  # CPU
        assert r["peak_bytes"] > r["model_bytes"] >= 4 * total  # fp32 weights are part of the model memory
        assert r["aux_bytes"] == r["peak_bytes"] - r["model_bytes"]
        if ckpt:
            assert r["saved_bytes"] is None
        else:  # at least the 16 x 64 fp32 input of each adapted layer is saved for backward
            assert r["saved_bytes"] >= 16 * 64 * 4


def test_params_match_count_params(result):
    got = rows_by(result)
    lora8 = train.count_params(attached(common.LoRA(r=8)))[0]
    for ckpt in (False, True):
        assert got[("lora-r8", ckpt)]["trainable_params"] == lora8
        assert got[("lora-r1", ckpt)]["trainable_params"] == train.count_params(attached(common.LoRA(r=1)))[0]
        if HAVE_PEFT:  # same targets, r, alpha, dropout: the same trainable tensors
            assert got[("peft-lora-r8", ckpt)]["trainable_params"] == lora8
        # stage rows are measured in their stage
        assert got[("g2r2-warmup", ckpt)]["method_stage"] == "warmup"
        refine = got[("g2r2-refine", ckpt)]
        assert refine["method_stage"] == "refine"
        assert refine["trainable_params"] == refine["adapter_params_end"] < refine["adapter_params_start"]
        assert refine["retained_modules"] == 2  # ceil(p_f · M) = ceil(0.2 · 10): 2 layers x 5 targets
        s2 = got[("pilora-s2", ckpt)]
        assert s2["method_stage"] == "stage2" and s2["trainable_params"] == s2["pilora_params"]
        assert got[("taso-r8", ckpt)]["trainable_params"] == got[("taso-r8", ckpt)]["taso_params"]
        assert got[("taso-r8", ckpt)]["calib_batches"] == 2 and got[("taso-r8", ckpt)]["importance_time_s"] > 0
        assert got[("spsft-r128", ckpt)]["trainable_params"] == got[("spsft-r128", ckpt)]["spsft_params"]


def test_report_renders(result, tmp_path):
    md_path = tmp_path / "B.md"
    (tmp_path / "B.md").write_text(f"old\n{report.BEGIN}\nhand-written analysis\n{report.END}\n")
    md = report.main([result["path"], "--out", str(md_path), "--png_dir", str(tmp_path)])
    assert md == md_path.read_text()
    assert "hand-written analysis" in md and "old" not in md.split("\n")[0]
    assert "GPU tables: still to be measured" in md and "not measured (no GPU)" in md
    line = next(l for l in md.splitlines() if l.startswith("| `lora-r8` |"))
    assert f"{rows_by(result)[('lora-r8', False)]['trainable_params']:,}" in line
    assert "| `g2r2-refine` |" in md and "G²R² refinement step time" in md
    assert result["command"] in md and result["torch"] in md


def test_cpu_peak_delta_counts_allocations():
    n = 1 << 20

    def fn():
        a = torch.ones(n)       # 4 MiB alive
        b = torch.ones(n // 2)  # + 2 MiB: the peak
        del a, b
        return torch.ones(n // 4)  # 1 MiB left at the end

    peak, out = efficiency.cpu_peak_delta(fn)
    assert 6 * 2 ** 20 <= peak < 7 * 2 ** 20 and out.numel() == n // 4


def test_saved_tensor_hooks_count_activations_not_parameters():
    w = torch.nn.Parameter(torch.randn(8, 32))
    model = torch.nn.Module()
    model.w = w
    x = torch.randn(16, 32)
    sink = {}
    with efficiency.saved_tensor_hooks(model, sink):
        y = F.linear(x, w).relu()  # saves x (for dW) and the relu output; w itself is not counted
    y.sum().backward()
    assert sum(sink.values()) == x.numel() * 4 + 16 * 8 * 4


def test_bad_row_name_is_a_clear_error():
    with pytest.raises(SystemExit):
        efficiency.parse_args(["--rows", "nope"])


def test_cut_cost_undoes_each_cut_and_restores_it(tmp_path):
    """bench/cut_cost.py: its undone dropout computes what the cut computes (same draws on CPU, same values
    and gradients), so the timing compares equal math; a run on tiny-llama gives every variant a positive
    median and leaves common.dropout_linear as it was; report.py renders the table."""
    import cut_cost
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(3, 16, requires_grad=True)
    drop = torch.nn.Dropout(0.3)
    outs = []
    for fn in (common.dropout_linear, cut_cost.kept_dropout_linear):
        torch.manual_seed(4)
        y, = fn(x, drop, w)
        outs.append((y, *torch.autograd.grad(y.square().sum(), [x, w])))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    path = tmp_path / "cut-cost-x.json"
    rows = cut_cost.main(["--model", "tiny-llama", "--seq_len", "16", "--rows", "lora-r8", "--grad_ckpt", "off",
                          "--steps", "2", "--warmup_steps", "1", "--json", str(path)])
    assert common.dropout_linear is cut_cost.CUT
    med = rows[0]["median_s"]
    assert {"ours", "nn.Dropout", "HF loss", "both undone"} <= set(med) and min(med.values()) > 0
    assert ("peft-lora-r8" in med) == HAVE_PEFT and rows[0]["vs_ours"]["ours"] == 1.0
    lines = report.cut_cost_section([str(path)])
    assert lines[0].startswith("### What the memory cuts cost") and any(x.startswith("| `lora-r8`") for x in lines)


def test_g2r2_model_is_freed_without_a_gc_pass():
    """bench/gpu_check.sh's rows must not inflate each other: after an exact-scoring G²R² step (the model's
    forward pre-hook and the layers' capture sinks armed), dropping the model and the method frees the model by
    reference counting alone (no model <-> method cycle left for a gc pass to find)."""
    import gc
    import weakref
    import g2r2
    model = models.build_tiny("tiny-llama")
    method = g2r2.G2R2(r=4, total_steps=10, warmup=5, prune=2, micro_batches=1)
    method.attach(model, [])
    ids = torch.randint(0, 260, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    method.after_backward(0)
    method.after_step(0)
    assert any(L.sink is not None for L in method.layers)  # the capture is armed for the next step
    ref = weakref.ref(model)
    gc.collect()
    gc.disable()
    try:
        del model, method
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.skipif(not HAVE_PEFT, reason="its LoRA / PEFT pair needs peft (optional: pip install -r bench/requirements.txt)")
def test_gpu_check_runs_without_pytest(tmp_path):
    """bench/gpu_check.sh on CPU, small shape, the LoRA / PEFT pair in both modes, LoRA's 2-step train check, where
    `import pytest` fails: every part runs and exits 0, the CUDA tests go through bench/plain_tests.py, and each
    part writes its JSON (the GPU run takes the same path with every pair and method; the compiled pair ran in
    a manual CPU run, PAIRS="lora-r8+compile")."""
    import subprocess
    fake = tmp_path / "nopytest"
    fake.mkdir()
    (fake / "pytest.py").write_text("raise ImportError('no pytest on this machine')\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(fake), PYTHON=sys.executable, OUT=str(out), MODEL="llama-h128-l2-v512",
               SEQ="16", STEPS="2", BLOCK="1", WARMUP="1", PAIRS="lora-r8", TRAIN_METHODS="lora", TRAIN_STEPS="2",
               TOTAL_S="900", OMP_NUM_THREADS="1")  # one thread: a shared CPU's cores are 20x slower oversubscribed
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((out / "gpu-check-status.json").read_text())
    assert [(p["part"], p["rc"]) for p in status["parts"]] == [
        ("env", 0), ("tests", 0), ("pairs-off", 0), ("pairs-compile", 0), ("pairs-on", 0), ("train", 0)], status
    log = (out / "gpu-check.log").read_text()
    assert "pytest ABSENT" in log and "pinned" in log
    tests = json.loads((out / "tests.json").read_text())
    assert tests["counts"]["passed"] == 2 and tests["counts"]["failed"] == 0  # the CPU cases; CUDA ones skip
    check = json.loads((out / "train-check.json").read_text())
    lora, = check["methods"]
    assert check["all_ok"] and lora["method"] == "lora" and lora["resume_exact"] and len(lora["losses"]) == 2
    assert lora["dtypes"]["trainable"] == ["float32"] and lora["grad_ckpt"] and lora["dtype"] == "bf16"
    for mode in ("off", "on"):
        res, = [json.loads(p.read_text()) for p in out.glob(f"pairs-*-{mode}-*.json")]
        pair, = res["pairs"]
        assert "error" not in pair, pair
        assert (pair["row"], pair["baseline"], pair["grad_ckpt"]) == ("lora-r8", "peft-lora-r8", mode == "on")
        assert [len(b) for b in pair["a"]["step_times_s"]] == [1, 1] and pair["a"]["flop"] > 0
        assert pair["low"] <= pair["ratio"] <= pair["high"]
    assert json.loads(next(out.glob("pairs-*-compile-*.json")).read_text())["pairs"] == []  # PAIRS has no compiled row
    assert len(list(out.iterdir())) <= 7  # what comes back from the device


# ----------------------------------------------------------------- timed pairs (bench/efficiency.py pairs)

def test_bootstrap_ratio_by_hand():
    """Blocks where B takes exactly twice A: every resample gives 0.5, so the interval is [0.5, 0.5]; with one
    block of B slower the point ratio is the ratio of medians and the interval holds it."""
    a = [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    b = [[2 * t for t in blk] for blk in a]
    assert efficiency.bootstrap_ratio(a, b) == (0.5, 0.5, 0.5)
    b2 = [[2.0, 2.0], [4.0, 4.0], [9.0, 9.0]]
    point, low, high = efficiency.bootstrap_ratio(a, b2)
    assert point == 2.0 / 4.0 and low <= point <= high and low >= 1 / 3 and high <= 0.5


def test_against_needs_the_whole_interval():
    assert efficiency.against(0.9, 0.80, 0.89) == "met"
    assert efficiency.against(0.9, 0.85, 0.95) == "not resolved"
    assert efficiency.against(0.9, 0.91, 0.99) == "missed"
    assert efficiency.against(0.4, 0.41, 0.5, at_most=False) == "met"
    assert efficiency.against(None, 0.1, 0.2) is None


def test_twin_shares_the_frozen_weights():
    """A pair's two models hold the base weights once; replacing a module in one leaves the other alone."""
    base = models.build_tiny("tiny-llama")
    a, b = efficiency.twin(base), efficiency.twin(base)
    pa, pb, p0 = (dict(m.named_parameters()) for m in (a, b, base))
    assert all(pa[k] is p0[k] and pb[k] is p0[k] for k in p0)
    common.LoRA(r=2).attach(a)
    assert type(b.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert type(a.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"


def test_pair_runs_interleaved_blocks(monkeypatch):
    """run_pair times A×block, B×block, A×block, … (the order recorded by stand-in loops) and reports each
    row's median over all its steps."""
    order = []

    class Stub:
        def __init__(self, name):
            self.name, self.warmup_s, self.trainable = name, 0.0, 1
            self.model, self.opt = torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters())

        def step(self):
            order.append(self.name)
    monkeypatch.setattr(efficiency, "pair_loop", lambda name, *a: Stub(name))
    monkeypatch.setattr(efficiency, "counted_flop", lambda *a: (None, None))
    opts = efficiency.pairs_args(["--steps", "6", "--block", "2", "--model", "tiny-llama", "--out", "x.json"])
    base = torch.nn.Linear(2, 2)
    pair = efficiency.PAIRS[0]
    res = efficiency.run_pair(pair, base, {}, 16, False, opts, "cpu", [])
    a, b = pair[1], pair[2]
    assert order == [a, a, b, b] * 3
    assert [len(x) for x in res["a"]["step_times_s"]] == [2, 2, 2] and res["a"]["steps"] == 6
    assert res["verdict"] in ("met", "missed", "not resolved")


def test_a_failing_row_is_recorded_and_the_suite_goes_on(monkeypatch, tmp_path):
    """efficiency.main: a row that raises, and one that runs past --row_timeout, each become a row with its error;
    the rows after them still run, and the JSON holds all of them (run_row stands in: no model is built)."""
    import time

    def run_row(name, model, seq, *a):
        if name == "lora-r1":
            raise KeyError("boom")
        if name == "lora-r8-qkvud":
            time.sleep(60)
        return {"row": name, "model": model, "seq_len": seq, "grad_ckpt": False, "trainable_params": 1,
                "step_time_median_s": 1.0, "aux_bytes": 0, "attach_s": 0.0}
    monkeypatch.setattr(efficiency, "run_row", run_row)
    out = tmp_path / "r.json"
    t0 = time.time()
    res = efficiency.main(["--model", "tiny-llama", "--seq_len", "8", "--grad_ckpt", "off", "--rows", "lora-r1",
                           "lora-r8-qkvud", "lora-r8", "--row_timeout", "2", "--out", str(out)])
    assert time.time() - t0 < 30
    rows = json.loads(out.read_text())["rows"]
    assert rows == res["rows"] and [r["row"] for r in rows] == ["lora-r1", "lora-r8-qkvud", "lora-r8"]
    assert rows[0]["error"].startswith("KeyError: 'boom' at test_bench.py")
    assert rows[1]["error"] == "RowTimeout: timed out after 2 s"
    assert "error" not in rows[2] and rows[2]["row_s"] < 2


def test_checkpointing_on_older_transformers():
    """The GPU machine's transformers (5.17) has only gradient_checkpointing_enable; 5.23 names it
    activation_checkpointing_enable. models.enable_checkpointing asks each for non-reentrant checkpointing."""
    calls = []

    class Old:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("gradient", gradient_checkpointing_kwargs))

    class New(Old):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("activation", activation_checkpointing_kwargs))
    models.enable_checkpointing(Old())
    models.enable_checkpointing(New())
    assert calls == [("gradient", {"use_reentrant": False}), ("activation", {"use_reentrant": False})]
    model = models.build_tiny("tiny-llama")
    models.enable_checkpointing(model)
    assert model.is_gradient_checkpointing


def hand_run(device, rows, date="2026-12-04 17:09 UTC"):
    """A bench/efficiency.py JSON made by hand: rows given as (name, grad_ckpt, aux MiB, step ms)."""
    mib = 2 ** 20
    return {"suite": "main", "device": device, "device_name": "NVIDIA H200" if device == "cuda" else "cpu",
            "torch": "2.11.0", "transformers": "5.17.0", "peft": None, "python": "3.12.3", "date": date,
            "command": "python bench/efficiency.py (by hand)", "load_avg": [0.0, 0.0, 0.0], "wall_s": 1.0,
            "settings": {"epoch_examples": 1000, "steps": 3, "warmup_steps": 2},
            "rows": [{"row": n, "model": "llama-7b-shape", "seq_len": 2048, "grad_ckpt": c, "pair": None,
                      "micro_batch_size": 1, "dtype": "bf16", "trainable_params": 10, "total_params": 1000,
                      "peak_bytes": (100 + aux) * mib, "model_bytes": 100 * mib, "aux_bytes": aux * mib,
                      "saved_bytes": None, "step_time_median_s": t / 1e3, "step_time_mean_s": t / 1e3,
                      "tokens_per_s": 2048e3 / t, "mfu": 0.1 if device == "cuda" else None, "attach_s": 0.1}
                     for n, c, aux, t in rows]}


def test_report_says_which_gpu_rows_were_not_run(tmp_path):
    """A GPU JSON holding only some rows (the first H200 run's case): bench/report.py renders, names the device from
    the JSON, judges the targets whose rows ran, and says "not measured (row not run: ...)" for the others in the
    CPU table's GPU column, in the CUDA targets and in the banner."""
    cpu = hand_run("cpu", [(n, c, 50, 100) for n in ("lora-r8", "peft-lora-r8", "taso-r8", "lora-r1")
                           for c in (False, True)])
    gpu = hand_run("cuda", [("lora-r8", True, 8, 90), ("peft-lora-r8", True, 10, 100), ("taso-r8", False, 5, 50)])
    paths = []
    for name, run in (("main-cpu.json", cpu), ("main-gpu.json", gpu)):
        paths.append(str(tmp_path / name))
        (tmp_path / name).write_text(json.dumps(run))
    md = report.main(paths + ["--out", str(tmp_path / "B.md"), "--results", str(tmp_path / "R.md"), "--png_dir", ""])
    assert "still to be measured" not in md and "**GPU tables: partly measured, on NVIDIA H200**" in md
    assert "GPU (NVIDIA H200, llama-7b-shape, seq 2048)" in md and "H100, 7B shape" not in md
    time8 = next(x for x in md.splitlines() if x.startswith("| Our LoRA ≤ 1.00× PEFT LoRA, time (r = 8) |"))
    assert time8.endswith("| no checkpointing: not measured (row not run: `lora-r8`, `peft-lora-r8`); "
                          "checkpointing: 0.90× **met** |")
    taso = next(x for x in md.splitlines() if x.startswith("| TASO step ≤ LoRA r = 1 step |"))
    assert taso.endswith("| no checkpointing: not measured (row not run: `lora-r1`); checkpointing: not measured "
                         "(row not run: `taso-r8`, `lora-r1`) |")
    mfu = next(x for x in md.splitlines() if x.startswith("| LoRA-step MFU"))
    assert mfu.endswith("| no checkpointing: not measured (row not run: `lora-r8`); checkpointing: 10.0 % **missed** |")
    assert "**Not run on the GPU**" in md and "`lora-r1`" in md.split("**Not run on the GPU**")[1].split("\n")[0]


def test_report_train_check_table_shows_an_error_row(tmp_path):
    """bench/gpu_train_check.py's JSON becomes the "Training check on the GPU" table: a resumed method with its
    diffs and dtypes, and a method that failed with its error (a | in it escaped) instead of numbers."""
    run = hand_run("cuda", [("lora-r8", True, 8, 90)])
    ok = {"method": "lora", "flags": [], "dtypes": {"frozen": ["bfloat16"], "trainable": ["float32"],
                                                     "inv_freq": ["float32"], "device": ["cuda"]},
          "resume_exact": True, "resume_ok": True, "dtypes_ok": True, "resume_loss_diff": 0.0,
          "resume_tensor_diff": 0.0, "again_loss_diff": 0.0, "again_tensor_diff": 1e-7,
          "trainable_params_start": 16384, "trainable_params_end": 16384, "step_time_s": 0.07,
          "peak_memory_bytes": 64 * 2 ** 20}
    bad = {"method": "pilora", "error": "TypeError: can't convert a | b", "traceback": "...", "wall_s": 0.7}
    check = {"check": "train", "device": "cuda", "device_name": "NVIDIA H200", "torch": "2.11.0",
             "transformers": "5.17.0", "model": "tiny-llama", "dtype": "bf16", "steps": 6, "wall_s": 25.0,
             "all_ok": False, "methods": [ok, bad]}
    status = {"parts": [{"part": "train", "rc": 1, "s": 34}, {"part": "7b-ckpt", "rc": 124, "s": 100}],
              "total_s": 138, "model": "llama-7b-shape", "seq_len": 2048, "stamp": "20261204-170825"}
    files = {"main-gpu.json": run, "gpu-train-check-h200-20261204-170825.json": check,
             "gpu-check-status-h200-20261204-170825.json": status}
    for name, d in files.items():
        (tmp_path / name).write_text(json.dumps(d))
    md = report.main([str(tmp_path / n) for n in files] + ["--out", str(tmp_path / "B.md"), "--png_dir", ""])
    lines = md.split("## Training check on the GPU (`bench/gpu_train_check.py`)")[1].splitlines()
    assert any("train exit 1 (34 s), 7b-ckpt TIMED OUT (100 s); 138 s in all" in x for x in lines)
    lora = next(x for x in lines if x.startswith("| `lora` |"))
    assert lora.startswith("| `lora` | 20261204-170825 | yes | 0 / 0 | 0 / 1e-07 | bfloat16 / float32 / float32 | "
                           "16,384 → 16,384 | 70.0 | 64.0 |")
    pilora = next(x for x in lines if x.startswith("| `pilora` |"))
    assert "**error**: TypeError: can't convert a \\| b |" in pilora and "yes" not in pilora

