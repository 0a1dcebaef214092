"""Device mixes without a GPU (issue 26): every method's optimizer step on a model whose tensors live on a device
that is not the CPU, as fake tensors (FakeTensorMode: shapes, dtypes and devices, no data), so that a tensor a
method creates on the CPU and uses with the model's tensors raises FakeTensorDeviceMismatchError, as it would
raise on a GPU. Covered, per method: attach (TASO's and SPSFT-Taylor's importance passes included), one
optimizer step through efficiency.Loop (train.py's step: loss, backward, after_backward, clip, AdamW, after_step
and the optimizer rebuild), G²R²'s pruning and refinement, PiLoRA's stage switch; then a checkpoint as train.py
writes it (trainable tensors, optimizer and method state) mapped to the CPU as torch.load(map_location="cpu")
reads it, loaded into a fresh model on the device (attach with the state, load_trainable, the optimizer's
load_state_dict) and one more step. The generator dropout draws from is asked for the model's device, never the
CPU's (common._generator is watched; a stand-in generator answers for the device).

The device is "meta", not "cuda": on this CPU-only build a fake CUDA tensor runs forwards, but the first autograd
node on one aborts the process (std::terminate: "PyTorch is not linked with support for cuda devices", no CUDA
device guard), and FakeTensorMode checks "meta" against "cpu" exactly as it checks "cuda". On "cuda" itself the
checkpoint's method state is loaded into a fake CUDA model (attach with the state: TASO's and SPSFT's indices,
PiLoRA's partition, G²R²'s pruning rebuilt from CPU values; adapters left uninitialised, as random init and a
copy from the CPU need the device guard too) and a training-mode forward runs without autograd (dropout
active, its generator asked for "cuda") through each adapter layer. What this cannot
cover: load_trainable's copy into the resumed model (torch skips copies into meta parameters, with a warning),
CUDA kernels and their numerics, bf16 autocast on CUDA (the step runs in fp32: autocast does not act on meta
tensors), the CUDA generator's real streams and their save / restore, streams and host syncs, memory
(bench/memory.py counts it) and NCCL; bench/gpu_check.sh checks those on a GPU.
"""
import os
import sys
from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError
from torch.utils._pytree import tree_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import efficiency  # noqa: E402
import memory  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

DEVICE = "meta"
ROWS = ["lora-r8", "g2r2-refine", "pilora-s2", "taso-r8", "spsft-r128-taylor"]


def build(device=DEVICE):
    """tiny-llama on the device, weights not initialised (random init reads values), eager attention."""
    import transformers as tf
    from transformers.initialization import no_init_weights
    cfg_cls, model_cls, kw = models.TINY["tiny-llama"]
    with torch.device(device), no_init_weights():
        model = getattr(tf, model_cls)(getattr(tf, cfg_cls)(**kw, attn_implementation="eager"))
    model.config.use_cache = False
    return model


def make_batch(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device=DEVICE)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.fixture
def generators(monkeypatch):
    """The device types dropout asked common._generator for; a CPU generator stands in for the device's.
    Autocast has no meta device (torch.is_autocast_enabled("meta") raises): for it, autocast is off."""
    asked, real, stand_in = [], common._generator, torch.Generator()
    autocast = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a and a[0] == DEVICE else autocast(*a))

    def gen(device):
        asked.append(device.type)
        return real(device) if device.type == "cpu" else stand_in
    monkeypatch.setattr(common, "_generator", gen)
    return asked


def on_device(model, device=DEVICE):
    bad = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device]
    assert not bad, f"on another device: {bad[:5]}"


