"""Own-loop mistakes of issue 32 for PiLoRA and TASO, each failing at once with the fix (or working), and the
own-loop save / load pair: method.state_dict() -> file -> fresh model -> attach(model, state=...) gives the
same logits (PiLoRA in stage 1 and in stage 2, TASO); a state of the other method or of another model refuses;
the index buffers travel with model.state_dict()."""
import ast
import io
import os
import sys

import pytest
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
import pilora  # noqa: E402
import taso  # noqa: E402
from helpers import llama_batches  # noqa: E402
from models import build_tiny  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")


def train(model, method, steps, lr=1e-2, zero_before_hooks=False):
    """The documented own loop: AdamW over param_groups, hooks between backward and step (or, the mistake,
    after optimizer.step() + zero_grad())."""
    opt = torch.optim.AdamW(method.param_groups(lr))
    for step, batch in enumerate(llama_batches(steps, seed=3)):
        model(**batch).loss.backward()
        if zero_before_hooks:
            opt.step()
            opt.zero_grad(set_to_none=zero_before_hooks == "none")
        method.after_backward(step)
        if not zero_before_hooks:
            opt.step()
        if method.after_step(step):
            opt = torch.optim.AdamW(method.param_groups(lr))
        opt.zero_grad(set_to_none=True)
    return model


def logits(model, seed=9):
    model.eval()
    with torch.no_grad():
        return model(**llama_batches(1, seed=seed)[0]).logits


def through_a_file(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what a careful user loads: tensors, lists, dicts, numbers


def pilora_method(**kw):
    return pilora.PiLoRA(**{"r": 4, "phase": 3, "interval": 1, "total_steps": 8, "dropout": 0.0, **kw})


def taso_method(**kw):
    return taso.TASO(**{"r": 4, "calib_batches": 2, "dropout": 0.0, **kw})


@pytest.mark.parametrize("set_to", ["none", "zero"])
def test_pilora_hooks_after_step_and_zero_grad_raise_naming_the_hook_order(set_to):
    """Before: 0 hits, 0 dominant rows, no word. Now the first scoring step raises."""
    model = build_tiny("tiny-llama")
    method = pilora_method()
    method.attach(model)
    with pytest.raises(RuntimeError, match=r"after_backward\(step\) after loss.backward\(\) and before optimizer.step"):
        train(model, method, 1, zero_before_hooks=set_to)


def test_taso_parameters_would_lose_the_lr_scale_and_refuses():
    model = build_tiny("tiny-llama")
    method = taso_method(metric="w")
    method.attach(model)
    with pytest.raises(RuntimeError, match=r"param_groups\(lr\)"):
        method.parameters()
    scales = {g["lr_scale"] for g in method.param_groups(1e-3)}
    assert scales == {2.0}  # r = 4: p = 1/4, T7's ρ^(-1/2) = 2 on every tensor (no heads here)
    none = taso_method(metric="w", lr_scale="none")
    none.attach(build_tiny("tiny-llama"))
    assert len(none.parameters()) == len(none.trainable()) > 0  # no scale: the plain list is right


@pytest.mark.parametrize("batch,match", [
    ((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long)), "dict of model inputs"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, "labels"),
])
def test_taso_importance_batches_of_the_wrong_form_fail_with_what_attach_expects(batch, match):
    with pytest.raises(common.UserError, match=match):
        taso_method().attach(build_tiny("tiny-llama"), iter([batch]))


@pytest.mark.parametrize("path", ["pilora.py", "taso.py"])
def test_method_files_import_neither_tqdm_nor_transformers(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"tqdm", "transformers"}, names


@pytest.mark.parametrize("case", ["pilora-stage1", "pilora-stage2", "taso"])
def test_own_loop_save_fresh_model_attach_state_gives_equal_logits(case):
    make = taso_method if case == "taso" else pilora_method
    model, method = build_tiny("tiny-llama"), make()
    method.attach(model, iter(llama_batches(2)))
    train(model, method, 2 if case == "pilora-stage1" else 5)
    assert method.stage == {"pilora-stage1": "stage1", "pilora-stage2": "stage2", "taso": "train"}[case]
    want, state = logits(model), through_a_file(method.state_dict())

    def no_scoring():
        raise AssertionError("a reload must not score")
        yield
    fresh, again = build_tiny("tiny-llama"), make(seed=1)  # the same pretrained base; another seed
    again.attach(fresh, no_scoring(), state=state)
    assert torch.equal(logits(fresh), want)
    assert again.summary() == method.summary()


def test_a_state_of_the_other_method_or_another_model_refuses():
    model, p = build_tiny("tiny-llama"), pilora_method()
    p.attach(model)
    t = taso_method(metric="w")
    t.attach(build_tiny("tiny-llama"))
    with pytest.raises(common.UserError, match="saved by TASO"):
        pilora_method().attach(build_tiny("tiny-llama"), state=t.state_dict())
    with pytest.raises(common.UserError, match="saved by PiLoRA"):
        taso_method().attach(build_tiny("tiny-llama"), state=p.state_dict())
    cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    for method, make in ((p, pilora_method), (t, taso_method)):
        with pytest.raises(common.UserError, match="attach it to the model it was saved from"):
            make().attach(transformers.LlamaForCausalLM(cfg), state=method.state_dict())
    one_layer = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg.to_dict(), "intermediate_size": 128,
                                                                          "num_hidden_layers": 1}))
    with pytest.raises(common.UserError, match="does not fit this model"):
        taso_method().attach(one_layer, state=t.state_dict())


@pytest.mark.parametrize("kind", ["pilora", "taso"])
def test_index_buffers_travel_with_model_state_dict(kind):
    """Before: non-persistent row / column indices; a fresh attach that chose other rows of the same sizes
    loaded model.state_dict() without error and computed other logits."""
    make = {"pilora": lambda s: pilora_method(partition="random", phase=1, seed=s),
            "taso": lambda s: taso_method(metric="random", seed=s)}[kind]
    model, method = build_tiny("tiny-llama"), make(0)
    method.attach(model)
    train(model, method, 3)
    want = logits(model)
    fresh, other = build_tiny("tiny-llama"), make(1)
    other.attach(fresh)
    if kind == "pilora":
        train(fresh, other, 1)  # stage 2, other random rows: ⌊m/2⌋ of them, the same sizes
        assert any(not torch.equal(a, b) for a, b in zip(other.dominant.values(), method.dominant.values()))
    else:
        assert any(not torch.equal(other.rows[n], method.rows[n]) for n in method.rows)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh), want)
    sd = dict(model.state_dict())  # an index of another size (another choice) refuses
    name = next(n for n in sd if n.endswith("idx_d" if kind == "pilora" else "cols"))
    sd[name] = sd[name][1:]
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict(sd)
