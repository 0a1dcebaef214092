"""data.py: response-only labels, truncation, GLUE layouts, images, collate, the built-in task.
Expected values are rebuilt by hand (bytes of the text, explicit loops), never read back from data.py."""
import json
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

PAD, BOS, EOS = 256, 257, 258


@pytest.fixture(scope="module")
def tok():
    return data.byte_tokenizer()


def utf8(s):
    return list(s.encode("utf-8"))


RECORDS = [{"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
           {"instruction": "Which number is larger?", "input": "12 or 57", "output": "57"},
           {"instruction": "Translate to German: ünd", "output": "und ö"}]  # no "input" key


# ------------------------------------------------------------------------------ instructions

def test_prompt_template():
    assert data.prompt("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Add.\n\n### Input:\n1 2\n\n### Response:\n")
    assert data.prompt("Add.") == data.prompt("Add.", "") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd.\n\n### Response:\n")


def test_byte_tokenizer(tok):
    text = "héllo, wörld\n\t!"
    assert tok(text)["input_ids"] == [BOS] + utf8(text)
    assert tok("ab", "cd")["input_ids"] == [BOS, 97, 98, EOS, 99, 100]
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, len(tok)) == (PAD, BOS, EOS, 260)
    tok.padding_side = "left"
    assert tok(["a", "abc"], padding=True)["input_ids"][0] == [PAD, PAD, BOS, 97]
    tok.padding_side = "right"


def test_response_only_labels(tok):
    ex = data.tokenize_instructions(RECORDS, tok, max_len=512)
    for r, e in zip(RECORDS, ex):
        p = [BOS] + utf8(data.prompt(r["instruction"], r.get("input", "")))
        y = utf8(r["output"]) + [EOS]
        assert e["input_ids"] == p + y
        assert len(e["labels"]) == len(e["input_ids"])
        for i, (t, lab) in enumerate(zip(e["input_ids"], e["labels"])):
            assert lab == (-100 if i < len(p) else t)  # prompt masked exactly, response trained
        trained = [lab for lab in e["labels"] if lab != -100]
        assert tok.decode(trained) == r["output"] + "</s>"


def test_truncation_keeps_prompt_start(tok):
    full = data.tokenize_instructions(RECORDS, tok, max_len=512)
    p_len = 1 + len(utf8(data.prompt(RECORDS[1]["instruction"], RECORDS[1]["input"])))
    for max_len in (5, p_len, p_len + 1, p_len + 3):
        ex = data.tokenize_instructions(RECORDS, tok, max_len=max_len)
        for e, f in zip(ex, full):
            n = min(max_len, len(f["input_ids"]))
            assert e["input_ids"] == f["input_ids"][:n] and e["labels"] == f["labels"][:n]
        trained = [lab for lab in ex[1]["labels"] if lab != -100]
        assert trained == (utf8("57") + [EOS])[:max(0, max_len - p_len)]


def test_missing_instruction_columns(tok):
    with pytest.raises(ValueError, match="found columns: question, answer"):
        data.tokenize_instructions([{"question": "q", "answer": "a"}], tok, 64)


def test_read_records(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(RECORDS))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert data.read_records(tmp_path / "a.json") == RECORDS
    assert data.read_records(str(tmp_path / "a.jsonl")) == RECORDS
    (tmp_path / "b.json").write_text(json.dumps({"data": RECORDS}))
    with pytest.raises(ValueError, match="list"):
        data.read_records(tmp_path / "b.json")
    for task, recs in (("boolq", RECORDS[:1]), ("ARC-Easy", RECORDS)):  # LLM-Adapters' dataset/<task>/train.json
        (tmp_path / "ca" / task).mkdir(parents=True)
        (tmp_path / "ca" / task / "train.json").write_text(json.dumps(recs))
    (tmp_path / "ca" / "boolq" / "test.json").write_text(json.dumps(RECORDS))  # test files are not training data
    assert data.read_records(tmp_path / "ca") == RECORDS + RECORDS[:1]  # sorted by task folder
    with pytest.raises(ValueError, match="train.json"):
        data.read_records(tmp_path / "ca" / "boolq")


