"""Any method of this repository inside transformers.Trainer: interop.MethodCallback calls its hooks.

    python examples/trainer.py --method g2r2 --model tiny-llama --epochs 1
    python examples/trainer.py --method pilora --model smollm2-135m --epochs 2 --out out/trainer_pilora

Your own code needs the method file, common.py and interop.py; models.py and data.py only give this
example a model and train.py's built-in task (docs/own-code.md). With num_train_epochs the run's length
is Trainer's, so the methods whose stages are cut from it (G²R², PiLoRA) are given the same count.
"""
import argparse, math, os, sys
import torch
import transformers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common, data, g2r2, interop, models, pilora, spsft, taso  # noqa: E401,E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--method", default="lora", choices=["lora", "g2r2", "pilora", "taso", "spsft"])
p.add_argument("--model", default="smollm2-135m", help="tiny-llama, smollm2-135m, a hub id or a folder")
p.add_argument("--epochs", type=float, default=1.0)
p.add_argument("--max_samples", type=int, default=None, help="use at most this many training examples")
p.add_argument("--batch_size", type=int, default=8)
p.add_argument("--lr", type=float, default=3e-4)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="out/trainer")
args = p.parse_args()

torch.manual_seed(args.seed)
path, _, tok = models.resolve(argparse.Namespace(model=args.model, task="causal"))
model = models.load_model(argparse.Namespace(model=args.model, seed=args.seed, dtype="fp32"), path, "causal")
model.config.use_cache = False
examples = data.tokenize_instructions(data.builtin_task(args.seed)[0], tok, 256)[:args.max_samples]
collate = lambda rows: data.collate(rows, tok.pad_token_id)  # noqa: E731
per_epoch = math.ceil(len(examples) / args.batch_size)
steps = math.ceil(args.epochs * per_epoch)  # what Trainer runs for num_train_epochs (no accumulation)

method = {"lora": lambda: common.LoRA(),
          "g2r2": lambda: g2r2.G2R2(total_steps=steps),  # T_w, T_p: 10 % of the steps each
          "pilora": lambda: pilora.PiLoRA(phase=max(1, steps // 2), total_steps=steps, causal=True),
          "taso": lambda: taso.TASO(calib_batches=4),
          "spsft": lambda: spsft.SPSFT(rows=8)}[args.method]()
method.attach(model, (collate(examples[i:i + args.batch_size]) for i in range(0, len(examples), args.batch_size)))
targs = transformers.TrainingArguments(
    output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=1.0, seed=args.seed, logging_steps=1,
    save_strategy="no", report_to="none")
trainer = transformers.Trainer(model=model, args=targs, train_dataset=examples, data_collator=collate,
                               callbacks=[interop.MethodCallback(method)])
trainer.train()
interop.save_peft(model, os.path.join(args.out, "peft"), path or args.model)  # peft.PeftModel loads it
method.export(model).save_pretrained(os.path.join(args.out, "merged"))  # plain Linears
