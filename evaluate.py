"""The evaluation protocols the papers report, written without extra dependencies.

- Commonsense reasoning, LLM-Adapters protocol (Hu et al. 2023; G²R² Table 1, PiLoRA Table 1): eight
  test sets (BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA) as JSON lists of
  {instruction, input, output, answer}; the training prompt template, generation with left padding
  in batches, the first match of the task's answer pattern, accuracy per task and their average.
- GLUE dev: accuracy, F1, Matthews correlation, Pearson and Spearman (GLUE_METRICS says which).
- Images: top-1 accuracy and per-class accuracy min / quartiles / max (SPSFT Table 1).

Deviations from LLM-Adapters' commonsense_evaluate.py, each on purpose:
- Greedy decoding by default (their script calls generate with num_beams=4: `--num_beams 4` in train.py).
- Only the new tokens are decoded (theirs decodes everything and splits on "### Response:"), and a
  missing pad token becomes EOS (theirs hard-codes id 0, LLaMA-1's unk): same answer text.
- `mode="loglik"` is our addition: each candidate response "the correct answer is {c}" is scored by its
  summed log-likelihood after the prompt and the argmax wins (exact, no generation, no format failures).
  Candidates are the ones the record's "Answer format:" line lists (ARC has 3–5 options), else all
  of the task's pattern.
"""
import copy
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import UserError

# ------------------------------------------------------------------------------------ metrics


def _pair(a, b):
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"predictions and references differ in length ({len(a)} vs {len(b)})")
    return a, b


def accuracy(pred, gold):
    pred, gold = _pair(pred, gold)
    return sum(p == g for p, g in zip(pred, gold)) / len(gold) if gold else 0.0


def f1(pred, gold, positive=1):
    """F1 of the positive class: 2TP / (2TP + FP + FN); 0 when there is nothing positive at all."""
    pred, gold = _pair(pred, gold)
    tp = sum(p == positive and g == positive for p, g in zip(pred, gold))
    fp = sum(p == positive and g != positive for p, g in zip(pred, gold))
    fn = sum(p != positive and g == positive for p, g in zip(pred, gold))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(pred, gold):
    """Matthews correlation from the confusion matrix, any number of classes (Gorodkin 2004):
    (c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²)); 0 when undefined (as sklearn)."""
    pred, gold = _pair(pred, gold)
    classes = set(pred) | set(gold)
    s, c = len(gold), sum(p == g for p, g in zip(pred, gold))
    pk = {k: pred.count(k) for k in classes}
    tk = {k: gold.count(k) for k in classes}
    cov = c * s - sum(pk[k] * tk[k] for k in classes)
    den = (s * s - sum(v * v for v in pk.values())) * (s * s - sum(v * v for v in tk.values()))
    return cov / math.sqrt(den) if den > 0 else 0.0