# ----------------------------------------------------------------------------- classification

def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows), encoding="utf-8")


def test_glue_sst2_with_header(tmp_path, tok):
    train = [("a \"quoted film", 1), ("NA", 0), ("it's dull , really", 0)]  # unbalanced quote, "NA"
    dev = [("great", 1), ("bad", 0)]
    write_tsv(tmp_path / "SST-2" / "train.tsv", [("sentence", "label")] + train)
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [("sentence", "label")] + dev)
    ex, info = data.load_classification(str(tmp_path / "SST-2"), "train", tok, 64)
    assert info == {"task": "sst2", "num_labels": 2, "regression": False,
                    "label_names": ["negative", "positive"]}
    assert [e["input_ids"] for e in ex] == [[BOS] + utf8(s) for s, _ in train]
    assert [e["labels"] for e in ex] == [y for _, y in train]
    for split in ("dev", "validation"):
        ex, _ = data.load_classification(tmp_path / "SST-2", split, tok, 4)
        assert [e["input_ids"] for e in ex] == [([BOS] + utf8(s))[:4] for s, _ in dev]  # truncated
    with pytest.raises(ValueError, match="no test split"):
        data.load_classification(tmp_path / "SST-2", "test", tok, 64)


def test_glue_cola_without_header(tmp_path, tok):
    rows = [("gj04", 1, "", "Our friends won't buy this analysis."), ("gj04", 0, "*", "They drank the pub.")]
    write_tsv(tmp_path / "CoLA" / "train.tsv", rows)
    ex, info = data.load_classification(tmp_path / "CoLA", "train", tok, 128)
    assert info["task"] == "cola" and info["num_labels"] == 2 and not info["regression"]
    assert len(ex) == 2  # the first row is data, not a header
    assert [e["labels"] for e in ex] == [1, 0]
    assert [e["input_ids"] for e in ex] == [[BOS] + utf8(r[3]) for r in rows]


def test_glue_stsb_pairs_regression(tmp_path, tok):
    head = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1",
            "sentence2", "score")
    rows = [(0, "main-captions", "MSRvid", "2012test", 1, "none", "none", "A plane takes off.",
             "An air plane is taking off.", "5.000"),
            (1, "main-captions", "MSRvid", "2012test", 4, "none", "none", "A man plays.", "A man sings.",
             "1.750")]
    write_tsv(tmp_path / "STS-B" / "dev.tsv", [head] + rows)
    ex, info = data.load_classification(tmp_path / "STS-B", "validation", tok, 128)
    assert info == {"task": "stsb", "num_labels": 1, "regression": True, "label_names": None}
    assert [e["labels"] for e in ex] == [5.0, 1.75] and all(type(e["labels"]) is float for e in ex)
    assert [e["input_ids"] for e in ex] == [[BOS] + utf8(r[7]) + [EOS] + utf8(r[8]) for r in rows]
    b = data.collate(ex, PAD)
    assert b["labels"].dtype == torch.float32 and b["labels"].tolist() == [5.0, 1.75]


