"""Own-loop mistakes that used to train the wrong thing without a word (issue 32): each one now stops within
one step with the fix, and the correct loop beside it runs through. One row per mistake; the method-specific
ones (PiLoRA's hits, G²R²'s schedule, SPSFT's rows) are in their method's tests."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import g2r2  # noqa: E402
import pilora  # noqa: E402
import spsft  # noqa: E402
import taso  # noqa: E402
from helpers import llama_batches  # noqa: E402
from models import build_tiny  # noqa: E402

MAKE = {"lora": lambda: common.LoRA(r=2, dropout=0.0),
        "spsft": lambda: spsft.SPSFT(rows=2),
        "taso": lambda: taso.TASO(r=2, density=1 / 8, calib_batches=2),  # T7: ρ^(-1/2) = 2.828
        "pilora": lambda: pilora.PiLoRA(r=2, phase=2, interval=1, dropout=0.0),
        "g2r2": lambda: g2r2.G2R2(r=2, total_steps=6, warmup=1, prune=2, dropout=0.0)}


def loop(method, steps=4, optimizer_first=False, plain_params=False, scheduler=False, rebuild_scheduler=True):
    """A plain own loop on tiny-llama; returns (step, message) of the first error, or (None, None)."""
    model = build_tiny("tiny-llama")
    data = llama_batches(steps + 2)
    if optimizer_first:  # built over the model before attach: it holds the base weights, none of the adapters
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    method.attach(model, iter(data[:2]))

    def new_opt():
        if plain_params:  # what requires grad, without the method's learning-rate scale
            return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return torch.optim.AdamW(method.param_groups(1e-2))

    def new_sched(o):
        return torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t))
    if not optimizer_first:
        opt = new_opt()
    sched = new_sched(opt) if scheduler else None
    for step in range(steps):
        try:
            model(**data[step]).loss.backward()
            method.after_backward(step)
            opt.step()
            if sched:
                sched.step()
            if method.after_step(step):
                opt = new_opt()
                if sched and rebuild_scheduler:
                    sched = new_sched(opt)
            opt.zero_grad(set_to_none=True)
        except RuntimeError as e:
            return step, str(e)
    return None, None


@pytest.mark.parametrize("name", ["lora", "spsft", "pilora"])
def test_an_optimizer_built_before_attach_stops_the_first_step(name):
    step, err = loop(MAKE[name](), optimizer_first=True)
    assert step == 0 and "lacks" in err and "rebuild the optimizer over method.param_groups(lr)" in err, err
    assert loop(MAKE[name]()) == (None, None)


def test_taso_over_a_plain_list_keeps_no_lr_scale():
    """T7's ρ^(-1/2): method.parameters() refuses the plain list; a plain list of what requires grad is
    caught at the first optimizer step; param_groups(lr) runs through."""
    m = MAKE["taso"]()
    m.attach(build_tiny("tiny-llama"), iter(llama_batches(2)))
    with pytest.raises(RuntimeError, match=r"param_groups\(lr\)"):
        m.parameters()
    step, err = loop(MAKE["taso"](), plain_params=True)
    assert step == 0 and "learning-rate scale 2.828" in err, err
    assert loop(MAKE["taso"]()) == (None, None)


def test_a_scheduler_not_rebuilt_with_the_optimizer_stops_the_next_step():
    """PiLoRA's stage 2 (phase 2): the old scheduler keeps stepping the old optimizer, the new one runs at the
    constant base rate."""
    step, err = loop(MAKE["pilora"](), steps=4, scheduler=True, rebuild_scheduler=False)
    assert step == 2 and "rebuild the LR scheduler over the new optimizer" in err, err
    assert loop(MAKE["pilora"](), steps=4, scheduler=True) == (None, None)


@pytest.mark.parametrize("name", list(MAKE))
def test_attach_twice_or_on_a_second_model_is_refused(name):
    m, model = MAKE[name](), build_tiny("tiny-llama")
    m.attach(model, iter(llama_batches(2)))
    with pytest.raises(RuntimeError, match="attached to a model already; build a new method object"):
        m.attach(model, iter(llama_batches(2)))
    with pytest.raises(RuntimeError, match="attached to a model already"):
        m.attach(build_tiny("tiny-llama"), iter(llama_batches(2)))
    with pytest.raises(ValueError, match="holds adapters already"):  # a new object on the adapted model
        MAKE[name]().attach(model, iter(llama_batches(2)))


def test_a_peft_model_is_refused():
    peft = pytest.importorskip("peft", reason="peft is optional (bench/requirements.txt)")
    model = peft.get_peft_model(build_tiny("tiny-llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"holds adapters already.*merge_and_unload"):
        common.LoRA(r=2).attach(model)


@pytest.mark.parametrize("hook", ["after_backward", "after_step"])
def test_hooks_before_attach_name_attach(hook):
    for make in MAKE.values():
        with pytest.raises(RuntimeError, match=r"call method.attach\(model\) first"):
            getattr(make(), hook)(0)


def test_task_loss_says_what_attach_expects():
    model = build_tiny("tiny-llama")
    b = llama_batches(1)[0]
    with pytest.raises(ValueError, match="dict of model inputs with labels"):
        common.task_loss(model, (b["input_ids"], b["labels"]))
    with pytest.raises(ValueError, match="returned no loss.*`labels`"):
        common.task_loss(model, {"input_ids": b["input_ids"]})
    torch.testing.assert_close(common.task_loss(model, b), model(**b).loss)


def test_need_grads_names_the_hook_order():
    common.need_grads(True, "PiLoRA", 3)
    with pytest.raises(RuntimeError, match=r"after loss.backward\(\) and before optimizer.step\(\)"):
        common.need_grads(False, "PiLoRA", 3)


def test_a_state_from_another_method_or_model_is_refused():
    m = MAKE["lora"]()
    m.attach(build_tiny("tiny-llama"))
    state = m.state_dict()
    with pytest.raises(ValueError, match="saved by LoRA, not SPSFT"):
        spsft.SPSFT(rows=2).attach(build_tiny("tiny-llama"), state=state)
    with pytest.raises(ValueError, match="does not fit this model"):  # other targets: other tensors
        common.LoRA(r=2, targets=["q_proj"]).attach(build_tiny("tiny-llama"), state=state)
    with pytest.raises(ValueError, match="does not fit this model"):  # another rank: other shapes
        common.LoRA(r=3, dropout=0.0).attach(build_tiny("tiny-llama"), state=state)


def test_lora_own_loop_save_and_load_gives_the_same_logits():
    m, model = MAKE["lora"](), build_tiny("tiny-llama")
    m.attach(model)
    with torch.no_grad():
        for p in m.trainable():
            p.normal_()
    b = llama_batches(1)[0]
    ref = model(**b).logits
    m2, model2 = MAKE["lora"](), build_tiny("tiny-llama")
    m2.attach(model2, state=m.state_dict())
    assert torch.equal(model2(**b).logits, ref)


@pytest.mark.parametrize("name", list(MAKE))
def test_choices_are_the_state_without_its_tensors(name):
    """state_dict() = choices() + "tensors" (every trainable tensor, by name); choices() holds none of them,
    so a checkpoint that saves the tensors on their own stores nothing twice."""
    m, model = MAKE[name](), build_tiny("tiny-llama")
    m.attach(model, iter(llama_batches(2)))
    state, chosen = m.state_dict(), m.choices()
    assert set(state) == set(chosen) | {"tensors"} and chosen["method"] == type(m).__name__
    assert set(state["tensors"]) == {n for n, p in model.named_parameters() if p.requires_grad}
    trained = {p.data_ptr() for p in m.trainable()}
    leaves = [v for v in torch.utils._pytree.tree_leaves(chosen) if torch.is_tensor(v)]
    assert not any(t.data_ptr() in trained or t.shape in [p.shape for p in m.trainable() if p.dim() > 1 and
                                                           t.dtype.is_floating_point and t.dim() > 1]
                   for t in leaves), [t.shape for t in leaves]


RELOAD = """import sys, torch
sys.path[:0] = [{repo!r}, {tests!r}]
import common, g2r2, pilora, spsft, taso
from helpers import llama_batches
from models import build_tiny
make = {{"lora": lambda: common.LoRA(r=2, dropout=0.0), "spsft": lambda: spsft.SPSFT(rows=2, importance="taylor",
         calib_batches=2), "taso": lambda: taso.TASO(r=2, calib_batches=2),
         "pilora": lambda: pilora.PiLoRA(r=2, phase=2, interval=1, dropout=0.0),
         "g2r2": lambda: g2r2.G2R2(r=2, total_steps=6, warmup=1, prune=2, dropout=0.0)}}[sys.argv[1]]
