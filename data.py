"""Data for train.py: instruction data, GLUE-style classification, images, and the built-in task.

Instruction data (Alpaca / LLM-Adapters commonsense_170k format: `instruction`, `input`, `output`) is
rendered with the LLM-Adapters prompt template and trained on the response only: prompt tokens get the
label -100, the response and an eos token are the targets. Deviation: LLM-Adapters' finetune.py keeps
the indentation of its triple-quoted template (and a stray "# noqa: E501") inside the prompt; we use
the clean Alpaca text it was meant to be. Prompt and response are tokenized separately and joined, so
the label mask is exact whatever the tokenizer merges across the boundary.

Classification reads a hub name (`glue/sst2`), a local GLUE directory (`.../SST-2` with train.tsv and
dev.tsv, as the GLUE download script writes them), or a local csv / tsv / json file, all through
`datasets.load_dataset`. Images come from an `imagefolder` directory or a hub name and go through the
model's image processor when an example is read.

`builtin_task()` generates the default job's data: pick the larger of two numbers (see its docstring).
"""
import csv
import itertools
import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from common import UserError

IGNORE = -100  # label of a token that is not trained (the prompt, padding)

# ------------------------------------------------------------------------------ instructions

def prompt(instruction: str, input: str = "") -> str:
    """The LLM-Adapters (Alpaca) prompt; the response follows it directly."""
    if input:
        return ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately "
            f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def byte_tokenizer():
    """An offline tokenizer for the tiny random models: bytes 0–255 are ids 0–255, then <pad> 256,
    <s> 257, </s> 258, <unk> 259 (vocab 260). Adds <s> in front; a pair is `<s> a </s> b`."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258, "<unk>": 259})
    # No merges and no character in the vocabulary: every character falls back to its UTF-8 bytes.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> $B", special_tokens=[("<s>", 257), ("</s>", 258)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def read_records(path) -> list:
    """Records from a .json file (a list of objects) or .jsonl (one object a line), or a folder's
    <task>/train.json files concatenated (LLM-Adapters' layout: a stand-in for commonsense_170k); any
    other source that is not a local path is a hub dataset name (its train split)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*/train.json"))
        if not files:
            raise UserError(f"{path} is a folder without <task>/train.json files; pass a .json or .jsonl file")
        return [r for f in files for r in read_records(f)]
    check_local(path, DATA_EXTS)
    if p.suffix == ".jsonl":
        lines = utf8_text(p).split("\n")  # not splitlines(): U+2028 may sit inside a JSON string
        records = [json_value(line, path, i + 1) for i, line in enumerate(lines) if line.strip()]
    elif p.suffix == ".json":
        records = json_value(utf8_text(p), path)
        if not isinstance(records, list):
            raise UserError(f"{path} holds a JSON {type(records).__name__}, not a list of records; "
                            "write [{\"instruction\": ..., \"output\": ...}, ...] or use .jsonl")
    elif p.exists():
        raise UserError(f"instruction data must be a .json or .jsonl file, got {path}; convert it, or pass "
                        "--model with a classification model for csv / tsv tables")
    else:
        return check_records(hub(path, split="train").to_list(), path)
    if not records:
        raise UserError(f"{path} holds no records; give it at least one {{instruction, output}} record")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise UserError(f"{path}: record {bad} is a JSON {type(records[bad]).__name__}, not an object; "
                        "each record must be {\"instruction\": ..., \"input\": ..., \"output\": ...}")
    return check_records(records, path)


def check_records(records, path=None):
    """records, each with a string instruction and output (input: a string, null or absent), or a
    UserError naming the record (its number in the file) and the field."""
    where = f"{path}: " if path else ""
    for i, r in enumerate(records):
        if "instruction" not in r or "output" not in r:
            raise UserError(f"{where}instruction data needs the columns instruction and output (input is "
                            f"optional); found columns: {', '.join(map(str, r)) or 'none'} (record {i})")
        bad = next((k for k in ("instruction", "input", "output")  # input may be null (no input)
                    if not isinstance(r.get(k, ""), str) and not (k == "input" and r[k] is None)), None)
        if bad:
            kind = "null" if r[bad] is None else type(r[bad]).__name__
            raise UserError(f"{where}record {i}'s {bad} is not a string (a JSON {kind}); "
                            "write every instruction, input and output as a JSON string")
        bad = next((k for k in ("instruction", "input", "output") if not is_text(r.get(k) or "")), None)
        if bad:
            raise UserError(f"{where}record {i}'s {bad} holds a lone surrogate escape (e.g. \\ud800), not text; "
                            "fix that record (write the character itself, or a valid pair of escapes)")
    return records


def utf8_text(path):
    """The text of a file, or a UserError naming the line and byte where it stops being UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); save the file "
                        "as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def json_value(text, path, line=None):
    """json.loads, or a UserError saying where the file stops being JSON."""
    if not text.strip():
        raise UserError(f"{path} is empty; give it a JSON list of {{instruction, input, output}} records")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {line}" if line else f"line {e.lineno} column {e.colno}"
        raise UserError(f"{path} is not valid JSON at {where} ({e.msg}); fix the file "
                        "(.json: one list of records, .jsonl: one record a line)") from None


def check_local(source, exts):
    """A UserError when `source` names a local file (a path or a data-file name) that is not there."""
    s = str(source)
    if not os.path.exists(s) and (s.startswith((".", "/", "~")) or s.endswith(exts)):
        raise UserError(f"{s}: no such file or folder; check the path (it is relative to {os.getcwd()})")


def datasets_cache():
    """The folder `datasets` caches every table it reads in, made now: a HOME that cannot be written is
    one UserError naming the variable to set, not a traceback from inside load_dataset."""
    import datasets.config
    d = datasets.config.HF_DATASETS_CACHE
    try:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f".write-test-{os.getpid()}"), "w"):
            pass
        os.remove(os.path.join(d, f".write-test-{os.getpid()}"))
    except OSError as e:
        raise UserError(f"the datasets cache {d} cannot be written ({e.strerror or e}); set HF_HOME (or "
                        "HF_DATASETS_CACHE) to a folder you can write, e.g. HF_HOME=/tmp/hf") from None


def hub(name, *args, **kw):
    """datasets.load_dataset(name, ...) of a hub dataset, or a UserError when it cannot be loaded."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError
    datasets_cache()
    try:
        return load_dataset(str(name), *args, **kw)
    except (OSError, DatasetsError) as e:  # not found, offline, gated
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--data {name}: not a local path, and the hub dataset could not be loaded "
                        f"({reason}); pass a local file or folder, or check the name and the network") from None


