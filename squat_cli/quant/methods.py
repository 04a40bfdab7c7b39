"""The method table: one record per training method, the only place method facts live.

Every part of squat that behaves differently per method (the recipe schema, the
conversion to quantized layers, the training strategy, the grid and the sweep,
the report and the CLI's help) asks this table instead of comparing names. A new
method is one new record here (and, when it needs one, a quantizer of its own
under ``quant/``).

The module imports no torch: the grid, the sweep and the report read the table
without loading a model. The quantizer factories import their classes when called.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from squat_cli.recipe.schema import QuantConfig


# ---------------------------------------------------------------- quantizer factories (lazy: no torch at import)


def _lsq_weight(cfg: "QuantConfig", rows: int, bits: int, embedding: bool) -> "nn.Module":
    """LSQ's weight quantizer; the word embeddings always get one step per row (per token, as TernaryBERT's
    row-wise embedding quantization): token vectors differ in norm far more than a layer's rows do."""
    from squat_cli.quant.lsq import LsqQuantizer

    return LsqQuantizer(bits, channels=rows if cfg.per_channel or embedding else None, learnable=True)


def _ptq_weight(cfg: "QuantConfig", rows: int, bits: int, embedding: bool) -> "nn.Module":
    from squat_cli.quant.lsq import LsqQuantizer

    return LsqQuantizer(bits, channels=rows if cfg.per_channel or embedding else None, learnable=False)


def _max_weight(cfg: "QuantConfig", rows: int, bits: int, embedding: bool) -> "nn.Module":
    from squat_cli.quant.q8bert import MaxQuantizer

    return MaxQuantizer(bits)


def _gobo_weight(cfg: "QuantConfig", rows: int, bits: int, embedding: bool) -> "nn.Module":
    from squat_cli.quant.gobo import GoboQuantizer

    return GoboQuantizer(bits, cfg.gobo_threshold)


def _qbert_weight(cfg: "QuantConfig", rows: int, bits: int, embedding: bool) -> "nn.Module":
    from squat_cli.quant.qbert import GroupQuantizer

    return GroupQuantizer(bits, 1 if embedding else cfg.qbert_groups)


def _qbert_check(cfg: "QuantConfig", rows: int, name: str) -> None:
    from squat_cli.errors import RecipeError

    if rows % cfg.qbert_groups:
        raise RecipeError(f"quant.qbert_groups: {cfg.qbert_groups} does not divide the {rows} rows of {name}")


def _lsq_act(cfg: "QuantConfig") -> "nn.Module":
    from squat_cli.quant.lsq import LsqQuantizer

    return LsqQuantizer(cfg.abits, learnable=True, grad_scale=cfg.act_grad_scale)


def _ptq_act(cfg: "QuantConfig") -> "nn.Module":
    from squat_cli.quant.lsq import LsqQuantizer

    return LsqQuantizer(cfg.abits, learnable=False, grad_scale=cfg.act_grad_scale)


def _max_act(cfg: "QuantConfig") -> "nn.Module":
    from squat_cli.quant.q8bert import MaxQuantizer

    return MaxQuantizer(cfg.abits, ema=cfg.q8bert_ema)


def _ema_act(cfg: "QuantConfig") -> "nn.Module":
    from squat_cli.quant.qbert import EmaRangeQuantizer

    return EmaRangeQuantizer(cfg.abits, cfg.qbert_act_momentum)


def _lsq_init(wq: "nn.Module", weight, cfg: "QuantConfig") -> None:
    wq.init_lsq(weight)


def _ptq_init(wq: "nn.Module", weight, cfg: "QuantConfig") -> None:
    (wq.init_mse if cfg.ptq_step == "mse" else wq.init_max)(weight)


def _fit_init(wq: "nn.Module", weight, cfg: "QuantConfig") -> None:
    wq.fit(weight)


