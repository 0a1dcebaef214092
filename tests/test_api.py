"""Using a method from your own code (issue 22): strict constructors (unknown keyword: TypeError; bad value:
ValueError at construction naming the keyword), loud misuse within one step, method.parameters(), the CLI
naming flags for keywords, and the two examples: own_loop.py against train.py's losses, trainer.py
with num_train_epochs."""
import os
import re
import runpy
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import g2r2  # noqa: E402
import pilora  # noqa: E402
import spsft  # noqa: E402
import taso  # noqa: E402
import train  # noqa: E402
from helpers import llama_batches  # noqa: E402
from models import build_tiny  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIN = nn.Linear(16, 8)
REQUIRED = {g2r2.G2R2: dict(total_steps=10), pilora.PiLoRA: dict(phase=2)}  # what each cannot run without

# (class, a bad keyword setting, the keyword its message names); required keywords added from REQUIRED
BAD = [
    (common.LoRA, dict(r=0), "r"), (common.LoRA, dict(alpha=0.0), "alpha"), (common.LoRA, dict(dropout=1.0), "dropout"),
    (common.LoRA, dict(targets="q_proj"), "targets"), (common.LoRA, dict(heads="classifier"), "heads"),
    (g2r2.G2R2, dict(total_steps=None), "total_steps"), (g2r2.G2R2, dict(total_steps=-1), "total_steps"),
    (g2r2.G2R2, dict(warmup=-1), "warmup"), (g2r2.G2R2, dict(warmup=8, prune=2), "warmup"),
    (g2r2.G2R2, dict(pf=0.0), "pf"), (g2r2.G2R2, dict(p0=0.1, pf=0.2), "pf"), (g2r2.G2R2, dict(beta1=1.0), "beta1"),
    (g2r2.G2R2, dict(beta2=-0.1), "beta2"), (g2r2.G2R2, dict(score="fisher"), "score"),
    (g2r2.G2R2, dict(score_every=0), "score_every"), (g2r2.G2R2, dict(micro_batches=0), "micro_batches"),
    (g2r2.G2R2, dict(r=0), "r"),
    (pilora.PiLoRA, dict(phase=None), "phase"), (pilora.PiLoRA, dict(phase=0), "phase"),
    (pilora.PiLoRA, dict(phase=5, total_steps=5), "phase"), (pilora.PiLoRA, dict(interval=0), "interval"),
    (pilora.PiLoRA, dict(tau=0.0), "tau"), (pilora.PiLoRA, dict(partition="half"), "partition"),
    (pilora.PiLoRA, dict(r_supp=9), "r_supp"), (pilora.PiLoRA, dict(r_supp=-1), "r_supp"),
    (pilora.PiLoRA, dict(alpha=float("nan")), "alpha"),
    (taso.TASO, dict(calib_batches=0), "calib_batches"), (taso.TASO, dict(topk=0), "topk"),
    (taso.TASO, dict(density=1.5), "density"), (taso.TASO, dict(metric="fisher"), "metric"),
    (taso.TASO, dict(select="diag"), "select"), (taso.TASO, dict(lr_scale="cube"), "lr_scale"),
    (taso.TASO, dict(score_groups=0), "score_groups"), (taso.TASO, dict(dropout=-0.1), "dropout"),
    (spsft.SPSFT, dict(importance="fisher"), "importance"), (spsft.SPSFT, dict(rows=0), "rows"),
    (spsft.SPSFT, dict(ratio=0.0), "ratio"), (spsft.SPSFT, dict(calib_batches=0), "calib_batches"),
    (spsft.SPSFT, dict(score_groups=0), "score_groups"), (spsft.SPSFT, dict(targets=["q", 3]), "targets"),
    # the adapter layers
    (common.LoRALinear, dict(base=LIN, r=9, alpha=1.0), "r"), (common.LoRALinear, dict(base=LIN, r=2, alpha=-1.0), "alpha"),
    (common.LoRALinear, dict(base=nn.Conv1d(2, 2, 1), r=2, alpha=1.0), "base"),
    (g2r2.G2R2Linear, dict(base=LIN, r=2, alpha=1.0, dropout=2.0), "dropout"),
    (pilora.PiLoRALinear, dict(base=LIN, dominant=[0, 8], r=2, r_supp=1, alpha=1.0), "dominant"),
    (pilora.PiLoRALinear, dict(base=LIN, dominant=[1, 1], r=2, r_supp=1, alpha=1.0), "dominant"),
    (pilora.PiLoRALinear, dict(base=LIN, dominant=[1], r=2, r_supp=-1, alpha=1.0), "r_supp"),
    (taso.TASOLinear, dict(base=LIN, rows=torch.tensor([9]), cols=torch.tensor([0]), r=2, alpha=1.0), "rows"),
    (taso.TASOLinear, dict(base=LIN, rows=torch.tensor([0]), cols=torch.tensor([16]), r=2, alpha=1.0), "cols"),
    (taso.TASOLinear, dict(base=LIN, rows=torch.tensor([0]), cols=torch.tensor([1]), r=0, alpha=1.0), "r"),
    (spsft.SPSFTLinear, dict(base=LIN, idx=torch.tensor([-1])), "idx"),
    (spsft.SPSFTLinear, dict(base=LIN, idx=torch.tensor([], dtype=torch.long)), "idx"),
]
GOOD = {common.LoRA: {}, g2r2.G2R2: {}, pilora.PiLoRA: {}, taso.TASO: {}, spsft.SPSFT: {},
        common.LoRALinear: dict(base=LIN, r=2, alpha=1.0), g2r2.G2R2Linear: dict(base=LIN, r=2, alpha=1.0),
        pilora.PiLoRALinear: dict(base=LIN, dominant=[1], r=2, r_supp=1, alpha=1.0),
        taso.TASOLinear: dict(base=LIN, rows=torch.tensor([1]), cols=torch.tensor([2]), r=1, alpha=1.0),
        spsft.SPSFTLinear: dict(base=LIN, idx=torch.tensor([3]))}