def pearson(x, y):
    """Pearson correlation in float64; 0 when either side is constant (undefined)."""
    x, y = _pair(map(float, x), map(float, y))
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def _ranks(x):
    """1-based ranks, ties get the average of the ranks they span."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    r, i = [0.0] * len(x), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x, y):
    """Spearman correlation: Pearson of the average ranks."""
    x, y = _pair(map(float, x), map(float, y))
    return pearson(_ranks(x), _ranks(y))


def _normalise(s):
    s = str(s).strip().lower()
    return s[:-1].rstrip() if s.endswith(".") else s


def exact_match(pred_texts, gold_texts):
    """Fraction of equal answers after strip, lowercase and removing one trailing period."""
    pred, gold = _pair(pred_texts, gold_texts)
    return accuracy([_normalise(p) for p in pred], [_normalise(g) for g in gold])


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}
GLUE_METRICS = {"sst2": ("accuracy",), "qnli": ("accuracy",), "rte": ("accuracy",), "mnli": ("accuracy",),
                "mnli_matched": ("accuracy",), "mnli_mismatched": ("accuracy",), "wnli": ("accuracy",),
                "mrpc": ("accuracy", "f1"), "qqp": ("accuracy", "f1"), "cola": ("matthews",),
                "stsb": ("pearson", "spearman")}


def glue_task(name):
    """'glue/sst2', 'SST-2', 'STS-B', 'mnli-mm' -> the GLUE_METRICS key (None stays None)."""
    if name is None:
        return None
    t = str(name).lower().replace("\\", "/").rstrip("/").split("/")[-1].replace("-", "")
    return {"mnlim": "mnli_matched", "mnlimm": "mnli_mismatched"}.get(t, t)


def glue_metrics(task, pred, gold, regression=False):
    """{metric: value} for a GLUE task; unknown/None task: accuracy, or Pearson/Spearman if regression."""
    t = glue_task(task)
    names = GLUE_METRICS.get(t, ("pearson", "spearman") if regression else ("accuracy",))
    return {m: METRICS[m](pred, gold) for m in names}


def _quantile(xs, q):
    """Linear-interpolation quantile of a list (numpy's / torch.quantile's default)."""
    xs, pos = sorted(xs), q * (len(xs) - 1)
    lo = math.floor(pos)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (pos - lo)


# --------------------------------------------------------------------- commonsense answer patterns

def _answers(word, k):
    return [f"{word}{i}" for i in range(1, k + 1)]


# LLM-Adapters commonsense_evaluate.py: the alternatives of each task's regex, in order. Their SIQA
# regex is answer1..answer5 although SIQA has three options; kept so numbers compare with the papers.
PATTERNS = {"boolq": ["true", "false"], "piqa": _answers("solution", 2), "social_i_qa": _answers("answer", 5),
            "arc-challenge": _answers("answer", 5), "arc-easy": _answers("answer", 5),
            "openbookqa": _answers("answer", 5), "hellaswag": _answers("ending", 4),
            "winogrande": _answers("option", 2)}
ALIASES = {"siqa": "social_i_qa", "obqa": "openbookqa", "arc-c": "arc-challenge", "arc-e": "arc-easy"}
RESPONSE = "the correct answer is {}"  # the training output format of commonsense_170k


def _task_key(task):
    t = ALIASES.get(str(task).lower(), str(task).lower())
    if t not in PATTERNS:
        raise UserError(f"unknown commonsense task {task!r}; name the file or folder after one of: "
                        f"{', '.join(PATTERNS)} (case-insensitive)")
    return t


def candidates(task):
    """All answers of the task's pattern, e.g. ['true', 'false'] for boolq."""
    return list(PATTERNS[_task_key(task)])


def extract_answer(task, text):
    """The first match of the task's answer pattern in a generation, None when nothing matches."""
    pattern = "|".join(PATTERNS[_task_key(task)])
    m = re.search(pattern, text.strip()) if isinstance(text, str) else None
    return m.group(0) if m else None


def _options(task, instruction):
    """The candidates the record's 'Answer format: a/b/c' line lists, else the task's whole pattern."""
    allowed = candidates(task)
    m = re.search(r"Answer format:\s*([\w/ ]+)", instruction or "")
    listed = [c.strip() for c in m.group(1).split("/")] if m else []
    return [c for c in listed if c in allowed] or allowed


# ----------------------------------------------------------------------------------- helpers

