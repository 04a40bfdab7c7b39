"""Which modules to quantize, the swap itself, activation calibration, and quantizer state on disk.

By default every ``nn.Linear`` inside the encoder's repeated blocks is swapped,
found by structure whatever the blocks are called (BERT: Q, K, V, attention
output, FFN in and out; RoBERTa, DistilBERT, ELECTRA, DeBERTa-v2, ModernBERT
alike);
pooler, classifier, LayerNorm and position/type embeddings stay full
precision. The word embeddings are quantized only when asked.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from torch import nn

from squat_cli.errors import RunError
from squat_cli.files import atomic_path, save_tensors
from squat_cli.quant.methods import get_method
from squat_cli.quant.q8bert import MaxQuantizer
from squat_cli.quant.qbert import EmaRangeQuantizer
from squat_cli.quant.qlinear import QuantEmbedding, QuantLinear, is_quantizer_key, learned_quantizers, quant_layers
from squat_cli.recipe import QuantConfig


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the encoder's repeated blocks, found by structure: the children of every ``nn.ModuleList``
    whose items are all of one class and hold ``nn.Linear`` layers (outermost lists only). BERT's
    ``encoder.layer.<i>``, DistilBERT's ``transformer.layer.<i>``, ModernBERT's ``model.layers.<i>``."""
    lists = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1 \
                and all(any(isinstance(m, nn.Linear) for m in c.modules()) for c in mod):
            if not any(name.startswith(f"{outer}.") for outer in lists):
                lists.append(name)
    return [f"{ln}.{i}" if ln else str(i) for ln in lists for i in range(len(model.get_submodule(ln)))]


def select_linear(model: nn.Module, include: Optional[list[str]], exclude: list[str]) -> list[str]:
    """Names of ``nn.Linear`` modules matching ``include`` and not ``exclude``; ``include`` None: every
    ``nn.Linear`` inside the encoder's repeated blocks (``repeated_blocks``), whatever they are called."""
    blocks = repeated_blocks(model) if include is None else []
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not isinstance(mod, QuantLinear)
        and (_matches(name, include) if include is not None else any(name.startswith(f"{b}.") for b in blocks))
        and not _matches(name, exclude)
    ]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, cfg: QuantConfig, init_steps: bool = True,
                   bits: Optional[dict[str, int]] = None) -> list[str]:
    """Swap the selected layers for quantized ones in place; return their names.

    Weight steps are initialised here (unless ``init_steps`` is False, when a
    saved quantizer state is loaded next); activation steps need ``calibrate``.
    ``bits`` gives some layers (by module name) another weight bit width than
    ``cfg.wbits`` (Q-BERT's mixed precision). ``fp-sam`` quantizes nothing.
    """
    method = get_method(cfg.method)
    if not method.quantizes:
        return []
    bits = bits or {}
    names = select_linear(model, cfg.include, cfg.exclude)
    if method.check_layer is not None:
        for name in names:
            method.check_layer(cfg, model.get_submodule(name).out_features, name)
    for name in names:
        lin = model.get_submodule(name)
        wq = method.weight_quantizer(cfg, lin.out_features, bits.get(name, cfg.wbits), False)
        aq = method.act_quantizer(cfg) if method.act_quantizer is not None and cfg.abits < 32 else None
        q = QuantLinear.from_linear(lin, wq, aq)
        if init_steps:
            method.init_weight(q.wq, q.weight.detach(), cfg)
        _set_module(model, name, q)
    emb_bits = cfg.word_embedding_bits()
    if emb_bits is not None:
        emb = model.get_input_embeddings()
        emb_name = next(n for n, m in model.named_modules() if m is emb)
        q = QuantEmbedding.from_embedding(emb, method.weight_quantizer(cfg, emb.num_embeddings, emb_bits, True))
        if init_steps:
            method.init_weight(q.wq, q.weight.detach(), cfg)
        _set_module(model, emb_name, q)
        names.append(emb_name)
    return names


def encoder_blocks(names: list[str]) -> dict[str, list[str]]:
    """Group module names by the repeated block they sit in (the path up to its first numeric part):
    ``bert.encoder.layer.3.attention.self.query`` -> ``bert.encoder.layer.3``. Names outside any block are left out."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        cut = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        if cut is not None:
            blocks.setdefault(".".join(parts[: cut + 1]), []).append(name)
    return blocks


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[dict], act_init: str = "max") -> int:
    """Initialise activation steps from a few batches; return how many batches were used.

    ``max``: step = max over batches of max|x| / Qp. ``lsq``: mean over batches of 2*mean|x|/sqrt(Qp).
    """
    layers = [m for _, m in quant_layers(model) if getattr(m, "aq", None) is not None]
    if not layers:
        return 0
    stats: dict[int, list[torch.Tensor]] = {id(m): [] for m in layers}
    hooks = []
    for m in layers:
        def hook(mod, args, _m=m):
            stats[id(_m)].append(args[0].detach().float())
        hooks.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    used = 0
    try:
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
            used += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if used == 0:
        raise RunError("calibration needs at least one training batch")
    for m in layers:
        xs = stats[id(m)]
        aq = m.aq
        if isinstance(aq, MaxQuantizer):
            aq.init_max(torch.stack([x.abs().max() for x in xs]))
        elif isinstance(aq, EmaRangeQuantizer):
            aq.init_range(xs)
        elif act_init == "max":
            aq.set_step(torch.stack([x.abs().max() for x in xs]).max() / aq.qp)
        else:
            aq.set_step(torch.stack([2 * x.abs().mean() / aq.qp**0.5 for x in xs]).mean())
    return used


# ---------------------------------------------------------------- state on disk


def quantizer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer tensor (step sizes, running maxima, init flags), keyed as in the model's state dict."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_quantizer_key(k)}


def save_quantizer(model: nn.Module, cfg: QuantConfig, path: Path, names: list[str]) -> None:
    tensors = quantizer_state(model)
    tensors = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v) for k, v in tensors.items()}
    meta = {
        "method": cfg.method, "wbits": str(cfg.wbits), "abits": str(cfg.abits),
        "per_channel": str(cfg.per_channel), "modules": json.dumps(names),
    }
    with atomic_path(path) as tmp:
        save_tensors(tensors, tmp, metadata=meta)


def load_quantizer(model: nn.Module, path: Path) -> dict[str, str]:
    """Load step sizes into an already converted model; errors name the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except Exception as exc:
        raise RunError(f"{path}: not a readable safetensors file ({type(exc).__name__})") from None
    own = model.state_dict()
    expected = {k for k in own if is_quantizer_key(k)}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:3]
        raise RunError(f"{path}: quantizer tensors do not match the model (missing e.g. {missing})")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise RunError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        own[k].copy_(v.to(own[k].dtype))
    return meta


def step_summary(model: nn.Module) -> dict[str, float]:
    """Mean weight and activation step sizes (to log how far they move)."""
    w = [q.step.detach().float().mean() for n, q in learned_quantizers(model) if n.endswith(".wq")]
    a = [q.step.detach().float().mean() for n, q in learned_quantizers(model) if n.endswith(".aq")]
    out = {}
    if w:
        out["mean_wstep"] = float(torch.stack(w).mean())
    if a:
        out["mean_astep"] = float(torch.stack(a).mean())
    return out