def full(cls, kw):
    return {**REQUIRED.get(cls, {}), **GOOD[cls], **kw}


@pytest.mark.parametrize("cls", list(GOOD), ids=lambda c: c.__name__)
def test_unknown_or_misspelled_keyword_is_a_type_error(cls):
    cls(**full(cls, {}))  # the good settings construct
    for wrong in ("rank", "g2r2_warmup", "spsft_rows", "importnace"):
        with pytest.raises(TypeError, match=wrong):
            cls(**full(cls, {wrong: 1}))


@pytest.mark.parametrize("cls,kw,name", BAD, ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, n) in enumerate(BAD)])
def test_each_bad_value_is_a_value_error_at_construction_naming_the_keyword(cls, kw, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        cls(**full(cls, kw))


def test_spsft_rows_and_importance_reach_the_method():
    """The issue's example: SPSFT(rows=8, importance="taylor") is 8 rows by Taylor, not 128 by ℓ2."""
    m = spsft.SPSFT(rows=8, importance="taylor", calib_batches=1)
    m.attach(build_tiny("tiny-llama"), iter(llama_batches(1)))
    assert m.importance == "taylor" and {len(i) for i in m.idx.values()} == {8}


def test_heads_and_r_supp_are_arguments_not_names_or_classes():
    model = build_tiny("tiny-bert", num_labels=3)
    m = common.LoRA(r=2)
    m.attach(model)  # no heads given: nothing outside the adapters trains, whatever the modules are called
    assert all(n.rpartition(".")[2].startswith("lora_") for n, p in model.named_parameters() if p.requires_grad)
    model = build_tiny("tiny-bert", num_labels=3)
    m = common.LoRA(r=2, heads=["classifier"])
    m.attach(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= names and {id(p) for p in m.parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad}
    assert pilora.PiLoRA(phase=2).r_supp == 1 and pilora.PiLoRA(phase=2, causal=True).r_supp == 2
    assert pilora.PiLoRA(phase=2, causal=True, r_supp=0).r_supp == 0


# ------------------------------------------------------------------------ misuse is loud within one step

def hand_loop(method, steps, skip_after_backward=False, keep_optimizer=False, model=None):
    """A plain loop over tiny-llama; returns the step at which it raised and the error (or None, None)."""
    model = model or build_tiny("tiny-llama")
    data = llama_batches(steps)
    method.attach(model)
    opt = torch.optim.AdamW(method.param_groups(1e-2))
    for step in range(steps):
        try:
            model(**data[step]).loss.backward()
            if not skip_after_backward:
                method.after_backward(step)
            opt.step()
            if method.after_step(step) and not keep_optimizer:
                opt = torch.optim.AdamW(method.param_groups(1e-2))
            opt.zero_grad(set_to_none=True)
        except RuntimeError as e:
            return step, str(e)
    return None, None


@pytest.mark.parametrize("make", [lambda: pilora.PiLoRA(r=2, phase=2, interval=1, dropout=0.0),
                                  lambda: g2r2.G2R2(r=2, total_steps=5, warmup=1, prune=2, dropout=0.0)],
                         ids=["pilora", "g2r2"])
def test_a_forgotten_after_backward_stops_the_first_step(make):
    step, err = hand_loop(make(), 5, skip_after_backward=True)
    assert step == 0 and "after_backward(0) was not called" in err and "call method.after_backward(step)" in err


@pytest.mark.parametrize("make,switch", [(lambda: pilora.PiLoRA(r=2, phase=2, interval=1, dropout=0.0), 1),
                                         (lambda: g2r2.G2R2(r=2, total_steps=6, warmup=1, prune=2, dropout=0.0), 2)],
                         ids=["pilora", "g2r2"])
def test_an_ignored_true_from_after_step_stops_the_next_step(make, switch):
    """PiLoRA's stage-2 tensors missing from the optimizer (they would stay zero), G²R²'s removed tensors
    kept in it: the step after the switch raises, naming the fix."""
    step, err = hand_loop(make(), 6, keep_optimizer=True)
    assert step == switch + 1 and "rebuild the optimizer over method.param_groups(lr)" in err, (step, err)
    assert hand_loop(make(), 6) == (None, None)  # the correct loop runs through


def test_a_step_that_goes_backwards_or_skips_raises():
    m = pilora.PiLoRA(r=2, phase=3, interval=1, dropout=0.0)
    model = build_tiny("tiny-llama")
    m.attach(model)
    model(**llama_batches(1)[0]).loss.backward()
    m.after_backward(0)
    m.after_step(0)
    with pytest.raises(RuntimeError, match=r"after_backward\(0\): expected step 1"):
        m.after_backward(0)
    with pytest.raises(RuntimeError, match=r"after_step\(3\): expected step 1"):
        m.after_step(3)
    lora = common.LoRA(r=2)
    lora.attach(build_tiny("tiny-llama"))
    lora.after_step(4)
    with pytest.raises(RuntimeError, match="expected step 5"):
        lora.after_backward(2)


def test_parameters_before_attach_says_so():
    with pytest.raises(RuntimeError, match="call attach"):
        common.LoRA().parameters()


# ------------------------------------------------------------------------------- the CLI keeps its words

@pytest.mark.parametrize("argv,flag", [
    (["--method", "g2r2", "--g2r2_warmup", "3", "--max_steps", "4"], "lower --g2r2_warmup / --g2r2_prune"),
    (["--method", "pilora", "--pilora_phase", "4", "--max_steps", "4"], "pass a smaller --pilora_phase"),
    (["--method", "taso", "--taso_density", "2"], "--taso_density must be in (0, 1]"),
    (["--method", "spsft", "--spsft_importance", "qm_taylor", "--max_steps", "1"], "use --spsft_importance taylor"),
    (["--method", "spsft", "--spsft_mlp_only", "--targets", "q_proj", "--max_steps", "1"], "MLP layers in --targets"),
])
def test_errors_raised_in_a_method_name_the_flag(capsys, tmp_path, argv, flag):
    assert train.cli(["--model", "tiny-llama", "--output_dir", str(tmp_path), "--eval_limit", "1", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and flag in lines[-1] and "`" not in lines[-1], lines[-1]


# ------------------------------------------------------------------------------------------ the examples

def run_example(name, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return runpy.run_path(os.path.join(ROOT, "examples", name), run_name="__main__")


@pytest.mark.parametrize("method", list(train.METHODS))
def test_own_loop_trains_every_method_to_train_py_losses(method, tmp_path, monkeypatch, capsys):
    steps = 4
    run_example("own_loop.py", ["--method", method, "--model", "tiny-llama", "--steps", str(steps),
                                "--out", str(tmp_path / "own")], monkeypatch)
    own = [float(x) for x in re.findall(r"step \d+: loss ([\d.]+)", capsys.readouterr().out)]
    flags = {"g2r2": [], "pilora": ["--pilora_phase", str(steps // 2)], "taso": ["--taso_calib_batches", "4"],
             "spsft": ["--spsft_rows", "8"], "lora": []}[method]
    ref = train.main(["--method", method, "--model", "tiny-llama", "--max_steps", str(steps), "--dtype", "fp32",
                      "--schedule", "constant", "--warmup", "0", "--eval_limit", "1",
                      "--output_dir", str(tmp_path / "train"), *flags])["losses"]
    assert len(own) == steps and max(abs(a - b) / b for a, b in zip(own, ref)) <= 1e-6, (own, ref)  # fp32 sum orders
    assert os.path.isfile(tmp_path / "own" / "config.json")  # the merged export


@pytest.mark.parametrize("method", list(train.METHODS))
def test_trainer_example_runs_every_method_with_num_train_epochs(method, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    g = run_example("trainer.py", ["--method", method, "--model", "tiny-llama", "--epochs", "1", "--max_samples",
                                   "24", "--out", str(tmp_path)], monkeypatch)
    assert g["trainer"].state.global_step == g["steps"] == 3  # num_train_epochs: 24 examples of 8
    m = g["method"]
    assert m.next_step == 3 if method in ("g2r2", "pilora") else True
    assert {"g2r2": lambda: m.refined, "pilora": lambda: m.stage == "stage2"}.get(method, lambda: True)()
    assert os.path.isfile(tmp_path / "peft" / "adapter_config.json") and os.path.isdir(tmp_path / "merged")


def test_trainer_refuses_a_method_built_for_another_length(tmp_path):
    """num_train_epochs: Trainer's max_steps is its own count (-1 in TrainingArguments); a G²R² whose stages
    were cut from another total stops before the first step, naming total_steps and Trainer's count."""
    transformers = pytest.importorskip("transformers")
    import data
    import interop
    model = build_tiny("tiny-llama")
    model.config.use_cache = False
    examples = [dict(input_ids=[5, 6, 7, 8], labels=[-100, 6, 7, 8])] * 8
    method = g2r2.G2R2(r=2, total_steps=3, warmup=1, prune=1)
    method.attach(model)
    targs = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=4,
                                           save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=examples,
                                   data_collator=lambda f: data.collate(f, 0), callbacks=[interop.MethodCallback(method)])
    with pytest.raises(common.UserError, match=r"built for total_steps=3 but Trainer runs 2 optimizer steps"):
        trainer.train()
