"""Running an ONNX export: onnxruntime sessions as squat opens them, and ``load_onnx`` (an export folder behind the
``model(**batch)`` interface that ``squat evaluate`` and ``squat predict`` use), checked against its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from squat_cli.errors import RunError
from squat_cli.export.folder import plain_name, read_manifest_file, source_settings, source_task

FORMAT = "squat-onnx"
FORMAT_VERSION = 2
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def need_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise RunError("ONNX export and evaluation need onnx and onnxruntime: pip install 'squat[onnx]'") from None
    return onnx, onnxruntime


def session_options(ort):
    """onnxruntime session options as squat uses them (errors only in the log)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    return opts



class OrtModel(nn.Module):
    """An onnxruntime session behind the ``model(**batch)`` interface (``.logits``, and ``.loss`` given labels)."""

    def __init__(self, session, inputs: list[str], regression: bool):
        super().__init__()
        self.session = session
        self.inputs = inputs
        self.regression = regression

    def forward(self, labels: Optional[torch.Tensor] = None, **batch):
        from transformers.modeling_outputs import SequenceClassifierOutput

        feed = {n: batch[n].cpu().numpy().astype(np.int64) for n in self.inputs}
        logits = torch.from_numpy(self.session.run(["logits"], feed)[0])
        loss = None
        if labels is not None:
            if self.regression:
                loss = F.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_onnx(path: Path, threads: Optional[int] = None):
    """(model-like runner, tokenizer, manifest) of an ONNX export folder or its ``model.onnx``."""
    _, ort = need_onnx()
    from squat_cli.models import load_tokenizer

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = read_manifest_file(folder, FORMAT, FORMAT_VERSION, "export with squat export --format onnx")
    file = folder / "manifest.json"
    model_file = folder / plain_name(manifest, "model_file", file)
    if path.is_file() and path.name != model_file.name:
        raise RunError(f"{path}: not the graph its folder's manifest names ({model_file.name})")
    task = source_task(source_settings(manifest, file))
    opts = session_options(ort)
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(model_file), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RunError(f"{model_file}: onnxruntime cannot load it ({type(exc).__name__})") from None
    graph_inputs = [i.name for i in session.get_inputs()]
    declared = manifest.get("inputs")
    if not isinstance(declared, list) or sorted(declared) != sorted(graph_inputs) \
            or not set(graph_inputs) <= set(INPUTS):
        raise RunError(f"{file}: inputs {declared!r} do not match the graph's {graph_inputs}")
    labels = task.num_labels
    out_shape = session.get_outputs()[0].shape
    if session.get_outputs()[0].name != "logits" or out_shape[-1] != labels:
        raise RunError(f"{model_file}: its output {session.get_outputs()[0].name} {out_shape} is not {task.name}'s "
                       f"{labels} logits per example (a graph of another task?)")
    return OrtModel(session, graph_inputs, task.is_regression), load_tokenizer(str(folder)), manifest
