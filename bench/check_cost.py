"""What a correct own loop pays for the misuse checks (docs/own-code.md): the check in every hook call, arming
the watch of an optimizer step (at attach and after a True from after_step) and the watched step's note, on a
model with Llama-2-7B's count of adapted modules (the checks touch tensor ids only, so small Linears do).

    python bench/check_cost.py
"""
import os
import sys
import time

import torch
import torch.nn as nn
from torch.optim.optimizer import _global_optimizer_post_hooks

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        for n in common.LLAMA:
            setattr(self, n, nn.Linear(8, 8, bias=False))
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)


def main(calls=100_000):
    model = nn.Sequential(*[Layer() for _ in range(32)])
    t = time.perf_counter()
    method = common.LoRA(r=2, targets=common.LLAMA, dropout=0.0)
    method.attach(model)
    attach_s = time.perf_counter() - t
    opt = torch.optim.SGD(method.param_groups(1e-3), lr=1e-3)
    note = _global_optimizer_post_hooks[method._handle.id]
    t = time.perf_counter()
    note(opt, (), {})
    note_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(calls):
        method.check_step(0, "after_backward")
    hook_s = (time.perf_counter() - t) / calls
    t = time.perf_counter()
    method.watch()
    arm_s = time.perf_counter() - t
    print(f"{sum(1 for _ in model.parameters())} tensors, {len(method.names)} adapted modules: "
          f"{hook_s * 1e6:.2f} us per hook call; arming the watch {arm_s * 1e3:.1f} ms (attach in all "
          f"{attach_s * 1e3:.0f} ms); the watched step's note {note_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