@contextmanager
def _eval_mode(model):
    """model.eval() inside, every submodule's previous training flag restored after; yields the device."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield next(model.parameters()).device
    finally:
        for m, t in modes.items():
            m.training = t


@contextmanager
def _padding(tokenizer, side):
    """Temporarily pad on `side`, with EOS as pad token when the tokenizer has none."""
    old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
    if old_pad is None and tokenizer.eos_token is None:
        raise UserError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    tokenizer.pad_token, tokenizer.padding_side = old_pad or tokenizer.eos_token, side
    try:
        yield tokenizer
    finally:
        tokenizer.pad_token, tokenizer.padding_side = old_pad, old_side


def _generate(model, tokenizer, prompts, batch_size, max_new_tokens, num_beams=1, desc=None):
    """Decoded new tokens of deterministic generation, left-padded batches."""
    dev, texts = next(model.parameters()).device, []
    eos = model.generation_config.eos_token_id  # stop at the model's and the tokenizer's EOS
    eos = [e for e in (eos if isinstance(eos, list) else [eos]) + [tokenizer.eos_token_id] if e is not None]
    with _padding(tokenizer, "left"):
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=desc is None):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=num_beams, use_cache=True, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return texts


def _loglik_scores(model, tokenizer, items, batch_size, desc=None):
    """Summed log p(response | prompt) for each (prompt, response) pair, exact, in three cached steps:
    the token prefix every pair shares (the template) runs once; each prompt's own tokens run once on
    a copy of that cache, keeping only the last logits; its candidates' remaining tokens run on copies
    of the prompt's cache (right-padded, batch_size at a time). Cost: about one prompt per question."""
    groups = {}
    for i, (p, _) in enumerate(items):
        groups.setdefault(p, []).append(i)
    dev, scores = next(model.parameters()).device, [0.0] * len(items)
    run = []  # (idx, fulls, starts, c): tokens [0, c) are shared by the group's pairs
    for p, idx in groups.items():
        ctx = tokenizer(p)["input_ids"]
        fulls = [tokenizer(p + items[i][1])["input_ids"] for i in idx]
        starts = [max(_shared(ctx, f), 1) for f in fulls]  # the first response token of each
        run.append((idx, fulls, starts, min(starts + [_shared(f, fulls[0]) for f in fulls])))
    # the template: tokens [0, base) shared by all groups, at least one own token left to each group
    firsts = [fulls[0] for _, fulls, _, _ in run]
    base = max(0, min([c - 1 for *_, c in run] + [_shared(firsts[0], f) for f in firsts], default=0))
    base_cache = model(input_ids=torch.tensor([firsts[0][:base]], device=dev), use_cache=True,
                       logits_to_keep=1).past_key_values if base > 0 else None
    for idx, fulls, starts, c in tqdm(run, desc=desc, leave=False, disable=desc is None):
        last, cache = None, None
        if c:
            out = model(input_ids=torch.tensor([fulls[0][base:c]], device=dev), use_cache=True,
                        past_key_values=copy.deepcopy(base_cache), logits_to_keep=1)
            last, cache = out.logits[0, -1:].float(), out.past_key_values  # logits at c - 1 predict token c
        for j in range(0, len(idx), batch_size):
            chunk = list(range(j, min(j + batch_size, len(idx))))
            S = max(len(fulls[b]) - c for b in chunk)
            ids = torch.zeros(len(chunk), max(S, 1), dtype=torch.long)
            mask = torch.zeros(len(chunk), c + max(S, 1), dtype=torch.long)
            for row, b in enumerate(chunk):
                ids[row, :len(fulls[b]) - c] = torch.tensor(fulls[b][c:], dtype=torch.long)
                mask[row, :len(fulls[b])] = 1
            kv = None
            if cache is not None:
                kv = copy.deepcopy(cache)
                kv.batch_repeat_interleave(len(chunk))
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), past_key_values=kv,
                           use_cache=cache is not None).logits.float()  # position c + t predicts c + t + 1
            first = last.expand(len(chunk), 1, -1) if last is not None else \
                torch.full_like(logits[:, :1], float("nan"))  # without a prefix, token 0 is never scored
            logits = torch.cat([first, logits], 1)  # now position k predicts token c + k
            for row, b in enumerate(chunk):
                t = torch.arange(starts[b], len(fulls[b]), device=dev)  # scored tokens
                if len(t):
                    logp = F.log_softmax(logits[row, t - c], dim=-1)
                    tok = torch.tensor(fulls[b][starts[b]:], device=dev)
                    scores[idx[b]] = logp.gather(1, tok[:, None]).double().sum().item()
    return scores


