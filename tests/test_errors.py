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
    return str(dst)


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
    ("eval into a run folder", lambda t, r: ["--eval_only", "--output_dir", spoil(r, t / "o", "")],
     "holds another run (ckpt.pt, summary.json, adapter.safetensors: --method lora"),
    ("finished run without ckpt", lambda t, r: ["--resume", "--output_dir", spoil(r, t / "o", "no_ckpt")],
     "holds a finished run and no ckpt.pt to resume (summary.json, adapter.safetensors: --method lora --model "
     "tiny-llama, step 2 (finished)"),
    ("resume and overwrite", lambda t, r: ["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    ("resume with another rank", lambda t, r: ["--resume", "--r", "4", "--output_dir", spoil(r, t / "o", "")],
     "saved tensors do not fit this model"),
    ("resume with fewer targets", lambda t, r: ["--resume", "--targets", "q_proj", "--output_dir", spoil(r, t / "o", "")],
     "saved tensors are not in this model"),
    ("save_every_min < 0", lambda t, r: ["--save_every_min", "-1"], "--save_every_min must be >= 0"),
]


@pytest.mark.parametrize("name, make, phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(name, make, phrase, tmp_path, done, capsys):
    argv = TINY + ["--output_dir", str(tmp_path / "out")] + make(tmp_path, done)  # the last flag wins
    line = cli(capsys, argv)
    assert phrase in line, line


def test_battery_size():
    assert len(CASES) >= 25 + 17


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


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    # lr 1e30: Adam moves every adapter weight by ~1e30 in step 1, so step 2's logits overflow
    line = cli(capsys, TINY + ["--max_steps", "4", "--lr", "1e30", "--save_every", "1", "--warmup", "0",
                               "--output_dir", str(out)])
    assert re.search(r"the loss is (nan|inf) at step 2\b.*ckpt.pt keeps step 1\b", line), line
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and len(ckpt["losses"]) == 1 and math.isfinite(ckpt["losses"][0])
    assert not (out / "summary.json").exists()


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
