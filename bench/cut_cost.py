"""What the two memory cuts of issue 15 cost in step time: our LoRA row timed against itself with each cut
undone, and against PEFT LoRA, the variants interleaved step by step (A B C … A B C …) so that a drifting,
shared machine slows them alike; medians over the steps after warm-up.

    OMP_NUM_THREADS=1 python bench/cut_cost.py --rows lora-r8 lora-r64 --grad_ckpt both --steps 20

Variants: `ours` (common.dropout_linear: backward redraws the dropout mask; train.causal_loss: the LM head
and loss in checkpointed chunks, recomputed in backward), `nn.Dropout` (the adapter input dropped by
nn.Dropout, the dropped copy and mask kept), `HF loss` (the model's own loss over full logits), `both
undone`, and the row's PEFT pair. Same batch, same Method hooks and loop as the efficiency suite.
"""
import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import efficiency  # noqa: E402
import models  # noqa: E402

CUT = common.dropout_linear


def kept_dropout_linear(x, dropout, *weights):
    """The cut undone: nn.Dropout's dropped copy (and mask) kept for backward, then each projection."""
    d = dropout(x) if dropout is not None else x
    return tuple(F.linear(d.to(cw.dtype), cw) for cw in (common.cast(w, x) for w in weights))


def hf_loss(loop):
    return loop.model(**loop.batch, num_items_in_batch=loop.n_items).loss


def make_loop(row, model_name, seq, ckpt, dtype, steps):
    """efficiency.run_row's set-up of one row (model, method, batch, loop) for `steps` steps, untimed."""
    args, method, _, total = efficiency.row_method(row, 1, "bf16" if dtype == torch.bfloat16 else "fp32", 0, 2, steps)
    model = efficiency.build_model(model_name, "cpu", dtype, 0)
    if ckpt:
        models.enable_checkpointing(model)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model = method.attach(model, iter([batch])) or model
    efficiency.train.to_fp32(model)
    model.train()
    return efficiency.Loop(model, method, args, batch, nullcontext(), total), efficiency.ROWS[row][5]


def measure(row, model_name, seq, ckpt, steps, warmup, dtype=torch.float32):
    n = warmup + steps
    ours, pair = make_loop(row, model_name, seq, ckpt, dtype, n)
    variants = {"ours": (ours, CUT, None)}
    for name, dl, loss in (("nn.Dropout", kept_dropout_linear, None), ("HF loss", CUT, hf_loss),
                           ("both undone", kept_dropout_linear, hf_loss)):
        variants[name] = (make_loop(row, model_name, seq, ckpt, dtype, n)[0], dl, loss)
    if pair and efficiency.have_peft():
        variants[pair] = (make_loop(pair, model_name, seq, ckpt, dtype, n)[0], CUT, None)
    times = {k: [] for k in variants}
    for i in range(warmup + steps):
        for name, (loop, dl, loss) in variants.items():
            common.dropout_linear = dl
            if loss is not None:
                loop.loss = lambda loop=loop: loss(loop)
            try:
                t = time.perf_counter()
                loop.step()
                dt = time.perf_counter() - t
            finally:
                common.dropout_linear = CUT
            if i >= warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"row": row, "model": model_name, "seq_len": seq, "grad_ckpt": ckpt, "steps": steps,
            "median_s": med, "vs_ours": {k: v / med["ours"] for k, v in med.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-small-shape")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--rows", nargs="+", default=["lora-r8", "lora-r64"])
    p.add_argument("--grad_ckpt", choices=["off", "on", "both"], default="both")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--json", help="write the results (a JSON list) here")
    a = p.parse_args(argv)
    out = []
    for ckpt in {"off": [False], "on": [True], "both": [False, True]}[a.grad_ckpt]:
        for row in a.rows:
            r = measure(row, a.model, a.seq_len, ckpt, a.steps, a.warmup_steps)
            out.append(r)
            print(f"{row} ckpt {int(ckpt)}: " + "  ".join(f"{k} {1e3 * v:.1f} ms ({r['vs_ours'][k]:.2f}×)"
                                                          for k, v in r["median_s"].items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
