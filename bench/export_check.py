"""Export real runs and score the exports: the run's dev metric, the packed export's, the ONNX graph's.

    python bench/export_check.py RUN [RUN ...] [--data-dir DIR] [--out bench/RESULTS-export.md]

For each finished quantized run: ``squat export --format packed`` then ``squat evaluate`` (must equal the run's
metrics exactly), and for uniform-grid runs ``squat export --format onnx`` then ``squat evaluate`` (onnxruntime,
FP32) beside the run evaluated by torch in FP32 (``--precision fp32``), the reference the ONNX graph is held to.
Sizes come from the manifests. Exports go to a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def check(run: Path, tmp: Path, data_dir: str | None) -> dict:
    from squat_cli.errors import RunError
    from squat_cli.evaluation import evaluate_path
    from squat_cli.export.onnx import export_onnx
    from squat_cli.export.packed import export_packed
    from squat_cli.runs import RunDir

    m = RunDir(run).metrics()
    key = m["main_metric"]
    tag = f"{m['task']}/{m['method']}-w{m['wbits']}a{m['abits']}/seed{m['seed']}"
    man = export_packed(run, tmp / "packed")
    packed = evaluate_path(tmp / "packed", data_dir, tmp / "p.json").metrics
    row = {"run": tag, "metric": key, "run_value": m[key], "run_loss": m["eval_loss"], "packed_value": packed[key],
           "packed_loss": packed["eval_loss"], "exact": packed[key] == m[key] and packed["eval_loss"] == m["eval_loss"],
           "layers_ratio": man["size"]["quantized_layers_ratio"], "file_ratio": man["size"]["file_ratio"],
           "file_mib": man["size"]["file_bytes"] / 2**20}
    try:
        om = export_onnx(run, tmp / "onnx")
    except RunError as exc:
        row["onnx"] = str(exc).split(": ", 1)[-1]
        return row
    onnx = evaluate_path(tmp / "onnx", data_dir, tmp / "o.json").metrics
    fp32 = evaluate_path(run, data_dir, tmp / "f.json", precision="fp32").metrics
    row.update({"onnx_value": onnx[key], "fp32_value": fp32[key], "onnx_weights": om["weight_type"],
                "onnx_mib": om["size"]["file_bytes"] / 2**20})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS-export.md")
    args = ap.parse_args()
    from common import machine_lines

    rows = []
    for run in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(check(run, Path(tmp), args.data_dir))
            print(rows[-1], flush=True)
    lines = ["# Exported runs scored again", "", *machine_lines(), "",
             "Dev metric x 100. `packed` is evaluated as the run was (its precision); `exact` = equal main metric and "
             "eval loss to the last bit. `torch FP32` is the run evaluated in FP32, the reference for the ONNX graph "
             "(onnxruntime, FP32). Ratios: quantized layers (codes + steps + FP32 bias) and the whole file, "
             "against FP32.", "",
             "| run | run | packed | exact | layers ratio | file MiB (ratio) | torch FP32 | ONNX | ONNX - FP32 | "
             "ONNX weights, MiB |", "|---|---:|---:|:-:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        onnx = (f"{100 * r['fp32_value']:.2f} | {100 * r['onnx_value']:.2f} | "
                f"{100 * (r['onnx_value'] - r['fp32_value']):+.2f} | {r['onnx_weights']}, {r['onnx_mib']:.1f}"
                if "onnx_value" in r else f"- | - | - | not exported: {r['onnx']}")
        lines.append(f"| {r['run']} | {100 * r['run_value']:.2f} | {100 * r['packed_value']:.2f} | "
                     f"{'yes' if r['exact'] else 'NO'} | 1/{1 / r['layers_ratio']:.1f} | {r['file_mib']:.1f} "
                     f"(1/{1 / r['file_ratio']:.2f}) | {onnx} |")
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
