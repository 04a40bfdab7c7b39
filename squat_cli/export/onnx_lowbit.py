"""Low-bit ONNX kernels for squat's uniform grids: ``MatMulNBits`` for linear layers, ``GatherBlockQuantized``
for the word embeddings (onnxruntime's ``com.microsoft`` operators). Checked on onnxruntime 1.27, 1.29 and 1.32:
1.24 has no 2-bit ``GatherBlockQuantized`` and 1.22 no 2-bit ``MatMulNBits``; before 1.29 a 2-bit
``MatMulNBits`` computes in FP32 whatever its accuracy level.

Both take block-wise quantized weights: unsigned ``b``-bit codes ``u`` packed along the reduction axis (low bits
first, the layout of ``export/packing.py``), one FP32 scale per block of ``block_size`` consecutive elements of a
row, and the weight ``(u - zero_point) * scale`` with the default zero point ``2^(b-1)``. An LSQ grid (one step
per tensor or per row, signed codes ``q`` in ``-2^(b-1) .. 2^(b-1) - 1``) is such a grid with the step repeated
in every block and ``u = q + 2^(b-1)``: the weights decode to the run's ``q * s`` bit for bit. The kernels take
2, 4 and 8 bits (onnxruntime 1.32 refuses 3), so 3-bit codes are stored in 4-bit fields (the values stay the
3-bit grid's).

``MatMulNBits``'s ``accuracy_level``:

* 4 (default): the kernel quantizes its input itself, to int8, symmetric, one scale per block of
  ``block_size`` elements of each row (absmax / 127, recomputed on every call), and uses the CPU's integer dot
  products. The run's own 8-bit activation step (one learned static scale per layer, clipping what lies
  beyond 127 steps) is not applied: the activation QDQ pair in front of each layer is removed. Finer scales,
  no clipping, so a tolerance rather than equality against the run.
* 0: FP32 compute; the run's activation QDQ stays in front of each layer, so the graph computes what the run
  computed (up to FP32 summation order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from squat_cli.export.codes import ExportError, encode_weight
from squat_cli.export.packing import pack_codes, unpack_codes

DOMAIN = "com.microsoft"
KERNEL_BITS = (2, 4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK = 128
ACCURACY_LEVELS = (0, 4)
MIN_ORT = "1.27"


def kernel_bits(bits: int) -> int:
    """The field width the kernels store ``bits``-bit codes in (2, 4 or 8)."""
    return next(b for b in KERNEL_BITS if b >= bits)


def block_for(width: int, largest: int) -> int:
    """The largest allowed block size up to ``largest`` that divides ``width`` (the packed axis)."""
    for size in reversed(BLOCK_SIZES):
        if size <= largest and width % size == 0:
            return size
    raise ExportError(f"a width of {width} is not a multiple of {BLOCK_SIZES[0]}: no block-wise kernel takes it")


def signed_codes(name: str, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(signed integer codes ``(rows, cols)``, step per row ``(rows,)``, bits) of a uniform-grid layer."""
    tensors, desc = encode_weight(name, layer)
    if desc["kind"] != "uniform":
        raise ExportError(f"{name}: a {desc['kind']} weight (GOBO or Q-BERT) has no exact block-quantized form; "
                          "use --format packed")
    rows, cols = desc["shape"]
    codes = unpack_codes(tensors["codes"], desc["bits"], rows * cols).view(rows, cols) + int(desc["offset"])
    scale = tensors["scale"].reshape(-1).float()
    return codes, (scale.expand(rows) if scale.numel() == 1 else scale), int(desc["bits"])


