"""Reading YAML safely: UTF-8 only, and bounded so that aliases cannot multiply a document past
``MAX_YAML_NODES`` nodes (the "billion laughs" alias bomb), whether in a recipe, a ``--set`` value or a run
folder's ``recipe.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from squat_cli.errors import RecipeError

MAX_YAML_NODES = 100_000
"""Bound on a document's size once YAML aliases are expanded."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path}: not UTF-8 text") from None
    except OSError as exc:
        raise RecipeError(f"recipe {path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return safe_yaml(text, f"recipe {path}") or {}


def safe_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load`` with a bound on the expanded size: aliases may not multiply the document past
    ``MAX_YAML_NODES`` nodes (the "billion laughs" alias bomb)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            size = _expanded_size(node, {})
            if size > MAX_YAML_NODES:
                raise RecipeError(f"{what}: too large once its YAML aliases are expanded (over {MAX_YAML_NODES} "
                                  "nodes)")
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{what}: not valid YAML{where}") from None
    except RecursionError:
        raise RecipeError(f"{what}: nested too deeply") from None


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in the document with every alias expanded (memoised: linear in the composed graph)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_YAML_NODES + 1  # a cycle counts as too large
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]
