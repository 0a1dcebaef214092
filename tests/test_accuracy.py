"""bench/accuracy.py: a tiny sweep writes the documented JSON, the cache skips finished runs, a killed run
resumes to the numbers of an uninterrupted one; the statistics and the tie rule against hand values."""
import importlib.util
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


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="bench/accuracy.py's t-interval needs scipy (not in requirements.txt)")
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
    assert all("code" in r for r in saved["cache"].values())  # which checkout each run trained from (None: no git)
    c = saved["paired"]["g2r2-pf0.2"][0]  # 2 seeds paired with the reference, both sides with predictions
    assert c["against"] == "lora-r8" and c["seeds"] == [0, 1] and c["t"] and c["boot"] and c["verdict"]
    # every dev-set run keeps its per-example predictions; the JSON keeps the dev labels once, read from dev.tsv
    gold = [int(ln.rsplit("\t", 1)[1]) for ln in open(os.path.join(data, "dev.tsv")).read().splitlines()[1:]]
    assert accuracy.unpack(saved["dev_gold"]) == gold
    for row in saved["rows"].values():
        for r in row["runs"]:
            pred = accuracy.unpack(saved["cache"][accuracy.run_key(r["argv"])]["dev_pred"])
            assert len(pred) == len(gold) and "dev_pred" not in r
            assert r["metrics"]["after"]["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / len(gold))

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
    assert r0["train_flop"] > 0 and r1["train_flop"] is None  # a resumed run counted only its second part


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="bench/accuracy.py's t-interval needs scipy (not in requirements.txt)")
def test_backfilled_runs_keep_what_they_replace_and_the_report_says_which_moved(tmp_path):
    """Two finished runs without predictions (as made before they were kept; seed 1's as if it had scored 0.123
    from another commit): --backfill_predictions trains both again, each keeps the earlier metrics and code in
    rerun_of, and RESULTS.md's line counts seed 0 as reproduced (a bit-exact rerun) and names seed 1."""
    import shutil
    data = glue_dir(tmp_path)
    argv = sweep_argv(data, tmp_path / "runs", tmp_path / "a.json")
    argv[argv.index("--rows") + 1:argv.index("--seeds")] = ["lora-r8"]
    first = accuracy.main(argv)
    saved = json.load(open(tmp_path / "a.json"))
    keys = [accuracy.run_key(r["argv"]) for r in first["rows"]["lora-r8"]["runs"]]
    for k in keys:
        del saved["cache"][k]["dev_pred"]
    saved["cache"][keys[1]]["metrics"]["after"]["accuracy"] = 0.123
    saved["cache"][keys[1]]["code"] = {"commit": "0" * 40, "dirty": False}
    json.dump(saved, open(tmp_path / "a.json", "w"))
    shutil.rmtree(tmp_path / "runs")  # their run folders are gone too: trained from scratch
    again = accuracy.main(argv + ["--backfill_predictions"])
    r0, r1 = again["rows"]["lora-r8"]["runs"]
    assert not r0["cached"] and not r1["cached"]
    assert r0["rerun_of"]["metrics"] == first["rows"]["lora-r8"]["runs"][0]["metrics"]
    assert r0["metrics"]["after"]["accuracy"] == r0["rerun_of"]["metrics"]["after"]["accuracy"]
    assert r1["rerun_of"]["metrics"]["after"]["accuracy"] == 0.123 and r1["rerun_of"]["code"]["commit"] == "0" * 40
    assert all("dev_pred" in again["cache"][k] for k in keys)
    line = report.reruns_line(again)
    assert "2 runs, 1 of which reproduce the earlier run's accuracy exactly; 1 do not" in line
    assert f"`lora-r8` seed 1 0.1230 → {r1['metrics']['after']['accuracy']:.4f} (code 0000000 → " in line
    assert "not reproducible" not in line
    r1["rerun_of"]["code"] = r1["code"] = {"commit": "a" * 40}  # the same commit twice, a different score
    assert "**1 of them ran the same commit twice: not reproducible.**" in report.reruns_line(again)
    r1["code"] = {"commit": "a" * 40, "dirty": True}  # edited files on that commit: not the same code
    assert "not reproducible" not in report.reruns_line(again)
    # a sweep without reruns says nothing
    assert report.reruns_line(first) is None


