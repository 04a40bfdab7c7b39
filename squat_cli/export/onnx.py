"""``squat export --format onnx``: a QDQ graph that onnxruntime runs, and its evaluation.

Each quantized linear layer becomes ``QuantizeLinear -> DequantizeLinear`` on
its 8-bit input (scale = the learned activation step, zero point 0, int8) and
``DequantizeLinear`` on its weight, whose integer codes are stored as an int8
initializer, or int4 (opset 21) when the layer has at most 4 bits: 2- and
3-bit codes take 4 bits each there (no smaller ONNX integer type), so a W2
graph's weights are twice the size of the packed export's. The weight is
stored transposed (``K x C``) so that ``DequantizeLinear`` feeds ``MatMul``
directly, the pattern onnxruntime fuses into its integer kernels.

Only uniform symmetric grids have an exact QDQ form: LSQ, SQuAT, joint, PTQ
and Q8BERT export; GOBO (a codebook) and Q-BERT (asymmetric row groups with
real-valued minima) do not, and are refused with a pointer to the packed
format. Activations must be 8-bit (or not quantized).

Numerics: the graph runs in FP32 while a bf16 run was evaluated under bf16
autocast, and onnxruntime's kernels sum in another order; Q8BERT's activations
clip at -128 in ONNX's int8 where the training grid stops at -127. The dev
metric therefore matches the run's within a tolerance (``squat evaluate``
prints both), not bit for bit.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from squat_cli.errors import RunError
from squat_cli.export.card import model_card
from squat_cli.export.codes import ExportError, encode_weight
from squat_cli.export.folder import (
    check_destination,
    check_exportable,
    run_facts,
    seal,
)
from squat_cli.export.onnx_lowbit import (
    ACCURACY_LEVELS,
    BLOCK_SIZES,
    DEFAULT_BLOCK,
    gather_block_quantized,
    kernel_bits,
    matmul_nbits,
    prune,
    signed_codes,
)
from squat_cli.export.onnx_lowbit import DOMAIN as LOWBIT_DOMAIN
from squat_cli.export.onnx_lowbit import MIN_ORT as LOWBIT_MIN_ORT
from squat_cli.export.onnx_runtime import FORMAT, FORMAT_VERSION, INPUTS, need_onnx, session_options
from squat_cli.files import atomic_dir, sha256_file, write_json, write_text
from squat_cli.quant.lsq import LsqQuantizer
from squat_cli.quant.q8bert import MaxQuantizer
from squat_cli.quant.qlinear import QuantEmbedding, QuantLinear, is_quantizer_key, quant_layers
from squat_cli.runs import RunDir

OPSET = 21
MODEL_FILE = "model.onnx"


class _QdqLinear(nn.Module):
    """What the exporter traces: fake-quant input (-> Q/DQ), fake-quant transposed weight (-> Q/DQ, folded later)."""

    def __init__(self, layer: QuantLinear, scale: torch.Tensor):
        super().__init__()
        w = layer.wq(layer.weight.detach().float()).detach()
        self.weight_t = nn.Parameter(w.t().contiguous(), requires_grad=False)  # (K, C)
        self.bias = layer.bias
        self.per_channel = scale.numel() > 1
        self.register_buffer("w_scale", scale.detach().float().reshape(-1).clone())
        self.act_scale: Optional[float] = None
        aq = layer.aq
        if isinstance(aq, LsqQuantizer):
            self.act_scale = float(aq.step.detach().float().reshape(()))
        elif isinstance(aq, MaxQuantizer):
            self.act_scale = float((aq.running_max.float() / aq.qp).clamp_min(1e-8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None:
            x = torch.fake_quantize_per_tensor_affine(x, self.act_scale, 0, -128, 127)
        if self.per_channel:
            zp = torch.zeros(self.w_scale.numel(), dtype=torch.int32)
            w = torch.fake_quantize_per_channel_affine(self.weight_t, self.w_scale, zp, 1, -128, 127)
        else:
            w = torch.fake_quantize_per_tensor_affine(self.weight_t, float(self.w_scale[0]), 0, -128, 127)
        out = x @ w
        return out + self.bias if self.bias is not None else out


class _Logits(nn.Module):
    def __init__(self, model: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        return self.model(**dict(zip(self.names, args))).logits


def _check_layer(name: str, layer: nn.Module) -> torch.Tensor:
    """The layer's weight scale; refuses what has no exact QDQ form."""
    _, desc = encode_weight(name, layer)
    if desc["kind"] != "uniform":
        raise ExportError(f"{name}: a {desc['kind']} weight (GOBO or Q-BERT) has no exact ONNX QDQ form; "
                          "use --format packed")
    if isinstance(layer, QuantEmbedding):
        return layer.wq.step.detach().float()  # a lookup: no activation to quantize
    aq = layer.aq
    if aq is not None and bool(getattr(aq, "initialized", True)):
        if not isinstance(aq, (LsqQuantizer, MaxQuantizer)) or aq.bits != 8:
            raise ExportError(f"{name}: ONNX export needs 8-bit symmetric activations (or none)")
    wq = layer.wq
    if isinstance(wq, LsqQuantizer):
        return wq.step.detach().float()
    return (layer.weight.detach().float().abs().max() / wq.qp).clamp_min(1e-8).reshape(1)


