"""evaluate.py: metrics against hand-worked values and brute-force references, answer extraction,
the commonsense protocol (both modes) on tiny llamas, classification and image metrics on stub models."""
import json
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate as E
from data import byte_tokenizer as byte_tok, prompt
from models import build_tiny


# ------------------------------------------------------------------------------------ metrics

def test_accuracy_f1_hand():
    pred, gold = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    assert E.accuracy(pred, gold) == pytest.approx(3 / 5)  # positions 0, 1, 3 agree
    # TP = 2 (0, 3), FP = 1 (2), FN = 1 (4): F1 = 2·2 / (2·2 + 1 + 1) = 2/3
    assert E.f1(pred, gold) == pytest.approx(2 / 3)
    # positive=0: TP = 1 (1), FP = 1 (4), FN = 1 (2): 2 / 4
    assert E.f1(pred, gold, positive=0) == pytest.approx(1 / 2)
    assert E.f1([0, 0], [0, 0]) == 0.0  # nothing positive anywhere
    with pytest.raises(ValueError, match="length"):
        E.accuracy([1, 2], [1])


def test_f1_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        pred = [rng.randint(0, 2) for _ in range(30)]
        gold = [rng.randint(0, 2) for _ in range(30)]
        hits = sum(1 for p, g in zip(pred, gold) if p == g == 1)
        precision = hits / max(1, pred.count(1))
        recall = hits / max(1, gold.count(1))
        ref = 2 * precision * recall / (precision + recall) if hits else 0.0
        assert E.f1(pred, gold) == pytest.approx(ref)


