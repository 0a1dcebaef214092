"""interop.MethodCallback inside transformers.Trainer, against train.py on tiny-llama with the same data
order, seed and (constant) learning rate: the same loss at every step for every method; G²R² ends with
the same retained modules and parameter count and Trainer's optimizer holds no tensor of a pruned module;
PiLoRA switches stage at the same step with the same dominant rows and its schedule restarts there;
TASO / SPSFT / LoRA train only their own tensors (TASO's at lr · lr_scale). A run resumed from a Trainer
checkpoint (interop.resume) continues exactly as the run that was not interrupted."""
import itertools
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import interop  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

transformers = pytest.importorskip("transformers")

STEPS, LR = 8, 1e-3
ARGV = ["--model", "tiny-llama", "--max_samples", "32", "--batch_size", "4", "--micro_batch_size", "2",
        "--max_steps", str(STEPS), "--schedule", "constant", "--warmup", "0", "--dropout", "0",
        "--lr", str(LR), "--eval_limit", "2", "--clip", "0.5"]
EXTRA = {"lora": [], "g2r2": ["--g2r2_warmup", "2", "--g2r2_prune", "3"],
         "pilora": ["--pilora_phase", "4", "--pilora_interval", "1"],
         "taso": ["--taso_calib_batches", "4"], "spsft": ["--spsft_rows", "8"]}


def trainer_run(tmp, name, schedule="constant", warmup=0, save_steps=None, attach=True, **training_args):
    """method `name` attached as train.py attaches it (attach=False: not attached, for resume()), then
    trained by Trainer + MethodCallback on train.py's micro-batch order (one epoch = STEPS steps of 2 × 2
    examples); save_steps: a Trainer checkpoint every that many steps."""
    args = train.parse_args(ARGV + ["--method", name, *EXTRA[name]])
    _, task, proc = train.resolve(args)
    examples = train.load_data(args, task, proc)[0][:args.max_samples]
    batches = train.Batches(examples, args.micro_batch_size, proc.pad_token_id, args.seed, "cpu")
    model = models.build_tiny("tiny-llama", seed=args.seed)
    model.config.use_cache = False
    method = train.build_method(args, "causal", STEPS, STEPS)
    if attach:
        method.attach(model, itertools.islice(batches.stream(), batches.per_epoch))
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    targs = transformers.TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type=schedule, warmup_steps=warmup, max_grad_norm=args.clip,
        weight_decay=0.0, optim="adamw_torch", train_sampling_strategy="sequential", logging_steps=1,
        report_to="none", save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        use_cpu=True, disable_tqdm=True, **training_args)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=[examples[j] for j in order],
                                   data_collator=lambda f: data.collate(f, proc.pad_token_id),
                                   callbacks=[interop.MethodCallback(method)])
    return trainer, model, method


def optimizer_tensors(trainer):
    return [p for g in trainer.optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("name", list(EXTRA))
def test_trainer_matches_train_py(tmp_path, name):
    ref = train.main(ARGV + ["--method", name, *EXTRA[name], "--output_dir", str(tmp_path / "ref")])
    trainer, model, method = trainer_run(tmp_path / "hf", name)
    adapters0 = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == pytest.approx(ref["losses"], abs=1e-5)  # steps move the loss by ~1e-2
    held = optimizer_tensors(trainer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in held} == {id(p) for p in trainable} and len(held) == len(trainable)
    assert train.count_params(model)[0] == ref["trainable_params_end"]
    state = trainer.optimizer.optimizer.state if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer.state
    assert all(id(p) in {id(q) for q in held} for p in state)  # no state left of a dropped tensor
    assert trainer.args.max_grad_norm == 0.5  # restored after the run
    if name == "g2r2":
        assert method.refined and method.summary()["retained_modules"] == ref["retained_modules"]
        pruned = [n for n in adapters0 if n.rpartition(".")[0] not in ref["retained_modules"]]
        assert pruned and not {id(adapters0[n]) for n in pruned} & {id(p) for p in held}
    elif name == "pilora":
        assert method.stage == "stage2" and method.schedule_start == ref["phase_steps"] == 4
        assert method.summary()["dominant_rows"] == ref["dominant_rows"]
        assert not {id(p) for p in adapters0.values()} & {id(p) for p in held}  # stage-1 tensors gone
    else:
        base = models.build_tiny("tiny-llama").state_dict()
        for n, t in model.state_dict().items():
            if n.rpartition(".")[2] in ("rows", "cols", "idx"):  # the layers' persistent choices (R, C, rows)
                assert not t.is_floating_point()
            elif method.prefix not in n:  # only the method's own tensors moved
                assert torch.equal(t, base[n.replace(".base.", ".")]), n
        assert all(method.prefix in n for n, p in model.named_parameters() if p.requires_grad)
        for g in trainer.optimizer.param_groups:
            if g["params"]:
                assert g["lr"] == pytest.approx(LR * method.lr_scale) and g["lr_scale"] == method.lr_scale


def test_hooks_see_unclipped_gradients_and_the_step_clipped_ones(tmp_path):
    """train.py's order: after_backward, then clip, then step (Trainer alone clips first)."""
    trainer, model, method = trainer_run(tmp_path, "lora")
    seen, stepped = [], []
    norm = lambda: float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in method.model.parameters()
                                                                  if p.grad is not None])))
    method.after_backward = lambda step: seen.append((step, norm()))
    method.after_step = lambda step: stepped.append(norm())  # None: the trainable set stays
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert [s for s, _ in seen] == list(range(STEPS))  # step = state.global_step, 0-based as in train.py
    assert [n for _, n in seen] == pytest.approx(logged, rel=1e-5) and min(logged) > 0.5  # all clipped
    assert stepped == pytest.approx([0.5] * STEPS, rel=1e-4)


