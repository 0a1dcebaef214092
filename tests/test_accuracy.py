"""bench/accuracy.py: a tiny sweep writes the documented JSON, the cache skips finished runs, a killed run
resumes to the numbers of an uninterrupted one; the statistics and the tie rule against hand values."""
import json
import os
import random
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import accuracy  # noqa: E402
import report  # noqa: E402
import train  # noqa: E402


def glue_dir(tmp_path):
    """A GLUE-layout SST-2 folder (train.tsv, dev.tsv) with a learnable word → label rule."""
    d = tmp_path / "SST-2"
    d.mkdir()
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 16)):
        with open(d / f"{split}.tsv", "w") as f:
            f.write("sentence\tlabel\n")
            for i in range(n):
                y = rng.randint(0, 1)
                f.write(f"{'good fine' if y else 'bad poor'} film {i}\t{y}\n")
    return str(d)


def sweep_argv(data, runs_dir, out_json):
    return ["--model", "tiny-bert", "--data", data, "--rows", "lora-r8", "g2r2", "--seeds", "0", "1",
            "--max_steps", "3", "--batch_size", "4", "--micro_batch_size", "4", "--save_every", "1",
            "--runs_dir", str(runs_dir), "--json", str(out_json)]


def test_sweep_json_cache_and_resume(tmp_path, monkeypatch):
    data = glue_dir(tmp_path)
    out = accuracy.main(sweep_argv(data, tmp_path / "runs", tmp_path / "a.json"))
    saved = json.load(open(tmp_path / "a.json"))
    for key in ("command", "versions", "machine", "rows", "seeds", "primary_metric", "date"):
        assert key in saved
    assert saved["primary_metric"] == "accuracy" and list(saved["rows"]) == ["lora-r8", "g2r2-pf0.2"]
    for name, row in saved["rows"].items():
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        for r in row["runs"]:
            assert r["steps"] == 3 and len(r["losses"]) == 3 and not r["cached"]
            assert {"before", "after"} <= set(r["metrics"]) and r["trainable_params_start"] > 0
        st = row["stats"]
        accs = [r["metrics"]["after"]["accuracy"] for r in row["runs"]]
        assert st["after"]["accuracy"][0] == pytest.approx(sum(accs) / 2)
        assert {"step_time_ratio", "trainable_params_end_ratio", "wall_s"} <= set(st)
    ref_end = [r["trainable_params_end"] for r in saved["rows"]["lora-r8"]["runs"]]
    g_end = [r["trainable_params_end"] for r in saved["rows"]["g2r2-pf0.2"]["runs"]]
    assert saved["rows"]["g2r2-pf0.2"]["stats"]["trainable_params_end_ratio"] == pytest.approx(sum(g_end) / sum(ref_end))
    assert "accuracy" in saved["rows"]["g2r2-pf0.2"]["verdict"]

    # RESULTS.md from that JSON: the command, one line per row, the verdict column
    md = tmp_path / "RESULTS.md"
    report.main([str(tmp_path / "a.json"), "--results", str(md), "--out", str(tmp_path / "B.md"), "--png_dir", ""])
    text = md.read_text()
    assert saved["command"] in text and "`lora-r8` | " in text and "`g2r2-pf0.2` | " in text
    assert "(reference)" in text and "vs lora-r8" in text
    g = saved["rows"]["g2r2-pf0.2"]["stats"]["after"]["accuracy"]
    assert report.pm(g) in text

    # a second call with the same command trains nothing
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("a cached run was trained again"))
    again = accuracy.main(sweep_argv(data, tmp_path / "runs", tmp_path / "b.json"))
    assert all(r["cached"] for row in again["rows"].values() for r in row["runs"])
    monkeypatch.undo()

    # kill one run after step 1 (its checkpoint exists, its result does not), then rerun the sweep
    args = accuracy.parse_args(sweep_argv(data, tmp_path / "runs2", tmp_path / "c.json"))
    _, _, runs = accuracy.plan(args)
    name, seed, argv = runs[1]  # g2r2, seed 0: the one with a stage change inside the run
    run_dir = os.path.join(args.runs_dir, accuracy.run_key(argv))
    stopped = train.main(argv + ["--output_dir", run_dir, "--save_every", "1", "--stop_after", "1"])
    assert stopped["stopped_at"] == 1 and os.path.exists(os.path.join(run_dir, "ckpt.pt"))
    resumed = accuracy.main(sweep_argv(data, tmp_path / "runs2", tmp_path / "c.json"))
    r1 = next(r for r in resumed["rows"]["g2r2-pf0.2"]["runs"] if r["seed"] == 0)
    r0 = next(r for r in out["rows"]["g2r2-pf0.2"]["runs"] if r["seed"] == 0)
    assert r1["resumed"] and not r0["resumed"]
    assert r1["losses"] == r0["losses"]
    assert accuracy.flat(r1["metrics"]["after"]) == accuracy.flat(r0["metrics"]["after"])  # flat drops *time_s
    assert accuracy.flat(r1["metrics"]["before"]) == accuracy.flat(r0["metrics"]["before"])
    assert r1["trainable_params_end"] == r0["trainable_params_end"]


def test_mean_std_and_tie_rule_by_hand():
    m, s = accuracy.mean_std([0.8, 0.9, 0.7])
    assert m == pytest.approx(0.8) and s == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0.01) / 2)
    assert accuracy.mean_std([0.5]) == (0.5, None)
    ref = (0.80, 0.10)
    assert accuracy.verdict((0.85, 0.02), ref) == "tie"        # 0.05 < max(0.02, 0.10)
    assert accuracy.verdict((0.95, 0.02), ref) == "better"     # 0.15 ≥ 0.10
    assert accuracy.verdict((0.59, 0.20), ref) == "worse"      # 0.21 ≥ 0.20
    assert accuracy.verdict((1.5, 0.1), (2.0, 0.1), higher_is_better=False) == "better"  # a loss
    assert accuracy.verdict((0.9, None), ref) is None          # one seed: no spread, no verdict


def test_spsft_rows_match_lora_r8_by_hand():
    # MiniLM-L6's six targets per layer: four 384×384, intermediate 1536×384, output 384×1536
    shapes = [(384, 384)] * 4 + [(1536, 384), (384, 1536)]
    rows = accuracy.spsft_rows(shapes)
    assert rows == 16  # 8·(4·768 + 2·1920) / (4·384 + 384 + 1536) = 55296 / 3456
    assert rows * sum(i for _, i in shapes) == 8 * sum(o + i for o, i in shapes)
    # tiny-bert (hidden 64, MLP 128, 2 layers), read from the config on the meta device
    assert accuracy.target_shapes("tiny-bert", "cls") == ([(64, 64)] * 4 + [(128, 64), (64, 128)]) * 2


def test_flat_keeps_numeric_leaves_only():
    m = {"accuracy": 0.5, "eval_time_s": 3.0,
         "commonsense_loglik": {"boolq": 0.6, "average": 0.55, "n": {"boolq": 10}, "mode": "loglik"}}
    assert accuracy.flat(m) == {"accuracy": 0.5, "commonsense_loglik.boolq": 0.6, "commonsense_loglik.average": 0.55}
