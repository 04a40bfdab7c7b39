"""A finished run's model, rebuilt as it was evaluated: the read side of a run folder.

Quantized runs are converted again from their recipe and get their saved
quantizer state; nothing here trains. ``squat export``, ``squat evaluate`` and
the sharpness scores load runs through it.
"""

from __future__ import annotations

import torch

from squat_cli.errors import RunError
from squat_cli.models import load_model, load_tokenizer
from squat_cli.quant.convert import load_quantizer, quantize_model
from squat_cli.quant.methods import get_method
from squat_cli.recipe import recipe_from_dict
from squat_cli.runs import RunDir, parse_variant
from squat_cli.tasks import get_task
from squat_cli.yaml_safe import read_yaml


def load_run_model(run: RunDir, device: str | torch.device = "cpu"):
    """Rebuild a finished run's model (quantized runs: converted, step sizes loaded) and tokenizer."""
    if not run.is_complete():
        raise RunError(f"{run.path} is not a complete run (no metrics.json)")
    if not (run.model_dir / "config.json").is_file():
        raise RunError(f"{run.path} has no saved model (model/)")
    if not run.recipe_file.is_file():
        raise RunError(f"{run.recipe_file}: missing")
    raw = read_yaml(run.recipe_file)
    recipe = recipe_from_dict(raw)
    task = get_task(recipe.data.task)
    tokenizer = load_tokenizer(str(run.model_dir))
    model = load_model(str(run.model_dir), task)
    method, _, _ = parse_variant(run.variant)
    if get_method(method).quantizes:
        if recipe.quant is None:
            raise RunError(f"{run.recipe_file}: a quantized run's recipe needs its quant section")
        quantize_model(model, recipe.quant, init_steps=False)
        load_quantizer(model, run.quantizer_file)
    model.to(device)
    model.eval()
    return model, tokenizer, recipe, task