def test_training_flop_grows_with_the_steps_and_leaves_out_the_evaluations(tmp_path):
    """Twice the optimizer steps on batches of one length (the hand-made sentences): exactly twice the training
    FLOP; the before / after evaluations (the same in both runs) are not in it, or the ratio would be below 2."""
    data = glue_dir(tmp_path)
    flop = {}
    for k in (3, 6):
        argv = ["--model", "tiny-bert", "--data", data, "--method", "lora", "--max_steps", str(k), "--batch_size", "4",
                "--micro_batch_size", "4", "--seed", "0"]
        flop[k] = accuracy.run_one(argv, str(tmp_path / "runs"), 100)[0]["train_flop"]
    assert flop[3] > 0 and flop[6] == 2 * flop[3]


def test_mean_std_by_hand():
    m, s = accuracy.mean_std([0.8, 0.9, 0.7])
    assert m == pytest.approx(0.8) and s == pytest.approx(0.1)  # sample std: sqrt((0.01 + 0.01) / 2)
    assert accuracy.mean_std([0.5]) == (0.5, None)


# ----------------------------------------------------------------------------- issue 34: paired verdicts

@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="bench/accuracy.py's t-interval needs scipy (not in requirements.txt)")
def test_t_interval_by_hand():
    # d = 0.01, 0.02, 0.03: mean 0.02, sd 0.01, se 0.01 / √3 = 0.0057735; t(0.975, 2 df) = 4.302653 (printed tables)
    m, lo, hi = accuracy.t_interval([0.01, 0.02, 0.03])
    half = 4.302653 * 0.01 / 3 ** 0.5  # 0.024841
    assert m == pytest.approx(0.02) and lo == pytest.approx(0.02 - half, abs=1e-6) and hi == pytest.approx(0.02 + half, abs=1e-6)
    assert (lo, hi) == pytest.approx((-0.004841, 0.044841), abs=1e-6)
    # 5 differences: t(0.975, 4) = 2.776445
    d = [0.5, -0.1, 0.3, 0.2, 0.1]  # mean 0.2, sd sqrt(0.2 / 4) = 0.223607
    assert accuracy.t_interval(d)[2] == pytest.approx(0.2 + 2.776445 * 0.223607 / 5 ** 0.5, abs=1e-5)
    assert accuracy.t_interval([0.3]) == (0.3, None, None)


def test_weighted_metric_equals_the_metric_of_an_explicit_resample():
    """One bootstrap replicate as counts == evaluate.py's metric on the resampled lists (its own loops)."""
    import evaluate
    import numpy as np
    rng = random.Random(1)
    n = 60
    idx = [rng.randrange(n) for _ in range(n)]  # one resample, with replacement
    w = np.bincount(idx, minlength=n)[None]
    pred3, gold3 = [rng.randrange(3) for _ in range(n)], [rng.randrange(3) for _ in range(n)]
    x, y = [rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]
    y = [a + b for a, b in zip(x, y)]  # correlated
    pick = lambda v: [v[i] for i in idx]  # noqa: E731
    assert accuracy.weighted_metric("accuracy", w, pred3, gold3)[0] == pytest.approx(evaluate.accuracy(pick(pred3), pick(gold3)))
    assert accuracy.weighted_metric("matthews", w, pred3, gold3)[0] == pytest.approx(evaluate.matthews(pick(pred3), pick(gold3)))
    p2, g2 = [v % 2 for v in pred3], [v % 2 for v in gold3]
    assert accuracy.weighted_metric("matthews", w, p2, g2)[0] == pytest.approx(evaluate.matthews(pick(p2), pick(g2)))
    assert accuracy.weighted_metric("pearson", w, x, y)[0] == pytest.approx(evaluate.pearson(pick(x), pick(y)))
    assert accuracy.weighted_metric("matthews", w, [1] * n, g2)[0] == 0.0  # undefined (a constant): 0, as evaluate
    assert accuracy.weighted_metric("pearson", w, [2.0] * n, y)[0] == 0.0


