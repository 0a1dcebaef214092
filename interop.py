"""The doors out of this repo, all through the Method hooks (common.Method): an adapter PEFT (and vLLM)
loads, the hooks inside transformers.Trainer, and several processes under torchrun (DDP).

    interop.save_peft(model, "out/peft", base_name)          # peft.PeftModel.from_pretrained(base, "out/peft")
    Trainer(..., callbacks=[interop.MethodCallback(method)])  # after method.attach(model, batches)
    interop.resume(trainer, method, "out/checkpoint-500")    # instead of attach, to continue a Trainer run
    torchrun --nproc_per_node 8 train.py ...                 # init_distributed, wrap, no_sync, on_rank0

Neither peft nor transformers is imported here until a function needs it.
"""
import atexit
import collections
import json
import os
import pickle
import shutil
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common import Method, UserError, world


# ------------------------------------------------------------ PEFT export (writing needs no peft)

PEFT_TASKS = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def peft_state(model, base_name=None):
    """(adapter_config, tensors) of `model` in PEFT's LoRA format. Every adapter layer's lora_factors()
    gives (A, B, α) with ΔW = (α / rank)·B A, or None when it carries no update (left out of
    target_modules). Full module names are the targets; ranks and α other than the most common pair go
    to rank_pattern / alpha_pattern. Other trained tensors (heads, norms) are saved with their whole
    module in modules_to_save. lora_dropout is 0: an export for inference. Every method's layers keep
    α / rank equal across modules, so the global lora_alpha / r is every module's scaling too: what
    vLLM applies (it ignores rank_pattern and alpha_pattern; tests/test_export.py checks that reading)."""
    layers = [n for n, m in model.named_modules() if n and hasattr(m, "lora_factors")]
    factors = {n: f for n in layers if (f := model.get_submodule(n).lora_factors()) is not None}
    if not factors:
        raise UserError("nothing to export: no adapter layer carries an update; attach a method first")
    tensors, save = {}, []
    for n, (A, B, _) in factors.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = A  # (rank, in)
        tensors[f"base_model.model.{n}.lora_B.weight"] = B  # (out, rank)
    for n, p in model.named_parameters():
        mod = n.rpartition(".")[0]
        if p.requires_grad and mod not in save and not any(n.startswith(a + ".") for a in layers):
            if not mod:
                raise UserError(f"trained tensor {n} sits on the model itself, PEFT saves only whole "
                                "submodules; train it inside a submodule")
            save.append(mod)
            for k, v in model.get_submodule(mod).state_dict().items():
                tensors[f"base_model.model.{mod}.{k}"] = v
    num = lambda a: int(a) if float(a).is_integer() else float(a)
    pairs = [(len(A), num(a)) for A, _, a in factors.values()]
    r, alpha = collections.Counter(pairs).most_common(1)[0][0]
    kind = next((t for suffix, t in PEFT_TASKS.items() if type(model).__name__.endswith(suffix)), None)
    config = {"peft_type": "LORA", "task_type": kind, "base_model_name_or_path": base_name,
              "r": r, "lora_alpha": alpha, "target_modules": list(factors),
              "rank_pattern": {n: k for n, (k, _) in zip(factors, pairs) if k != r},
              "alpha_pattern": {n: a for n, (_, a) in zip(factors, pairs) if a != alpha},
              "modules_to_save": save or None, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "init_lora_weights": True, "inference_mode": True}
    return config, tensors


def save_peft(model, out_dir, base_name=None):
    """Write out_dir/adapter_config.json + adapter_model.safetensors (peft_state), atomically: built in
    a sibling folder and renamed into place. peft.PeftModel.from_pretrained(base, out_dir) loads it."""
    from safetensors.torch import save_file
    config, tensors = peft_state(model, base_name)
    out_dir = os.path.normpath(out_dir)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


# ------------------------------------------------------------- inside transformers.Trainer

METHOD_STATE = "method_state.pt"  # the method's choices() in a Trainer checkpoint folder (as in train.py's runs)


