"""Fine-tune a Hugging Face model with one of the importance-guided PEFT methods (work in progress)."""
import torch
import torch.nn as nn

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


def build_tiny(name, num_labels=2, seed=0):
    """A small random-init model from its config (tiny-llama, tiny-deberta, tiny-bert, tiny-vit)."""
    import transformers
    cfg_cls, model_cls, kw = TINY[name]
    cfg = getattr(transformers, cfg_cls)(**kw, **({} if name == "tiny-llama" else {"num_labels": num_labels}))
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(cfg)
