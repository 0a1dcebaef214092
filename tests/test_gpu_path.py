"""The GPU's path on the CPU (issue 26): a bf16 run loads the way it does on a GPU (from_pretrained in bf16,
fp32 rotary buffers, fp32 adapters under autocast), and the dtype-sensitive pieces are checked against
float64 / fp32 references: G²R²'s exact ∂ℒ/∂ΔW from bf16 operands, the dropout scale, the merge, the
chunked loss of a model whose logits are scaled, scoring passes without dropout under checkpointing."""
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import g2r2  # noqa: E402
import models  # noqa: E402
import train  # noqa: E402

BF16 = torch.bfloat16


def llama_h128(tmp_path):
    """A saved random-init Llama with a realistic head_dim (128) and short sequences."""
    import transformers as tf
    cfg = tf.LlamaConfig(vocab_size=260, hidden_size=256, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    from data import byte_tokenizer
    byte_tokenizer().save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


def test_bf16_run_loads_like_the_gpu(tmp_path, monkeypatch):
    import transformers as tf
    path = llama_h128(tmp_path)
    x = torch.randint(0, 260, (1, 300), generator=torch.Generator().manual_seed(0))
    seen = {}
    load = train.load_model

    def spy(*a, **kw):
        model = load(*a, **kw)
        with torch.no_grad():
            seen["logits0"] = model(input_ids=x).logits.float()
        rope = model.model.rotary_emb
        rope.register_forward_pre_hook(lambda m, a: seen.setdefault("rope", set()).update(
            b.dtype for b in m.buffers()))
        seen["model"] = model
        return model
    monkeypatch.setattr(train, "load_model", spy)
    train.main(["--model", path, "--dtype", "bf16", "--grad_ckpt", "--max_steps", "2", "--batch_size", "2",
                "--micro_batch_size", "2", "--max_samples", "8", "--eval_limit", "2",
                "--output_dir", str(tmp_path / "run")])
    model = seen["model"]
    assert seen["rope"] == {torch.float32}  # inv_freq stayed fp32 through training
    base = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert base and all(p.dtype == BF16 for p in base)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    ref = tf.AutoModelForCausalLM.from_pretrained(path, dtype=BF16)
    with torch.no_grad():
        assert torch.equal(seen["logits0"], ref(input_ids=x).logits.float())
    cast = tf.AutoModelForCausalLM.from_pretrained(path).to(dtype=BF16)  # the old path: inv_freq in bf16
    with torch.no_grad():
        assert not torch.equal(seen["logits0"], cast(input_ids=x).logits.float())


def test_tiny_model_in_bf16_keeps_fp32_buffers():
    model = models.build_tiny("tiny-llama", dtype=BF16)
    assert all(p.dtype == BF16 for p in model.parameters())
    assert {b.dtype for b in model.model.rotary_emb.buffers()} == {torch.float32}
    fp32 = models.build_tiny("tiny-llama")  # same draws, rounded once
    assert all(torch.equal(a.to(BF16), b) for a, b in zip(fp32.parameters(), model.parameters()))


def test_exact_grad_from_bf16_operands_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    delta, x = torch.randn(4, 512, 48, generator=g), torch.randn(4, 512, 40, generator=g)
    ref = delta.double().reshape(-1, 48).T @ x.double().reshape(-1, 40)
    got = g2r2.exact_grad(delta.to(BF16), x.to(BF16), BF16)
    assert got.dtype == torch.float32
    # operand rounding (2^-9 each) and one output rounding on CPU: well inside 2 %, while a bf16 running
    # sum over 2,048 tokens would be off by far more for the small entries
    err = (got.double() - ref).abs() / ref.abs().clamp_min(ref.abs().mean())
    assert err.max() < 2e-2
    assert torch.equal(g2r2.exact_grad(delta, x), delta.reshape(-1, 48).T @ x.reshape(-1, 40))  # fp32 as before


def test_dropout_scale_is_not_rounded_to_bf16():
    p, n = 0.05, 200_000
    x = torch.rand(n, 1, generator=torch.Generator().manual_seed(0)).add_(0.5).to(BF16)
    eye = torch.eye(1)
    torch.manual_seed(0)
    xd, = common.dropout_linear(x, nn.Dropout(p), eye)  # F.linear with the 1 × 1 identity: the dropped x
    kept = xd[:, 0] != 0
    ratio = (xd[kept, 0].double() / x[kept, 0].double()).mean().item()
    assert 0.9 < kept.float().mean().item() < 1
    assert ratio == pytest.approx(1 / (1 - p), abs=2e-4)  # 1/(1-p) in bf16 is 1.0547: +0.2 %
    # and the backward uses the same mask, in fp32 weights' gradient
    w = torch.ones(1, 1, requires_grad=True)
    torch.manual_seed(0)
    y, = common.dropout_linear(x.float().requires_grad_(), nn.Dropout(p), w)
    assert torch.equal(y[:, 0] != 0, kept)


def test_merge_of_a_bf16_run_is_fp32(tmp_path):
    from safetensors.torch import load_file
    import transformers as tf
    out = tmp_path / "run"
    train.main(["--model", "tiny-llama", "--dtype", "bf16", "--max_steps", "3", "--batch_size", "2",
                "--micro_batch_size", "2", "--max_samples", "8", "--eval_limit", "2", "--lr", "1e-2",
                "--merge", "--output_dir", str(out)])
    merged = tf.AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.float32
    ad = load_file(out / "adapter.safetensors")
    base = models.build_tiny("tiny-llama", dtype=BF16)
    name = "model.layers.0.self_attn.q_proj"
    A, B = ad[f"{name}.lora_A"], ad[f"{name}.lora_B"]
    expect = base.get_submodule(name).weight.float() + (16.0 / 8) * (B @ A)
    got = merged.get_submodule(name).weight
    assert (B @ A).abs().max() > 0 and torch.allclose(got, expect, rtol=0, atol=1e-6)
    assert not torch.equal(got, expect.to(BF16).float())  # bf16 would have rounded some updates away


def tiny_lm(kind):
    import transformers as tf
    kw = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    if kind == "cohere":
        return tf.CohereForCausalLM(tf.CohereConfig(**kw, logit_scale=0.0625))
    if kind == "granite":
        return tf.GraniteForCausalLM(tf.GraniteConfig(**kw, logits_scaling=8.0))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**kw))


