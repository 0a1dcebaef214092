"""README.md and docs/*.md against the code: every relative link resolves (file and #anchor), every
`file.name` they mention exists, and every function the README's equation -> code table names runs
when its method trains (a table entry cannot point at dead code). All of it is parsed from the
documents, so a new page, a moved function or a new table row is checked without editing this file."""
import functools
import inspect
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import train  # noqa: E402

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
MODULES = {p.stem for p in ROOT.glob("*.py")}  # `common.ema` names common.py's ema
# Pages other issues are adding in parallel; the README links them already. Once one exists it is
# checked like any other link, and test_landing_list_is_current asks for its entry to be removed.
LANDING = set()  # pages linked before they land (none now)


def prose(text):
    """The text outside fenced code blocks."""
    return re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)


def code_spans(text):
    return re.findall(r"`([^`\n]+)`", prose(text))


def anchors(md):
    """GitHub's heading ids of a markdown file: lower case, punctuation dropped, spaces to hyphens,
    a repeated id numbered -1, -2, ..."""
    seen, out = {}, set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", prose(md.read_text(encoding="utf-8")), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(doc):
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(doc.read_text(encoding="utf-8")))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    bad = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        rel = os.path.relpath(file, ROOT)
        if not file.exists():
            if rel not in LANDING:
                bad.append(f"{target}: no file {rel}")
            continue
        if anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            bad.append(f"{target}: no heading #{anchor} in {rel}")
    assert not bad, f"{doc.name}: broken links: {bad}"


def test_landing_list_is_current():
    landed = sorted(p for p in LANDING if (ROOT / p).exists())
    assert not landed, f"{landed} exist now: remove them from LANDING in tests/test_docs.py"


def resolve(name):
    """The object `mod.attr.attr` names, importing mod from the repository root."""
    mod, *attrs = name.split(".")
    obj = __import__(mod)
    for a in attrs:
        obj = getattr(obj, a)
    return obj


def dotted_names(text):
    """`mod.attr...` code spans (call arguments dropped) whose mod is a file of this repository;
    `mod.py` is a file name, not a name in it."""
    out = set()
    for span in code_spans(text):
        m = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(\(.*\))?", span.strip())
        if m and m.group(1).split(".")[0] in MODULES and not m.group(1).endswith(".py"):
            out.add(m.group(1))
    return out


