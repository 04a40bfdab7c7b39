"""Tiny models and batches for the quantization tests (no dropout: passes are deterministic)."""

import torch
from transformers import BertConfig, BertForSequenceClassification


def tiny_bert(seed: int = 0, num_labels: int = 2, layers: int = 1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
    )
    return BertForSequenceClassification(cfg)


def batches(n: int, seed: int = 1, size: int = 4, length: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 100, (size, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # some padding
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (size,), generator=g)})
    return out