def _no_init(wq: "nn.Module", weight, cfg: "QuantConfig") -> None:
    """Quantizers that set their range on the first forward pass (Q8BERT, Q-BERT)."""


def _embedding_bits_if_asked(cfg: "QuantConfig") -> Optional[int]:
    """The LSQ family's: ``quant.embedding_bits``, or the weights' bits under ``quant.quantize_embeddings``."""
    if cfg.embedding_bits is not None:
        return cfg.embedding_bits
    return cfg.wbits if cfg.quantize_embeddings else None


def _gobo_embedding_bits(cfg: "QuantConfig") -> Optional[int]:
    bits = cfg.gobo_embedding_bits
    if bits is None:  # as published: 2 for W2, else max(4, W)
        bits = 2 if cfg.wbits == 2 else max(4, cfg.wbits)
    return None if bits >= 32 else bits


def _qbert_embedding_bits(cfg: "QuantConfig") -> Optional[int]:
    return None if cfg.qbert_embedding_bits >= 32 else cfg.qbert_embedding_bits


def _never(cfg: "QuantConfig") -> Optional[int]:
    return None


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Method:
    name: str
    """The recipe's ``quant.method`` and the grid's method name (``fp``: plain fine-tuning)."""
    label: str
    """Row name in the report's tables."""
    strategy: str
    """Training strategy (``train/strategies.py``): ``plain`` (one pass), ``joint`` (SAM on Q(w, s)) or ``squat``
    (Algorithm 1); ``none`` for post-training methods."""
    weight_quantizer: Optional[Callable] = None
    """(cfg, rows, bits, embedding) -> the weight quantizer of one layer; None: nothing is quantized."""
    act_quantizer: Optional[Callable] = None
    """cfg -> the activation quantizer of one layer; None: activations stay FP32."""
    init_weight: Callable = _no_init
    """(quantizer, weight, cfg): set the weight quantizer's range from the FP weight at conversion."""
    embedding_bits: Callable = _never
    """cfg -> bits of the word embeddings (None: kept FP32)."""
    check_layer: Optional[Callable] = None
    """(cfg, rows, module name): refuse a layer the quantizer cannot take, before any layer is swapped."""
    post_training: bool = False
    """Makes no training step (evaluated as converted)."""
    uses_sam: bool = False
    """Takes SAM's perturbation, so ``sam.rho`` acts on it."""
    learned_steps: bool = False
    """Has LSQ step sizes trained by the step-size optimizer."""
    mixed_precision: bool = False
    """Takes ``quant.mixed`` (per-layer bit widths by Hessian sensitivity)."""
    paper_label: Optional[str] = None
    """The paper's row label for this method (its published numbers), None where the paper has none."""
    selectable: bool = True
    """A ``quant.method`` value (False for ``fp``, the fine-tuning that every quantized run starts from)."""

    @property
    def quantizes(self) -> bool:
        return self.weight_quantizer is not None

    @property
    def takes_embedding_bits(self) -> bool:
        """Takes ``quant.embedding_bits`` / ``quant.quantize_embeddings`` (the LSQ family and PTQ; GOBO and
        Q-BERT have their own keys)."""
        return self.embedding_bits is _embedding_bits_if_asked

    @property
    def weight_only(self) -> bool:
        """Activations stay FP32, so the run's variant is always ``a32``."""
        return self.act_quantizer is None

    def variant_bits(self, wbits: int, abits: int) -> tuple[int, int]:
        """(W, A) of the run folder's variant: an unquantized method is w32a32, a weight-only one a32."""
        if not self.quantizes:
            return 32, 32
        return wbits, (32 if self.weight_only else abits)