def _shared(a, b):
    """Length of the common prefix of two token lists."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _commonsense_files(source):
    """[(task, path)] for a file, or the known tasks' <task>.json files and <task>/test.json in a folder."""
    src = Path(source)
    if src.is_file():
        return [(src.parent.name if src.stem == "test" else src.stem, src)]
    if not src.is_dir():
        raise UserError(f"--eval_commonsense {source}: no such file or directory; check the path")
    if (src / "test.json").is_file():
        return [(src.name, src / "test.json")]
    found = [(d.name, d / "test.json") for d in src.iterdir() if (d / "test.json").is_file()]
    found = sorted([(t, f) for t, f in found + [(f.stem, f) for f in src.glob("*.json")]
                    if ALIASES.get(t.lower(), t.lower()) in PATTERNS], key=lambda t: t[0].lower())
    if not found:
        raise UserError(f"no test sets in {source}; give it <task>/test.json or <task>.json files, "
                        f"task one of {', '.join(PATTERNS)}")
    return found


def commonsense_records(path):
    """The records of an LLM-Adapters test file: a JSON list of {"instruction", "answer"} objects (strings;
    "input" optional), or a UserError naming the record and field."""
    from data import is_text, json_value, utf8_text
    records = json_value(utf8_text(path), path)
    if not isinstance(records, list):
        raise UserError(f"{path} holds a JSON {type(records).__name__}, not a list of records; "
                        "write [{\"instruction\": ..., \"answer\": ...}, ...]")
    if not records:
        raise UserError(f"{path} holds no records (an empty task would score 0 and pull the average down); "
                        "fill it or remove the file")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{path}: record {i} is a JSON {type(r).__name__}, not an object; "
                            "each record must be {\"instruction\": ..., \"answer\": ...}")
        bad = next((k for k in ("instruction", "answer") if not isinstance(r.get(k), str)), None)
        bad = bad or ("input" if r.get("input") is not None and not isinstance(r["input"], str) else None)
        if bad:
            what = "is missing" if bad not in r else f"is not a string (a JSON {type(r[bad]).__name__})"
            raise UserError(f"{path}: record {i}'s {bad} {what}; give every record an instruction and an "
                            "answer as JSON strings")
        bad = next((k for k in ("instruction", "input", "answer") if not is_text(r.get(k) or "")), None)
        if bad:
            raise UserError(f"{path}: record {i}'s {bad} holds a lone surrogate escape (e.g. \\ud800), not text; "
                            "fix that record")
    return records


def check_commonsense(source):
    """Every test file of `source` read and checked before training (evaluation runs at the end)."""
    for task, path in _commonsense_files(source):
        _task_key(task)
        commonsense_records(path)


# -------------------------------------------------------------------------------- evaluations

@torch.no_grad()
def evaluate_commonsense(model, tokenizer, source, mode="generate", batch_size=8, max_new_tokens=32,
                         limit=None, num_beams=1):
    """Accuracy per commonsense task and their average: {task: acc, "average", "n": {task: n}, "mode"}."""
    from data import json_value, prompt
    if mode not in ("generate", "loglik"):
        raise ValueError(f"--eval_mode must be generate or loglik, got {mode!r}")
    files = _commonsense_files(source)
    for task, _ in files:
        _task_key(task)  # fail before any model work on a badly named file
    out, n = {}, {}
    with _eval_mode(model):
        for task, path in files:
            records = commonsense_records(path)[:limit]
            prompts = [prompt(r["instruction"], r.get("input") or "") for r in records]
            if mode == "generate":
                texts = _generate(model, tokenizer, prompts, batch_size, max_new_tokens, num_beams, f"{task} (generate)")
                preds = [extract_answer(task, t) for t in texts]
            else:
                opts = [_options(task, r["instruction"]) for r in records]
                items = [(p, RESPONSE.format(c)) for p, o in zip(prompts, opts) for c in o]
                flat, preds, k = _loglik_scores(model, tokenizer, items, batch_size, f"{task} (loglik)"), [], 0
                for o in opts:
                    s = flat[k:k + len(o)]
                    preds.append(o[s.index(max(s))])  # ties: the first candidate
                    k += len(o)
            out[task] = accuracy(preds, [r["answer"] for r in records])
            n[task] = len(records)
    out["average"] = sum(out[t] for t in n) / len(n)
    out["n"], out["mode"] = n, mode
    return out


