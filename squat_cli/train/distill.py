"""Knowledge distillation from the FP teacher: the loss every pass of a distilled run takes.

    L = labels * L_task + logits * L_logits + hidden * L_hidden + attention * L_attention

- ``L_logits``: classification, Hinton's soft cross-entropy at temperature T,
  ``-T^2 * mean_b sum_c softmax(t/T)_c * log_softmax(s/T)_c``; regression (STS-B),
  ``mean_b (s - t)^2``.
- ``L_hidden``: TernaryBERT's, ``sum_l mean (h_s^l - h_t^l)^2`` over every hidden
  state the encoder returns (the embeddings' output and each layer's), every
  position and feature (padding included, as TernaryBERT's code does).
- ``L_attention``: TernaryBERT's, ``sum_l mean (a_s^l - a_t^l)^2`` over the
  attention scores *before* the softmax (scaled QK^T), masked key positions set to
  0. transformers returns probabilities, so a run with this term routes attention
  through ``squat_scores`` (registered below): eager attention that returns the
  masked scores in place of the probabilities; its values are eager attention's.

The teacher runs in eval mode under ``no_grad`` once per batch (``prepare``);
every pass of the step (SAM's ascent, the weight step, SQuAT's step-size pass)
reuses its outputs, cut to the rows a pass sees (SAM's ``ascent_fraction``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from squat_cli.errors import RecipeError

SCORES_ATTENTION = "squat_scores"
TERMS = ("labels", "logits", "hidden", "attention")


def _scores_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                      **kwargs):
    """Eager attention (as transformers' BERT computes it) that returns the pre-softmax scores, masked keys 0."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    weights = scores if attention_mask is None else scores + attention_mask
    weights = F.softmax(weights, dim=-1)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    if attention_mask is not None:
        scores = scores.masked_fill(attention_mask.expand_as(scores) < 0, 0.0)
    return out, scores


def use_score_attention(model: nn.Module) -> None:
    """Route the model's attention through ``squat_scores`` (its attentions output: masked pre-softmax scores)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SCORES_ATTENTION, _scores_attention)
    AttentionMaskInterface.register(SCORES_ATTENTION, eager_mask)  # the additive mask eager attention takes
    model.config._attn_implementation = SCORES_ATTENTION
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = SCORES_ATTENTION


def check_teacher(teacher: nn.Module, student: nn.Module, where: str) -> None:
    """The teacher must match the student's depth and widths (and label count); one line naming what differs."""
    t, s = teacher.config, student.config
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_labels"):
        a, b = getattr(t, key, None), getattr(s, key, None)
        if a != b:
            raise RecipeError(f"distill.teacher: {where} has {key} {a}, the student {b}; a teacher must match the "
                              "student's layers and widths")


class Distiller:
    """Teacher outputs for the current batch, and the distillation loss of a student's outputs."""

    def __init__(self, teacher: nn.Module, cfg, regression: bool,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.regression = regression
        self.autocast = autocast
        self.hidden = cfg.hidden > 0
        self.attention = cfg.attention > 0
        self.teacher_passes = 0
        """Teacher forward passes made (one per training batch)."""
        self._batch: Optional[dict] = None
        self._out: dict[str, object] = {}

    def student_kwargs(self) -> dict:
        return {"output_hidden_states": self.hidden, "output_attentions": self.attention}

    @torch.no_grad()
    def prepare(self, batch: dict) -> None:
        """Run the teacher on ``batch`` (once: a batch already prepared is not run again)."""
        if batch is self._batch:
            return
        with self.autocast():
            out = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}, **self.student_kwargs())
        self._out = {"logits": out.logits.detach().float(),
                     "hidden": tuple(h.detach().float() for h in out.hidden_states) if self.hidden else (),
                     "attention": tuple(a.detach().float() for a in out.attentions) if self.attention else ()}
        self._batch = batch
        self.teacher_passes += 1

    def _teacher(self, rows: int) -> dict[str, object]:
        if self._batch is None:
            raise RuntimeError("Distiller.prepare(batch) must run before the loss")
        full = len(self._out["logits"])
        if rows == full:
            return self._out
        return {"logits": self._out["logits"][:rows], "hidden": tuple(h[:rows] for h in self._out["hidden"]),
                "attention": tuple(a[:rows] for a in self._out["attention"])}

    def terms(self, out, rows: int) -> dict[str, torch.Tensor]:
        """Each term of the loss (unweighted) for a student's outputs on the first ``rows`` rows of the batch."""
        t = self._teacher(rows)
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {"labels": out.loss}
        s_logits = out.logits.float()
        if cfg.logits > 0:
            if self.regression:
                terms["logits"] = F.mse_loss(s_logits, t["logits"])
            else:
                temp = cfg.temperature
                soft = F.softmax(t["logits"] / temp, dim=-1)
                terms["logits"] = -(soft * F.log_softmax(s_logits / temp, dim=-1)).sum(-1).mean() * temp * temp
        if self.hidden:
            terms["hidden"] = sum(F.mse_loss(s.float(), h) for s, h in zip(out.hidden_states, t["hidden"]))
        if self.attention:
            terms["attention"] = sum(F.mse_loss(s.float(), a) for s, a in zip(out.attentions, t["attention"]))
        return terms

    def loss(self, out, rows: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum, and each (unweighted) term, detached: read them with ``term_values`` where recorded."""
        terms = self.terms(out, rows)
        total = sum(getattr(self.cfg, k) * v for k, v in terms.items() if getattr(self.cfg, k) > 0)
        return total, {k: v.detach() for k, v in terms.items()}


def term_values(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """The terms as numbers (one host read each): only for the pass the history records."""
    return {k: float(v) for k, v in terms.items()}