_TABLE = (
    Method("fp", "FP32", "plain", paper_label="FP32", selectable=False),
    Method("ptq", "PTQ", "none", _ptq_weight, _ptq_act, _ptq_init, _embedding_bits_if_asked, post_training=True),
    Method("q8bert", "Q8BERT", "plain", _max_weight, _max_act, paper_label="Q8BERT"),
    Method("gobo", "GOBO", "none", _gobo_weight, None, _fit_init, _gobo_embedding_bits, post_training=True,
           paper_label="GOBO"),
    Method("qbert", "Q-BERT", "plain", _qbert_weight, _ema_act, embedding_bits=_qbert_embedding_bits,
           check_layer=_qbert_check, mixed_precision=True, paper_label="Q-BERT"),
    Method("lsq", "LSQ", "plain", _lsq_weight, _lsq_act, _lsq_init, _embedding_bits_if_asked, learned_steps=True,
           paper_label="LSQ"),
    Method("joint", "Joint", "joint", _lsq_weight, _lsq_act, _lsq_init, _embedding_bits_if_asked, uses_sam=True,
           learned_steps=True),
    Method("squat", "SQuAT", "squat", _lsq_weight, _lsq_act, _lsq_init, _embedding_bits_if_asked, uses_sam=True,
           learned_steps=True, paper_label="SQuAT"),
    Method("fp-sam", "FP-SAM", "joint", uses_sam=True),
)

METHODS_BY_NAME: dict[str, Method] = {m.name: m for m in _TABLE}
METHOD_ORDER: tuple[str, ...] = tuple(m.name for m in _TABLE)
"""Every method, in the order of the report's rows (``fp`` first)."""
METHODS: tuple[str, ...] = tuple(m.name for m in _TABLE if m.selectable)
"""The values of ``quant.method``."""
MIXED_RE = re.compile(r"^qbert-mp([2-8])$")
"""Grid method names for Q-BERT's mixed precision: ``qbert-mp3`` is W/3 for each W of its bit widths."""
KD_SUFFIX = "+kd"
"""Marks a distilled run's method (``lsq+kd``): in a grid's methods, its run folders and the report's rows."""


def split_kd(name: str) -> tuple[str, bool]:
    """``lsq+kd`` -> (``lsq``, True); ``lsq`` -> (``lsq``, False)."""
    if name.endswith(KD_SUFFIX):
        return name[: -len(KD_SUFFIX)], True
    return name, False


def get_method(name: str) -> Method:
    """The record of ``name`` (a grid's ``qbert-mp<H>`` is Q-BERT's, ``lsq+kd`` LSQ's); ValueError for an unknown
    name."""
    name = split_kd(name)[0]
    if MIXED_RE.match(name):
        name = "qbert"
    try:
        return METHODS_BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}") from None


def is_known(name: str) -> bool:
    base, kd = split_kd(name)
    known = base in METHODS_BY_NAME or bool(MIXED_RE.match(base))
    return known and not (kd and (not METHODS_BY_NAME.get(base, METHODS_BY_NAME["qbert"]).selectable
                                  or get_method(base).post_training))


def names_where(**facts: bool) -> tuple[str, ...]:
    """Names of the methods whose facts (``post_training=True``, ``uses_sam=True``, ...) all match."""
    return tuple(m.name for m in _TABLE if all(getattr(m, k) == v for k, v in facts.items()))


def label(name: str, wbits: int) -> str:
    """Display name of a table row's method (``qbert-mp3`` at W2: ``Q-BERT MP 2/3``)."""
    base, kd = split_kd(name)
    mixed = MIXED_RE.match(base)
    if mixed:
        text = f"Q-BERT MP {wbits}/{mixed.group(1)}"
    else:
        text = METHODS_BY_NAME[base].label if base in METHODS_BY_NAME else base
    return f"{text}+KD" if kd else text


def order(name: str) -> float:
    """Rank of a method among the report's rows (a distilled method right after its own; unknown names last)."""
    base, kd = split_kd(name)
    base = "qbert" if MIXED_RE.match(base) else base
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)) + (0.5 if kd else 0.0)


def help_text() -> str:
    """The list of methods for the CLI's help."""
    return ", ".join(METHODS[:-1]) + f" or {METHODS[-1]}"