model = build_tiny("tiny-llama")  # the same base ("checkpoint"); the adapters' init drawn from another seed:
torch.manual_seed(123)            # every trained value must come from the file
make().attach(model, state=torch.load(sys.argv[2], weights_only=True))
with torch.no_grad():
    torch.save(model.eval()(**llama_batches(1, seed=3)[0]).logits, sys.argv[3])
"""


@pytest.mark.parametrize("name", ["lora", "spsft", "taso", "pilora", "g2r2"])
def test_own_loop_state_reloads_in_a_fresh_process(name, tmp_path):
    """Train 4 steps in an own loop (PiLoRA into stage 2, G²R² into pruning), save method.state_dict(), load it
    in a new Python process on a freshly built base model: the same logits, bit for bit."""
    import subprocess
    model, method = build_tiny("tiny-llama"), MAKE[name]() if name != "spsft" else spsft.SPSFT(
        rows=2, importance="taylor", calib_batches=2)
    data = llama_batches(6)
    method.attach(model, iter(data[:2]))
    opt = torch.optim.AdamW(method.param_groups(1e-2))
    for step in range(4):
        model(**data[step]).loss.backward()
        method.after_backward(step)
        opt.step()
        if method.after_step(step):
            opt = torch.optim.AdamW(method.param_groups(1e-2))
        opt.zero_grad(set_to_none=True)
    torch.save(method.state_dict(), tmp_path / "state.pt")
    with torch.no_grad():
        ref = model.eval()(**llama_batches(1, seed=3)[0]).logits
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "reload.py").write_text(RELOAD.format(repo=repo, tests=os.path.join(repo, "tests")))
    p = subprocess.run([sys.executable, str(tmp_path / "reload.py"), name, str(tmp_path / "state.pt"),
                        str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt", weights_only=True), ref)
