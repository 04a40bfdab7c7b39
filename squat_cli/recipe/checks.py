"""The recipe's cross-field rules: what the types alone cannot say (a width in range, a method's own options,
a distillation that has a term). Each broken rule is one ``RecipeError`` naming the key; nothing is changed."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from squat_cli.errors import RecipeError
from squat_cli.quant.methods import get_method, names_where
from squat_cli.task_file import TaskSpec

if TYPE_CHECKING:
    from squat_cli.recipe.schema import Recipe

MIXED_RE = re.compile(r"^\d+/\d+$")
"""Q-BERT's mixed precision, ``L/H`` (``2/3``)."""
MAX_SEED = 2**32 - 1
"""numpy's seeding takes 32-bit seeds."""


def check_recipe(r: "Recipe") -> None:
    """Every cross-field rule of ``r``; the first broken one raises."""
    if isinstance(r.data.task, TaskSpec):
        r.data.task.check("data.task")
    _positive("data.max_seq_length", r.data.max_seq_length, allow_zero=False)
    if r.data.max_seq_length > 4096:
        raise RecipeError(f"data.max_seq_length: {r.data.max_seq_length} is too large (at most 4096)")
    for key, val in (("data.train_subset", r.data.train_subset), ("data.eval_subset", r.data.eval_subset)):
        if val is not None:
            _positive(key, val, allow_zero=False)
    t = r.train
    _positive("train.epochs", t.epochs, allow_zero=False)
    if t.max_steps is not None:
        _positive("train.max_steps", t.max_steps, allow_zero=False)
    _positive("train.batch_size", t.batch_size, allow_zero=False)
    _positive("train.eval_batch_size", t.eval_batch_size, allow_zero=False)
    _positive("train.lr", t.lr)
    _positive("train.weight_decay", t.weight_decay)
    if not 0 <= t.warmup_ratio < 1:
        raise RecipeError(f"train.warmup_ratio: {t.warmup_ratio} must be in [0, 1)")
    if t.max_grad_norm is not None:
        _positive("train.max_grad_norm", t.max_grad_norm, allow_zero=False)
    _positive("train.eval_steps", t.eval_steps, allow_zero=False)
    _positive("train.log_every", t.log_every, allow_zero=False)
    _positive("train.seed", t.seed)
    if t.seed > MAX_SEED:
        raise RecipeError(f"train.seed: {t.seed} is too large (at most {MAX_SEED})")
    q = r.quant
    if r.sam.rho is None:
        raise RecipeError("sam.rho: unset (resolve() fills the paper's radius)")
    if r.sam.rho < 0:
        raise RecipeError(f"sam.rho: {r.sam.rho} must be >= 0")
    _positive("sam.every", r.sam.every, allow_zero=False)
    for key in ("probability", "ascent_fraction"):
        if not 0 < getattr(r.sam, key) <= 1:
            raise RecipeError(f"sam.{key}: {getattr(r.sam, key)} must be in (0, 1]")
    if q is not None:
        method = get_method(q.method)
        if not 2 <= q.wbits <= 8 and not (not method.quantizes and q.wbits == 32):
            raise RecipeError(f"quant.wbits: {q.wbits} is outside 2..8")
        if not 2 <= q.abits <= 32:
            raise RecipeError(f"quant.abits: {q.abits} is outside 2..32")
        _positive("quant.step_lr", q.step_lr)
        _positive("quant.calib_batches", q.calib_batches, allow_zero=False)
        if not 0 <= q.step_momentum < 1:
            raise RecipeError(f"quant.step_momentum: {q.step_momentum} must be in [0, 1)")
        if not 0 < q.q8bert_ema < 1:
            raise RecipeError(f"quant.q8bert_ema: {q.q8bert_ema} must be in (0, 1)")
        if method.quantizes and method.weight_only and q.abits != 32:
            raise RecipeError(f"quant.abits: {q.abits}; {q.method} keeps activations in FP32 (use 32)")
        if q.embedding_bits is not None or q.quantize_embeddings:
            key = "quant.embedding_bits" if q.embedding_bits is not None else "quant.quantize_embeddings"
            if not method.takes_embedding_bits:
                takers = ", ".join(names_where(takes_embedding_bits=True))
                raise RecipeError(f"{key}: an option of {takers} (method is {q.method}; GOBO and Q-BERT have "
                                  "their own gobo_/qbert_embedding_bits)")
            if q.embedding_bits is not None and not 2 <= q.embedding_bits <= 8:
                raise RecipeError(f"quant.embedding_bits: {q.embedding_bits} is outside 2..8")
        if q.gobo_embedding_bits is not None and not (1 <= q.gobo_embedding_bits <= 8
                                                      or q.gobo_embedding_bits == 32):
            raise RecipeError(f"quant.gobo_embedding_bits: {q.gobo_embedding_bits} is outside 1..8 (or 32)")
        if not (2 <= q.qbert_embedding_bits <= 8 or q.qbert_embedding_bits == 32):
            raise RecipeError(f"quant.qbert_embedding_bits: {q.qbert_embedding_bits} is outside 2..8 (or 32)")
        _positive("quant.qbert_groups", q.qbert_groups, allow_zero=False)
        if not 0 < q.qbert_act_momentum < 1:
            raise RecipeError(f"quant.qbert_act_momentum: {q.qbert_act_momentum} must be in (0, 1)")
        if q.mixed is not None:
            if not method.mixed_precision:
                mixed = ", ".join(names_where(mixed_precision=True))
                raise RecipeError(f"quant.mixed: mixed precision is an option of {mixed} (method is {q.method})")
            parts = q.mixed.split("/")
            if not MIXED_RE.match(q.mixed) or not 2 <= int(parts[0]) < int(parts[1]) <= 8:
                raise RecipeError(f"quant.mixed: {q.mixed!r} must be L/H with 2 <= L < H <= 8, e.g. 2/3")
            if q.wbits != int(parts[0]):
                raise RecipeError(f"quant.wbits: {q.wbits}; with quant.mixed {q.mixed} it is {parts[0]}")
        if not 0 < q.mixed_share < 1:
            raise RecipeError(f"quant.mixed_share: {q.mixed_share} must be in (0, 1)")
        for key in ("hessian_subsets", "hessian_examples", "hessian_iters"):
            _positive(f"quant.{key}", getattr(q, key), allow_zero=False)
    k = r.distill
    if k is not None:
        for key in ("logits", "hidden", "attention", "labels"):
            _positive(f"distill.{key}", getattr(k, key))
        _positive("distill.temperature", k.temperature, allow_zero=False)
        if not k.uses():
            raise RecipeError("distill: every weight is 0; give at least one term a weight")
        if q is not None and get_method(q.method).post_training:
            raise RecipeError(f"distill: {q.method} makes no training step; distillation needs a QAT method")


def _positive(key: str, value: float, allow_zero: bool = True) -> None:
    if value < 0 or (not allow_zero and value == 0):
        raise RecipeError(f"{key}: {value} must be {'>= 0' if allow_zero else '> 0'}")