def test_bootstrap_width_matches_the_paired_standard_error():
    """Accuracy of one seed: the paired bootstrap's 95 % interval ≈ mean ± 1.96 · sd(d_i) / √n, d_i the per-example
    difference of correctness (the normal approximation, computed here by hand)."""
    rng = random.Random(2)
    n = 800
    gold = [rng.randrange(2) for _ in range(n)]
    ref = [g if rng.random() < 0.75 else 1 - g for g in gold]
    row = [g if rng.random() < 0.80 else 1 - g for g in gold]
    d = [(a == g) - (b == g) for a, b, g in zip(row, ref, gold)]
    mean = sum(d) / n
    se = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5 / n ** 0.5
    lo, hi = accuracy.bootstrap_interval("accuracy", [row], [ref], gold)
    assert (lo + hi) / 2 == pytest.approx(mean, abs=0.25 * se)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert accuracy.bootstrap_interval("accuracy", [ref], [ref], gold) == (0.0, 0.0)


def paired_run(preds, gold, metric="accuracy"):
    """A sweep JSON by hand: rows {name: [per-seed predictions]}, scored with evaluate.py's metric; the cache holds
    each run's predictions (keyed by its argv, as accuracy.main writes it)."""
    import evaluate
    rows, cache = {}, {}
    for name, per_seed in preds.items():
        runs = []
        for seed, p in enumerate(per_seed):
            argv = ["--row", name, "--seed", str(seed)]
            score = getattr(evaluate, metric)(p, gold)
            runs.append({"seed": seed, "argv": argv, "metrics": {"after": {metric: score}}})
            if p is not None:
                cache[accuracy.run_key(argv)] = {"dev_pred": accuracy.pack(p)}
        rows[name] = {"runs": runs}
    return {"reference": "lora-r8", "primary_metric": metric, "rows": rows, "cache": cache,
            "dev_gold": accuracy.pack(gold)}


def fixed(gold, correct_idx):
    """Predictions right exactly on the examples in correct_idx."""
    return [g if i in correct_idx else 1 - g for i, g in enumerate(gold)]


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="bench/accuracy.py's t-interval needs scipy (not in requirements.txt)")
def test_paired_verdicts_on_hand_made_runs():
    rng = random.Random(3)
    n = 400
    gold = [rng.randrange(2) for _ in range(n)]
    base = [set(rng.sample(range(n), 300)) for _ in range(3)]  # the reference: 300 of 400 right, per seed
    ref = [fixed(gold, b) for b in base]
    wrong = [sorted(set(range(n)) - b) for b in base]
    better = [fixed(gold, b | set(w[:40])) for b, w in zip(base, wrong)]  # +40 examples right in every seed: +0.10
    worse = [fixed(gold, set(sorted(b)[40:])) for b in base]  # 40 fewer: −0.10
    run = paired_run({"lora-r8": ref, "same": [list(p) for p in ref], "taso": better, "taso-random": worse}, gold)

    same = accuracy.compare(run, "same")  # identical runs: an interval around 0, no verdict
    assert same["diff"] == 0 and same["t"] == [0, 0] and same["boot"] == [0, 0]
    assert same["verdict"] == "no difference shown"
    up = accuracy.compare(run, "taso")  # a constant shift: the right sign
    assert up["diff"] == pytest.approx(0.10) and up["boot"][0] > 0 and up["verdict"] == "better"
    down = accuracy.compare(run, "taso-random")
    assert down["diff"] == pytest.approx(-0.10) and down["boot"][1] < 0 and down["verdict"] == "worse"
    # an ablation is also compared with its own method: taso-random vs taso is −0.20
    c = accuracy.comparisons(run)["taso-random"]
    assert [x["against"] for x in c] == ["lora-r8", "taso"] and c[1]["diff"] == pytest.approx(-0.20)
    assert c[1]["verdict"] == "worse"
    assert [x["against"] for x in accuracy.comparisons(run)["lora-r8"]] == []

    # 12 examples gained and 10 (or 9) lost per seed: the seeds agree on a small gain (t excludes 0), the dev
    # sample does not settle it (22 discordant examples a seed)
    tiny = [fixed(gold, (b - set(sorted(b)[:k])) | set(w[:12])) for b, w, k in zip(base, wrong, (10, 10, 9))]
    run = paired_run({"lora-r8": ref, "g2r2-pf0.7": tiny}, gold)
    c = accuracy.compare(run, "g2r2-pf0.7")
    assert c["t"][0] > 0 and c["boot"][0] <= 0 and c["verdict"] == "no difference shown"
    assert accuracy.paired_verdict([c["t"]]) == "better"  # the t-interval alone would have said so

    # runs without predictions: the t-interval alone, and the JSON says why
    run = paired_run({"lora-r8": ref, "taso": better}, gold)
    del run["cache"][accuracy.run_key(["--row", "taso", "--seed", "1"])]
    c = accuracy.compare(run, "taso")
    assert c["boot"] is None and "predictions" in c["boot_missing"] and c["verdict"] == "better"
    # one seed: no interval, no verdict; a loss is better when lower
    one = paired_run({"lora-r8": ref[:1], "taso": better[:1]}, gold)
    assert accuracy.compare(one, "taso")["verdict"] is None
    assert accuracy.paired_verdict([(-0.3, -0.1)], higher_is_better=False) == "better"
    assert accuracy.paired_verdict([(0.1, 0.3), (-0.1, 0.3)]) == "no difference shown"


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