def _raw(codes: np.ndarray, dtype: int) -> bytes:
    """Raw ONNX bytes: int8 one per byte; int4 two per byte, the first element in the low nibble (ONNX's layout)."""
    import onnx

    flat = codes.reshape(-1).astype(np.int8)
    if dtype == onnx.TensorProto.INT8:
        return flat.tobytes()
    nib = (flat.astype(np.uint8) & 0x0F)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()


def _fold_weight_quantizers(graph, weight_bits: dict[str, int]) -> int:
    """Replace every ``QuantizeLinear(initializer)`` by its integer codes (int8, or int4 for <= 4 bits); bytes stored."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return numpy_helper.to_array(consts[name].attribute[0].t)

    stored = 0
    drop = []
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        wname = node.input[0]
        w, scale = value(wname).astype(np.float32), value(node.input[1]).astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        s = scale.reshape([-1 if d == axis % w.ndim else 1 for d in range(w.ndim)]) if scale.ndim else scale
        codes = np.clip(np.rint(w / s), -128, 127).astype(np.int8)
        bits = weight_bits.get(wname, 8)
        dtype = onnx.TensorProto.INT4 if bits <= 4 else onnx.TensorProto.INT8
        qname, zname = f"{wname}.codes", f"{wname}.zero_point"
        zshape = list(scale.shape)
        graph.initializer.append(helper.make_tensor(qname, dtype, codes.shape, _raw(codes, dtype), raw=True))
        graph.initializer.append(helper.make_tensor(zname, dtype, zshape, _raw(np.zeros(zshape, np.int8), dtype),
                                                    raw=True))
        stored += (codes.size + 1) // 2 if dtype == onnx.TensorProto.INT4 else codes.size
        for user in graph.node:
            if user.op_type == "DequantizeLinear" and user.input[0] == node.output[0]:
                user.input[0] = qname
                user.input[2] = zname
        drop.append(node)
        graph.initializer.remove(inits[wname])
    for node in drop:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)  # the float zero points and scales only the removed nodes read
    return stored


WEIGHT_TYPES = ("int8", "int4", "nbits")


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's FP32 checkpoint (every state-dict tensor but the quantizers' in FP32)."""
    return sum(4 * v.numel() if v.is_floating_point() else v.numel() * v.element_size()
               for k, v in model.state_dict().items() if not is_quantizer_key(k))


def _dequantized_embedding(layer: QuantEmbedding) -> nn.Embedding:
    """A plain lookup table holding the run's quantized table (the exporter's Gather, rewritten afterwards)."""
    emb = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx)
    emb.weight = nn.Parameter(layer.wq(layer.weight.detach().float()).detach(), requires_grad=False)
    return emb


