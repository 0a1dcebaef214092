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
        with p.open(encoding="utf-8") as f:
            records = [json_value(line, path, i + 1) for i, line in enumerate(f) if line.strip()]
    elif p.suffix == ".json":
        records = json_value(p.read_text(encoding="utf-8"), path)
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
    return records


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


def hub(name, *args, **kw):
    """datasets.load_dataset(name, ...) of a hub dataset, or a UserError when it cannot be loaded."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetsError
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


def load_classification(source, split, tokenizer, max_len):
    """(examples [{"input_ids", "labels"}], info) for a hub name, a local GLUE directory or a file
    (a file is one split: `split` is not used). Sentence pairs are encoded as tokenizer(a, b);
    labels are ints, or floats for regression."""
    path = Path(source)
    check_local(source, DATA_EXTS)
    if path.exists():
        task = glue_task(path if path.is_dir() else path.parent)
        file = split_file(path, split, task) if path.is_dir() else path
        if path.is_file() and SPLITS.get(split, split) != "train":
            print(f"warning: {source} is one file, so it is also the evaluation set (metrics on training "
                  "examples); for held-out metrics pass a folder with train and dev files", file=sys.stderr)
        ds, names = read_table(file, task), GLUE.get(task)
    else:
        name, _, config = str(source).partition(":")  # "name:config", or "glue/<task>"
        if name.rpartition("/")[0] in ("glue", "nyu-mll/glue"):
            name, _, config = name.rpartition("/")
        task = config if name in ("glue", "nyu-mll/glue") and config in GLUE else None
        ds = hub(name, config or None, split=hub_split(split, task))
        feature = next((ds.features[c] for c in LABEL_COLUMNS if c in ds.features), None)
        names = getattr(feature, "names", None)  # a ClassLabel's names
    texts, label_col = find_columns(ds.column_names, source)
    raw = list(ds[label_col])
    regression = task == "stsb" or (names is None and any(isinstance(v, float) and not v.is_integer()
                                                          for v in raw))
    if regression:
        labels, names = [float(v) for v in raw], None
    else:
        if names is None and any(isinstance(v, str) and not v.lstrip("-").isdigit() for v in raw):
            names = sorted({str(v) for v in raw})  # string labels of a generic file
        labels = [to_class(v, names, source) for v in raw]
        if any(y < 0 for y in labels):
            raise UserError(f"split {split!r} of {source} has no labels (GLUE test splits are "
                            "unlabelled); use train or validation")
    columns = [[str(t) for t in ds[c]] for c in texts]
    enc = tokenizer(*columns, truncation=True, max_length=max_len)["input_ids"]
    examples = [{"input_ids": ids, "labels": y} for ids, y in zip(enc, labels)]
    num_labels = 1 if regression else len(names) if names else max(labels) + 1
    return examples, {"task": task, "num_labels": num_labels, "regression": regression,
                      "label_names": names}


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
    with open(file, encoding="utf-8", errors="replace") as f:
        first = list(itertools.islice(filter(str.strip, f), 2))  # the first two non-blank lines
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
    try:
        return load_dataset(kind, data_files=str(file), split="train", **kw)
    except DatasetGenerationError as e:  # the parser's own error is its cause
        cause = " ".join(str(e.__cause__ or e).split())[:200]
        raise UserError(f"{file} could not be read as {file.suffix[1:]} ({cause}); fix the file") from None


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


def to_class(v, names, source):
    if isinstance(v, str) and not v.lstrip("-").isdigit():
        if names is None or v not in names:
            raise UserError(f"{source}: unknown label {v!r}; expected one of {names}")
        return names.index(v)
    return int(v)


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
