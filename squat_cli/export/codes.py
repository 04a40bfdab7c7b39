"""Integer codes of one quantized layer, and back: what each quantizer's weight *is* in low-bit form.

``encode_weight`` turns a quantized layer's weight into a small dict of tensors
plus a JSON-able description, ``decode_weight`` turns them back into the FP32
weight that the layer used in training (bit for bit: ``encode_weight`` checks
the round trip against the layer's own fake-quantized weight and refuses
anything else). Kinds:

* ``uniform`` (LSQ, SQuAT, joint, PTQ, Q8BERT): ``w = (code + offset) * scale``,
  ``scale`` one per tensor ``(1,)`` or per output row ``(C, 1)``;
* ``group`` (Q-BERT): ``w = code * scale + min`` per row group, ``(G, 1)`` each;
* ``codebook`` (GOBO): ``w = codebook[code]``, with FP32 outliers at
  ``outlier_index`` (flat positions) replaced by ``outlier_value``.

Activation quantizers are described by ``act_state`` and rebuilt by
``build_act_quantizer`` (the training classes, so they quantize exactly as in
training).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from squat_cli.export.packing import pack_codes, unpack_codes
from squat_cli.quant.gobo import GoboQuantizer, outlier_mask
from squat_cli.quant.lsq import MIN_STEP, LsqQuantizer
from squat_cli.quant.q8bert import MaxQuantizer
from squat_cli.quant.qbert import EmaRangeQuantizer, GroupQuantizer, group_ranges


class ExportError(ValueError):
    """A layer cannot be written as codes, or stored codes do not describe a valid layer."""


def _exact(rebuilt: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    if not torch.equal(rebuilt, reference):
        bad = int((rebuilt != reference).sum())
        raise ExportError(f"{what}: {bad} weights do not round-trip through their integer codes")


@torch.no_grad()
def encode_weight(name: str, layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors keyed by suffix, description) for ``layer.weight`` under ``layer.wq``."""
    wq, w = layer.wq, layer.weight.detach().float()
    ref = wq(w).detach().float()  # the weight the layer computes with
    if isinstance(wq, GoboQuantizer):
        flat = w.reshape(-1)
        out = outlier_mask(flat, float(wq.mu), float(wq.sigma), wq.threshold)
        book = wq.codebook.float()
        mid = (book[1:] + book[:-1]) / 2
        codes = torch.bucketize(flat, mid)
        pos = torch.nonzero(out).reshape(-1).to(torch.int32)
        tensors = {"codes": pack_codes(torch.where(out, 0, codes), wq.bits), "codebook": book.clone(),
                   "outlier_index": pos, "outlier_value": flat[pos.long()].clone()}
        desc = {"kind": "codebook", "bits": wq.bits, "outliers": int(pos.numel())}
    elif isinstance(wq, GroupQuantizer):
        lo, hi = group_ranges(w, wq.groups)
        scale = ((hi.float() - lo.float()) / (2**wq.bits - 1)).clamp_min(MIN_STEP)
        g = ref.reshape(wq.groups, -1)
        codes = ((g - lo) / scale).round().clamp(0, 2**wq.bits - 1).to(torch.int64)
        tensors = {"codes": pack_codes(codes, wq.bits), "scale": scale.contiguous(), "min": lo.float().contiguous()}
        desc = {"kind": "group", "bits": wq.bits, "groups": wq.groups}
    elif isinstance(wq, (LsqQuantizer, MaxQuantizer)):
        if isinstance(wq, LsqQuantizer):
            if not bool(wq.initialized):
                raise ExportError(f"{name}: its weight quantizer was never initialised")
            scale, qn, qp = wq.step.detach().float().clone(), wq.qn, wq.qp
        else:
            scale = (w.abs().max() / wq.qp).clamp_min(MIN_STEP).reshape(1)
            qn, qp = -wq.qp, wq.qp
        q = (ref.reshape(scale.shape[0], -1) if scale.numel() > 1 else ref.reshape(-1)) / scale
        codes = q.round().clamp(qn, qp).to(torch.int64) - qn
        bits = wq.bits
        tensors = {"codes": pack_codes(codes, bits), "scale": scale.contiguous()}
        desc = {"kind": "uniform", "bits": bits, "offset": qn, "levels": qp - qn + 1,
                "granularity": "channel" if scale.numel() > 1 else "tensor"}
    else:
        raise ExportError(f"{name}: no export for weight quantizer {type(wq).__name__}")
    desc["shape"] = list(w.shape)
    _exact(decode_weight(tensors, desc), ref.reshape(w.shape), name)
    return tensors, desc


def decode_weight(tensors: dict[str, torch.Tensor], desc: dict[str, Any]) -> torch.Tensor:
    """The FP32 weight from stored codes (``tensors`` keyed by suffix, as ``encode_weight`` wrote them)."""
    shape = tuple(desc["shape"])
    n = 1
    for d in shape:
        n *= d
    bits, kind = int(desc["bits"]), desc["kind"]
    codes = unpack_codes(tensors["codes"], bits, n)
    if kind == "uniform":
        if codes.numel() and int(codes.max()) >= int(desc["levels"]):
            raise ExportError("a code lies outside the layer's grid")
        scale = tensors["scale"]
        q = (codes + int(desc["offset"])).float()
        w = (q.view(scale.shape[0], -1) if scale.numel() > 1 else q) * scale
        return w.reshape(shape)
    if kind == "group":
        scale, lo = tensors["scale"], tensors["min"]
        return (codes.float().view(scale.shape[0], -1) * scale + lo).reshape(shape)
    if kind == "codebook":
        w = tensors["codebook"][codes]
        idx = tensors["outlier_index"].long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ExportError("an outlier position lies outside the weight")
        w[idx] = tensors["outlier_value"]
        return w.reshape(shape)
    raise ExportError(f"unknown weight kind {kind!r}")


def act_state(aq: Optional[nn.Module]) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(tensors, description) of an input-activation quantizer; ({}, None) for none."""
    if aq is None or not bool(getattr(aq, "initialized", True)):
        return {}, None
    if isinstance(aq, LsqQuantizer):
        return {"step": aq.step.detach().float().reshape(1).clone()}, {"kind": "lsq", "bits": aq.bits}
    if isinstance(aq, MaxQuantizer):
        return {"max": aq.running_max.detach().float().reshape(1).clone()}, {"kind": "max", "bits": aq.bits}
    if isinstance(aq, EmaRangeQuantizer):
        return ({"min": aq.running_min.detach().float().reshape(1).clone(),
                 "max": aq.running_max.detach().float().reshape(1).clone()}, {"kind": "range", "bits": aq.bits})
    raise ExportError(f"no export for activation quantizer {type(aq).__name__}")


def build_act_quantizer(tensors: dict[str, torch.Tensor], desc: dict[str, Any]) -> nn.Module:
    """The training-time activation quantizer, in its evaluation state."""
    kind, bits = desc["kind"], int(desc["bits"])
    if kind == "lsq":
        q = LsqQuantizer(bits, learnable=False)
        q.set_step(tensors["step"])
    elif kind == "max":
        q = MaxQuantizer(bits, ema=0.0)
        q.running_max.fill_(float(tensors["max"]))
        q.initialized.fill_(True)
    elif kind == "range":
        q = EmaRangeQuantizer(bits)
        q.running_min.fill_(float(tensors["min"]))
        q.running_max.fill_(float(tensors["max"]))
        q.initialized.fill_(True)
    else:
        raise ExportError(f"unknown activation kind {kind!r}")
    return q.eval()
