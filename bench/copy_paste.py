"""Copy-paste size: the lines a user takes to run a method in their own code, i.e. the method file plus
every repository module it imports, transitively (read from the import statements, not guessed), the
third-party modules those files import, and the targets of issue 32.

    python bench/copy_paste.py           # per method: lines for an own loop, with interop.py for Trainer / the
                                         # PEFT export, the own loop's code lines, third-party modules, targets
    python bench/copy_paste.py --write   # rewrite the figures in README.md and docs/own-code.md (between the
                                         # <!-- copy-paste --> markers); tests/test_docs.py fails when they differ
"""
import ast
import io
import os
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"LoRA": "common.py", "G2R2": "g2r2.py", "PiLoRA": "pilora.py", "TASO": "taso.py", "SPSFT": "spsft.py"}
TARGETS = {"G2R2": (800, 550)}  # (lines, code lines) for an own loop; every other method (650, 450)
DOCS = ["README.md", os.path.join("docs", "own-code.md")]
BEGIN, END = "<!-- copy-paste -->", "<!-- /copy-paste -->"


def imports(path):
    """{top-level module name: True when imported at module level, False when only inside a function}."""
    out = {}

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            names = ([a.name for a in child.names] if isinstance(child, ast.Import) else
                     [child.module] if isinstance(child, ast.ImportFrom) and child.module and not child.level else [])
            for n in names:
                out[n.split(".")[0]] = out.get(n.split(".")[0], False) or top
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))
    visit(ast.parse(open(path).read()), True)
    return out


def local_imports(path):
    """The repository modules (top-level .py files) that `path` imports anywhere in its text."""
    return sorted(n + ".py" for n in imports(path) if os.path.isfile(os.path.join(ROOT, n + ".py")))


def third_party(files):
    """{module: True when some file imports it at module level}: what the files need beyond the standard library."""
    out = {}
    for f in files:
        for n, top in imports(os.path.join(ROOT, f)).items():
            if n not in sys.stdlib_module_names and not os.path.isfile(os.path.join(ROOT, n + ".py")):
                out[n] = out.get(n, False) or top
    return dict(sorted(out.items()))


def closure(file):
    """`file` and every repository module it imports, transitively."""
    seen, todo = [], [file]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.append(f)
            todo += local_imports(os.path.join(ROOT, f))
    return sorted(seen)


def lines(files):
    return sum(sum(1 for _ in open(os.path.join(ROOT, f))) for f in files)


def code_lines(files):
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    total = 0
    for f in files:
        text = open(os.path.join(ROOT, f)).read()
        doc = set()
        for node in ast.walk(ast.parse(text)):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                doc |= set(range(body[0].lineno, body[0].end_lineno + 1))
        code = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                                  tokenize.DEDENT, tokenize.ENDMARKER)}
        total += len(code - doc)
    return total


def sizes():
    """{method: dict(files, lines, trainer, code, needs, target)}: lines for an own loop, lines with interop.py
    (transformers.Trainer, PEFT export), the own loop's code lines, third-party modules, (lines, code) targets."""
    out = {}
    for name, file in METHODS.items():
        files = closure(file)
        with_trainer = sorted(set(files) | set(closure("interop.py")))
        out[name] = dict(files=files, lines=lines(files), trainer=lines(with_trainer), code=code_lines(files),
                         needs=third_party(files), extra=third_party(with_trainer),
                         target=TARGETS.get(name, (650, 450)))
    return out


def verdict(n, limit):
    return f"{n:,} ✓" if n <= limit else f"{n:,} (target {limit}: missed by {n - limit})"


def render(s=None):
    """The markdown the docs carry: one row per method, then the third-party modules."""
    s = s or sizes()
    rows = ["| method | files (own loop) | lines | code lines | with `interop.py` (Trainer, PEFT export) |",
            "| --- | --- | ---: | ---: | ---: |"]
    for name, r in s.items():
        rows.append(f"| {name} | {' + '.join(f'`{f}`' for f in r['files'])} | {verdict(r['lines'], r['target'][0])} | "
                    f"{verdict(r['code'], r['target'][1])} | {r['trainer']:,} |")
    needs = sorted(set().union(*(r["needs"] for r in s.values())))
    extra = sorted(set().union(*(r["extra"] for r in s.values())) - set(needs))
    rows += ["", f"Third-party modules of the own-loop files: {', '.join(f'`{n}`' for n in needs) or 'none'}; "
             f"`interop.py` adds {', '.join(f'`{n}`' for n in extra) or 'none'}. "
             f"Generated by `python bench/copy_paste.py --write`."]
    return "\n".join(rows)


def stale(text, table):
    """The text with its copy-paste block replaced by `table` (None when it has no block)."""
    if BEGIN not in text or END not in text:
        return None
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    s = sizes()
    print(f"{'method':8} {'own loop':>8} {'Trainer':>8} {'code':>6}  files; third-party")
    for name, r in s.items():
        print(f"{name:8} {r['lines']:8d} {r['trainer']:8d} {r['code']:6d}  {' + '.join(r['files'])}; "
              f"{', '.join(n + ('' if top else ' (in a function)') for n, top in r['needs'].items())}")
    if "--write" in argv:
        for doc in DOCS:
            path = os.path.join(ROOT, doc)
            new = stale(open(path).read(), render(s))
            if new is None:
                print(f"{doc}: no {BEGIN} block")
                return 1
            open(path, "w").write(new)
            print(f"wrote {doc}")


if __name__ == "__main__":
    sys.exit(main())
