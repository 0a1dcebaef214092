"""torch.compile (issue 31 item 3): every method trains to eager's losses with each decoder layer compiled, and
no adapter layer breaks the graph in training mode (dropout on). The losses use the aot_eager backend: the
same tracing and autograd functionalization as inductor, without its minutes of C++ codegen on a CPU;
train.py --compile (inductor) is run once for LoRA."""
import json
import os
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

STEPS = 6
MAKE = {"lora": lambda: common.LoRA(r=2, dropout=0.0),
        "g2r2": lambda: g2r2.G2R2(r=2, total_steps=STEPS, warmup=1, prune=2, dropout=0.0),  # prunes and refines
        "pilora": lambda: pilora.PiLoRA(r=2, phase=2, interval=1, dropout=0.0),  # stage 2 from step 2
        "taso": lambda: taso.TASO(r=2, calib_batches=2, dropout=0.0),
        "spsft": lambda: spsft.SPSFT(rows=2, importance="taylor", calib_batches=2)}


def losses(name, compiled):
    torch._dynamo.reset()
    model = build_tiny("tiny-llama")
    data = llama_batches(STEPS)
    method = MAKE[name]()
    method.attach(model, iter(data[:2]))
    if compiled:
        for layer in model.model.layers:
            layer.compile(backend="aot_eager")
    opt = torch.optim.AdamW(method.param_groups(1e-2))
    out = []
    for step in range(STEPS):
        loss = model(**data[step]).loss
        loss.backward()
        method.after_backward(step)
        opt.step()
        if method.after_step(step):
            opt = torch.optim.AdamW(method.param_groups(1e-2))
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


@pytest.mark.parametrize("name", list(MAKE))
def test_compiled_layers_train_to_eager_losses(name):
    eager, compiled = losses(name, False), losses(name, True)
    assert eager[-1] != eager[0]  # it trains
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


LIN = dict(in_features=64, out_features=32)
LAYERS = {"LoRALinear": lambda b: common.LoRALinear(b, 4, 8.0, 0.05),
          "G2R2Linear": lambda b: g2r2.G2R2Linear(b, 4, 8.0, 0.05),
          "PiLoRALinear": lambda b: pilora.PiLoRALinear(b, [1, 5, 7], 4, 1, 8.0, 0.05),
          "TASOLinear": lambda b: taso.TASOLinear(b, [0, 3], [1, 2, 9], 4, 8.0, 0.05),
          "SPSFTLinear": lambda b: spsft.SPSFTLinear(b, torch.tensor([2, 4]))}


@pytest.mark.parametrize("name", list(LAYERS))
def test_an_adapter_layer_traces_without_a_graph_break(name):
    torch._dynamo.reset()
    layer = LAYERS[name](nn.Linear(**LIN)).train()
    x = torch.randn(2, 8, 64, requires_grad=True)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ex = torch._dynamo.explain(layer)(x)
        assert ex.graph_break_count == 0 and not ex.break_reasons, ex.break_reasons
        assert ex.graph_count == 1


def test_train_py_compile_gives_eager_losses(tmp_path):
    """--compile with inductor, the user's path: the same losses as eager for LoRA (dropout off)."""
    argv = ["--model", "tiny-llama", "--method", "lora", "--max_steps", "3", "--batch_size", "2",
            "--micro_batch_size", "2", "--max_samples", "8", "--eval_limit", "2", "--dropout", "0", "--lr", "1e-2"]
    train.main(argv + ["--output_dir", str(tmp_path / "eager")])
    torch._dynamo.reset()
    train.main(argv + ["--compile", "--output_dir", str(tmp_path / "compiled")])
    eager, compiled = (json.load(open(tmp_path / d / "summary.json"))["losses"] for d in ("eager", "compiled"))
    assert len(eager) == 3
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