def test_matthews_hand():
    # pred [1,0,1,1,0] vs gold [1,0,0,1,1]: TP 2, TN 1, FP 1, FN 1
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 − 1) / sqrt(3·3·2·2) = 1/6
    assert E.matthews([1, 0, 1, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6)
    assert E.matthews([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
    assert E.matthews([1, 0, 0], [0, 1, 1]) == pytest.approx(-1.0)
    assert E.matthews([1, 1, 1], [0, 1, 1]) == 0.0  # constant prediction: undefined -> 0


def test_matthews_brute_force():
    rng = random.Random(1)
    for _ in range(10):  # binary: the TP/TN/FP/FN formula, counted by a loop
        pred = [rng.randint(0, 1) for _ in range(40)]
        gold = [rng.randint(0, 1) for _ in range(40)]
        tp = tn = fp = fn = 0
        for p, g in zip(pred, gold):
            tp += p == 1 and g == 1
            tn += p == 0 and g == 0
            fp += p == 1 and g == 0
            fn += p == 0 and g == 1
        ref = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert E.matthews(pred, gold) == pytest.approx(ref)
    for _ in range(10):  # multiclass: covariance of one-hot matrices (Gorodkin's definition), dense
        pred = [rng.randint(0, 3) for _ in range(40)]
        gold = [rng.randint(0, 3) for _ in range(40)]
        X = F.one_hot(torch.tensor(pred), 4).double()
        Y = F.one_hot(torch.tensor(gold), 4).double()
        X, Y = X - X.mean(0), Y - Y.mean(0)
        ref = (X * Y).sum() / ((X * X).sum() * (Y * Y).sum()).sqrt()
        assert E.matthews(pred, gold) == pytest.approx(ref.item())


def test_pearson_spearman_hand():
    # x = [1,2,3], y = [1,2,5]: dx = (−1,0,1), dy = (−5/3,−2/3,7/3); Σdxdy = 4, Σdx² = 2, Σdy² = 78/9
    assert E.pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(4 / math.sqrt(2 * 78 / 9))
    # x = [1,2,2,3] has ranks (1, 2.5, 2.5, 4); y = [10,20,30,40] ranks (1,2,3,4)
    # dx = (−1.5,0,0,1.5), dy = (−1.5,−.5,.5,1.5): 4.5 / sqrt(4.5 · 5)
    assert E.spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert E.spearman([1, 2, 3], [1, 4, 9]) == pytest.approx(1.0)  # monotone, not linear
    assert E.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant side: undefined -> 0


def test_pearson_spearman_brute_force():
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        x = torch.randint(0, 5, (25,), generator=g).double()  # many ties
        y = x + torch.randn(25, generator=g, dtype=torch.float64)
        assert E.pearson(x.tolist(), y.tolist()) == pytest.approx(torch.corrcoef(torch.stack([x, y]))[0, 1].item())

        def ranks(v):  # 1 + #smaller + (#equal − 1) / 2, by a loop
            return torch.tensor([1 + sum(b < a for b in v) + (sum(b == a for b in v) - 1) / 2 for a in v],
                                dtype=torch.float64)
        rx, ry = ranks(x.tolist()), ranks(y.tolist())
        assert E.spearman(x.tolist(), y.tolist()) == pytest.approx(torch.corrcoef(torch.stack([rx, ry]))[0, 1].item())


def test_exact_match():
    # "paris." -> "paris" = "paris"; "rome" = "rome." -> "rome"; "berlin" != "bonn"
    assert E.exact_match([" Paris. ", "rome", "Berlin"], ["paris", "Rome.", "bonn"]) == pytest.approx(2 / 3)
    assert E.exact_match(["4"], ["4.0"]) == 0.0


def test_glue_metrics():
    pred, gold = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    assert E.glue_metrics("sst2", pred, gold) == {"accuracy": pytest.approx(0.6)}
    assert E.glue_metrics("glue/mrpc", pred, gold) == {"accuracy": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}
    assert E.glue_metrics("CoLA", pred, gold) == {"matthews": pytest.approx(1 / 6)}
    assert set(E.glue_metrics("STS-B", [1.0, 2.0, 3.0], [1, 2, 5])) == {"pearson", "spearman"}
    assert set(E.glue_metrics("MNLI-mm", pred, gold)) == {"accuracy"}
    assert set(E.glue_metrics(None, pred, gold)) == {"accuracy"}
    assert E.glue_metrics(None, [1.0, 2.0, 3.0], [1, 2, 5], regression=True)["pearson"] == pytest.approx(
        E.pearson([1, 2, 3], [1, 2, 5]))
    assert all(set(v) <= set(E.METRICS) for v in E.GLUE_METRICS.values())


# ----------------------------------------------------------------------------- answer extraction

@pytest.mark.parametrize("task, text, want", [
    ("boolq", "the correct answer is true", "true"),
    ("BoolQ", " false, not true", "false"),  # first match wins
    ("boolq", "The correct answer is True", None),  # the protocol's regex is case-sensitive
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution3", None),
    ("social_i_qa", "the correct answer is answer3", "answer3"),
    ("siqa", "answer2 or answer1", "answer2"),
    ("ARC-Challenge", "the correct answer is answer5", "answer5"),
    ("arc-easy", "I think answer4.", "answer4"),
    ("openbookqa", "answer1answer2", "answer1"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("hellaswag", "ending5", None),
    ("winogrande", "the correct answer is option2", "option2"),
    ("winogrande", "option", None),
    ("boolq", "", None),
    ("ARC-Easy", "\x00\ufffd####", None),
    ("piqa", None, None),
])
def test_extract_answer(task, text, want):
    assert E.extract_answer(task, text) == want


def test_candidates_and_options():
    assert E.candidates("BOOLQ") == ["true", "false"]
    assert E.candidates("hellaswag") == ["ending1", "ending2", "ending3", "ending4"]
    assert E.candidates("winogrande") == ["option1", "option2"]
    assert E.candidates("ARC-Easy") == [f"answer{i}" for i in range(1, 6)]
    assert E._options("ARC-Easy", "Q?\n\nAnswer format: answer1/answer2/answer3") == ["answer1", "answer2", "answer3"]
    assert E._options("piqa", "no format line") == ["solution1", "solution2"]
    with pytest.raises(ValueError, match="unknown commonsense task"):
        E.candidates("mmlu")


# ------------------------------------------------------------------- commonsense on tiny llamas

def write_tasks(root, n_boolq=5, n_arc=3):
    (root / "boolq").mkdir()
    (root / "boolq" / "test.json").write_text(json.dumps(
        [{"instruction": f"Is {i} odd?\n\nAnswer format: true/false", "input": "", "output": "",
          "answer": ["false", "true"][i % 2]} for i in range(n_boolq)]))
    (root / "ARC-Easy.json").write_text(json.dumps(
        [{"instruction": f"Q{i}?\n\nAnswer format: answer1/answer2/answer3", "input": "x" * i, "output": "",
          "answer": f"answer{i % 3 + 1}"} for i in range(n_arc)]))


def loglik_brute(model, tok, p, r):
    """Summed log p(r | p), one unpadded sequence, token by token."""
    n, ids = len(tok(p)["input_ids"]), tok(p + r)["input_ids"]
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    return sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids)))


def test_commonsense_runs_both_modes(tmp_path):
    write_tasks(tmp_path)
    (tmp_path / "commonsense_170k.json").write_text("[]")  # not a test set: skipped
    model, tok = build_tiny("tiny-llama"), byte_tok()
    model.train()
    tok.pad_token = None  # EOS pads while evaluating, then the tokenizer is as it was
    for mode in ("generate", "loglik"):
        r = E.evaluate_commonsense(model, tok, tmp_path, mode=mode, batch_size=2, max_new_tokens=4)
        assert r["n"] == {"ARC-Easy": 3, "boolq": 5} and r["mode"] == mode
        assert r["average"] == pytest.approx((r["ARC-Easy"] + r["boolq"]) / 2)
        assert model.training and tok.padding_side == "right" and tok.pad_token is None
    r = E.evaluate_commonsense(model, tok, tmp_path / "boolq" / "test.json", mode="loglik", limit=2)
    assert r["n"] == {"boolq": 2}
    # loglik accuracy = accuracy of the brute-force argmax over the options each record lists
    model.eval()
    recs = json.loads((tmp_path / "ARC-Easy.json").read_text())
    hits = 0
    with torch.no_grad():
        for rec in recs:
            p = prompt(rec["instruction"], rec["input"])
            s = [loglik_brute(model, tok, p, f"the correct answer is answer{k}") for k in (1, 2, 3)]
            hits += f"answer{s.index(max(s)) + 1}" == rec["answer"]
    r = E.evaluate_commonsense(model, tok, tmp_path / "ARC-Easy.json", mode="loglik", batch_size=4)
    assert r["ARC-Easy"] == pytest.approx(hits / 3)


def test_commonsense_bad_input(tmp_path):
    model, tok = build_tiny("tiny-llama"), byte_tok()
    with pytest.raises(ValueError, match="no such file"):
        E.evaluate_commonsense(model, tok, tmp_path / "missing")
    with pytest.raises(ValueError, match="no test sets"):
        E.evaluate_commonsense(model, tok, tmp_path)
    (tmp_path / "mmlu.json").write_text("[]")  # a folder skips files of unknown tasks ...
    with pytest.raises(ValueError, match="no test sets"):
        E.evaluate_commonsense(model, tok, tmp_path)
    with pytest.raises(ValueError, match="unknown commonsense task"):  # ... a file names its task
        E.evaluate_commonsense(model, tok, tmp_path / "mmlu.json")
    with pytest.raises(ValueError, match="eval_mode"):
        E.evaluate_commonsense(model, tok, tmp_path, mode="beam")


def test_loglik_scores_match_unbatched():
    torch.manual_seed(0)
    model, tok = build_tiny("tiny-llama").eval(), byte_tok()
    items = [(prompt("Q?"), "the correct answer is true"), (prompt("Longer question here?", "ctx"), "no"),
             (prompt("Q?"), "the correct answer is false"), (prompt("Why"), "the correct answer is answer5")]
    with torch.no_grad():
        got = E._loglik_scores(model, tok, items, batch_size=3)  # chunks of 3 and 1, right-padded
        want = [loglik_brute(model, tok, p, r) for p, r in items]
    assert got == pytest.approx(want, abs=1e-4)


def test_loglik_scores_without_a_shared_first_token():
    """A tokenizer whose first token depends on the whole text: no prefix can be shared (no KV cache)."""
    torch.manual_seed(0)
    model, base = build_tiny("tiny-llama").eval(), byte_tok()

    def tok(text):
        return {"input_ids": [len(text) % 7] + base(text)["input_ids"]}
    items = [(prompt("Q?"), "the correct answer is true"), (prompt("Q?"), "the correct answer is false!")]
    with torch.no_grad():
        got = E._loglik_scores(model, tok, items, batch_size=2)
        want = []
        for p, r in items:  # scored from the first token after the prompt's own tokens (position 1 at least)
            ctx, ids = tok(p)["input_ids"], tok(p + r)["input_ids"]
            n = max(next((k for k, (a, b) in enumerate(zip(ctx, ids)) if a != b), len(ctx)), 1)
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            want.append(sum(logp[t - 1, ids[t]].item() for t in range(n, len(ids))))
    assert got == pytest.approx(want, abs=1e-4)


def test_generate_left_padding_matches_unbatched():
    torch.manual_seed(0)
    model, tok = build_tiny("tiny-llama", seed=1).eval(), byte_tok()
    prompts = [prompt("a"), prompt("a much longer instruction"), prompt("mid length", "in")]
    with torch.no_grad():
        got = E._generate(model, tok, prompts, batch_size=3, max_new_tokens=6)
        for p, g in zip(prompts, got):  # greedy, one prompt at a time, no cache, no padding
            ids = tok(p)["input_ids"]
            new = []
            for _ in range(6):
                nxt = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
                if nxt in (model.generation_config.eos_token_id, tok.eos_token_id):
                    break
                new.append(nxt)
            assert g == tok.decode(new, skip_special_tokens=True)


PLANTED = [("Pick one.", "answer1"), ("Pick the second.", "answer2"), ("Pick number three.", "answer3"),
           ("Pick the fourth one please.", "answer4"), ("Say yes.", "true"), ("Say no.", "false")]


@pytest.fixture(scope="module")
def trained():
    """A tiny llama trained (80 full-batch AdamW steps) to answer each PLANTED instruction."""
    torch.manual_seed(0)
    model, tok = build_tiny("tiny-llama"), byte_tok()
    seqs = []
    for ins, ans in PLANTED:
        fmt = "true/false" if ans in ("true", "false") else "answer1/answer2/answer3/answer4"
        p = prompt(f"{ins} Answer format: {fmt}")
        n, full = len(tok(p)["input_ids"]), tok(p + "the correct answer is " + ans)["input_ids"] + [tok.eos_token_id]
        seqs.append((full, [-100] * n + full[n:]))
    T = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [0] * (T - len(s)) for s, _ in seqs])
    labels = torch.tensor([lab + [-100] * (T - len(lab)) for _, lab in seqs])
    mask = (torch.arange(T) < torch.tensor([len(s) for s, _ in seqs])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(80):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, tok


def test_commonsense_picks_planted_answer(trained, tmp_path):
    model, tok = trained
    arc = [{"instruction": f"{i} Answer format: answer1/answer2/answer3/answer4", "input": "", "answer": a}
           for i, a in PLANTED[:4]]
    boolq = [{"instruction": f"{i} Answer format: true/false", "input": "", "answer": a} for i, a in PLANTED[4:]]
    (tmp_path / "ARC-Challenge.json").write_text(json.dumps(arc))
    (tmp_path / "boolq.json").write_text(json.dumps(boolq))
    for mode, beams in (("loglik", 1), ("generate", 1), ("generate", 3)):  # four different answers
        r = E.evaluate_commonsense(model, tok, tmp_path, mode=mode, batch_size=4, num_beams=beams)
        assert (r["ARC-Challenge"], r["boolq"], r["average"]) == (1.0, 1.0, 1.0), (mode, beams)
    # the same records with the gold answers rotated: the planted answers are now all wrong
    for rec, other in zip(arc, arc[1:] + arc[:1]):
        rec["answer"] = other["answer"]
    (tmp_path / "ARC-Challenge.json").write_text(json.dumps(arc))
    r = E.evaluate_commonsense(model, tok, tmp_path / "ARC-Challenge.json", mode="loglik")
    assert r["ARC-Challenge"] == 0.0


def test_evaluate_generation(trained):
    model, tok = trained
    recs = [{"instruction": f"{i} Answer format: answer1/answer2/answer3/answer4", "input": "",
             "answer": f"The correct answer is {a}."} for i, a in PLANTED[:4]]
    recs[3]["answer"] = "the correct answer is answer1"  # wrong on purpose
    r = E.evaluate_generation(model, tok, recs, batch_size=3, max_new_tokens=32)
    assert r == {"exact_match": pytest.approx(3 / 4), "n": 4}


# --------------------------------------------------------------- classification and images (stubs)

class Stub(nn.Module):
    """Returns row input_ids[:, 0] (or pixel_values[:, 0]) of a fixed logits table."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table, dtype=torch.float32))

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kw):
        assert "labels" not in kw and not self.training and not torch.is_grad_enabled()
        idx = input_ids[:, 0] if input_ids is not None else pixel_values[:, 0].long()
        return SimpleNamespace(logits=self.table[idx])


def test_evaluate_classification():
    model = Stub([[2, 1], [0, 3], [5, -1], [1, 1.5]]).train()  # argmax: 0, 1, 0, 1
    batches = [{"input_ids": torch.tensor([[0, 9], [1, 9]]), "attention_mask": torch.ones(2, 2),
                "labels": torch.tensor([0, 1])},
               {"input_ids": torch.tensor([[2, 9], [3, 9]]), "attention_mask": torch.ones(2, 2),
                "labels": torch.tensor([1, 1])}]
    # gold 0,1,1,1: 3 of 4 right; TP 2, FP 0, FN 1 -> F1 = 4/5
    assert E.evaluate_classification(model, batches, task="mrpc") == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert model.training
    # regression reads logits[:, 0] = 2, 0, 5, 1 against scores 2.5, 0.5, 4, 1
    for b, y in zip(batches, ([2.5, 0.5], [4.0, 1.0])):
        b["labels"] = torch.tensor(y)
    r = E.evaluate_classification(model, batches, task="stsb", regression=True)
    assert r == {"pearson": pytest.approx(E.pearson([2, 0, 5, 1], [2.5, .5, 4, 1])), "spearman": pytest.approx(1.0)}


def test_evaluate_images_hand():
    # labels 0,0 | 1,1,1 | 2,2,2,2 ; right: 2 of 2, 1 of 3, 2 of 4 -> per class (1, 1/3, 1/2), top-1 5/9
    labels = [0, 0, 1, 1, 1, 2, 2, 2, 2]
    preds = [0, 0, 1, 0, 2, 2, 2, 0, 1]
    model = Stub(torch.eye(4)[preds].tolist())  # row i predicts preds[i]; class 3 never appears
    batches = [{"pixel_values": torch.arange(9.0)[i:i + 4, None], "labels": torch.tensor(labels[i:i + 4])}
               for i in range(0, 9, 4)]
    r = E.evaluate_images(model, batches, num_labels=4)
    # sorted (1/3, 1/2, 1): q1 at position 0.5 -> 1/3 + (1/2 − 1/3)/2 = 5/12; q3 at 1.5 -> 3/4
    assert r == pytest.approx({"accuracy": 5 / 9, "class_acc_min": 1 / 3, "class_acc_q1": 5 / 12,
                               "class_acc_median": 1 / 2, "class_acc_q3": 3 / 4, "class_acc_max": 1.0})


def test_evaluate_images_brute_force():
    g = torch.Generator().manual_seed(0)
    n, k = 200, 7
    logits = torch.randn(n, k, generator=g)
    labels = torch.randint(0, k, (n,), generator=g)
    model = Stub(logits.tolist())
    batches = [{"pixel_values": torch.arange(float(n))[i:i + 32, None], "labels": labels[i:i + 32]}
               for i in range(0, n, 32)]
    r = E.evaluate_images(model, batches, num_labels=k)
    pred = logits.argmax(-1)
    per = torch.tensor([(pred[labels == c] == c).double().mean().item() for c in range(k)], dtype=torch.float64)
    assert r["accuracy"] == pytest.approx((pred == labels).double().mean().item())
    for name, q in [("min", 0), ("q1", .25), ("median", .5), ("q3", .75), ("max", 1)]:
        assert r[f"class_acc_{name}"] == pytest.approx(torch.quantile(per, q).item())


def test_print_table(capsys):
    E.print_table({"boolq": 0.5, "average": 0.25, "n": {"boolq": 4}, "mode": "loglik"}, title="commonsense")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "commonsense" and lines[1].split() == ["metric", "value"]
    assert lines[3].split() == ["boolq", "0.5000"] and lines[5].split() == ["n.boolq", "4"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned
    E.print_table({"before": {"acc": 0.1}, "after": {"acc": 0.9, "f1": 0.8}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["metric", "before", "after"]
    assert lines[2].split() == ["acc", "0.1000", "0.9000"] and lines[3].split() == ["f1", "-", "0.8000"]


def test_evaluate_loss_is_the_mean_over_all_response_tokens():
    torch.manual_seed(0)
    model = build_tiny("tiny-llama")
    model.train()
    batches = []
    for b, t, cut in ((2, 9, 4), (3, 6, 2), (2, 5, 5)):  # different sizes and prompt lengths; the last all prompt
        ids = torch.randint(0, 260, (b, t))
        labels = ids.clone()
        labels[:, :cut] = -100
        labels[0, -1] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    got = E.evaluate_loss(model, batches)
    assert model.training  # restored
    nll, n = 0.0, 0  # brute force: every scored token of every batch, one by one, float64
    with torch.no_grad():
        model.eval()
        for bt in batches:
            logp = torch.log_softmax(model(input_ids=bt["input_ids"]).logits.double(), -1)
            for row in range(len(bt["labels"])):
                for pos in range(1, bt["labels"].shape[1]):
                    tok = int(bt["labels"][row, pos])
                    if tok != -100:
                        nll -= logp[row, pos - 1, tok].item()
                        n += 1
    assert got == pytest.approx(nll / n, rel=1e-5)
