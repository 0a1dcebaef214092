"""PEFT export (interop.peft_state / save_peft, each layer's lora_factors): for every method on a causal, a
classification (with its head) and an image model, peft.PeftModel.from_pretrained on a fresh base gives
this repository's logits (fp32, ≤ 1e-5) and its merge_and_unload() gives our merged model; G²R² exports
only retained modules; PiLoRA's stage 2 is one rank-(r + r′) LoRA with zeros where they belong; train.py's
--export peft after --resume and from --eval_only --adapter equals the uninterrupted run's export."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import g2r2  # noqa: E402
import interop  # noqa: E402
import pilora  # noqa: E402
import spsft  # noqa: E402
import taso  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402
from helpers import llama_batches  # noqa: E402

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

STEPS = 5
METHODS = {  # small settings that reach every stage in STEPS steps; heads: the task's (train.HEADS or none)
    "lora": lambda heads: common.LoRA(r=4, heads=heads),
    "g2r2": lambda heads: g2r2.G2R2(r=4, total_steps=STEPS, warmup=1, prune=2, pf=0.3, heads=heads),
    "pilora": lambda heads: pilora.PiLoRA(r=4, total_steps=STEPS, phase=2, interval=1, heads=heads, causal=not heads),
    "taso": lambda heads: taso.TASO(r=4, calib_batches=2, heads=heads),
    "spsft": lambda heads: spsft.SPSFT(ratio=0.1, heads=heads),  # rows ∝ d_out: per-module ranks (rank_pattern)
    "spsft_norms": lambda heads: spsft.SPSFT(rows=4, norms=True, heads=heads),  # norms whole: modules_to_save
}
FAMILIES = ["tiny-llama", "tiny-deberta", "tiny-vit"]


def batches(family, n=4, seed=1):
    if family == "tiny-llama":
        return llama_batches(n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 2, (2,), generator=g)
        if family == "tiny-vit":
            out.append(dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g), labels=y))
        else:
            ids = torch.randint(0, 260, (2, 12), generator=g)
            out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=y))
    return out


def drive(family, name, steps=STEPS):
    """A fresh tiny model with method `name` attached and trained `steps` AdamW steps through its hooks."""
    heads = () if family == "tiny-llama" else train.HEADS
    model, method, data = models.build_tiny(family), METHODS[name](heads), batches(family)
    method.attach(model, iter(data))
    opt = torch.optim.AdamW(method.param_groups(2e-2))
    for t in range(steps):
        model(**data[t % len(data)]).loss.backward()
        method.after_backward(t)
        opt.step()
        if method.after_step(t):
            opt = torch.optim.AdamW(method.param_groups(2e-2))
        opt.zero_grad(set_to_none=True)
    return model.eval(), method, data


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def logits(model, batch):
    return model(**inputs(batch)).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_peft_loads_our_model_and_merges_like_ours(tmp_path, family, name):
    model, method, data = drive(family, name)
    x = data[0]
    ours = logits(model, x)
    out = interop.save_peft(model, str(tmp_path / "peft"), family)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    base = models.build_tiny(family).eval()
    untouched = logits(base, x)
    assert not torch.allclose(ours, untouched, atol=1e-3)  # the adapter does something
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(logits(loaded, x), ours, atol=1e-5, rtol=0)
    # merge_and_unload() == our merge (the --merge model), tensor by tensor and in the logits
    ours_merged = method.export(model).eval()
    theirs = loaded.merge_and_unload().eval()
    mine, other = ours_merged.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys()
    for k in mine:
        torch.testing.assert_close(other[k], mine[k], atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(logits(theirs, x), logits(ours_merged, x), atol=1e-5, rtol=0)
    # vLLM's reading of the same folder: one scaling lora_alpha / r for every module (it drops rank_pattern
    # and alpha_pattern, takes each rank from the tensors): W₀ + (α/r)·B A is still our merged weight
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    tensors, fresh = load_file(os.path.join(out, "adapter_model.safetensors")), models.build_tiny(family)
    for n in config["target_modules"]:
        A, B = (tensors[f"base_model.model.{n}.lora_{k}.weight"] for k in "AB")
        W = fresh.get_submodule(n).weight + config["lora_alpha"] / config["r"] * (B @ A)
        torch.testing.assert_close(W, mine[n + ".weight"], atol=1e-6, rtol=0, msg=n)


def test_config_targets_heads_and_ranks():
    model, method, _ = drive("tiny-deberta", "spsft")
    config, tensors = interop.peft_state(model, "tiny-deberta")
    assert config["task_type"] == "SEQ_CLS" and config["peft_type"] == "LORA"
    assert config["modules_to_save"] == ["pooler.dense", "classifier"]  # the trained heads, whole
    assert torch.equal(tensors["base_model.model.classifier.bias"], model.classifier.bias)
    assert sorted(config["target_modules"]) == sorted(method.idx)
    rows = {n: len(i) for n, i in method.idx.items()}  # SPSFT: rank = rows, α = rows (scaling 1)
    for n, k in rows.items():
        assert config["rank_pattern"].get(n, config["r"]) == k
        assert config["alpha_pattern"].get(n, config["lora_alpha"]) == k
    assert len(set(rows.values())) > 1 and config["rank_pattern"]  # ranks differ: the pattern is used
    n = next(iter(rows))
    B = tensors[f"base_model.model.{n}.lora_B.weight"]
    assert torch.equal(B.sum(0), torch.ones(rows[n])) and torch.equal(B.nonzero()[:, 0], method.idx[n])
    lm, _, _ = drive("tiny-llama", "lora", steps=1)
    c, _ = interop.peft_state(lm)
    assert c["task_type"] == "CAUSAL_LM" and c["modules_to_save"] is None and not c["rank_pattern"]
    assert (c["r"], c["lora_alpha"]) == (4, 16)
    vit, _, _ = drive("tiny-vit", "lora", steps=1)
    c, _ = interop.peft_state(vit)
    assert c["task_type"] is None and c["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("steps", [2, STEPS])  # mid-pruning (pruned modules still attached), refined
def test_g2r2_exports_only_retained_modules(tmp_path, steps):
    model, method, data = drive("tiny-llama", "g2r2", steps)
    assert method.refined == (steps == STEPS) and method.pruned_at
    kept = [method.names[i] for i in method.retained()]
    config, tensors = interop.peft_state(model)
    assert config["target_modules"] == kept
    assert {k.rsplit(".", 2)[0][len("base_model.model."):] for k in tensors} == set(kept)
    loaded = peft.PeftModel.from_pretrained(models.build_tiny("tiny-llama"), interop.save_peft(model, str(tmp_path / "p")))
    torch.testing.assert_close(logits(loaded.eval(), data[0]), logits(model, data[0]), atol=1e-5, rtol=0)


def test_pilora_stage2_is_one_rank_r_plus_r_supp_lora():
    model, method, _ = drive("tiny-llama", "pilora")
    assert method.stage == "stage2" and method.r_supp == 2
    config, tensors = interop.peft_state(model)
    r, rs = method.r, method.r_supp
    for n in method.names:
        layer = model.get_submodule(n)
        A = tensors[f"base_model.model.{n}.lora_A.weight"]
        B = tensors[f"base_model.model.{n}.lora_B.weight"]
        rank = (r if len(layer.idx_d) else 0) + (rs if len(layer.idx_s) else 0)
        assert A.shape[0] == B.shape[1] == rank == config["rank_pattern"].get(n, config["r"])
        alpha = config["alpha_pattern"].get(n, config["lora_alpha"])
        assert alpha / rank == pytest.approx(layer.scaling)  # both groups keep s = α / r
        if len(layer.idx_d):
            assert torch.equal(B[layer.idx_d, :r], layer.lora_B_d) and torch.equal(A[:r], layer.lora_A_d)
            assert not B[layer.idx_d, r:].any()  # dominant rows: zero in the supplementary columns
        if len(layer.idx_s):
            assert torch.equal(B[layer.idx_s, -rs:], layer.lora_B_s) and torch.equal(A[-rs:], layer.lora_A_s)
            assert not B[layer.idx_s, :-rs].any()  # supplementary rows: zero in the dominant columns
    # the export's ΔW is exactly the PiLoRA merge's (Eq 11), brute force over the full matrix
    n = method.names[0]
    layer = model.get_submodule(n)
    dense = (alpha / rank) * tensors[f"base_model.model.{n}.lora_B.weight"].double() @ tensors[
        f"base_model.model.{n}.lora_A.weight"].double()
    merged = layer.merge().weight.double() - layer.base.weight.double()
    torch.testing.assert_close(dense, merged, atol=1e-6, rtol=0)


RUN = ["--model", "tiny-llama", "--method", "g2r2", "--max_samples", "24", "--batch_size", "4",
       "--micro_batch_size", "2", "--max_steps", "6", "--g2r2_warmup", "1", "--g2r2_prune", "2",
       "--eval_limit", "2", "--lr", "1e-2", "--dropout", "0.1", "--export", "peft"]


def exported(d):
    with open(os.path.join(d, "peft", "adapter_config.json")) as f:
        return json.load(f), load_file(os.path.join(d, "peft", "adapter_model.safetensors"))


def test_train_export_resume_and_eval_only_equal(tmp_path):
    a, b, e = (str(tmp_path / k) for k in "abe")
    train.main(RUN + ["--output_dir", a])
    part = train.main(RUN + ["--output_dir", b, "--save_every", "1", "--stop_after", "2"])  # killed mid-pruning
    assert part["stopped_at"] == 2 and not os.path.exists(os.path.join(b, "peft"))
    train.main(RUN + ["--output_dir", b, "--resume"])
    train.main(RUN + ["--output_dir", e, "--eval_only", "--adapter", a])
    (ca, ta), (cb, tb), (ce, te) = exported(a), exported(b), exported(e)
    assert ca == cb == ce and len(ca["target_modules"]) < 10  # 10 targets, some pruned
    assert ta.keys() == tb.keys() == te.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]) and torch.equal(ta[k], te[k]), k


def test_export_with_eval_only_needs_adapter(tmp_path, capsys):
    assert train.cli(["--model", "tiny-llama", "--eval_only", "--export", "peft", "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: --export with --eval_only has no adapter to export; pass --adapter RUN_DIR (the run whose "
        "adapter to export)")
    with pytest.raises(common.UserError, match="nothing to export"):
        interop.peft_state(models.build_tiny("tiny-llama"))