def export_onnx(run_path: Path, to: Optional[Path] = None, weight_type: Optional[str] = None,
                accuracy_level: Optional[int] = None, block_size: int = DEFAULT_BLOCK) -> dict[str, Any]:
    """Write ``<to>/model.onnx`` (default ``<run>/export/onnx``) with tokenizer, config and manifest.

    ``weight_type``: ``int8`` / ``int4`` QDQ weight codes (default: int4 for <= 4-bit layers), or ``nbits``:
    ``MatMulNBits`` kernels (``accuracy_level`` 4 or 0, blocks of at most ``block_size``; see ``onnx_lowbit``).
    Quantized word embeddings are a ``GatherBlockQuantized`` lookup in every case."""
    onnx, ort = need_onnx()
    from squat_cli.run_model import load_run_model

    if weight_type not in (None, *WEIGHT_TYPES):
        raise RunError(f"--weight-type: {weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
    if accuracy_level is not None and (weight_type != "nbits" or accuracy_level not in ACCURACY_LEVELS):
        raise RunError(f"--accuracy-level: {accuracy_level} needs --weight-type nbits and one of "
                       f"{', '.join(map(str, ACCURACY_LEVELS))}")
    accuracy_level = 4 if accuracy_level is None else accuracy_level
    if block_size not in BLOCK_SIZES:
        raise RunError(f"--block-size: {block_size} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    run = RunDir(Path(run_path))
    check_exportable(run)
    out = Path(to) if to is not None else run.path / "export" / "onnx"
    check_destination(out)
    model, tokenizer, recipe, task = load_run_model(run)
    layers = quant_layers(model)
    if not layers:
        raise RunError(f"{run.path}: a full-precision run has no quantized layers to export")
    try:
        scales = {name: _check_layer(name, layer) for name, layer in layers}
    except ExportError as exc:
        raise RunError(f"{run.path}: {exc}") from None
    traced = copy.deepcopy(model).float().eval()
    if hasattr(traced.config, "_attn_implementation"):
        traced.config._attn_implementation = "eager"  # exports everywhere; same function as SDPA
    weight_bits, lowbit = {}, {}
    for name, _ in layers:
        layer = traced.get_submodule(name)
        parent, _, child = name.rpartition(".")
        embedding = isinstance(layer, QuantEmbedding)
        if embedding or weight_type == "nbits":
            try:
                lowbit[name] = signed_codes(name, layer)
            except ExportError as exc:
                raise RunError(f"{run.path}: {exc}") from None
        replacement = _dequantized_embedding(layer) if embedding else _QdqLinear(layer, scales[name])
        setattr(traced.get_submodule(parent) if parent else traced, child, replacement)
        bits = layer.wq.bits
        if not embedding:
            weight_bits[f"model.{name}.weight_t"] = 8 if weight_type == "int8" else (4 if weight_type == "int4" else bits)
    sample = tokenizer(["a first sentence", "a second one"], ["and its pair", "b"], return_tensors="pt", padding=True)
    names = tuple(n for n in INPUTS if n in sample)
    wrapper = _Logits(traced, names)
    with atomic_dir(out) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(sample[n] for n in names), str(tmp / MODEL_FILE), dynamo=False,
                              opset_version=OPSET, input_names=list(names), output_names=["logits"],
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}})
        graph_model = onnx.load(str(tmp / MODEL_FILE))
        names = tuple(i.name for i in graph_model.graph.input)  # what the model takes (DeBERTa-v2: no token types)
        graph = graph_model.graph
        kernels: dict[str, Any] = {}
        weight_bytes = 0
        try:
            for name, (codes, step, bits) in lowbit.items():
                if isinstance(model.get_submodule(name), QuantEmbedding):
                    weight_bytes += gather_block_quantized(graph, f"model.{name}.weight", codes, step, bits, block_size)
                    kernels["embeddings"] = {"op": "GatherBlockQuantized", "bits": bits,
                                             "field_bits": kernel_bits(bits)}
                else:
                    fact = matmul_nbits(graph, f"model.{name}.weight_t", codes, step, bits, block_size, accuracy_level)
                    weight_bits.pop(f"model.{name}.weight_t")
                    weight_bytes += fact["bytes"]
                    kernels["linear"] = {"op": "MatMulNBits", "accuracy_level": accuracy_level,
                                         "max_block_size": block_size}
        except ExportError as exc:
            raise RunError(f"{run.path}: {exc}") from None
        prune(graph)
        if lowbit and LOWBIT_DOMAIN not in {o.domain for o in graph_model.opset_import}:
            graph_model.opset_import.append(onnx.helper.make_opsetid(LOWBIT_DOMAIN, 1))
        weight_bytes += _fold_weight_quantizers(graph, weight_bits)
        onnx.checker.check_model(graph_model)
        onnx.save(graph_model, str(tmp / MODEL_FILE))
        try:
            session = ort.InferenceSession(str(tmp / MODEL_FILE), session_options(ort),
                                           providers=["CPUExecutionProvider"])
            session.run(None, {n: sample[n].numpy() for n in names})  # it runs
        except Exception as exc:  # onnxruntime raises its own exception types
            need = f"; the low-bit kernels need onnxruntime >= {LOWBIT_MIN_ORT}" if kernels else ""
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RunError(f"onnxruntime {ort.__version__} cannot run the exported graph ({first}){need}") from None
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        types = sorted({"int4" if b <= 4 else "int8" for b in weight_bits.values()}
                       | ({"nbits"} if "linear" in kernels else set()))
        facts = run_facts(run, recipe)
        facts["dev_metrics"] = {k: run.metrics()[k] for k in (*task.metric_names(), "eval_loss") if k in run.metrics()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_file": MODEL_FILE, "opset": OPSET,
                    "sha256": sha256_file(tmp / MODEL_FILE), "inputs": list(names), "weight_type": "+".join(types),
                    "kernels": kernels,
                    "source_run": facts,
                    "size": {"file_bytes": (tmp / MODEL_FILE).stat().st_size, "quantized_weight_bytes": weight_bytes,
                             "fp32_checkpoint_bytes": fp32_bytes(model)}}
        write_text(tmp / "README.md", model_card("onnx", facts, recipe, task, manifest["size"]))
        manifest = seal(manifest, tmp)
        write_json(tmp / "manifest.json", manifest)
    return manifest