def block_quantized(codes: torch.Tensor, scale: torch.Tensor, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 ``(rows, blocks, block * kb / 8)``, scales ``(rows, blocks)``) of signed codes and row steps."""
    rows, cols = codes.shape
    kb = kernel_bits(bits)
    unsigned = codes + 2 ** (kb - 1)
    blocks = cols // block
    packed = pack_codes(unsigned, kb).numpy().reshape(rows, blocks, block * kb // 8)
    scales = scale.reshape(rows, 1).expand(rows, blocks).contiguous().numpy().astype(np.float32)
    return packed, scales


def decode_block_quantized(packed: np.ndarray, scales: np.ndarray, bits: int, cols: int) -> torch.Tensor:
    """The FP32 weight ``(rows, cols)`` a kernel computes with: ``(u - 2^(b-1)) * scale`` per block (for tests)."""
    rows, blocks = scales.shape
    u = unpack_codes(torch.from_numpy(packed.reshape(-1).copy()), bits, rows * cols).view(rows, blocks, -1)
    return ((u - 2 ** (bits - 1)).float() * torch.from_numpy(scales.copy()).unsqueeze(-1)).reshape(rows, cols)


# ---------------------------------------------------------------- graph rewrites


def _consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def _producer(graph, name: str):
    return next((n for n in graph.node if name in n.output), None)


def prune(graph) -> None:
    """Drop nodes whose outputs nothing reads, and initializers no node reads (repeatedly): once, after the
    rewrites below, which leave the nodes and the FP32 weights they replaced unread."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def gather_block_quantized(graph, table: str, codes: torch.Tensor, scale: torch.Tensor, bits: int,
                           largest_block: int) -> int:
    """Replace the ``Gather`` that reads the FP32 initializer ``table`` by ``GatherBlockQuantized``; bytes stored."""
    from onnx import helper, numpy_helper

    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] == table]
    if len(gathers) != 1 or len(_consumers(graph, table)) != 1:
        raise ExportError(f"{table}: expected one Gather reading the word embeddings, found {len(gathers)}")
    gather = gathers[0]
    block = block_for(codes.shape[1], largest_block)
    packed, scales = block_quantized(codes, scale, bits, block)
    data, sname = f"{table}.codes", f"{table}.scales"
    graph.initializer.append(numpy_helper.from_array(packed.reshape(packed.shape[0], -1), data))
    graph.initializer.append(numpy_helper.from_array(scales, sname))
    node = helper.make_node("GatherBlockQuantized", [data, gather.input[1], sname], list(gather.output),
                            name=f"{gather.name or table}.lowbit", domain=DOMAIN, gather_axis=0, quantize_axis=1,
                            block_size=block, bits=kernel_bits(bits))
    graph.node.insert(list(graph.node).index(gather), node)
    graph.node.remove(gather)
    return packed.nbytes + scales.nbytes


def matmul_nbits(graph, weight: str, codes: torch.Tensor, scale: torch.Tensor, bits: int, largest_block: int,
                 accuracy_level: int) -> dict[str, Any]:
    """Replace ``MatMul(x, DequantizeLinear(QuantizeLinear(weight)))`` by ``MatMulNBits``; at accuracy level 4 the
    activation's QDQ pair in front goes too. ``codes``: ``(out, in)``, the layer's weight orientation."""
    from onnx import helper, numpy_helper

    quant = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == weight]
    if len(quant) != 1:
        raise ExportError(f"{weight}: expected one QuantizeLinear reading the weight, found {len(quant)}")
    dq = _consumers(graph, quant[0].output[0])
    matmuls = [m for d in dq for m in _consumers(graph, d.output[0]) if m.op_type == "MatMul"]
    if len(dq) != 1 or dq[0].op_type != "DequantizeLinear" or len(matmuls) != 1:
        raise ExportError(f"{weight}: its weight does not feed one MatMul through Q -> DQ")
    mm = matmuls[0]
    x = mm.input[0]
    if accuracy_level == 4:  # the kernel quantizes its input itself: drop the run's static activation QDQ
        act_dq = _producer(graph, x)
        if act_dq is not None and act_dq.op_type == "DequantizeLinear":
            act_q = _producer(graph, act_dq.input[0])
            readers = _consumers(graph, x)  # layers reading one input with equal steps share one QDQ pair
            if act_q is not None and act_q.op_type == "QuantizeLinear" \
                    and all(r.op_type in ("MatMul", "MatMulNBits") for r in readers):
                x = act_q.input[0]
    n, k = codes.shape
    block = block_for(k, largest_block)
    packed, scales = block_quantized(codes, scale, bits, block)
    bname, sname = f"{weight}.nbits", f"{weight}.scales"
    graph.initializer.append(numpy_helper.from_array(packed, bname))
    graph.initializer.append(numpy_helper.from_array(scales.reshape(-1), sname))
    node = helper.make_node("MatMulNBits", [x, bname, sname], list(mm.output), name=f"{mm.name or weight}.nbits",
                            domain=DOMAIN, K=k, N=n, bits=kernel_bits(bits), block_size=block,
                            accuracy_level=accuracy_level)
    graph.node.insert(list(graph.node).index(mm), node)
    graph.node.remove(mm)
    return {"bytes": packed.nbytes + scales.nbytes, "block_size": block}
