"""Run safety (issue 24; issue 26 items 2-3): a signal ends the step, checkpoints and exits 128 + signal,
and --resume then equals the uninterrupted run for every method; a second Ctrl-C, kill -9 or a full disk
during a checkpoint write keeps the previous checkpoint; runs are never overwritten silently; the
checkpoint carries every RNG (CUDA through a stub) and a GPU-written one opens on CPU; under torchrun
each rank draws its own dropout masks and resumes its own stream."""
import errno
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402

BASE = ["--model", "tiny-llama", "--max_len", "256", "--batch_size", "1", "--micro_batch_size", "1",
        "--max_samples", "8", "--eval_limit", "1", "--lr", "1e-3", "--dropout", "0.1", "--warmup", "1"]
METHODS = {  # name -> (flags, the steps a signal may come after)
    "lora": (["--max_steps", "3"], [1, 2]),
    "g2r2": (["--method", "g2r2", "--max_steps", "5", "--g2r2_warmup", "1", "--g2r2_prune", "2", "--g2r2_pf", "0.4"],
             [2]),                                              # mid-pruning: the resume prunes and refines
    "pilora": (["--method", "pilora", "--max_steps", "4", "--pilora_phase", "2", "--pilora_interval", "1"],
               [1]),                                            # stage 1: the resume switches
    "taso": (["--method", "taso", "--max_steps", "2", "--taso_calib_batches", "2"], [1]),
    "spsft": (["--method", "spsft", "--spsft_importance", "taylor", "--spsft_rows", "16",
               "--spsft_calib_batches", "2", "--max_steps", "2"], [1]),
}
FULL = {}


def argv(name, out, *extra):
    return BASE + METHODS[name][0] + ["--output_dir", str(out), *extra]


def full(name, tmp_path_factory):
    """The uninterrupted run of `name` (made once per module): its output folder."""
    if name not in FULL:
        out = tmp_path_factory.mktemp(f"full-{name}")
        assert train.cli(argv(name, out, "--overwrite")) == 0
        FULL[name] = out
    return FULL[name]


def same_run(a, b):
    """Equal losses (bit for bit) and equal trained tensors."""
    sa, sb = (json.load(open(d / "summary.json")) for d in (a, b))
    assert sa["losses"] == sb["losses"] and len(sa["losses"]) == sa["steps"]
    ta, tb = (load_file(d / "adapter.safetensors") for d in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


def signal_after_step(monkeypatch, k, *signums):
    """Send `signums` to this process right after the k-th optimizer step (as kill -TERM from outside would)."""
    calls = [0]
    step = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        out = step(self, *a, **kw)
        calls[0] += 1
        if calls[0] == k:
            for s in signums:
                os.kill(os.getpid(), s)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)


@pytest.mark.parametrize("name", list(METHODS))
def test_sigterm_checkpoints_and_resume_equals_uninterrupted(name, tmp_path, tmp_path_factory, monkeypatch, capsys):
    k = random.Random(name).choice(METHODS[name][1])
    ref = full(name, tmp_path_factory)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:
        signal_after_step(m, k, signal.SIGTERM)
        assert train.cli(argv(name, tmp_path)) == 128 + signal.SIGTERM
    total = json.load(open(ref / "summary.json"))["steps"]
    err = capsys.readouterr().err
    assert f"stopped at step {k} of {total} (SIGTERM); continue with the same command and --resume" in err, err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == k and not (tmp_path / "summary.json").exists()
    assert train.cli(argv(name, tmp_path, "--resume")) == 0
    same_run(tmp_path, ref)