# ----------------------------------------------------------------------------- issue 25

def hand_run(ref_after, before, constant, metric="pearson"):
    """A sweep JSON by hand: lora-r8 (reference) and taso, 3 seeds each, taso clearly above the reference."""
    def row(after, name):
        runs = [{"seed": s, "argv": [name, str(s)], "metrics": {"after": {metric: after + (s - 1) * 0.01}}}
                for s in range(3)]
        return {"runs": runs, "stats": {"before": {metric: (before, 0.01)}, "after": {metric: (after, 0.01)}}}
    rows = {"lora-r8": row(ref_after, "lora-r8"), "taso": row(ref_after + 0.1, "taso")}  # +0.1 in every seed
    return {"command": "python bench/accuracy.py ...", "model": "m", "data": "d/STS-B", "seeds": [0, 1, 2],
            "reference": "lora-r8", "primary_metric": metric, "base_argv": ["--epochs", "3", "--lr", "0.001"],
            "fills": {}, "date": "2026-12-04", "machine": {"device": "cpu", "cpu_count": 2},
            "versions": {"torch": "t", "transformers": "x"}, "trivial": {"constant": constant}, "rows": rows}


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="bench/accuracy.py's t-interval needs scipy (not in requirements.txt)")
def test_budget_rule_on_hand_made_jsons():
    # Pearson: the reference must beat max(untuned, constant 0) by 0.3
    assert accuracy.budget_rule(hand_run(0.35, 0.06, 0.0))["ok"] is False   # 0.35 < 0.06 + 0.3
    assert accuracy.budget_rule(hand_run(0.37, 0.06, 0.0))["ok"] is True    # 0.37 ≥ 0.36
    # accuracy: the better trivial predictor is the majority class here (0.68 > untuned 0.50), margin 0.10
    below = hand_run(0.75, 0.50, 0.68, "accuracy")
    assert accuracy.budget_rule(below).items() >= {"ok": False, "metric": "accuracy", "reference": 0.75,
                                                   "untuned": 0.50, "constant": 0.68, "trivial": 0.68,
                                                   "margin": 0.10}.items()
    assert accuracy.budget_rule(hand_run(0.79, 0.50, 0.68, "accuracy"))["ok"] is True
    # Matthews: +0.2 over max(untuned, 0)
    assert accuracy.budget_rule(hand_run(0.19, -0.02, 0.0, "matthews"))["ok"] is False
    assert accuracy.budget_rule(hand_run(0.21, -0.02, 0.0, "matthews"))["ok"] is True

    # the reference row still pending (a grid running): its finished dev-set runs decide, two seeds averaged
    pending = hand_run(0.0, 0.0, 0.0)
    pending["rows"]["lora-r8"] = {"runs": [], "stats": {"before": {}, "after": {}}}
    pending["budget_check"] = [{"lr": 1e-3, "seed": s, "metrics": {"before": {"pearson": 0.05},
                                                                   "after": {"pearson": p}}} for s, p in ((0, 0.3), (1, 0.36))]
    b = accuracy.budget_rule(pending)
    assert b["ok"] is False and b["reference"] == pytest.approx(0.33) and b["from_check"]  # 0.33 < 0.05 + 0.3
    pending["budget_check"][0]["metrics"]["after"]["pearson"] = 0.5
    assert accuracy.budget_rule(pending)["ok"] is True  # 0.43 ≥ 0.35

    text = "\n".join(report.accuracy_table(below))
    assert "budget too small to rank the methods" in text.lower() and "`trivial`" in text
    assert "better" not in text.replace("the better trivial", "") and "worse" not in text and "| tie" not in text
    above = "\n".join(report.accuracy_table(hand_run(0.95, 0.50, 0.68, "accuracy")))
    assert "budget too small" not in above.lower() and "| **better** +0.100 (t [+0.100, +0.100]) |" in above
    assert "rest on the t-interval over seeds alone" in above  # the hand-made runs kept no predictions


