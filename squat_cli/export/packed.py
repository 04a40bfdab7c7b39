"""``squat export --format packed``: a finished run as one safetensors file of packed integer codes plus a manifest.

The export folder holds ``model.safetensors`` (packed codes, step sizes and the
tensors that stay FP32), ``manifest.json`` (format version, every quantized
layer's kind, bits, shape and grid, the activation quantizers, the size report,
the source run and its dev metrics, and the SHA-256 of the weights file),
``config.json`` and the tokenizer files. Tensor names: a quantized layer ``L``
stores ``L.weight.codes`` (uint8, packed as in ``squat_cli.export.packing``)
with ``L.weight.scale`` (and ``L.weight.min`` / ``L.weight.codebook`` /
``L.weight.outlier_index`` / ``L.weight.outlier_value`` by kind), its input
quantizer as ``L.input.<step|max|min>``; every other tensor keeps its
state-dict name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from squat_cli.errors import RunError
from squat_cli.export.card import model_card
from squat_cli.export.codes import ExportError, act_state, encode_weight
from squat_cli.export.folder import MANIFEST_FILE, check_destination, check_exportable, run_facts, seal
from squat_cli.files import atomic_dir, save_tensors, sha256_file, write_json, write_text
from squat_cli.quant.qlinear import is_quantizer_key, quant_layers
from squat_cli.runs import RunDir

FORMAT = "squat-packed"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pack_model(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors, layers description, size report) of a converted model in evaluation state."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    replaced: set[str] = set()
    per_layer = {}
    q_bytes = q_fp32 = 0
    for name, layer in quant_layers(model):
        wt, desc = encode_weight(name, layer)
        at, adesc = act_state(getattr(layer, "aq", None))
        for k, v in wt.items():
            tensors[f"{name}.weight.{k}"] = v
        for k, v in at.items():
            tensors[f"{name}.input.{k}"] = v
        desc["input"] = adesc
        desc["module"] = type(layer).__name__
        layers[name] = desc
        replaced.add(f"{name}.weight")
        bias = getattr(layer, "bias", None)
        fp32 = 4 * layer.weight.numel() + (4 * bias.numel() if bias is not None else 0)
        stored = sum(_nbytes(v) for v in wt.values()) + sum(_nbytes(v) for v in at.values()) \
            + (4 * bias.numel() if bias is not None else 0)
        per_layer[name] = {"bytes": stored, "fp32_bytes": fp32, "ratio": round(stored / fp32, 5)}
        q_bytes += stored
        q_fp32 += fp32
    for key, value in model.state_dict().items():
        if key in replaced or is_quantizer_key(key):
            continue
        tensors[key] = value.detach().float().contiguous() if value.is_floating_point() else value.detach().contiguous()
    fp32_total = sum(4 * v.numel() if v.is_floating_point() else _nbytes(v)
                     for k, v in model.state_dict().items() if not is_quantizer_key(k))
    size = {"quantized_layers": per_layer, "quantized_layers_bytes": q_bytes, "quantized_layers_fp32_bytes": q_fp32,
            "quantized_layers_ratio": round(q_bytes / q_fp32, 5) if q_fp32 else None,
            "fp32_checkpoint_bytes": fp32_total}
    return tensors, layers, size


def export_packed(run_path: Path, to: Optional[Path] = None) -> dict[str, Any]:
    """Write the packed export of the run at ``run_path`` (default ``<run>/export/packed``); return the manifest."""
    from squat_cli.run_model import load_run_model  # the run folder's model, exactly as evaluated

    run = RunDir(Path(run_path))
    check_exportable(run)
    check_destination(Path(to) if to is not None else run.path / "export" / "packed")
    model, tokenizer, recipe, task = load_run_model(run)
    if not quant_layers(model):
        raise RunError(f"{run.path}: a full-precision run has no quantized layers to pack (export a quantized run)")
    try:
        tensors, layers, size = pack_model(model)
    except ExportError as exc:
        raise RunError(f"{run.path}: {exc}") from None
    facts = run_facts(run, recipe)
    facts["dev_metrics"] = {k: run.metrics()[k] for k in (*task.metric_names(), "eval_loss") if k in run.metrics()}
    out = Path(to) if to is not None else run.path / "export" / "packed"
    check_destination(out)
    with atomic_dir(out) as tmp:
        save_tensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
        size["file_bytes"] = file_bytes
        size["file_ratio"] = round(file_bytes / size["fp32_checkpoint_bytes"], 5)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE,
                    "sha256": sha256_file(tmp / WEIGHTS_FILE), "source_run": facts,
                    "model_type": model.config.model_type, "layers": layers, "size": size}
        write_text(tmp / "README.md", model_card("packed", facts, recipe, task, size))
        manifest = seal(manifest, tmp)
        write_json(tmp / MANIFEST_FILE, manifest)
    return manifest