def MethodCallback(method):
    """A transformers.TrainerCallback that drives `method`'s hooks inside Trainer, in train.py's order.

    Trainer runs backward × accumulation → clip → on_pre_optimizer_step → step → on_optimizer_step →
    scheduler.step → zero_grad; train.py runs after_backward *before* clipping (PiLoRA's hits and
    G²R²'s paper / product scores read unclipped gradients). So the callback takes clipping over:
    Trainer's max_grad_norm is set to 0 for the run (restored at the end) and the callback clips to it
    right after after_backward. after_step runs in on_optimizer_step; when it reports a new trainable
    set, Trainer's own optimizer drops the removed tensors with their state and gains the new ones
    (sync_optimizer), and a moved `schedule_start` restarts Trainer's own schedule (restart_schedule).
    `lr_scale` applies to the method's tensors as in train.py. A multi-process Trainer refuses methods whose
    hooks act mid-run (G²R², PiLoRA: use torchrun train.py). Hooks get step = state.global_step,
    the 0-based index of the optimizer step, as in train.py. Every Trainer checkpoint gets the method's
    choices() beside it (checkpoint-N/method_state.pt, rank 0, atomic); resume(trainer, method,
    checkpoint) restores it. transformers is imported on the call."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class _MethodCallback(TrainerCallback):
        resumed_at = 0  # the step resume() restored the method to

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if args.fp16:
                raise UserError("MethodCallback: fp16 loss scaling hands the hooks scaled gradients; use bf16")
            acts = [h for h in ("after_backward", "after_step")
                    if getattr(type(method), h) is not getattr(Method, h)]  # hooks that act mid-run
            if args.world_size > 1 and acts:
                raise UserError(f"MethodCallback: {type(method).__name__} scores or changes its tensors during "
                                f"training ({', '.join(acts)}), which a multi-process Trainer does not follow (it "
                                f"builds its DDP wrapper once and averages gradients); run torchrun train.py ..., or "
                                f"Trainer in one process")
            if state.global_step != self.resumed_at:
                raise UserError(f"Trainer resumes at step {state.global_step} but the method was attached "
                                f"afresh; call interop.resume(trainer, method, checkpoint) instead of "
                                f"method.attach(model) before trainer.train(resume_from_checkpoint=...)")
            planned = getattr(method, "total_steps", None)  # G²R²'s stages, PiLoRA's stage 2 are cut from it
            if planned is not None and planned != state.max_steps:
                raise UserError(f"MethodCallback: {type(method).__name__} was built for total_steps={planned} but "
                                f"Trainer runs {state.max_steps} optimizer steps; pass total_steps={state.max_steps} "
                                f"(with num_train_epochs: ceil(epochs × len(train_dataloader) / accumulation))")
            self.clip, args.max_grad_norm = args.max_grad_norm, 0.0
            sync_optimizer(model, method, optimizer, lr_scheduler, args.learning_rate, args.weight_decay)
            if method.schedule_start:  # resumed after a restart (PiLoRA stage 2): the lambdas are not saved
                restart_schedule(lr_scheduler, args, state.max_steps, method.schedule_start)

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            method.after_backward(state.global_step)
            if self.clip:
                nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.clip)

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            start = method.schedule_start
            if method.after_step(state.global_step):
                sync_optimizer(model, method, optimizer, lr_scheduler, args.learning_rate, args.weight_decay)
            if method.schedule_start != start:
                restart_schedule(lr_scheduler, args, state.max_steps, method.schedule_start)

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
                tmp = os.path.join(folder, METHOD_STATE + ".tmp")
                torch.save(method.choices(), tmp)  # the tensors are Trainer's weights
                os.replace(tmp, os.path.join(folder, METHOD_STATE))

        def on_train_end(self, args, state, control, **kw):
            args.max_grad_norm = self.clip

    return _MethodCallback()


def resume(trainer, method, checkpoint, batches=()):
    """Instead of method.attach(model) when a Trainer run continues from `checkpoint` (a checkpoint-N
    folder MethodCallback saved into): rebuild the method's adapters in trainer.model as they were at
    step N (its method_state.pt; G²R²'s pruned modules, PiLoRA's stage, TASO's regions, SPSFT's rows),
    and group Trainer's optimizer as the callback does as soon as Trainer creates it, so that the
    optimizer state Trainer saved fits. Then trainer.train(resume_from_checkpoint=checkpoint) loads the
    adapter tensors, optimizer, schedule and data position as for any model."""
    path = os.path.join(checkpoint, METHOD_STATE)
    cbs = [cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "resumed_at")]
    if not cbs:
        raise UserError("interop.resume: the Trainer has no MethodCallback; pass "
                        "callbacks=[interop.MethodCallback(method)] to it")
    if not os.path.isfile(path):
        raise UserError(f"{checkpoint} has no {METHOD_STATE}; resume a checkpoint written by a Trainer that "
                        f"had interop.MethodCallback(method) among its callbacks")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            step = json.load(f)["global_step"]
    except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as e:
        raise UserError(f"{checkpoint} is damaged or incomplete ({type(e).__name__}: {str(e)[:200]}); resume "
                        f"an earlier checkpoint") from None
    method.attach(trainer.model, batches, state=state)
    cbs[0].resumed_at = step
    create = trainer.create_optimizer

    def create_optimizer(*a, **kw):
        opt = create(*a, **kw)
        sync_optimizer(trainer.model, method, opt, None, trainer.args.learning_rate, trainer.args.weight_decay)
        return opt
    trainer.create_optimizer = create_optimizer


def sync_optimizer(model, method, opt, sched, lr, weight_decay):
    """Make `opt` (torch or accelerate-wrapped) hold exactly the model's trainable tensors, in place:
    tensors no longer trained leave with their state; survivors keep theirs; the method's tensors (leaf
    name starts with method.prefix) sit in groups with lr·method.lr_scale; new tensors get weight decay
    when they are matrices (train.py's rule). New groups are added to the LambdaLR `sched` too (None: the
    optimizer is new and its schedule not built yet)."""
    opt, sched = getattr(opt, "optimizer", opt), getattr(sched, "scheduler", sched)  # accelerate wrappers
    want = {p: method.lr_scale if n.rpartition(".")[2].startswith(method.prefix) else 1.0
            for n, p in model.named_parameters() if p.requires_grad}
    placed, moved = set(), {}
    for g in opt.param_groups:
        scale = g.setdefault("lr_scale", 1.0)
        for p in g["params"]:
            if p not in want:
                opt.state.pop(p, None)
            elif want[p] == scale:
                placed.add(p)
            else:
                moved[p] = g["weight_decay"]  # right tensor, wrong lr: keeps its decay and state
        g["params"] = [p for p in g["params"] if p in placed]
    for p, s in want.items():
        if p in placed:
            continue
        wd = moved.get(p, weight_decay if p.dim() >= 2 else 0.0)
        g = next((g for g in opt.param_groups if g["lr_scale"] == s and g["weight_decay"] == wd), None)
        if g is not None:
            g["params"].append(p)
            continue
        if sched is not None and not hasattr(sched, "lr_lambdas"):
            raise UserError("MethodCallback adds the method's tensors to a LambdaLR schedule only; use a "
                            "transformers lr_scheduler_type other than reduce_lr_on_plateau")
        factor = 1.0 if sched is None else sched.lr_lambdas[0](sched.last_epoch)
        opt.add_param_group({"params": [p], "lr": lr * s * factor, "initial_lr": lr * s, "weight_decay": wd,
                             "lr_scale": s})
        if sched is not None:
            sched.base_lrs.append(lr * s)
            sched.lr_lambdas.append(sched.lr_lambdas[0])


def restart_schedule(sched, args, total, start):
    """Trainer's schedule again from its warmup at step `start`, over the total − start steps left
    (train.py's get_lr(step − schedule_start, total − schedule_start))."""
    from transformers import get_scheduler
    sched = getattr(sched, "scheduler", sched)
    n = total - start
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    f = get_scheduler(args.lr_scheduler_type, probe, num_warmup_steps=args.get_warmup_steps(n),
                      num_training_steps=n, scheduler_specific_kwargs=args.lr_scheduler_kwargs).lr_lambdas[0]
    sched.lr_lambdas = [lambda t, f=f: f(t - start)] * len(sched.lr_lambdas)


# ------------------------------------------------------------------ several processes (torchrun)

WAIT = None  # a gloo group without a practical timeout: the other processes wait in it while rank 0 evaluates


def init_distributed(args):
    """(rank, world size). With WORLD_SIZE > 1 (torchrun) start the process group: NCCL with one GPU per
    process (LOCAL_RANK), gloo on CPU. The micro-batches of every step are dealt out to the processes
    (micro-batch k to rank k mod world size), so they must divide evenly."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    accum = args.batch_size // args.micro_batch_size
    if size > 1 and accum % size:
        raise UserError(f"--batch_size {args.batch_size} / --micro_batch_size {args.micro_batch_size} = {accum} "
                        f"micro-batches per step do not divide among {size} processes; make --batch_size a "
                        f"multiple of --micro_batch_size × {size}")
    if size == 1 or dist.is_initialized():
        return world()
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
        env = ", ".join(f"{k}={os.environ.get(k)}" for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
        raise UserError(f"the {backend} process group of WORLD_SIZE={size} did not start ({env}: {reason}); "
                        f"launch with torchrun --nproc_per_node N train.py ..., or unset WORLD_SIZE to run "
                        f"one process") from None
    atexit.register(dist.destroy_process_group)
    return world()


def on_rank0(fn, *args):
    """fn(*args) on rank 0 while the other processes wait for it, however long; None on those."""
    rank, size = world()
    out = fn(*args) if rank == 0 else None
    if size > 1:
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
    if world()[1] == 1:
        return model
    # the frozen model and its buffers are the same on every process (loaded, not trained): DDP neither
    # broadcasts them when it is built (each rebuild would resend the whole model) nor before each forward
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ddp = DDP(model, device_ids=[torch.cuda.current_device()] if torch.cuda.is_available() else None,
              find_unused_parameters=method.unused_params, broadcast_buffers=False)
    ddp.register_comm_hook(None, sum_hook)
    return ddp


def no_sync(net, skip):
    """DDP's no_sync() for the forward of every micro-batch but a process's last (its backward then
    reduces the accumulated gradients once); nothing in one process."""
    return net.no_sync() if skip and isinstance(net, DDP) else nullcontext()