def test_glue_mrpc_and_rte_pairs(tmp_path, tok):
    write_tsv(tmp_path / "MRPC" / "train.tsv",
              [("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
               (1, 702876, 702977, "He said so.", "So he said."), (0, 2108705, 2108831, "Yes.", "No.")])
    ex, info = data.load_classification(tmp_path / "MRPC", "train", tok, 128)
    assert info["task"] == "mrpc" and info["num_labels"] == 2
    assert [e["labels"] for e in ex] == [1, 0]
    assert ex[1]["input_ids"] == [BOS] + utf8("Yes.") + [EOS] + utf8("No.")
    write_tsv(tmp_path / "RTE" / "dev.tsv", [("index", "sentence1", "sentence2", "label"),
                                             (0, "A b.", "C d.", "not_entailment"),
                                             (1, "E f.", "G h.", "entailment")])
    ex, info = data.load_classification(tmp_path / "RTE", "dev", tok, 128)
    assert info["label_names"] == ["entailment", "not_entailment"]
    assert [e["labels"] for e in ex] == [1, 0]  # hub order of the names


def test_generic_csv_and_missing_columns(tmp_path, tok):
    (tmp_path / "reviews.csv").write_text('text,label\n"good, very",pos\nawful,neg\nfine,pos\n')
    ex, info = data.load_classification(tmp_path / "reviews.csv", "train", tok, 64)
    assert info == {"task": None, "num_labels": 2, "regression": False, "label_names": ["neg", "pos"]}
    assert [e["labels"] for e in ex] == [1, 0, 1]
    assert ex[0]["input_ids"] == [BOS] + utf8("good, very")
    (tmp_path / "bad.csv").write_text("review,stars\nnice,5\n")
    with pytest.raises(ValueError) as err:
        data.load_classification(tmp_path / "bad.csv", "train", tok, 64)
    msg = str(err.value)
    assert "review, stars" in msg and "sentence1+sentence2" in msg and "label" in msg


def test_generic_directory_json(tmp_path, tok):
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "val.jsonl").write_text('{"sentence": "x", "label": 2}\n{"sentence": "yz", "label": 0}\n')
    ex, info = data.load_classification(d, "dev", tok, 64)
    assert info["task"] is None and info["num_labels"] == 3
    assert [(e["input_ids"], e["labels"]) for e in ex] == [([BOS, 120], 2), ([BOS, 121, 122], 0)]


# ------------------------------------------------------------------------------------ images

def test_imagefolder(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed (datasets images need it)")
    from transformers import ViTImageProcessor
    rng = random.Random(0)
    for split in ("train", "validation"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(2):
                px = bytes(rng.randrange(256) for _ in range(10 * 12 * 3))
                Image.frombytes("RGB", (12, 10), px).save(tmp_path / split / cls / f"{k}.png")
    proc = ViTImageProcessor(size={"height": 32, "width": 32})
    ex, info = data.load_images(str(tmp_path), "dev", proc)
    assert info == {"task": "image", "num_labels": 2, "label_names": ["cat", "dog"], "regression": False}
    assert len(ex) == 4
    seen = []
    for e in ex:
        assert e["pixel_values"].shape == (3, 32, 32) and e["pixel_values"].dtype == torch.float32
        # find the file this example came from by comparing against every file of its class
        cls = info["label_names"][e["labels"]]
        files = sorted((tmp_path / "validation" / cls).iterdir())
        hits = [f for f in files if torch.equal(
            proc(images=Image.open(f).convert("RGB"), return_tensors="pt")["pixel_values"][0],
            e["pixel_values"])]
        assert len(hits) == 1
        seen.append(hits[0])
    assert len(set(seen)) == 4
    b = data.collate(ex[:3], pad_id=0)
    assert b["pixel_values"].shape == (3, 3, 32, 32) and b["labels"].dtype == torch.long
    with pytest.raises(ValueError, match="found splits: train, validation"):
        data.load_images(str(tmp_path), "test", proc)
    flat = tmp_path / "validation"  # <dir>/<class>/*.png without split folders: all of it is train
    ex, info = data.load_images(str(flat), "train", proc)
    assert len(ex) == 4 and info["label_names"] == ["cat", "dog"]


# ----------------------------------------------------------------------------------- batches

def test_collate_instruction_padding(tok):
    ex = data.tokenize_instructions(RECORDS, tok, 512)
    b = data.collate(ex, PAD)
    T = max(len(e["input_ids"]) for e in ex)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, T)
    for i, e in enumerate(ex):
        for t in range(T):
            inside = t < len(e["input_ids"])
            assert b["input_ids"][i, t].item() == (e["input_ids"][t] if inside else PAD)
            assert b["labels"][i, t].item() == (e["labels"][t] if inside else -100)
            assert b["attention_mask"][i, t].item() == int(inside)
    c = data.collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], 9)
    assert c["input_ids"].tolist() == [[1, 2], [3, 9]] and c["labels"].dtype == torch.long


