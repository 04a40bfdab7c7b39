"""Dropout for CPU training that spends less time drawing random numbers.

PyTorch's CPU dropout draws one Bernoulli sample per element
(``bernoulli_``), which on a 2-core machine takes about 15% of a BERT
training step (attention-probability dropout alone is 6.3M elements per layer
at batch 32 x 128). Here each element gets 32 random bits instead: one
full-range 64-bit draw fills two elements, and an element is kept when its
32-bit word is below ``round((1 - p) * 2^32)``. The keep probability is exact
to 2^-32; the masks are i.i.d. as with ``torch.nn.Dropout``, scaled by
``1 / (1 - p)``, and drawn from the same default generator (so ``torch.manual_seed``
and checkpointed RNG states govern them). Only the random stream differs from
PyTorch's, so runs are not bit-identical to ones with ``nn.Dropout``.

On other devices (CUDA's dropout is already a fused kernel) and in evaluation,
the functions below fall back to PyTorch's own dropout / attention.

``use_fast_dropout(model)`` swaps every ``nn.Dropout`` of a model for
``FastDropout`` and routes a ``transformers`` model's attention through
``attention_forward`` (SDPA unchanged whenever attention dropout is off,
as in evaluation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(shape: torch.Size, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean mask, each element True with probability ``1 - p`` (to 2^-32), independently."""
    n = math.prod(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    bits = words.view(torch.int32)[:n]
    # bits is uniform over int32; keep when bits + 2^31 < round((1 - p) * 2^32)
    threshold = round((1.0 - p) * 2**32) - 2**31
    if threshold > 2**31 - 1:
        return torch.ones(shape, dtype=torch.bool)
    return (bits < threshold).view(shape)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop-in for ``F.dropout`` (not in place): ``x * mask / (1 - p)``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    scaled = keep_mask(x.shape, p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * scaled


_fast_dropout = dropout  # the name ``dropout`` is a parameter of attention_forward (transformers' keyword)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the faster CPU mask (same ``p``, same train/eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)


ATTENTION_NAME = "squat_sdpa"


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """``transformers`` attention function: SDPA, except CPU training with attention dropout, done explicitly.

    The explicit path is SDPA's own math path (scores, mask, softmax, dropout,
    weighted sum) with the fast mask; SDPA on CPU takes that path anyway once
    dropout is on.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    if key.size(1) != query.size(1):  # grouped-query attention: repeat the key/value heads
        rep = query.size(1) // key.size(1)
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    # scale the (B, H, T, d) query rather than the (B, H, T, T) scores: a smaller pass, as SDPA's math path does
    scores = torch.matmul(query * scaling, key.transpose(2, 3))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores.add_(attention_mask)  # in place: matmul's backward does not need its output
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = _fast_dropout(probs, dropout, True)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, None


def use_fast_dropout(model: nn.Module) -> int:
    """Swap ``model``'s ``nn.Dropout`` modules for ``FastDropout`` and its attention for ``attention_forward``.

    Returns the number of dropout modules replaced. Parameters and state dict are unchanged.
    """
    count = 0
    for _, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.Dropout:
                setattr(mod, child_name, FastDropout(child.p, child.inplace))
                count += 1
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTENTION_NAME, attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the same masks SDPA gets
        model.set_attn_implementation(ATTENTION_NAME)
    return count