def paths(text):
    """Code spans that are repository paths of a file (`tests/test_export.py`, `common.py`)."""
    return {s for s in code_spans(text)
            if re.fullmatch(r"[\w./-]+\.(py|md|sh|txt)", s) and not s.startswith(("../", "/", "~"))}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_code_exists(doc):
    text, bad = doc.read_text(encoding="utf-8"), []
    for name in sorted(dotted_names(text)):
        try:
            resolve(name)
        except AttributeError as e:
            bad.append(f"{name} ({e})")
    for p in sorted(paths(text)):
        if not any((base / p).exists() for base in (ROOT, doc.parent)) and p not in LANDING:
            bad.append(f"{p}: no such file")
    assert not bad, f"{doc.name} names what does not exist: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_parse(doc):
    """Every `python train.py ...` / `torchrun ... train.py ...` line of a bash block is a command
    train.py accepts (flags only; nothing runs)."""
    text = doc.read_text(encoding="utf-8")
    for block in re.findall(r"^ *```bash\n(.*?)^ *```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "train.py" in words and words[0] in ("python", "torchrun"):
                train.parse_args(words[words.index("train.py") + 1:])


# ------------------------------------------------------------------ equation table -> running code

def equation_table():
    """{method: [names]} from the README's "equations → code" table: the paper cell (G²R² (000) ->
    g2r2) holds for the rows below it until the next paper."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## [^\n]*equations?[^\n]*code[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M | re.I)
    assert section, "README.md has no '## ... equations → code' section"
    table, method = {}, None
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) < 3 or set(cells[0]) <= set("-: ") and cells[0] or cells[0] == "paper":
            continue
        if cells[0]:
            method = cells[0].split()[0].lower().replace("²", "2")
        table.setdefault(method, []).extend(
            s for s in re.findall(r"`([^`]+)`", cells[-1]) if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", s))
    return table


def counted(obj, owner, attr, called, monkeypatch):
    """Replace obj (owner.attr: a function, or every function a class defines: __init__, forward, an
    autograd Function's forward / backward) by wrappers that add the original's code object to
    `called`; return those code objects."""
    if inspect.isclass(obj):
        return set().union(*[counted(v, obj, k, called, monkeypatch) for k, v in list(vars(obj).items())
                             if inspect.isfunction(getattr(v, "__func__", v))])
    raw = vars(owner).get(attr, obj) if inspect.isclass(owner) else obj
    f = getattr(raw, "__func__", raw)
    if not inspect.isfunction(inspect.unwrap(f)):
        return set()
    code = inspect.unwrap(f).__code__

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        called.add(code)
        return f(*args, **kwargs)
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else (lambda w: w)
    monkeypatch.setattr(owner, attr, kind(wrapper))
    return {code}


def tsv_task(path, n=24):
    """A tiny GLUE-style folder (train.tsv, dev.tsv) with two classes."""
    path.mkdir()
    rows = ["sentence\tlabel"] + [f"{'good nice' if i % 2 else 'bad awful'} film {i}\t{i % 2}" for i in range(n)]
    (path / "train.tsv").write_text("\n".join(rows) + "\n")
    (path / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")
    return path


BASE = ["--model", "tiny-bert", "--batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-3",
        "--max_samples", "8", "--eval_limit", "4", "--merge"]
# The runs that exercise each method's paths: every estimator / importance the table names, and
# long enough to reach G²R²'s refinement and PiLoRA's stage 2; --merge runs the merges.
RUNS = {
    "lora": [["--method", "lora", "--max_steps", "1"]],
    "g2r2": [["--method", "g2r2", "--max_steps", "3", "--g2r2_warmup", "1", "--g2r2_prune", "1"],
             *[["--method", "g2r2", "--max_steps", "3", "--g2r2_warmup", "1", "--g2r2_prune", "1",
               "--g2r2_score", score] for score in ("paper", "random", "product")]],
    "pilora": [["--method", "pilora", "--max_steps", "4", "--pilora_phase", "2", "--pilora_interval", "1"]],
    "taso": [["--method", "taso", "--max_steps", "1", "--taso_calib_batches", "2", "--taso_score_groups", "2"]],
    "spsft": [["--method", "spsft", "--max_steps", "1", "--spsft_rows", "4", "--spsft_importance", imp,
               "--spsft_calib_batches", "2"] for imp in ("l2", "taylor", "qm_taylor")],
}


def test_equation_table_runs(tmp_path, monkeypatch):
    """Every function (or class) in the README's equation table runs when its method trains and
    merges: each is wrapped to record its calls, then RUNS[method] train a tiny BERT through train.main."""
    table = equation_table()
    assert set(table) <= set(RUNS), f"no runs for {set(table) - set(RUNS)}: add them to RUNS"
    folder = tsv_task(tmp_path / "SST-2")
    called, codes = set(), {}
    for name in sorted({n for names in table.values() for n in names}):
        parent, _, attr = name.rpartition(".")
        codes[name] = counted(resolve(name), resolve(parent), attr, called, monkeypatch)
        assert codes[name], f"{name}: not a Python function or class"
    dead = []
    for method, names in table.items():
        called.clear()
        for i, argv in enumerate(RUNS[method]):
            train.main(BASE + ["--data", str(folder), "--output_dir", str(tmp_path / f"{method}{i}")] + argv)
        dead += [f"{method}: {n}" for n in names if not codes[n] & called]
    assert not dead, f"the README's equation table names code its method never runs: {dead}"


def test_a_single_classification_file_is_called_the_evaluation_set(tmp_path, capsys):
    """The README promises a warning when one file is both the training and the evaluation set."""
    folder = tsv_task(tmp_path / "SST-2")
    tok = data.byte_tokenizer()
    data.load_classification(str(folder / "train.tsv"), "train", tok, 32)
    assert "warning" not in capsys.readouterr().err
    data.load_classification(str(folder / "train.tsv"), "validation", tok, 32)
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "evaluation set" in err and "folder with train and dev" in err
    data.load_classification(str(folder), "validation", tok, 32)  # a folder's dev file: no warning
    assert "warning" not in capsys.readouterr().err


def test_copy_paste_figures_are_the_count():
    """README.md's and docs/own-code.md's copy-paste table is what bench/copy_paste.py counts now (a stated
    figure that differs fails: run `python bench/copy_paste.py --write`)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import copy_paste
    table = copy_paste.render()
    for doc in copy_paste.DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        assert copy_paste.stale(text, table) == text, f"{doc}: run `python bench/copy_paste.py --write`"


def test_copy_paste_counts_by_hand(tmp_path, monkeypatch):
    """The counter on two hand-made files: lines, code lines (no docstring, comment or blank line), the import
    closure and the third-party modules with where they are imported."""
    sys.path.insert(0, str(ROOT / "bench"))
    import copy_paste
    (tmp_path / "a.py").write_text('"""doc\nstring"""\nimport b\nimport torch\n\n# note\nx = 1  # one\n')
    (tmp_path / "b.py").write_text("def f():\n    import tqdm\n    return 2\n")
    monkeypatch.setattr(copy_paste, "ROOT", str(tmp_path))
    assert copy_paste.closure("a.py") == ["a.py", "b.py"]
    assert copy_paste.lines(["a.py", "b.py"]) == 7 + 3
    assert copy_paste.code_lines(["a.py"]) == 3 and copy_paste.code_lines(["b.py"]) == 3
    assert copy_paste.third_party(["a.py", "b.py"]) == {"torch": True, "tqdm": False}
