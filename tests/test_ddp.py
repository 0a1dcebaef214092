"""train.py under torchrun: 2 CPU processes (gloo) against one process with the same global batch and
seed, for every method: per-step losses, trainable-parameter count and the method's decisions; G²R²
and PiLoRA resumed mid-stage under DDP; --eval_only; a process group that cannot start. All DDP runs share one
torchrun launch (a driver calls train.main for each), which saves the start-up of every launch."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402

BASE = ["--model", "tiny-llama", "--max_len", "256", "--max_samples", "48", "--eval_limit", "2", "--lr", "1e-3",
        "--dropout", "0", "--dtype", "fp32", "--warmup", "1"]
RUNS = {  # name -> arguments (the output dir is added); every run is also made in one process
    "lora": ["--batch_size", "4", "--micro_batch_size", "1", "--max_steps", "4"],  # 2 micro-batches per process
    "g2r2": ["--method", "g2r2", "--batch_size", "4", "--micro_batch_size", "1", "--max_steps", "8",
             "--g2r2_warmup", "2", "--g2r2_prune", "3", "--g2r2_pf", "0.4"],   # exact scores, refine after step 4
    "g2r2_bf16": ["--method", "g2r2", "--batch_size", "4", "--micro_batch_size", "1", "--max_steps", "8",
                  "--g2r2_warmup", "2", "--g2r2_prune", "3", "--g2r2_pf", "0.4", "--dtype", "bf16", "--grad_ckpt"],
    "pilora": ["--method", "pilora", "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "6",
               "--pilora_phase", "3", "--pilora_interval", "1"],                 # switch after step 2
    "taso": ["--method", "taso", "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3",
             "--taso_calib_batches", "5"],                                        # 3 + 2 calibration batches
    "taso_groups": ["--method", "taso", "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "2",
                    "--taso_calib_batches", "5", "--taso_score_groups", "3"],             # a pass per run of layers
    "spsft": ["--method", "spsft", "--spsft_importance", "taylor", "--spsft_rows", "16", "--spsft_calib_batches",
              "3", "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3"],
    "spsft_groups": ["--method", "spsft", "--spsft_importance", "taylor", "--spsft_rows", "16",
                     "--spsft_calib_batches", "3", "--spsft_score_groups", "3", "--batch_size", "4",
                     "--micro_batch_size", "2", "--max_steps", "2"],
    "spsft_qm": ["--model", "tiny-vit", "--method", "spsft", "--spsft_importance", "qm_taylor", "--spsft_rows", "16",
                 "--spsft_calib_batches", "3", "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "3"],
}
STOPS = {"g2r2": 3, "pilora": 2}  # stopped mid-pruning / mid-stage-1, then --resume
DRIVER = """import json, sys
sys.path.insert(0, {repo!r})
import train
for argv in json.load(open(sys.argv[1])):
    train.main(argv)
