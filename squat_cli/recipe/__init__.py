"""Recipes: typed dataclasses are the schema; YAML and ``--set`` overrides fill them.

A recipe has sections ``model``, ``data``, ``train``, ``quant`` and ``sam``.
Loading validates every key and value; anything wrong is a ``RecipeError``
with a one-line message naming the key (``train.scheduler``) and what is
allowed. ``schema`` holds the sections, ``checks`` the rules across their
keys, ``layers`` how a recipe is put together from defaults, a file and
overrides.
"""

from squat_cli.recipe.checks import MAX_SEED
from squat_cli.recipe.layers import (
    DISTILL_DEFAULTS,
    QUANTIZE_DEFAULTS,
    apply_overrides,
    load_recipe,
    merge_sections,
    parse_override,
)
from squat_cli.recipe.schema import (
    METHODS,
    POST_TRAINING_METHODS,
    WEIGHT_ONLY_METHODS,
    DataConfig,
    DistillConfig,
    ModelConfig,
    QuantConfig,
    Recipe,
    SamConfig,
    TrainConfig,
    recipe_from_dict,
)

__all__ = ["DISTILL_DEFAULTS", "QUANTIZE_DEFAULTS", "apply_overrides", "load_recipe", "merge_sections", "parse_override",
           "MAX_SEED", "METHODS", "POST_TRAINING_METHODS", "WEIGHT_ONLY_METHODS", "DataConfig", "DistillConfig",
           "ModelConfig", "QuantConfig", "Recipe", "SamConfig", "TrainConfig", "recipe_from_dict"]
