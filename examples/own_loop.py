"""Any method of this repository in a plain PyTorch loop (nanoGPT's shape), then a merged export.

    python examples/own_loop.py --method pilora --model tiny-llama --steps 20
    python examples/own_loop.py --method g2r2 --model smollm2-135m --steps 100 --out out/own_g2r2

Your own code needs the method file (g2r2.py, pilora.py, taso.py, spsft.py) and common.py; models.py
and data.py only give this example a model and train.py's built-in task (docs/own-code.md).
"""
import argparse, os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common, data, g2r2, models, pilora, spsft, taso  # noqa: E401,E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--method", default="lora", choices=["lora", "g2r2", "pilora", "taso", "spsft"])
p.add_argument("--model", default="smollm2-135m", help="tiny-llama, smollm2-135m, a hub id or a folder")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--batch_size", type=int, default=8)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="out/own_loop")
args = p.parse_args()

torch.manual_seed(args.seed)
path, _, tok = models.resolve(argparse.Namespace(model=args.model, task="causal"))
model = models.load_model(argparse.Namespace(model=args.model, seed=args.seed, dtype="fp32"), path, "causal")
model.config.use_cache = False
model.train()  # adapter dropout on (from_pretrained returns eval mode)
examples = data.tokenize_instructions(data.builtin_task(args.seed)[0], tok, 256)
per_epoch = -(-len(examples) // args.batch_size)

def batch(i):  # batch i of the run: a new order every epoch
    epoch, k = divmod(i, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
    return data.collate([examples[j] for j in order[k * args.batch_size:(k + 1) * args.batch_size]], tok.pad_token_id)

method = {"lora": lambda: common.LoRA(),
          "g2r2": lambda: g2r2.G2R2(total_steps=args.steps),  # T_w, T_p: 10 % of the steps each
          "pilora": lambda: pilora.PiLoRA(phase=args.steps // 2, total_steps=args.steps, causal=True),
          "taso": lambda: taso.TASO(calib_batches=4),
          "spsft": lambda: spsft.SPSFT(rows=8)}[args.method]()
method.attach(model, map(batch, range(per_epoch)))  # TASO, SPSFT-Taylor score on training batches here
opt = torch.optim.AdamW(method.param_groups(args.lr))  # its tensors, heads included, at its lr scale
for step in range(args.steps):
    loss = model(**batch(step)).loss
    loss.backward()
    method.after_backward(step)  # G²R², PiLoRA score the gradients here
    torch.nn.utils.clip_grad_norm_(method.trainable(), 1.0)
    opt.step()
    if method.after_step(step):  # new trainable set (G²R² refinement, PiLoRA stage 2): new optimizer
        old, opt = opt, torch.optim.AdamW(method.param_groups(args.lr))
        opt.state.update((q, old.state[q]) for q in method.trainable() if q in old.state)  # survivors' moments
    opt.zero_grad(set_to_none=True)
    print(f"step {step}: loss {loss.item():.7f}")
method.export(model).save_pretrained(args.out)  # plain Linears: no extra latency
tok.save_pretrained(args.out)