@pytest.mark.parametrize("kind", ["llama", "cohere", "granite"])
def test_causal_loss_is_the_models_own(kind):
    model = tiny_lm(kind)
    model.config.use_cache = False
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)  # logits large enough for their scale to matter
    ids = torch.randint(0, 260, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    n = int((labels[:, 1:] != -100).sum())
    plain = train.plain_lm_head(model)
    assert plain == (kind == "llama")
    own = model(**batch).loss
    assert torch.allclose(train.causal_loss(model, batch, n, chunk=5, plain=plain), own, rtol=1e-5)
    if not plain:  # the chunked head alone would be wrong here: that is why it falls back
        assert not torch.allclose(train.causal_loss(model, batch, n, chunk=5), own, rtol=1e-3)


def test_scoring_pass_under_checkpointing_runs_without_dropout():
    """OPT's decoder layer drops with its own training flag, which HF checkpointing needs set: a scoring
    pass must run every module in eval mode and still give the un-checkpointed eval gradients."""
    import transformers as tf
    cfg = tf.OPTConfig(vocab_size=260, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, dropout=0.5, word_embed_proj_dim=64)
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))

    def score(ckpt):
        torch.manual_seed(0)
        model = tf.OPTForCausalLM(cfg)
        model.config.use_cache = False
        if ckpt:
            models.enable_checkpointing(model)
        model.train()
        flags, recomputed = [], [0]
        for m in model.modules():
            m.register_forward_pre_hook(lambda mod, a: flags.append(mod.training))
        model.model.decoder.layers[0].fc1.register_forward_hook(
            lambda *a: recomputed.__setitem__(0, recomputed[0] + 1))
        with torch.enable_grad(), common.scoring_mode(model):
            model(input_ids=ids, labels=ids).loss.backward()
        assert all(m.training for m in model.modules())  # restored
        assert "forward" not in model.model.decoder.layers[0].__dict__
        return flags, recomputed[0], [p.grad for p in model.parameters()]
    flags, calls, grads = score(ckpt=True)
    ref_flags, ref_calls, ref = score(ckpt=False)
    assert not any(flags) and not any(ref_flags)
    assert calls == 2 and ref_calls == 1  # the checkpointed pass really recomputed
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref) if a is not None)


def test_trained_norms_keep_a_bf16_stream_bf16():
    import spsft
    model = models.build_tiny("tiny-llama", dtype=BF16)
    method = spsft.SPSFT(rows=4, norms=True)
    method.attach(model)
    train.to_fp32(model)
    norm = model.model.layers[0].input_layernorm
    assert norm.weight.requires_grad and norm.weight.dtype == torch.float32
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    ids = torch.randint(0, 260, (1, 8))
    with torch.autocast("cpu", dtype=BF16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [BF16] and norm.weight.grad is not None
    fp32 = models.build_tiny("tiny-llama")  # an fp32 model's norms stay fp32
    spsft.SPSFT(rows=4, norms=True).attach(fp32)
    h = torch.randn(1, 3, 64)
    assert fp32.model.layers[0].input_layernorm(h).dtype == torch.float32
