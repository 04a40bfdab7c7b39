"""Load a packed export as a ready ``transformers`` model: codes become FP32 weights once, at load.

    from squat_cli.export import load_packed
    model, tokenizer, manifest = load_packed("runs/stsb/squat-w2a8/seed1/export/packed")
    logits = model(**tokenizer("A man plays.", "A man is playing.", return_tensors="pt")).logits

Every quantized ``nn.Linear`` becomes a ``DequantLinear``: an ``nn.Linear``
holding the decoded weight, with the run's input-activation quantizer in front
(8-bit activations are quantized exactly as in training). The weights file is
checked against the manifest's SHA-256 and every tensor against the manifest's
layers before anything is built: a damaged or altered export is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from squat_cli.errors import RunError
from squat_cli.export.codes import ExportError, build_act_quantizer, decode_weight
from squat_cli.export.folder import MANIFEST_FILE, plain_name, read_manifest_file
from squat_cli.export.packed import FORMAT, FORMAT_VERSION
from squat_cli.export.packing import packed_bytes


class DequantLinear(nn.Linear):
    """``nn.Linear`` with a decoded low-bit weight and the run's input quantizer (``aq``, or None)."""

    def __init__(self, lin: nn.Linear, aq: Optional[nn.Module]):
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        self.weight = lin.weight
        self.bias = lin.bias
        self.aq = aq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.aq is not None:
            x = self.aq(x)
        return F.linear(x, self.weight, self.bias)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the export folder ``path``, checked for format and version."""
    folder = Path(path)
    if not folder.is_dir():
        raise RunError(f"no export folder at {folder}")
    return read_manifest_file(folder, FORMAT, FORMAT_VERSION, "not a squat export")


ACT_KINDS = {"lsq": ("step",), "max": ("max",), "range": ("min", "max")}


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_desc(desc: Any) -> None:
    """A manifest layer entry's types and ranges, before anything is decoded (ExportError naming the key)."""
    if not isinstance(desc, dict):
        raise ExportError("its manifest entry is not a mapping")
    shape = desc.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(_whole(d, 1, 1 << 24) for d in shape):
        raise ExportError(f"shape {shape!r} is not two positive whole numbers")
    if not _whole(desc.get("bits"), 1, 8):
        raise ExportError(f"bits {desc.get('bits')!r} is not a whole number in 1..8")
    act = desc.get("input")
    if act is not None:
        if not isinstance(act, dict):
            raise ExportError(f"input {act!r} is not a mapping (or null)")
        if act.get("kind") not in ACT_KINDS:
            raise ExportError(f"input kind {act.get('kind')!r} is not one of {', '.join(ACT_KINDS)}")
        if not _whole(act.get("bits"), 2, 32):
            raise ExportError(f"input bits {act.get('bits')!r} is not a whole number in 2..32")


def _expected_suffixes(desc: dict[str, Any]) -> dict[str, tuple[str, Optional[tuple[int, ...]]]]:
    """suffix -> (dtype name, shape or None when only the dtype is fixed) of one layer's stored tensors."""
    shape = tuple(desc["shape"])
    n = 1
    for d in shape:
        n *= d
    bits = int(desc["bits"])
    out: dict[str, tuple[str, Optional[tuple[int, ...]]]] = {"weight.codes": ("uint8", (packed_bytes(n, bits),))}
    kind = desc["kind"]
    if kind == "uniform":
        out["weight.scale"] = ("float32", (shape[0], 1) if desc.get("granularity") == "channel" else (1,))
    elif kind == "group":
        out["weight.scale"] = ("float32", (int(desc["groups"]), 1))
        out["weight.min"] = ("float32", (int(desc["groups"]), 1))
    elif kind == "codebook":
        out["weight.codebook"] = ("float32", (2**bits,))
        out["weight.outlier_index"] = ("int32", (int(desc["outliers"]),))
        out["weight.outlier_value"] = ("float32", (int(desc["outliers"]),))
    else:
        raise ExportError(f"unknown weight kind {kind!r}")
    act = desc.get("input")
    if act is not None:
        names = ACT_KINDS.get(act.get("kind"))
        if names is None:
            raise ExportError(f"unknown activation kind {act.get('kind')!r}")
        out.update({f"input.{k}": ("float32", (1,)) for k in names})
    return out


def _read_tensors(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = folder / plain_name(manifest, "weights_file", folder / MANIFEST_FILE)  # its SHA-256 was checked
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise RunError(f"{weights}: not a readable safetensors file ({type(exc).__name__})") from None


def _decode_layers(tensors: dict[str, torch.Tensor], layers: dict[str, Any]):
    """{name: (weight, act description, act tensors)}; removes the layers' tensors from ``tensors``."""
    decoded = {}
    for name, desc in layers.items():
        try:
            _check_desc(desc)
            expected = _expected_suffixes(desc)
            own = {}
            for suffix, (dtype, shape) in expected.items():
                t = tensors.pop(f"{name}.{suffix}", None)
                if t is None:
                    raise ExportError(f"tensor {name}.{suffix} is missing")
                if str(t.dtype).removeprefix("torch.") != dtype or (shape is not None and tuple(t.shape) != shape):
                    raise ExportError(f"tensor {name}.{suffix} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
                own[suffix] = t
            weight = decode_weight({k.removeprefix("weight."): v for k, v in own.items() if k.startswith("weight.")}, desc)
            act = {k.removeprefix("input."): v for k, v in own.items() if k.startswith("input.")}
        except (ExportError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise RunError(f"layer {name}: {exc}") from None
        decoded[name] = (weight, desc.get("input"), act)
    return decoded


def load_packed(path: Path | str, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, manifest) of a packed export folder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from squat_cli.models import load_tokenizer, quiet_transformers

    folder = Path(path)
    manifest = read_manifest(folder)
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise RunError(f"{folder / MANIFEST_FILE}: lists no quantized layers")
    tensors = _read_tensors(folder, manifest)
    decoded = _decode_layers(tensors, layers)
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForSequenceClassification.from_config(config)
    except Exception as exc:
        raise RunError(f"{folder}: could not build the model from its config.json ({type(exc).__name__})") from None
    state = dict(tensors)
    for name, (weight, _, _) in decoded.items():
        state[f"{name}.weight"] = weight
    own = model.state_dict()
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise RunError(f"{folder}: {key} has shape {tuple(value.shape)}, the model of config.json takes "
                           f"{tuple(own[key].shape)}")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        which = "missing" if result.missing_keys else "unexpected"
        what = (result.missing_keys or result.unexpected_keys)[:3]
        raise RunError(f"{folder}: the weights do not match the model of config.json ({which}: {what})")
    for name, (weight, adesc, act) in decoded.items():
        mod = model.get_submodule(name)
        if tuple(mod.weight.shape) != tuple(weight.shape):
            raise RunError(f"layer {name}: shape {tuple(weight.shape)} does not fit the model's {tuple(mod.weight.shape)}")
        if isinstance(mod, nn.Linear):
            try:
                aq = build_act_quantizer(act, adesc) if adesc is not None else None
            except (ExportError, KeyError, TypeError, ValueError) as exc:
                raise RunError(f"layer {name}: {exc}") from None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, DequantLinear(mod, aq))
    tokenizer = load_tokenizer(str(folder))
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise RunError(f"{folder}: the tokenizer has {len(tokenizer)} ids, the model's embeddings {rows} rows")
    model.to(device)
    model.eval()
    return model, tokenizer, manifest