def test_pilora_restarts_trainers_schedule_at_stage_2(tmp_path):
    trainer, model, method = trainer_run(tmp_path, "pilora", schedule="linear", warmup=2)
    lrs = []

    class Record(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            lrs.append([g["lr"] for g in optimizer.param_groups if g["params"]])

    trainer.add_callback(Record())
    trainer.train()
    linear = lambda t, n, w: t / w if t < w else max(0.0, (n - t) / (n - w))  # Trainer's linear warmup + decay
    expect = [LR * linear(t, STEPS, 2) for t in range(4)] + [LR * linear(t, 4, 2) for t in range(4)]
    assert [g[0] for g in lrs] == pytest.approx(expect) and all(len(set(g)) == 1 for g in lrs)


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# checkpoints across each method's transitions: G²R² mid-pruning and in refinement, PiLoRA mid-scoring
# (stage 1) and after its switch and schedule restart (stage 2)
RESUME_AT = [("lora", 4), ("g2r2", 3), ("g2r2", 5), ("pilora", 2), ("pilora", 6), ("taso", 4), ("spsft", 4)]


@pytest.mark.parametrize("name,at", RESUME_AT, ids=[f"{n}-{k}" for n, k in RESUME_AT])
def test_resume_from_a_trainer_checkpoint_continues_the_run(tmp_path, name, at):
    """Trainer checkpoint at step `at`, a new process-like start (fresh model, method not attached),
    interop.resume, train to the end: the losses of the steps after `at` and every trained tensor equal
    the uninterrupted run's; Trainer loaded the adapter tensors without a missing or unexpected key."""
    full, full_model, full_method = trainer_run(tmp_path / "a", name, "linear", 2, save_steps=at)
    full.train()
    trainer, model, method = trainer_run(tmp_path / "b", name, "linear", 2, save_steps=at, attach=False)
    ckpt = str(tmp_path / "a" / f"checkpoint-{at}")
    interop.resume(trainer, method, ckpt)
    trainer.train(resume_from_checkpoint=ckpt)
    assert len(losses_of(trainer)) == STEPS  # the checkpoint's history + the steps run here
    assert losses_of(trainer)[at:] == pytest.approx(losses_of(full)[at:], abs=1e-6)
    want = {n: p for n, p in full_model.named_parameters() if p.requires_grad}
    got = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(got) == list(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6)
    assert method.stage == full_method.stage and method.summary() == full_method.summary()


def test_resume_refuses_what_would_continue_wrongly(tmp_path):
    """A resumed Trainer whose method was attached afresh, a checkpoint without the method's state and a
    Trainer without the callback: one clear UserError each, before any step."""
    full, _, _ = trainer_run(tmp_path / "a", "g2r2", save_steps=1)
    full.train()
    ckpt = tmp_path / "a" / "checkpoint-1"  # mid-warmup: same tensors, but the scores so far would be lost
    trainer, _, _ = trainer_run(tmp_path / "b", "g2r2", save_steps=1)  # attached afresh
    with pytest.raises(common.UserError, match="interop.resume"):
        trainer.train(resume_from_checkpoint=str(ckpt))
    trainer, _, method = trainer_run(tmp_path / "c", "g2r2", attach=False)
    (ckpt / interop.METHOD_STATE).unlink()
    with pytest.raises(common.UserError, match="has no method_state.pt"):
        interop.resume(trainer, method, str(ckpt))
    trainer.pop_callback(next(cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "resumed_at")))
    with pytest.raises(common.UserError, match="no MethodCallback"):
        interop.resume(trainer, method, str(ckpt))


TRAINER_DDP = """import json, os, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
import common
from test_trainer_callback import trainer_run
out = {{}}
for name in ("lora", "taso", "spsft", "pilora", "g2r2"):
    trainer, model, method = trainer_run(sys.argv[1] + "/" + name, name, ddp_backend="gloo")
    try:
        trainer.train()
    except common.UserError as e:
        out[name] = str(e)
        continue
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    both = [torch.zeros_like(flat) for _ in range(2)]
    torch.distributed.all_gather(both, flat)
    out[name] = float((both[0] - both[1]).abs().max())
if int(os.environ["RANK"]) == 0:
    json.dump(out, open(sys.argv[1] + "/out.json", "w"))
"""


def test_multi_process_trainer_keeps_replicas_equal_or_refuses(tmp_path):
    """Trainer under torchrun (2 gloo processes): LoRA, TASO, SPSFT train one fixed set of tensors and the two
    replicas end identical; G²R² and PiLoRA, whose hooks score and change tensors mid-run (which Trainer's
    DDP, built once and averaging, does not follow: PiLoRA's replicas drifted apart, 7.6e-3, before this
    check), stop with one UserError naming torchrun train.py."""
    import json
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "driver.py").write_text(TRAINER_DDP.format(repo=os.path.dirname(here), tests=here))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "driver.py"), str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["lora"] == out["taso"] == out["spsft"] == 0.0
    for name in ("pilora", "g2r2"):
        assert "multi-process Trainer" in out[name] and "torchrun train.py" in out[name], out[name]