def test_carve_holds_out_part_of_train_only(tmp_path):
    for task, header in (("STS-B", ["a\tb\tscore"]), ("CoLA", [])):
        d = tmp_path / task
        d.mkdir()
        body = [f"s{i}\tx{i}\t{i % 5}" for i in range(40)]
        (d / "train.tsv").write_text("\n".join(header + body) + "\n")
        (d / "dev.tsv").write_text("never read\n")
        out = accuracy.carve(str(d), str(tmp_path / "carved"), 0.1)
        assert os.path.basename(out) == task
        tr = open(os.path.join(out, "train.tsv")).read().splitlines()
        va = open(os.path.join(out, "dev.tsv")).read().splitlines()
        assert tr[:len(header)] == header and va[:len(header)] == header
        tr, va = tr[len(header):], va[len(header):]
        assert len(va) == 4 and sorted(tr + va) == sorted(body) and not set(tr) & set(va)


def test_lr_choice_ignores_dev_set_and_committed_cache_runs_nothing(tmp_path, monkeypatch):
    """The same training file with the dev labels flipped (and dev made lopsided so the reported accuracy
    must differ) gives the same held-out scores and learning rate; the JSON alone replays the sweep."""
    data = glue_dir(tmp_path)
    flipped = tmp_path / "flipped" / "SST-2"
    flipped.mkdir(parents=True)
    (flipped / "train.tsv").write_text(open(os.path.join(data, "train.tsv")).read())
    dev = ["sentence\tlabel"] + [f"good fine film {i}\t1" for i in range(12)] + [f"bad poor film {i}\t0" for i in range(4)]
    open(os.path.join(data, "dev.tsv"), "w").write("\n".join(dev) + "\n")
    (flipped / "dev.tsv").write_text("\n".join(dev[:1] + [ln[:-1] + str(1 - int(ln[-1])) for ln in dev[1:]]) + "\n")

    def sweep(d, runs, out):
        return ["--model", "tiny-bert", "--data", str(d), "--rows", "lora-r8", "--seeds", "0", "--lr_grid", "0.3", "3",
                "--max_steps", "3", "--batch_size", "4", "--micro_batch_size", "4", "--max_samples", "0",
                "--val_frac", "0.25", "--runs_dir", str(runs), "--json", str(out)]
    a = accuracy.main(sweep(data, tmp_path / "ra", tmp_path / "a.json"))
    b = accuracy.main(sweep(flipped, tmp_path / "rb", tmp_path / "b.json"))
    ga, gb = a["lr_select"]["lora-r8"], b["lr_select"]["lora-r8"]
    assert [lr for lr, _ in ga["grid"]] == [0.0003, 0.003]
    assert ga["grid"] == gb["grid"] and ga["chosen"] == gb["chosen"]
    acc = lambda o: o["rows"]["lora-r8"]["runs"][0]["metrics"]["after"]["accuracy"]
    assert acc(a) == pytest.approx(1 - acc(b))  # the reported dev set is the flipped one
    assert acc(a) != pytest.approx(0.5)

    # another machine: no runs_dir, only the committed JSON -> the whole sweep, grid included, trains nothing
    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("a run in the committed JSON was trained"))
    again = accuracy.main(sweep(data, tmp_path / "fresh", tmp_path / "a.json"))
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    assert again["lr_select"]["lora-r8"]["grid"] == ga["grid"]
    assert all(r["cached"] for r in again["rows"]["lora-r8"]["runs"]) and acc(again) == acc(a)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="bench/accuracy.py's t-interval needs scipy (not in requirements.txt)")
