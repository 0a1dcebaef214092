"""Copy-paste size: the lines a user takes to run a method in their own code, i.e. the method file plus
every repository module it imports, transitively (read from the import statements, not guessed).

    python bench/copy_paste.py     # per method: lines for an own loop, with interop.py for Trainer, and
                                   # the own loop's code lines (no blank, comment or docstring lines)
"""
import ast
import io
import os
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {"LoRA": "common.py", "G2R2": "g2r2.py", "PiLoRA": "pilora.py", "TASO": "taso.py", "SPSFT": "spsft.py"}


def local_imports(path):
    """The repository modules (top-level .py files) that `path` imports anywhere in its text."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return sorted(n + ".py" for n in names if os.path.isfile(os.path.join(ROOT, n + ".py")))


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
    """{method: (files, lines for an own loop, lines with interop.py for transformers.Trainer, own loop's code lines)}."""
    out = {}
    for name, file in METHODS.items():
        files = closure(file)
        with_trainer = sorted(set(files) | set(closure("interop.py")))
        out[name] = (files, lines(files), lines(with_trainer), code_lines(files))
    return out


def main():
    print(f"{'method':8} {'own loop':>8} {'Trainer':>8} {'code':>6}  files")
    for name, (files, own, trainer, code) in sizes().items():
        print(f"{name:8} {own:8d} {trainer:8d} {code:6d}  {' + '.join(files)}")


if __name__ == "__main__":
    sys.exit(main())