def step_and_resume(row, ckpt, cuda=False):
    """One step of `row` in its stage on the device, a checkpoint mapped to the CPU, a resumed step; with cuda,
    that checkpoint also loaded into a fake CUDA model and a training-mode forward run without autograd."""
    with memory.counting():  # FakeTensorMode; .item() and nonzero() of fake values get placeholders
        model = build()
        if ckpt:
            models.enable_checkpointing(model)
        args, method, pre, total = efficiency.row_method(row, 2, "fp32", 0, 2, 2)
        stage = efficiency.ROWS[row][4]
        batch = make_batch(model)
        calib = (dict(batch) for _ in iter(int, 1))
        model.train()
        method.attach(model, calib)
        train.to_fp32(model)
        loop = efficiency.Loop(model, method, args, batch, nullcontext(), total)
        loop.n_items = torch.full((), 30, device=DEVICE)  # torch.tensor(.., device="meta") is not faked
        while loop.t < pre or (stage and method.stage != stage):
            assert loop.t <= pre + 10, f"never reached {stage}"
            loop.step()
        loop.step()
        on_device(model)
        assert method.stage == (stage or method.stage)
        saved = {"trainable": train.trainable_state_dict(model), "optimizer": loop.opt.state_dict(),
                 "method": method.state_dict(), "step": loop.t}
        assert all(isinstance(t, FakeTensor) for t in saved["trainable"].values())
        saved = tree_map(lambda t: t.to("cpu") if torch.is_tensor(t) else t, saved)  # map_location="cpu"

        model2 = build()
        if ckpt:
            models.enable_checkpointing(model2)
        args2, method2, _, _ = efficiency.row_method(row, 2, "fp32", 0, 2, 2)
        model2.train()
        choices = {k: v for k, v in saved["method"].items() if k != "tensors"}  # load_trainable copies the tensors
        method2.attach(model2, (dict(batch) for _ in iter(int, 1)), state=choices)
        train.to_fp32(model2)
        train.load_trainable(model2, saved["trainable"])
        loop2 = efficiency.Loop(model2, method2, args2, batch, nullcontext(), total)
        loop2.n_items = loop.n_items
        loop2.opt.load_state_dict(saved["optimizer"])
        loop2.t = saved["step"]
        loop2.step()
        on_device(model2)
        assert all(t.device.type == DEVICE for st in loop2.opt.state.values() for k, t in st.items()
                   if torch.is_tensor(t) and k != "step")
        if cuda:
            model3 = build("cuda")
            method3 = efficiency.row_method(row, 2, "fp32", 0, 2, 2)[1]
            model3.train()
            with mock.patch.object(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: t):  # no random init
                method3.attach(model3, (), state=choices)  # on a fake CUDA device (copy_ from the CPU needs a guard)
            train.to_fp32(model3)  # (load_trainable's copy_ from the CPU needs a CUDA device guard too)
            on_device(model3, "cuda")
            adapters = [m for m in model3.modules() if hasattr(m, "base")]
            assert adapters
            with torch.no_grad():  # each adapter layer (HF's own forward needs the device guard: its mask code)
                for m in adapters:
                    x = torch.zeros(2, 16, m.base.in_features, device="cuda")
                    assert m(x).device.type == "cuda"
        return method, method2


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("row", ROWS)
def test_step_on_the_device(row, ckpt, generators):
    method, method2 = step_and_resume(row, ckpt, cuda=not ckpt)
    if row.startswith("spsft"):  # no dropout in SPSFT (§3): no draws
        assert not generators
    else:  # dropout drew, from the device's generator only
        assert set(generators) == ({DEVICE} if ckpt else {DEVICE, "cuda"})
    if row == "g2r2-refine":
        assert method.refined and method.pruned_at and method2.refined
    if row == "pilora-s2":
        assert method.stage == method2.stage == "stage2"


def test_a_mask_made_on_the_cpu_is_caught(monkeypatch, generators):
    """The check can fail: a dropout mask drawn on the CPU (torch.empty(x.shape), no device) and used with the
    model's activations raises the mismatch (and so would an adapter, index or generator state made there)."""
    monkeypatch.setattr(common, "_dropout", lambda x, p: (x * torch.empty(x.shape).bernoulli_(1 - p).div_(1 - p),
                                                          torch.empty(x.shape, dtype=torch.bool)))
    with pytest.raises(FakeTensorDeviceMismatchError):
        step_and_resume("lora-r8", False)


def test_an_index_made_on_the_cpu_is_caught(monkeypatch, generators):
    """Likewise an index buffer left on the CPU (SPSFT's row index i_1 … i_r, built without device=)."""
    import spsft
    real = spsft.SPSFTLinear.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        self.idx = self.idx.to("cpu")
    monkeypatch.setattr(spsft.SPSFTLinear, "__init__", init)
    with pytest.raises(RuntimeError, match="same device"):  # index_add's own check, before the fake mode's
        step_and_resume("spsft-r128-taylor", False)
