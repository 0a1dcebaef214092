"""Shared test helpers (pytest puts tests/ on sys.path)."""
import torch


def llama_batches(n, b=2, t=12, seed=1):
    """n random tiny-llama batches (vocab 260) whose first 3 tokens are prompt (label -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 260, (b, t), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # prompt tokens
        out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
    return out


def params_per_module(model, prefix):
    """{module name: trainable params in tensors named prefix*} for every adapted module."""
    out = {}
    for n, p in model.named_parameters():
        mod, _, leaf = n.rpartition(".")
        if p.requires_grad and leaf.startswith(prefix):
            out[mod] = out.get(mod, 0) + p.numel()
    return out
