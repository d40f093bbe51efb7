"""Tiny random-init Hugging Face models of every family the tests cover (no downloads)."""
from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              vocab_size=100, max_position_embeddings=64)

FAMILIES = {
    # family: (config class, config kwargs, model class, number of default target matrices per layer)
    "bert": ("BertConfig", {}, "BertForSequenceClassification", 6),
    "roberta": ("RobertaConfig", {"pad_token_id": 1}, "RobertaForSequenceClassification", 6),
    "distilbert": ("DistilBertConfig", {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64,
                                        "vocab_size": 100, "max_position_embeddings": 64},
                   "DistilBertForSequenceClassification", 6),
    "albert": ("AlbertConfig", {"embedding_size": 16}, "AlbertForSequenceClassification", 6),
    "electra": ("ElectraConfig", {"embedding_size": 32}, "ElectraForSequenceClassification", 6),
    "deberta-v2": ("DebertaV2Config", {"relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                       "position_buckets": 8, "max_relative_positions": 16},
                   "DebertaV2ForSequenceClassification", 8),   # + pos_key_proj, pos_query_proj (share_att_key off)
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 100},
             "GPT2LMHeadModel", 4),
    "llama": ("LlamaConfig", {"num_key_value_heads": 2, "head_dim": 8}, "LlamaForCausalLM", 7),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "head_dim": 8}, "Qwen2ForCausalLM", 7),
    "vit": ("ViTConfig", {"image_size": 16, "patch_size": 8, "num_channels": 3}, "ViTForImageClassification", 6),
}
SIMPLE = ("distilbert", "gpt2")  # configs that do not take COMMON's names


def tiny(family: str, seed: int = 0) -> torch.nn.Module:
    cfg_name, kw, model_name, _ = FAMILIES[family]
    base = {} if family in SIMPLE else dict(COMMON)
    if family == "vit":
        base.pop("vocab_size")
        base.pop("max_position_embeddings")
    cfg = getattr(transformers, cfg_name)(**{**base, **kw})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval()


def example(family: str, batch: int = 2, seq: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(3, 100, (batch, seq), generator=g), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
