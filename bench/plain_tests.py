"""Run test functions of tests/*.py without pytest (bench/gpu_check.sh on a machine that lacks it).

    python bench/plain_tests.py tests/test_memory.py -k reuses_the_forward_mask --json out/gpu/tests.json

A stand-in `pytest` module (installed in sys.modules whether or not pytest is) gives the test files what they use at
import time and in the selected tests: mark.parametrize (ids, stacked), mark.skipif, param(..., marks=),
approx, raises, skip, fixture (as a marker: a test that takes a fixture other than tmp_path is skipped).
Every parametrized case whose name (test_x[id-id]) contains one of the -k words runs; pass, fail (with the
error) or skip is printed and written to --json. Exit status 1 when a case fails.
"""
import argparse
import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import sys
import tempfile
import time
import traceback
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Param:
    def __init__(self, *values, marks=(), id=None):
        self.values, self.marks, self.id = values, marks if isinstance(marks, (list, tuple)) else [marks], id


class _Skip(Exception):
    pass


class _Mark:
    @staticmethod
    def parametrize(names, values, ids=None, **unused):
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)

        def deco(fn):
            fn.__dict__.setdefault("_plain_params", []).append((names, list(values), ids))  # pytest: nearest first
            return fn
        return deco

    @staticmethod
    def skipif(cond, reason=""):
        def deco(fn):
            fn.__dict__.setdefault("_plain_skip", []).append((cond, reason))
            return fn
        deco.skip = (cond, reason)
        return deco

    def __getattr__(self, name):  # slow, filterwarnings, ...: no effect here
        return lambda *a, **k: (lambda fn: fn)


def _approx(expected, rel=1e-6, abs=1e-12):
    class Approx:
        def __eq__(self, got):
            return math.isclose(got, expected, rel_tol=rel, abs_tol=abs)
    return Approx()


@contextlib.contextmanager
def _raises(exc, match=None):
    try:
        yield
    except exc as e:
        if match is not None:
            import re
            assert re.search(match, str(e)), f"{e!r} does not match {match!r}"
        return
    raise AssertionError(f"did not raise {exc}")


def stub_pytest():
    """The stand-in module, installed as sys.modules['pytest']."""
    m = types.ModuleType("pytest")
    m.mark, m.param, m.approx, m.raises = _Mark(), _Param, _approx, _raises
    m.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda fn: fn))

    def skip(reason=""):
        raise _Skip(reason)
    m.skip = skip
    m.importorskip = lambda name, *a, **k: importlib.import_module(name)
    return m


def cases(fn):
    """(id, kwargs, skip reason or None) for every combination of fn's parametrize decorators."""
    layers = []
    for names, values, ids in fn.__dict__.get("_plain_params", []):
        opts = []
        for i, v in enumerate(values):
            p = v if isinstance(v, _Param) else _Param(*(v if len(names) > 1 else (v,)))
            skip = next((s.skip for s in p.marks if getattr(s, "skip", None) and s.skip[0]), None)
            vid = p.id or (ids[i] if ids else "-".join(str(x) for x in p.values))
            opts.append((vid, dict(zip(names, p.values)), skip))
        layers.append(opts)
    for combo in itertools.product(*layers):
        kwargs, skip = {}, next((s for c in combo for s in [c[2]] if s), None)
        for c in combo:
            kwargs.update(c[1])
        skip = skip or next(((c, r) for c, r in fn.__dict__.get("_plain_skip", []) if c), None)
        yield "-".join(c[0] for c in combo), kwargs, skip[1] if skip else None


def run(files, words):
    results = []
    for path in files:
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name, fn in vars(mod).items():
            if not (name.startswith("test_") and inspect.isfunction(fn)):
                continue
            for cid, kwargs, skip in cases(fn):
                full = f"{name}[{cid}]" if cid else name
                if words and not any(w in full for w in words):
                    continue
                extra = [a for a in inspect.signature(fn).parameters if a not in kwargs]
                t = time.time()
                if skip is None and set(extra) - {"tmp_path"}:
                    skip = f"needs fixtures {extra}"
                if skip is not None:
                    res = {"test": f"{path}::{full}", "outcome": "skipped", "reason": skip}
                else:
                    try:
                        with tempfile.TemporaryDirectory() as tmp:
                            import pathlib
                            fn(**kwargs, **({"tmp_path": pathlib.Path(tmp)} if "tmp_path" in extra else {}))
                        res = {"test": f"{path}::{full}", "outcome": "passed"}
                    except _Skip as e:
                        res = {"test": f"{path}::{full}", "outcome": "skipped", "reason": str(e)}
                    except Exception as e:  # noqa: BLE001 (recorded, and the next case runs)
                        res = {"test": f"{path}::{full}", "outcome": "failed",
                               "error": f"{type(e).__name__}: {e}"[:500],
                               "traceback": traceback.format_exc(limit=-3)[-1500:]}
                res["s"] = round(time.time() - t, 2)
                print(f"{res['outcome'].upper():8} {res['test']} ({res['s']} s)"
                      + (f"  {res.get('error') or res.get('reason')}" if res["outcome"] != "passed" else ""), flush=True)
                results.append(res)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("-k", nargs="+", default=[], help="run the cases whose name contains one of these words")
    p.add_argument("--json")
    args = p.parse_args(argv)
    sys.modules["pytest"] = stub_pytest()  # also where pytest is installed: the same runner everywhere
    sys.path.insert(0, ROOT)
    results = run(args.files, args.k)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "skipped")}
    print(f"plain_tests: {counts}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump({"runner": "bench/plain_tests.py", "counts": counts, "results": results}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