def tokenize_instructions(records, tokenizer, max_len) -> list:
    """[{"input_ids", "labels"}]: prompt + response + eos, labels -100 on the prompt, both cut to
    max_len from the end (the prompt's start is kept; a prompt that fills max_len trains nothing)."""
    if max_len < 1:
        raise UserError(f"--max_len must be at least 1, got {max_len}")
    check_records(records)  # records built in code (builtin_task, a caller's list) too
    prompts = tokenizer([prompt(r["instruction"], r.get("input") or "") for r in records])["input_ids"]
    responses = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    out = []
    for p, y in zip(prompts, responses):
        y = y + [tokenizer.eos_token_id]
        out.append({"input_ids": (p + y)[:max_len], "labels": ([IGNORE] * len(p) + y)[:max_len]})
    return out


# --------------------------------------------------------------------------- the built-in task

def builtin_task(seed=0, n_train=400, n_test=50):
    """(train, test) records of "Which number is larger?" with input "a or b" (two different numbers
    in 10–99) and answer the larger one, e.g. "47 or 82" -> "82". SmolLM2-135M-Instruct answers in a
    sentence ("The larger number is 82."), so its exact-match accuracy starts near 0; the rule (not a
    table) is learnt in a few dozen LoRA steps. Test pairs never occur in train, in either order."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(a + 1, 100)]  # unordered pairs
    rng.shuffle(pairs)

    def record(a, b):
        if rng.random() < 0.5:  # the larger number first or second with equal chance
            a, b = b, a
        answer = str(max(a, b))
        return {"instruction": "Which number is larger?", "input": f"{a} or {b}",
                "output": answer, "answer": answer}

    test = [record(a, b) for a, b in pairs[:n_test]]
    train = [record(a, b) for a, b in pairs[n_test:n_test + n_train]]
    return train, test


# ----------------------------------------------------------------------------- classification

# GLUE tasks: label names in the order of the hub's ClassLabel (None: regression).
GLUE = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
        "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
        "stsb": None, "mnli": ["entailment", "neutral", "contradiction"],
        "qnli": ["entailment", "not_entailment"], "rte": ["entailment", "not_entailment"],
        "wnli": ["not_entailment", "entailment"]}
# Text columns (one sentence or a pair) and label columns we recognise, first match wins; they
# cover the hub's GLUE, the GLUE TSVs (MRPC "#1 String", MNLI "gold_label", QQP "is_duplicate").
TEXT_COLUMNS = [("sentence1", "sentence2"), ("#1 String", "#2 String"), ("question1", "question2"),
                ("question", "sentence"), ("premise", "hypothesis"), ("sentence",), ("text",)]
LABEL_COLUMNS = ["label", "labels", "score", "gold_label", "Quality", "is_duplicate"]
COLA_COLUMNS = ["source", "label", "original-label", "sentence"]  # CoLA's TSVs have no header
SPLITS = {"dev": "validation", "valid": "validation", "val": "validation"}
DATA_EXTS = (".tsv", ".csv", ".json", ".jsonl")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_classification(source, split, tokenizer, max_len, space=None):
    """(examples [{"input_ids", "labels"}], info) for a hub name, a local GLUE directory or a file
    (a file is one split: `split` is not used). Sentence pairs are encoded as tokenizer(a, b);
    labels are ints, or floats for regression. `space` (the training split's info) maps this split's
    labels through the training split's classes, so a class means the same in every split; without it
    the classes come from this split (label_space)."""
    path = Path(source)
    check_local(source, DATA_EXTS)
    if path.exists():
        task = glue_task(path if path.is_dir() else path.parent)
        file = split_file(path, split, task) if path.is_dir() else path
        if path.is_file() and SPLITS.get(split, split) != "train":
            print(f"warning: {source} is one file, so it is also the evaluation set (metrics on training "
                  "examples); for held-out metrics pass a folder with train and dev files", file=sys.stderr)
        ds, names = read_table(file, task), GLUE.get(task)
        first = 1 if task == "cola" and file.stem != "test" else 2  # the line of row 0 (after a header)
        where = (lambda i: f"{file} record {i}") if file.suffix == ".json" else \
            (lambda i: f"{file} line {i + 1}") if file.suffix == ".jsonl" else (lambda i: f"{file} line {i + first}")
    else:
        name, _, config = str(source).partition(":")  # "name:config", or "glue/<task>"
        if name.rpartition("/")[0] in ("glue", "nyu-mll/glue"):
            name, _, config = name.rpartition("/")
        task = config if name in ("glue", "nyu-mll/glue") and config in GLUE else None
        ds = hub(name, config or None, split=hub_split(split, task))
        feature = next((ds.features[c] for c in LABEL_COLUMNS if c in ds.features), None)
        names = getattr(feature, "names", None)  # a ClassLabel's names
        where = lambda i: f"{source} ({split}) row {i}"  # noqa: E731
    texts, label_col = find_columns(ds.column_names, source)
    raw = list(ds[label_col])
    check_cells(raw, label_col, where, split)
    info = space or label_space(raw, task, names, label_col, where)
    labels = [to_label(v, info, label_col, where(i)) for i, v in enumerate(raw)]
    columns = [[str(t) for t in ds[c]] for c in texts]
    for c, col in zip(texts, columns):
        bad = next((i for i, t in enumerate(col) if not is_text(t)), None)
        if bad is not None:
            raise UserError(f"{where(bad)}: {c} holds a lone surrogate escape (e.g. \\ud800), not text; "
                            "fix that cell (write the character itself, or a valid pair of escapes)")
    enc = tokenizer(*columns, truncation=True, max_length=max_len)["input_ids"]
    examples = [{"input_ids": ids, "labels": y} for ids, y in zip(enc, labels)]
    return examples, info


def is_text(s):
    """False for a str that UTF-8 cannot encode (a lone surrogate, from JSON's "\\ud800")."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def is_int(v):
    """An integer label: an int, an integral float, or a string of digits ('1', '-1')."""
    if isinstance(v, bool):
        return False
    if isinstance(v, float):
        return v.is_integer()
    return isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())


def check_cells(raw, col, where, split):
    """A blank label or a repeated header row stops with the row named."""
    for i, v in enumerate(raw):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise UserError(f"{where(i)}: the {col} cell is blank; give every row a label or remove the row")
        if isinstance(v, str) and v.strip() == col:
            raise UserError(f"{where(i)} repeats the header row ({col!r} as a label); remove that line")


def label_space(raw, task, names, col, where):
    """The classes of a training split: {"task", "num_labels", "regression", "label_names"}. Regression for
    STS-B or non-integer floats; else the task's known names (GLUE, a hub ClassLabel), a generic file's
    class names (sorted) or its integers 0..max. Mixed integers and names, or a single class, stop with
    the rows named."""
    floats = [i for i, v in enumerate(raw) if isinstance(v, float) and not v.is_integer()]
    if task == "stsb" or (names is None and floats):
        return {"task": task, "num_labels": 1, "regression": True, "label_names": None}
    ints = [i for i, v in enumerate(raw) if is_int(v)]
    if names is None and 0 < len(ints) < len(raw):
        s = next(i for i, v in enumerate(raw) if not is_int(v))
        raise UserError(f"{where(ints[0])} has the integer label {raw[ints[0]]!r} and {where(s)} the name "
                        f"{raw[s]!r}; write every {col} as a class name or every one as an integer")
    space = {"task": task, "num_labels": None, "regression": False, "label_names": names}
    if names is None and not ints:
        space["label_names"] = sorted({str(v).strip() for v in raw})  # string labels of a generic file
    if space["label_names"] is not None:
        space["num_labels"] = len(space["label_names"])
    else:
        space["num_labels"] = max(int(float(raw[i])) for i in ints) + 1
        if space["num_labels"] <= 0:
            raise UserError(f"{where(0)}: the labels are negative (GLUE test splits are unlabelled, -1); "
                            "use train or validation")
    seen = {to_label(v, space, col, where(i)) for i, v in enumerate(raw)}
    if len(seen) < 2:
        only = raw[0] if raw else None
        raise UserError(f"every training row has the label {only!r}: a classifier needs at least two classes; "
                        f"check the {col} column (for regression write scores such as 0.5)")
    return space


def to_label(v, space, col, where):
    """One label through the training split's space: a float (regression) or a class index; a label
    outside the space stops with its row named."""
    if space["regression"]:
        try:
            return float(v)
        except (TypeError, ValueError):
            raise UserError(f"{where}: {col} {v!r} is not a number, and this task is a regression; "
                            "write a score") from None
    names, k = space["label_names"], space["num_labels"]
    if is_int(v):
        y = int(float(v))
        if y < 0:
            raise UserError(f"{where}: {col} is {y}, and negative labels mean unlabelled (GLUE test splits); "
                            "use train or validation, or fix the row")
        if y >= k:
            raise UserError(f"{where}: {col} {y} is outside the training split's classes 0..{k - 1}; fix the "
                            "row, or add examples of that class to the training split")
        return y
    if names is None or str(v).strip() not in names:
        what = f"one of the integers 0..{k - 1}" if names is None else f"one of {names}"
        raise UserError(f"{where}: {col} {v!r} is not a class of the training split ({what}); fix the row, "
                        "or add examples of that class to the training split")
    return names.index(str(v).strip())


def glue_task(folder):
    """The GLUE task a directory holds by its name (SST-2 -> sst2, STS-B -> stsb), else None."""
    key = folder.name.lower().replace("-", "").replace("_", "")
    return key if key in GLUE else None


def split_file(folder, split, task):
    """The file of `split` in a directory: train.tsv, dev.tsv (also for "validation"), MNLI's
    dev_matched.tsv / dev_mismatched.tsv, or <split>.csv / .json / .jsonl."""
    split = SPLITS.get(split, split)
    stems = {"validation": ["dev", "validation", "valid", "val"],
             "validation_matched": ["dev_matched"], "validation_mismatched": ["dev_mismatched"]}
    stems = stems.get(split, [split])
    if task == "mnli" and split == "validation":
        stems = ["dev_matched"] + stems
    for stem in stems:
        for ext in DATA_EXTS:
            if (folder / (stem + ext)).is_file():
                return folder / (stem + ext)
    found = sorted(f.name for f in folder.iterdir() if f.suffix in DATA_EXTS)
    raise UserError(f"no {split} split in {folder} (found {', '.join(found) or 'no data files'}); add "
                    f"{stems[0]}.tsv, .csv, .json or .jsonl")


def read_table(file, task=None):
    """A local csv / tsv / json(l) file as a datasets.Dataset, every cell read as written."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError
    headerless = task == "cola" and file.stem != "test"
    text = utf8_text(file)
    if file.suffix in (".json", ".jsonl"):
        check_json_table(text, file)
    first = list(itertools.islice(filter(str.strip, text.split("\n")), 2))  # the first two non-blank lines
    if len(first) < (1 if headerless or file.suffix in (".json", ".jsonl") else 2):
        raise UserError(f"{file} holds no examples (only blank lines or a header); give it at least one")
    kw = {}
    if file.suffix in (".tsv", ".csv"):
        kw = {"delimiter": "\t" if file.suffix == ".tsv" else ",", "keep_default_na": False}
    if file.suffix == ".tsv":
        kw["quoting"] = csv.QUOTE_NONE  # GLUE's TSVs hold unbalanced quotes inside sentences
    if headerless:
        kw.update(header=None, column_names=COLA_COLUMNS)
    kind = "json" if file.suffix in (".json", ".jsonl") else "csv"
    datasets_cache()
    try:
        return load_dataset(kind, data_files=str(file), split="train", **kw)
    except DatasetGenerationError as e:  # the parser's own error is its cause
        cause = " ".join(str(e.__cause__ or e).split())[:200]
        raise UserError(f"{file} could not be read as {file.suffix[1:]} ({cause}); fix the file") from None


def check_json_table(text, file):
    """A JSON table parsed here first: a syntax error or a lone surrogate is one line naming where (the
    parser behind load_dataset would log a traceback)."""
    if file.suffix == ".jsonl":
        rows = [(f"line {i + 1}", json_value(line, file, i + 1)) for i, line in enumerate(text.split("\n")) if line.strip()]
    else:
        rows = [(f"record {i}", r) for i, r in enumerate(json_value(text, file) if text.strip() else [])]
    for where, row in rows:
        if any(isinstance(v, str) and not is_text(v) for v in (row.values() if isinstance(row, dict) else [row])):
            raise UserError(f"{file} {where}: a cell holds a lone surrogate escape (e.g. \\ud800), not text; fix "
                            "that cell (write the character itself, or a valid pair of escapes)")


def hub_split(split, task):
    split = SPLITS.get(split, split)
    return "validation_matched" if task == "mnli" and split == "validation" else split


def find_columns(columns, source):
    """(text columns, label column) of a table, or a UserError naming what was found and expected."""
    texts = next((t for t in TEXT_COLUMNS if all(c in columns for c in t)), None)
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    if texts is None or label is None:
        expected = " | ".join("+".join(t) for t in TEXT_COLUMNS)
        raise UserError(f"{source}: found columns {', '.join(map(str, columns))}; expected text "
                        f"columns ({expected}) and a label column ({' | '.join(LABEL_COLUMNS)})")
    return list(texts), label


# ------------------------------------------------------------------------------------ images

class ImageExamples(Sequence):
    """[{"pixel_values": (C, H, W), "labels": int}], each processed when read (a whole data set
    of float images would not fit in memory)."""

    def __init__(self, ds, image_col, label_col, processor):
        self.ds, self.image_col, self.label_col, self.processor = ds, image_col, label_col, processor

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        try:
            row = self.ds[range(len(self))[i]]
            image = row[self.image_col].convert("RGB")
        except OSError as e:  # PIL cannot read the file (not an image, truncated)
            raise UserError(f"example {i} is not a readable image ({e}); remove or replace that file") from None
        x = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": x.float(), "labels": int(row[self.label_col])}


def load_images(source, split, processor):
    """(examples, info) from an imagefolder directory (<dir>/<split>/<class>/*.png, or <dir>/<class>/
    when there are no split folders: all of it is "train") or a hub image-classification dataset."""
    from datasets import ClassLabel, Image, load_dataset
    check_local(source, DATA_EXTS)
    if os.path.isdir(source):
        if not any(f.suffix.lower() in IMAGE_EXTS for f in Path(source).rglob("*")):
            raise UserError(f"{source} holds no images ({', '.join(IMAGE_EXTS)}); pass a folder laid out "
                            "as <split>/<class>/<image> or <class>/<image>")
        datasets_cache()
        dsd = load_dataset("imagefolder", data_dir=str(source))
    else:
        dsd = hub(source)
    split = SPLITS.get(split, split)
    if split not in dsd:
        raise UserError(f"no {split} split in {source}; found splits: {', '.join(dsd)}")
    ds = dsd[split]
    image_col = next((c for c, f in ds.features.items() if isinstance(f, Image)), None)
    label_col = next((c for c, f in ds.features.items() if isinstance(f, ClassLabel)), None)
    if image_col is None or label_col is None:
        raise UserError(f"{source}: found columns {', '.join(ds.column_names)}; expected an image "
                        "column and a class-label column")
    names = ds.features[label_col].names
    return (ImageExamples(ds, image_col, label_col, processor),
            {"task": "image", "num_labels": len(names), "label_names": names, "regression": False})


# ----------------------------------------------------------------------------------- batches

def collate(examples, pad_id) -> dict:
    """A batch of tensors, right-padded: input_ids (pad_id), attention_mask, labels (token labels
    padded with -100; int64 classes; float32 regression targets), or stacked pixel_values + labels."""
    if "pixel_values" in examples[0]:
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    ys = [e["labels"] for e in examples]
    if isinstance(ys[0], list):  # token labels of instruction data
        labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
        for i, y in enumerate(ys):
            labels[i, :len(y)] = torch.tensor(y, dtype=torch.long)
    elif any(isinstance(y, float) for y in ys):
        labels = torch.tensor(ys, dtype=torch.float32)
    else:
        labels = torch.tensor(ys, dtype=torch.long)
    batch["labels"] = labels
    return batch