def test_lr_grid_runs_row_by_row_and_tied_rows_take_their_partners_choice(tmp_path, monkeypatch):
    """--lr_grid: a row's grid, then its seeds, then the next row (a sweep cut short leaves whole rows);
    TASO has no grid of its own and trains at lora-r8's chosen rate, selected first even when listed first."""
    data, calls = glue_dir(tmp_path), []

    def fake_run_one(argv, runs_dir, save_every, cache=None, need_pred=False):
        lr = float(argv[argv.index("--lr") + 1])
        row = "spsft" if "spsft" in argv else "taso" if "taso" in argv else "lora"
        calls.append((row, lr, "--val_split" in argv, int(argv[argv.index("--seed") + 1])))
        score = {0.0003: 0.6, 0.001: 0.9, 0.003: 0.7}.get(lr, 0.5)  # lora's held-out best: factor 1
        return {"metrics": {"before": {"accuracy": 0.5}, "after": {"accuracy": score}}, "argv": argv}, False
    monkeypatch.setattr(accuracy, "run_one", fake_run_one)
    written = []  # the JSON after each run: its metric is known from the first grid run on
    monkeypatch.setattr(train, "write_json", lambda obj, path: written.append(obj["primary_metric"]))
    out = accuracy.main(["--model", "tiny-bert", "--data", data, "--rows", "taso", "lora-r8", "--seeds", "0", "1",
                         "--lr_grid", "0.3", "1", "3", "--json", str(tmp_path / "o.json"), "--runs_dir", str(tmp_path)])
    assert calls == [("lora", 0.0003, True, 0), ("lora", 0.001, True, 0), ("lora", 0.003, True, 0),
                     ("taso", 0.001, False, 0), ("taso", 0.001, False, 1),
                     ("lora", 0.001, False, 0), ("lora", 0.001, False, 1)]
    assert out["lr_select"]["taso"] == {"tied_to": "lora-r8", "chosen": 0.001}
    assert out["lr_select"]["lora-r8"]["grid"] == [[0.0003, 0.6], [0.001, 0.9], [0.003, 0.7]]
    assert written and set(written) == {"accuracy"}


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="bench/accuracy.py's t-interval needs scipy (not in requirements.txt)")
def test_a_best_at_the_grid_end_grows_the_grid_until_the_best_is_inside(tmp_path, monkeypatch):
    """A row whose held-out score is best at an end of a 3-factor grid gets the next factor past it (×3 up, or
    ×0.3 down), up to --lr_extend times; a choice inside the grid adds nothing. Hand-made held-out scores."""
    data, calls = glue_dir(tmp_path), []
    peak = {"spsft": 0.0018, "lora": 1e-5}  # spsft: best one step past the top end; lora: below every value

    def fake_run_one(argv, runs_dir, save_every, cache=None, need_pred=False):
        lr, row = float(argv[argv.index("--lr") + 1]), "spsft" if "spsft" in argv else "lora"
        calls.append((row, lr, "--val_split" in argv))
        score = 1 - abs(__import__("math").log(lr / peak[row]))  # highest at the row's peak
        return {"metrics": {"before": {"accuracy": 0.5}, "after": {"accuracy": score}}, "argv": argv}, False
    monkeypatch.setattr(accuracy, "run_one", fake_run_one)
    monkeypatch.setattr(train, "write_json", lambda obj, path: None)
    out = accuracy.main(["--model", "tiny-bert", "--data", data, "--rows", "spsft", "lora-r8", "--seeds", "0",
                         "--lr_grid", "0.3", "1", "3", "--json", str(tmp_path / "o.json"), "--runs_dir", str(tmp_path)])
    held = [(row, lr) for row, lr, val in calls if val]
    # spsft (centre 2e-4): 6e-5, 2e-4, 6e-4 -> best at the top -> 1.8e-3 (its peak, the new top) -> 5.4e-3
    assert held[:5] == [("spsft", 6e-05), ("spsft", 0.0002), ("spsft", 0.0006), ("spsft", 0.0018), ("spsft", 0.0054)]
    # lora (centre 1e-3): best at the bottom each time -> 9e-5, then 2.7e-5, then the limit (2) stops it
    assert held[5:] == [("lora", 0.0003), ("lora", 0.001), ("lora", 0.003), ("lora", 9e-05), ("lora", 2.7e-05)]
    sel = out["lr_select"]
    assert sel["spsft"]["chosen"] == 0.0018 and sel["spsft"]["extended"] == [0.0018, 0.0054]
    assert sel["lora-r8"]["chosen"] == 2.7e-05 and sel["lora-r8"]["extended"] == [9e-05, 2.7e-05]
    assert [(r, lr) for r, lr, val in calls if not val] == [("spsft", 0.0018), ("lora", 2.7e-05)]
    text = "\n".join(report.lr_table(out))
    assert "0.0018⁺: 1.000" in text and "2.7e-05⁺" in text and "pending" not in text
    # a peak just above the top end: one added value shows the top end is the best inside the grown grid
    peak["spsft"], calls[:] = 0.0007, []
    q = accuracy.main(["--model", "tiny-bert", "--data", data, "--rows", "spsft", "--seeds", "0", "--lr_grid", "0.3",
                       "1", "3", "--json", str(tmp_path / "q.json"), "--runs_dir", str(tmp_path)])
    assert [lr for _, lr, val in calls if val] == [6e-05, 0.0002, 0.0006, 0.0018]
    assert q["lr_select"]["spsft"]["chosen"] == 0.0006 and q["lr_select"]["spsft"]["extended"] == [0.0018]
    # --lr_extend 0: the plain grid
    calls.clear()
    accuracy.main(["--model", "tiny-bert", "--data", data, "--rows", "spsft", "--seeds", "0", "--lr_extend", "0",
                   "--lr_grid", "0.3", "1", "3", "--json", str(tmp_path / "p.json"), "--runs_dir", str(tmp_path)])
    assert [lr for _, lr, val in calls if val] == [6e-05, 0.0002, 0.0006]


def test_progress_counts_a_grown_grid_and_an_open_choice():
    """Hand-made sweep JSONs: 1 row × 2 seeds + a 3-value grid = 5 planned; a grid grown by one = 6; a full grid
    whose choice is still open (an end was best, the added run not yet finished) = one more pending."""
    def state(grid, chosen, seeds_done):
        return {"rows": {"spsft": {"runs": [{}] * seeds_done}}, "seeds": [0, 1], "lr_grid": [0.3, 1, 3],
                "cache": {}, "lr_select": {"spsft": {"grid": [[lr, 0.5] for lr in grid], "chosen": chosen}}}
    assert report.progress(state([1, 2, 3], 2, 2)) == "All 5 planned runs finished."
    assert report.progress(state([1, 2, 3, 4], 4, 2)) == "All 6 planned runs finished."
    assert "3 of 6 planned" in report.progress(state([1, 2, 3], None, 0))
    assert "2 of 5 planned" in report.progress(state([1, 2], None, 0))
