"""Copy-paste size: the lines a user takes to run a method in their own code, i.e. the method file plus
every repository module it imports, transitively (read from the import statements, not guessed).

    python bench/copy_paste.py            # a table: method, files, lines (own loop; + interop.py for Trainer)
"""
import ast
import os
import sys

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


def sizes():
    """{method: (files, lines for an own loop, lines with interop.py for transformers.Trainer)}."""
    out = {}
    for name, file in METHODS.items():
        files = closure(file)
        with_trainer = sorted(set(files) | set(closure("interop.py")))
        out[name] = (files, lines(files), lines(with_trainer))
    return out


def main():
    print(f"{'method':8} {'own loop':>8} {'Trainer':>8}  files")
    for name, (files, own, trainer) in sizes().items():
        print(f"{name:8} {own:8d} {trainer:8d}  {' + '.join(files)}")


if __name__ == "__main__":
    sys.exit(main())