"""


def images(root):
    """A small imagefolder (train, validation) with three classes of 12 × 10 RGB pictures."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("validation", 1)):
        for c in ("a", "b", "c"):
            (root / "img" / split / c).mkdir(parents=True)
            for k in range(n):
                px = torch.randint(0, 256, (10, 12, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(root / "img" / split / c / f"{k}.png")
    return str(root / "img")


def argv(name, out, data):
    extra = ["--data", data] if name == "spsft_qm" else []
    return BASE + RUNS[name] + extra + ["--output_dir", str(out)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (DDP output dir, one-process output dir)}; the DDP runs in one torchrun launch."""
    root = tmp_path_factory.mktemp("ddp")
    data = images(root)
    calls = []
    for name in RUNS:
        calls.append(argv(name, root / "ddp" / name, data))
        if name in STOPS:
            stop = argv(name, root / "ddp" / f"{name}_resumed", data)
            calls += [stop + ["--save_every", str(STOPS[name]), "--stop_after", str(STOPS[name])], stop + ["--resume"]]
    calls.append(argv("lora", root / "ddp" / "lora_eval", data) + ["--eval_only", "--adapter", str(root / "ddp" / "lora")])
    (root / "calls.json").write_text(json.dumps(calls))
    (root / "driver.py").write_text(DRIVER.format(repo=REPO))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(root / "driver.py"), str(root / "calls.json")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    for name in RUNS:
        train.main(argv(name, root / "one" / name, data))
    return {name: (root / "ddp" / name, root / "one" / name) for name in RUNS} | {
        f"{name}_resumed": (root / "ddp" / f"{name}_resumed", root / "ddp" / name) for name in STOPS}


def summary(d):
    return json.load(open(d / "summary.json"))


def state(d):
    return torch.load(d / "method_state.pt", weights_only=True)


def same_run(a, b, tol=1e-5):
    sa, sb = summary(a), summary(b)
    assert len(sa["losses"]) == len(sb["losses"]) and len(sa["losses"]) > 0
    assert max(abs(x - y) for x, y in zip(sa["losses"], sb["losses"])) <= tol, (sa["losses"], sb["losses"])
    assert sa["trainable_params_end"] == sb["trainable_params_end"]
    assert sa["trainable_params_start"] == sb["trainable_params_start"]
    return sa, sb


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_equal_one(runs, name):
    ddp, one = runs[name]
    s2, s1 = same_run(ddp, one, tol=1e-4 if "bf16" in name else 1e-5)
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    timeless = lambda m: {k: v for k, v in m.items() if k != "eval_time_s"}
    assert timeless(s2["metrics"]["after"]) == timeless(s1["metrics"]["after"])  # rank 0 evaluated
    a, b = state(ddp), state(one)
    if name.startswith("g2r2"):
        assert s2["pruned_at_step"] == s1["pruned_at_step"] and len(s2["pruned_at_step"]) > 0
        assert s2["retained_modules"] == s1["retained_modules"]
        for n, h in s1["r_hat"].items():
            assert (h is None) == (s2["r_hat"][n] is None) and (h is None or s2["r_hat"][n] == pytest.approx(h, rel=1e-4))
    elif name == "pilora":
        assert a["stage"] == b["stage"] == "stage2"
        assert all(torch.equal(a["dominant"][n], b["dominant"][n]) for n in b["dominant"])
        assert all(torch.equal(a["hits"][n], b["hits"][n]) for n in b["hits"])
    elif name.startswith("taso"):
        assert a["calib_batches"] == b["calib_batches"] == 5
        assert all(torch.equal(a["rows"][n], b["rows"][n]) and torch.equal(a["cols"][n], b["cols"][n]) for n in b["rows"])
    elif name.startswith("spsft"):
        assert all(torch.equal(a["idx"][n], b["idx"][n]) for n in b["idx"])


def test_eval_only_under_ddp_evaluates_on_rank0(runs):
    ddp, _ = runs["lora"]
    timeless = lambda m: {k: v for k, v in m.items() if k != "eval_time_s"}
    evaluated = json.load(open(ddp.parent / "lora_eval" / "eval.json"))  # --eval_only writes its own file
    assert timeless(evaluated["metrics"]["eval"]) == timeless(summary(ddp)["metrics"]["after"])


@pytest.mark.parametrize("name", list(STOPS))
def test_resume_mid_stage_under_ddp_equals_uninterrupted(runs, name):
    resumed, full = runs[f"{name}_resumed"]
    sr, sf = same_run(resumed, full, tol=1e-6)
    a, b = state(resumed), state(full)
    if name == "g2r2":
        assert sr["pruned_at_step"] == sf["pruned_at_step"] and a["refined"] and b["refined"]
    else:
        assert all(torch.equal(a["dominant"][n], b["dominant"][n]) for n in b["dominant"])


@pytest.mark.parametrize("n", [0, 1, 5, 8])
def test_shards_deal_every_batch_once(monkeypatch, n):
    """Batch k goes to process k mod world size: the shares of 3 processes add up to n and differ by ≤ 1."""
    import common
    shares = []
    for rank in range(3):
        monkeypatch.setattr(common, "world", lambda rank=rank: (rank, 3))
        shares.append(common.shard_len(n))
    assert sum(shares) == n and max(shares) - min(shares) <= 1 and shares == sorted(shares, reverse=True)
    assert shares == [sum(1 for k in range(n) if k % 3 == r) for r in range(3)]  # dealt out one by one


def launch_alone(env, *extra):
    """train.py as one process of a group that cannot start: (exit status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")} | env
    p = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--model", "tiny-llama", "--max_steps", "1",
                        "--batch_size", "2", "--micro_batch_size", "1", "--output_dir", "unused", *extra],
                       env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and "; " in err, err
    return err


def test_process_group_that_cannot_start_says_so_in_one_line():
    with socket.socket() as busy:  # rank 0's store cannot listen on a port that is taken
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        err = launch_alone(dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port)))
    assert "process group" in err and "address already in use" in err and "torchrun" in err, err
    err = launch_alone(dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"))  # WORLD_SIZE without a launcher
    assert "MASTER_ADDR" in err and "torchrun --nproc_per_node" in err, err
    err = launch_alone(dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"), "--batch_size", "3")
    assert "do not divide among 2 processes" in err and "multiple of --micro_batch_size × 2" in err, err