def test_causal_lm_loss_is_response_only(tok):
    """model(**batch).loss on a tiny llama equals the mean cross-entropy of next-token predictions
    over response + eos tokens only, computed by hand."""
    from models import build_tiny
    model = build_tiny("tiny-llama").eval()
    ex = data.tokenize_instructions(RECORDS, tok, 512)
    b = data.collate(ex, PAD)
    with torch.no_grad():
        loss = model(**b).loss
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    total, n = 0.0, 0
    for i, e in enumerate(ex):
        for t in range(1, len(e["input_ids"])):
            if e["labels"][t] != -100:  # token t is predicted from position t - 1
                total -= torch.log_softmax(logits[i, t - 1], -1)[e["input_ids"][t]].item()
                n += 1
    assert n == sum(len(utf8(r["output"])) + 1 for r in RECORDS)
    assert abs(loss.item() - total / n) < 1e-4


# ---------------------------------------------------------------------------- built-in task

def test_builtin_task_rule_and_determinism():
    train, test = data.builtin_task(seed=0)
    assert (train, test) == data.builtin_task(seed=0)
    assert data.builtin_task(seed=1) != (train, test)
    assert 200 <= len(train) <= 1000 and 30 <= len(test) <= 100
    for r in train + test:
        a, word, b = r["input"].split(" ")
        assert word == "or" and a != b and 10 <= int(a) <= 99 and 10 <= int(b) <= 99
        assert r["answer"] == r["output"] == (a if int(a) > int(b) else b)
        assert r["instruction"] == "Which number is larger?"
    def key(r):
        return frozenset(r["input"].split(" or "))
    assert not {key(r) for r in train} & {key(r) for r in test}  # unseen test pairs, either order
    assert len({key(r) for r in test}) == len(test)
    first = [r["input"].split(" or ")[0] == r["answer"] for r in train]
    assert 0.35 < sum(first) / len(first) < 0.65  # the answer's position is no shortcut


def test_every_split_is_mapped_through_the_training_classes(tmp_path, tok):
    """Issue 33: train neg/neu/pos, dev neg/pos: dev's pos is class 2 (pos of the training split), not 1
    (its index among dev's own labels); integer labels keep their value whatever the dev split holds."""
    d = tmp_path / "three"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"f{i}\t{y}\n" for i, y in enumerate(["neg", "neu", "pos"] * 2)))
    (d / "dev.tsv").write_text("sentence\tlabel\nf0\tneg\nf1\tpos\nf2\tpos\n")
    train_ex, info = data.load_classification(str(d), "train", tok, 64)
    dev_ex, dev_info = data.load_classification(str(d), "validation", tok, 64, space=info)
    assert info["label_names"] == ["neg", "neu", "pos"] and dev_info == info
    assert [e["labels"] for e in train_ex] == [0, 1, 2, 0, 1, 2] and [e["labels"] for e in dev_ex] == [0, 2, 2]
    (d / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"f{i}\t{y}\n" for i, y in enumerate([0, 1, 2, 3])))
    (d / "dev.tsv").write_text("sentence\tlabel\nf0\t3\nf1\t1\n")
    train_ex, info = data.load_classification(str(d), "train", tok, 64)
    dev_ex, _ = data.load_classification(str(d), "validation", tok, 64, space=info)
    assert info["num_labels"] == 4 and [e["labels"] for e in dev_ex] == [3, 1]