def test_second_ctrl_c_during_the_write_keeps_the_previous_checkpoint(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """Ctrl-C twice while step 2's checkpoint is written: exit at once (130), ckpt.pt still holds step 1."""
    save = torch.save

    def interrupted_save(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 2:
            f.write(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step and checkpoint
            os.kill(os.getpid(), signal.SIGINT)  # the second: now
        return save(obj, f, *a, **kw)
    with monkeypatch.context() as m:
        m.setattr(torch, "save", interrupted_save)
        assert train.cli(argv("lora", tmp_path, "--save_every", "1")) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert f"stopped at once (SIGINT); {tmp_path}/ckpt.pt keeps step 1; continue with" in err, err
    assert train.load_weights(tmp_path / "ckpt.pt", "")["step"] == 1 and not (tmp_path / "ckpt.pt.tmp").exists()
    assert train.cli(argv("lora", tmp_path, "--resume")) == 0
    same_run(tmp_path, full("lora", tmp_path_factory))


def test_signal_before_training_stops_at_once(tmp_path, monkeypatch, capsys):
    load = train.load_data

    def interrupted(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return load(*a, **kw)
    monkeypatch.setattr(train, "load_data", interrupted)
    assert train.cli(argv("lora", tmp_path)) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "stopped at once (SIGTERM); nothing was trained yet; run the command again"


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    save = torch.save

    def full_disk(obj, f, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 2:
            f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    assert train.cli(argv("lora", tmp_path, "--save_every", "1")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"error: could not write {tmp_path}/ckpt.pt (No space left on device); the previous one is "
                         "kept: free space (or fix the folder) and continue with the same command and --resume")
    assert train.load_weights(tmp_path / "ckpt.pt", "")["step"] == 1 and not (tmp_path / "ckpt.pt.tmp").exists()


def test_kill_9_during_checkpoint_writes(tmp_path, tmp_path_factory, monkeypatch):
    """20 child processes write a real run's checkpoints in a loop and die by SIGKILL at a random moment:
    ckpt.pt always loads and is one of the complete checkpoints; --resume from it equals the uninterrupted run."""
    written = {}
    save = train.save_atomic

    def keep(obj, path):
        save(obj, path)
        if str(path).endswith("ckpt.pt"):
            written[obj["step"]] = torch.load(path, weights_only=True)  # a copy: the run goes on changing obj
    monkeypatch.setattr(train, "save_atomic", keep)
    train.main(argv("lora", tmp_path / "src", "--save_every", "1", "--stop_after", "2"))
    monkeypatch.undo()
    ckpts = [written[s] for s in sorted(written)]
    out = tmp_path / "run"
    out.mkdir()
    path, rng, mid_write = str(out / "ckpt.pt"), random.Random(0), 0
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # the child: write checkpoints until killed
            try:
                for k in range(10 ** 9):
                    train.save_atomic(ckpts[k % len(ckpts)], path)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += os.path.exists(path + ".tmp")  # killed between open and rename
        if os.path.exists(path):
            got = train.load_weights(path, "")
            want = ckpts[got["step"] - 1]
            assert all(torch.equal(got["trainable"][n], t) for n, t in want["trainable"].items())
            assert got["losses"] == want["losses"]
    assert mid_write >= 1  # at least one kill landed inside a write
    assert train.cli(argv("lora", out, "--resume")) == 0
    same_run(out, full("lora", tmp_path_factory))


class StubCuda:
    """torch.cuda as train.py's RNG helpers see it on a machine with one GPU: the generator's state counts
    the reads; set_rng_state records what a resume restores."""

    def __init__(self):
        self.reads, self.restored = 0, []

    def is_initialized(self):
        return True

    def device_count(self):
        return 1

    def get_rng_state_all(self):
        self.reads += 1
        return [torch.tensor([self.reads, 42], dtype=torch.uint8)]

    def set_rng_state(self, state, device):
        self.restored.append((device, state.tolist()))


def test_cuda_rng_in_checkpoint_and_a_gpu_checkpoint_opens_on_cpu(tmp_path, tmp_path_factory, monkeypatch):
    cuda = StubCuda()
    monkeypatch.setattr(train, "CUDA", cuda)
    train.main(argv("lora", tmp_path, "--save_every", "1", "--stop_after", "2"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["rng_ranks"][0]["cuda"][0].tolist() == [2, 42] == ckpt["rng"]["cuda"][0].tolist()
    # the same checkpoint as a GPU run writes it: every storage tagged cuda:0
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    monkeypatch.undo()
    monkeypatch.setattr(train, "CUDA", cuda)
    assert b"cuda:0" in (tmp_path / "ckpt.pt").read_bytes()
    if not torch.cuda.is_available():  # what loading it without map_location does on a CPU machine
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert train.cli(argv("lora", tmp_path, "--resume")) == 0
    assert cuda.restored == [(0, [2, 42])]  # the CUDA generator got back its state at step 2
    same_run(tmp_path, full("lora", tmp_path_factory))


def test_overwrite_refused_overwrite_and_resume_proceed(tmp_path, tmp_path_factory, capsys, monkeypatch):
    ref = full("lora", tmp_path_factory)
    import shutil
    shutil.copytree(ref, tmp_path / "run")
    before = (tmp_path / "run" / "summary.json").read_bytes()
    assert train.cli(argv("taso", tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "holds another run (ckpt.pt, summary.json, adapter.safetensors: --method lora --model tiny-llama, step 3 " \
           "(finished), 20" in err and "pass --resume to continue it, --overwrite to replace it" in err, err
    assert (tmp_path / "run" / "summary.json").read_bytes() == before  # untouched
    assert train.cli(argv("lora", tmp_path / "run", "--resume")) == 0  # a finished run: evaluated and written again
    assert json.load(open(tmp_path / "run" / "summary.json"))["losses"] == json.loads(before)["losses"]
    with monkeypatch.context() as m:  # --overwrite: the old files go before the new run starts
        signal_after_step(m, 1, signal.SIGTERM)
        assert train.cli(argv("taso", tmp_path / "run", "--overwrite")) == 128 + signal.SIGTERM
    left = sorted(p.name for p in (tmp_path / "run").iterdir() if p.suffix in (".pt", ".json", ".safetensors"))
    assert left == ["ckpt.pt"] and torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["args"]["method"] == "taso"


def test_default_output_folders_are_unique(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.time, "strftime", lambda fmt, *a: "20261204-150000")  # both in the same second
    for _ in range(2):
        assert train.cli(BASE + ["--max_steps", "1"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("output folder: ")]
    assert printed == ["output folder: out/lora-tiny-llama-20261204-150000",
                       "output folder: out/lora-tiny-llama-20261204-150000-1"]
    assert all((tmp_path / p.split(": ")[1] / "summary.json").exists() for p in printed)


def test_save_every_min_checkpoints_by_time(tmp_path):
    out = train.main(argv("lora", tmp_path, "--save_every_min", "1e-9", "--stop_after", "1"))
    assert out["stopped_at"] == 1 and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1


DRIVER = """import json, os, sys
import torch
sys.path.insert(0, {repo!r})
import common, train
masks, draw = [], common._dropout

def record(x, p):  # every dropout mask this process draws (forward, and backward's redraw)
    y, mask = draw(x, p)
    masks.append(mask.bool().clone())
    return y, mask
common._dropout = record
for out, argv in json.load(open(sys.argv[1])):
    masks.clear()
    train.main(argv)
    torch.save({{"masks": masks, "rng": torch.get_rng_state()}}, os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
"""


def test_torchrun_ranks_draw_their_own_masks_and_resume_them(tmp_path):
    """2 gloo processes, dropout 0.1: rank 0's and rank 1's masks differ (each process used to seed --seed
    alike, so micro-batch 0 on rank 0 and micro-batch 1 on rank 1 shared masks); stopped at step 2 and
    resumed, each rank draws the masks and ends with the RNG state of the uninterrupted run."""
    a = ["--batch_size", "2", "--micro_batch_size", "1", "--max_steps", "4"]  # 1 micro-batch per rank and step
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    calls = [(str(full_dir), argv("lora", full_dir, *a)),
             (str(cut_dir), argv("lora", cut_dir, *a, "--save_every", "2", "--stop_after", "2")),
             (str(cut_dir), argv("lora", cut_dir, *a, "--resume"))]
    (tmp_path / "calls.json").write_text(json.dumps(calls))
    (tmp_path / "driver.py").write_text(DRIVER.format(repo=REPO))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "driver.py"), str(tmp_path / "calls.json")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    f0, f1, r0, r1 = (torch.load(d / f"rank{r}.pt", weights_only=True) for d in (full_dir, cut_dir) for r in (0, 1))
    assert len(f0["masks"]) == len(f1["masks"]) > 0 and f0["masks"][0].shape == f1["masks"][0].shape
    assert not any(torch.equal(x, y) for x, y in zip(f0["masks"], f1["masks"]))  # per-rank streams
    for f, r in ((f0, r0), (f1, r1)):  # the resumed half draws the uninterrupted run's masks, rank by rank
        n = len(r["masks"])
        assert n == len(f["masks"]) // 2 and all(torch.equal(x, y) for x, y in zip(r["masks"], f["masks"][-n:]))
        assert torch.equal(r["rng"], f["rng"])
    same_run(cut_dir, full_dir)


# ---------------------------------------------- issue 33: nothing deleted before every input is checked

def files(d):
    """Every file under d (relative path -> bytes)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_eval_only_overwrite_never_touches_a_finished_run(tmp_path, tmp_path_factory):
    ref = full("lora", tmp_path_factory)
    import shutil
    shutil.copytree(ref, tmp_path / "run")
    before = files(tmp_path / "run")
    run = str(tmp_path / "run")
    assert train.cli(argv("lora", run, "--eval_only", "--overwrite", "--adapter", run)) == 0
    after = files(tmp_path / "run")
    assert {k: v for k, v in after.items() if k != "eval.json"} == before  # the run's own files, byte for byte
    timeless = lambda m: {k: v for k, v in m.items() if k != "eval_time_s"}  # noqa: E731
    assert timeless(json.loads(after["eval.json"])["metrics"]["eval"]) == \
        timeless(json.loads(before["summary.json"])["metrics"]["after"])


@pytest.mark.parametrize("bad", [["--data", "./no/such/data.json"], ["--targets", "q_projj"],
                                 ["--model", "./no/such/model"], ["--r", "1000"]])
def test_overwrite_with_bad_input_keeps_the_old_run(tmp_path, tmp_path_factory, bad):
    """Every input is checked before --overwrite touches the folder: a mistyped path, a target that matches
    nothing (found only when the method attaches), a missing model: exit 2, the old run byte for byte."""
    import shutil
    shutil.copytree(full("lora", tmp_path_factory), tmp_path / "run")
    before = files(tmp_path / "run")
    assert train.cli(argv("lora", tmp_path / "run", "--overwrite", *bad)) == 2
    assert files(tmp_path / "run") == before and not list(tmp_path.glob("run.old-*"))


def test_overwrite_moves_the_old_run_aside_at_the_first_write(tmp_path, tmp_path_factory, capsys):
    import shutil
    shutil.copytree(full("lora", tmp_path_factory), tmp_path / "run")
    before = files(tmp_path / "run")
    assert train.cli(argv("taso", tmp_path / "run", "--overwrite")) == 0
    old, = tmp_path.glob("run.old-*")
    assert files(old) == before  # nothing lost
    assert f"--overwrite: the old run's ckpt.pt, summary.json, adapter.safetensors, method_state.pt moved to {old}; " \
           "delete it when you no longer need it" in capsys.readouterr().out
    assert json.load(open(tmp_path / "run" / "summary.json"))["method"] == "taso"


def test_one_process_per_output_folder(tmp_path, capsys):
    """A lock of a live process (a real other process) is refused; once it is gone, the lock is taken over
    with a line; the run's lock is released when it ends."""
    out = tmp_path / "o"
    out.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(f"{other.pid} {socket.gethostname()}\n")
        assert train.cli(argv("lora", out)) == 2
        err = capsys.readouterr().err
        assert f"error: {out} is in use by another run (.lock: pid {other.pid} " in err, err
        assert (out / ".lock").read_text().startswith(str(other.pid)) and not (out / "ckpt.pt").exists()
    finally:
        other.kill()
        other.wait()
    assert train.cli(argv("lora", out)) == 0
    assert f"{out}: taking over the lock of pid {other.pid}, which is no longer running" in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "summary.json").exists()


def test_eval_every_history_survives_sigterm(tmp_path, monkeypatch):
    """summary.json's evaluations during training after SIGTERM + --resume equal the uninterrupted run's."""
    timeless = lambda s: [{k: v for k, v in m.items() if k != "eval_time_s"} for m in s["metrics"]["during"]]  # noqa: E731
    full_run = tmp_path / "full"
    assert train.cli(argv("lora", full_run, "--eval_every", "1")) == 0
    with monkeypatch.context() as m:
        signal_after_step(m, 2, signal.SIGTERM)
        assert train.cli(argv("lora", tmp_path / "cut", "--eval_every", "1")) == 128 + signal.SIGTERM
    assert train.cli(argv("lora", tmp_path / "cut", "--eval_every", "1", "--resume")) == 0
    sf, sc = (json.load(open(d / "summary.json")) for d in (full_run, tmp_path / "cut"))
    assert [m["step"] for m in sf["metrics"]["during"]] == [1, 2] and timeless(sc) == timeless(sf)
    same_run(tmp_path / "cut", full_run)


def test_full_disk_at_the_adapter_save(tmp_path, tmp_path_factory, monkeypatch, capsys):
    """ENOSPC while adapter.safetensors is written (safetensors' own error): one line, no half file, the final
    ckpt.pt kept; --resume once there is space writes the outputs of the uninterrupted run."""
    import safetensors.torch
    from safetensors import SafetensorError
    save = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"the first bytes")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert train.cli(argv("lora", tmp_path)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"error: could not write {tmp_path}/adapter.safetensors (No space left on device); "
                    f"{tmp_path}/ckpt.pt keeps the finished run (step 3): free space (or fix the folder) and run the "
                    "same command with --resume, which evaluates and writes the outputs"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no half adapter, no summary
    monkeypatch.setattr(safetensors.torch, "save_file", save)
    assert train.cli(argv("lora", tmp_path, "--resume")) == 0
    same_run(tmp_path, full("lora", tmp_path_factory))
