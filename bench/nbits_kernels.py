"""One linear layer under onnxruntime, each way squat's ONNX exports compute it: what bounds the low-bit graphs.

    python bench/nbits_kernels.py [--threads 2] [--rounds 50] [--out bench/RESULTS-nbits-kernels.md]

A MiniLM feed-forward layer (K = 384 inputs, N = 1536 outputs) at M = 21 rows (batch 1 of the inference bench)
and M = 768 rows (batch 32 x 24 tokens), random weights and inputs:

* ``fp32 MatMul``: the FP32 graph's kernel (MLAS SGEMM);
* ``int8 QDQ``: ``QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear(int8 weights)``, which
  onnxruntime fuses into its integer kernel (``MatMulIntegerToFloat``) — the ``--weight-type int8`` export;
* ``int4 QDQ``: the same with int4 weight codes (onnxruntime dequantizes them to FP32 on every call);
* ``MatMulNBits`` at 2, 4 and 8 bits, accuracy level 0 and 4, blocks of 32 and 128 (``--weight-type nbits``).

Each graph gets its own session; median of ``--rounds`` calls after 5 warm-up calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

K, N = 384, 1536


def _model(nodes, inits, ms: bool):
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", N])], initializer=inits)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def fp32(rng):
    from onnx import helper, numpy_helper

    w = rng.standard_normal((K, N)).astype(np.float32)
    return _model([helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(w, "W")], False)


def qdq(rng, int4: bool):
    from onnx import TensorProto, helper, numpy_helper

    dtype = TensorProto.INT4 if int4 else TensorProto.INT8
    codes = rng.integers(-8 if int4 else -128, 8 if int4 else 128, size=(K, N)).astype(np.int8)
    if int4:
        nib = codes.reshape(-1).astype(np.uint8) & 0x0F
        raw = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
    else:
        raw = codes.tobytes()
    inits = [helper.make_tensor("Wq", dtype, [K, N], raw, raw=True), numpy_helper.from_array(np.float32(0.01), "ws"),
             helper.make_tensor("wz", dtype, [], b"\x00", raw=True), numpy_helper.from_array(np.float32(0.05), "as"),
             numpy_helper.from_array(np.int8(0), "az")]
    nodes = [helper.make_node("QuantizeLinear", ["A", "as", "az"], ["Aq"]),
             helper.make_node("DequantizeLinear", ["Aq", "as", "az"], ["Ad"]),
             helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"]),
             helper.make_node("MatMul", ["Ad", "Wd"], ["Y"])]
    return _model(nodes, inits, False)


def nbits(rng, bits: int, level: int, block: int):
    from onnx import helper, numpy_helper

    packed = rng.integers(0, 256, size=(N, K // block, block * bits // 8), dtype=np.uint8)
    scales = np.full((N * (K // block),), 0.01, np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=level)
    return _model([node], [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")], True)


def time_ms(model: bytes, rows: int, threads: int, rounds: int, rng) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    a = rng.standard_normal((rows, K)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"A": a})
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        session.run(None, {"A": a})
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS-nbits-kernels.md")
    args = ap.parse_args()
    import onnxruntime as ort
    from common import machine_lines

    rng = np.random.default_rng(0)
    graphs = [("fp32 MatMul", fp32(rng)), ("int8 QDQ (fused integer kernel)", qdq(rng, False)),
              ("int4 QDQ", qdq(rng, True))]
    graphs += [(f"MatMulNBits {b}-bit, level {lv}, block {bs}", nbits(rng, b, lv, bs))
               for b in (2, 4, 8) for lv in (0, 4) for bs in (32, 128)]
    rows = []
    for name, model in graphs:
        row = [name] + [f"{time_ms(model, m, args.threads, args.rounds, rng):.3f}" for m in (21, 768)]
        rows.append(row)
        print(" | ".join(row), flush=True)
    lines = ["# One linear layer (384 -> 1536) under onnxruntime, each way squat's ONNX exports compute it", "",
             *machine_lines(), f"- onnxruntime {ort.__version__}; {args.threads} threads; median of {args.rounds} calls",
             "", "| kernel | 21 rows ms | 768 rows ms |", "|---|---:|---:|", *(f"| {' | '.join(r)} |" for r in rows), ""]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