@torch.no_grad()
def evaluate_generation(model, tokenizer, records, batch_size=16, max_new_tokens=8):
    """Exact match of the first generated line against record["answer"]: {"exact_match", "n"}."""
    from data import prompt
    records = list(records)
    prompts = [prompt(r["instruction"], r.get("input", "")) for r in records]
    with _eval_mode(model):
        texts = _generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    first = [t.strip().split("\n")[0] for t in texts]
    return {"exact_match": exact_match(first, [r["answer"] for r in records]), "n": len(records)}


@torch.no_grad()
def evaluate_loss(model, batches):
    """Mean loss per response token (labels ≠ -100) over all batches: the eval loss of instruction data."""
    total, n = 0.0, 0
    with _eval_mode(model):
        for b in batches:
            k = int((b["labels"][:, 1:] != -100).sum())
            if k:  # a batch with no target token has loss nan (0 / 0): it counts nothing
                total += float(model(**b).loss) * k
                n += k
    return total / max(n, 1)


@torch.no_grad()
def evaluate_classification(model, batches, task=None, regression=False):
    """GLUE metrics of argmax(logits) (logits[:, 0] for regression) against batch["labels"]."""
    pred, gold = [], []
    with _eval_mode(model) as dev:
        for b in batches:
            b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits.float()
            pred += (logits[:, 0] if regression else logits.argmax(-1)).tolist()
            gold += b["labels"].tolist()
    return glue_metrics(task, pred, gold, regression=regression)


@torch.no_grad()
def evaluate_images(model, batches, num_labels):
    """Top-1 accuracy and min / quartiles / max of the per-class accuracies (classes present in labels)."""
    hit, count = torch.zeros(num_labels, dtype=torch.long), torch.zeros(num_labels, dtype=torch.long)
    with _eval_mode(model) as dev:
        for b in batches:
            b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
            y = b["labels"].cpu()
            p = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1).cpu()
            count += torch.bincount(y, minlength=num_labels)
            hit += torch.bincount(y[p == y], minlength=num_labels)
    per_class = [h / c for h, c in zip(hit.tolist(), count.tolist()) if c > 0]
    if not per_class:
        raise UserError("the image evaluation split has no labelled examples; give it <class>/<image> folders")
    stats = {"accuracy": hit.sum().item() / count.sum().item()}
    for name, q in [("min", 0), ("q1", 0.25), ("median", 0.5), ("q3", 0.75), ("max", 1)]:
        stats[f"class_acc_{name}"] = _quantile(per_class, q)
    return stats


# -------------------------------------------------------------------------------------- table

def _flat(d, prefix=""):
    """{"n": {"boolq": 3}} -> {"n.boolq": 3}."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def print_table(metrics, title=""):
    """A compact aligned table; {run: {metric: value}} (all values dicts) prints one column per run."""
    if metrics and all(isinstance(v, dict) for v in metrics.values()):
        cols = {c: _flat(v) for c, v in metrics.items()}
    else:
        cols = {"value": _flat(metrics)}
    rows = list(dict.fromkeys(k for c in cols.values() for k in c))
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    table = [["metric", *cols]] + [[r, *(cell(c[r]) if r in c else "-" for c in cols.values())] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    if title:
        print(title)
    for j, row in enumerate(table):
        print("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
