"""Inference latency, memory, size and accuracy: FP32 torch and ONNX beside each run's packed, QDQ and MatMulNBits exports.

    python bench/inference.py --run RUN [--run RUN2 ...] [--fp FP_RUN] [--threads 2] [--rounds 20]
                              [--data-dir DIR] [--no-metric] [--out bench/RESULTS-inference.md]

Models (exported into a temporary folder first):

* ``fp32-torch``: the FP run the (first) quantized run started from (eager PyTorch, FP32);
* ``fp32-onnx``: that FP model exported to ONNX, under onnxruntime (what onnxruntime alone gives);

and for every ``--run``:

* ``packed-torch``: ``squat export --format packed`` loaded with ``load_packed`` (decoded FP32 weights, activations
  fake-quantized as in training, FP32);
* ``qdq-int8-onnx``: ``squat export --format onnx --weight-type int8``: int8 activations and int8 weight codes,
  the pattern onnxruntime fuses into its integer kernels;
* ``qdq-int4-onnx``: the same graph with the codes stored as int4 (the default for <= 4-bit runs);
* ``nbits-onnx``: ``--weight-type nbits``: ``MatMulNBits`` at accuracy level 4 (int8 activations per block);
* ``nbits-exact-onnx``: the same at accuracy level 0 (FP32 compute behind the run's activation QDQ).

A run with quantized word embeddings has them as ``GatherBlockQuantized`` in every ONNX graph.

Batches are real dev examples of the run's task: batch 1 (the first example) and batch 32 (the first 32, padded to
the longest). Each model runs in its own process (so peak memory is its own): load, warm up, then ``--rounds``
timed calls per batch size; the median is reported. Peak memory is the process's maximum resident set size (VmHWM), and
beside it the same process's peak right after imports (the model's share is the difference). With ``--metric``
(default) each model is also scored on the full dev set with ``squat evaluate``'s code (ONNX in FP32; torch models
in the run's precision for the packed export). For ONNX models the report lists the graph's node types after
onnxruntime's own optimisations (the optimised graph onnxruntime writes out), i.e. which kernels ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FP_KINDS = ("fp32-torch", "fp32-onnx")
RUN_KINDS = ("packed-torch", "qdq-int8-onnx", "qdq-int4-onnx", "nbits-onnx", "nbits-exact-onnx")
KINDS = FP_KINDS + RUN_KINDS


def _rss_mib() -> float:
    """Peak resident set size of this process (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batches(tokenizer, task_name: str, data_dir: str | None):
    from squat_cli.data import load_split, resolve_data_dir
    from squat_cli.tasks import get_task

    task = get_task(task_name)
    ex = load_split(task, task.dev_splits[0], resolve_data_dir(data_dir, "embedded", task))
    pairs = ex.text_b is not None

    def enc(n):
        a = ex.text_a[:n]
        return dict(tokenizer(a, ex.text_b[:n] if pairs else None, padding=True, truncation=True, max_length=128,
                              return_tensors="np"))
    return {1: enc(1), 32: enc(32)}


def measure_one(kind: str, path: str, task: str, threads: int, rounds: int, data_dir: str | None, metric: bool) -> dict:
    """Runs inside the child process: load one model, time it, optionally score it."""
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from squat_cli.models import load_tokenizer

    base = _rss_mib()
    t0 = time.perf_counter()
    if kind.endswith("onnx"):
        import collections

        import onnx
        import onnxruntime as ort

        from squat_cli.export.onnx_runtime import OrtModel, session_options
        from squat_cli.tasks import get_task

        opts = session_options(ort)
        opts.intra_op_num_threads = threads
        optimized = Path(tempfile.mkdtemp()) / "optimized.onnx"
        opts.optimized_model_filepath = str(optimized)
        session = ort.InferenceSession(str(Path(path) / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        model, tok = OrtModel(session, inputs, get_task(task).is_regression), load_tokenizer(path)
        ops = collections.Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
        kernels = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
        call = lambda b: model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits  # noqa: E731
    else:
        if kind == "packed-torch":
            from squat_cli.export import load_packed

            model, tok, _ = load_packed(path)
        else:
            from squat_cli.models import load_model
            from squat_cli.tasks import get_task

            model, tok = load_model(path, get_task(task)).eval(), load_tokenizer(path)

        def call(b):
            with torch.inference_mode():
                return model(**{k: torch.from_numpy(v) for k, v in b.items()}).logits
    load_s = time.perf_counter() - t0
    out = {"kind": kind, "load_s": round(load_s, 2), "rss_after_imports_mib": round(base, 1)}
    if kind.endswith("onnx"):
        out["ort_version"] = ort.__version__
        out["optimized_ops"] = kernels
    for bs, batch in _batches(tok, task, data_dir).items():
        for _ in range(3):
            call(batch)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            call(batch)
            times.append(time.perf_counter() - t)
        out[f"ms_b{bs}"] = round(1000 * statistics.median(times), 2)
        out[f"seq_b{bs}"] = int(np.asarray(batch["input_ids"]).shape[1])
    out["peak_rss_mib"] = round(_rss_mib(), 1)
    if metric:
        from squat_cli.evaluation import evaluate_path

        if kind == "fp32-torch" or kind == "fp32-onnx":
            out["metric"] = None  # filled from the FP run by the parent
        else:
            out["metric"] = evaluate_path(Path(path), data_dir, Path(tempfile.mkdtemp()) / "m.json").metrics
    return out


def _export_run(run: Path, tmp: Path) -> dict[str, str]:
    """Every export of one quantized run: kind -> folder."""
    from squat_cli.export.onnx import export_onnx
    from squat_cli.export.packed import export_packed

    paths = {kind: str(tmp / kind) for kind in RUN_KINDS}
    export_packed(run, tmp / "packed-torch")
    export_onnx(run, tmp / "qdq-int8-onnx", weight_type="int8")
    export_onnx(run, tmp / "qdq-int4-onnx", weight_type="int4")
    export_onnx(run, tmp / "nbits-onnx", weight_type="nbits", accuracy_level=4)
    export_onnx(run, tmp / "nbits-exact-onnx", weight_type="nbits", accuracy_level=0)
    return paths


def _export_fp(fp: Path, tmp: Path) -> dict[str, str]:
    """The FP model as itself and as an FP32 ONNX graph: kind -> folder."""
    import torch

    from squat_cli.models import load_model, load_tokenizer
    from squat_cli.runs import RunDir
    from squat_cli.tasks import get_task

    paths = {"fp32-torch": str(fp / "model"), "fp32-onnx": str(tmp / "fp-onnx")}
    task = get_task(RunDir(fp).metrics()["task"])
    model = load_model(str(fp / "model"), task).eval()
    model.config._attn_implementation = "eager"
    tok = load_tokenizer(str(fp / "model"))
    sample = tok(["a sentence", "another one here"], ["its pair", "b"], return_tensors="pt", padding=True)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, *args):
            return self.m(**dict(zip(names, args))).logits

    (tmp / "fp-onnx").mkdir(parents=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(), tuple(sample[n] for n in names), str(tmp / "fp-onnx" / "model.onnx"), dynamo=False,
                          opset_version=21, input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}})
    tok.save_pretrained(tmp / "fp-onnx")
    model.config.save_pretrained(tmp / "fp-onnx")
    return paths


def _size_mib(path: str) -> float:
    p = Path(path)
    files = [p / "model.safetensors", p / "model.onnx"]
    return round(sum(f.stat().st_size for f in files if f.is_file()) / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, action="append", help="A finished quantized run (uniform grid, 8-bit "
                    "activations); give it several times to compare runs of one task.")
    ap.add_argument("--fp", type=Path, help="The FP run (default: the first run's 'from').")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-metric", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS-inference.md")
    ap.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.path, args.task, args.threads, args.rounds, args.data_dir,
                                     not args.no_metric)))
        return
    from common import machine_lines

    from squat_cli.runs import RunDir

    if not args.run:
        ap.error("--run is required")
    m = RunDir(args.run[0]).metrics()
    fp = args.fp or Path(m["from"])
    fp_metrics = RunDir(fp).metrics()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(kind, path, "FP") for kind, path in _export_fp(fp, Path(tmp) / "fp").items()]
        labels = {}
        for i, run_path in enumerate(args.run):
            label = run_label(RunDir(run_path))
            labels[label] = str(run_path)
            jobs += [(kind, path, label) for kind, path in _export_run(run_path, Path(tmp) / f"run{i}").items()]
        for kind, path, label in jobs:
            cmd = [sys.executable, __file__, "--one", kind, "--path", path, "--task", m["task"],
                   "--threads", str(args.threads), "--rounds", str(args.rounds)]
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            cmd += ["--no-metric"] if args.no_metric or kind.startswith("fp32") else []
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"{label} {kind} failed:\n{res.stderr[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["run"] = label
            row["size_mib"] = _size_mib(path)
            if kind.startswith("fp32"):
                row["metric"] = fp_metrics
            rows.append(row)
            print(label, kind, {k: row[k] for k in ("ms_b1", "ms_b32", "peak_rss_mib", "size_mib")}, flush=True)
    write_report(args.out, rows, m, labels, machine_lines())


def run_label(run) -> str:
    """``W2`` / ``W4``, ``+emb2`` when the run quantized its word embeddings, and the seed."""
    from squat_cli.recipe import load_recipe

    m = run.metrics()
    quant = load_recipe(run.recipe_file).quant
    emb = quant.word_embedding_bits() if quant is not None else None
    return f"{m['method']} W{m['wbits']}A{m['abits']}{f' emb{emb}' if emb else ''} seed {m['seed']}"


def _ratio(a: float, b: float) -> str:
    return f"1/{b / a:.1f}" if a else "-"


def goal_verdicts(rows: list[dict]) -> list[str]:
    """The goals of the low-bit work (issue: quantized embeddings and MatMulNBits), judged on these rows."""
    fp_onnx = next(r for r in rows if r["kind"] == "fp32-onnx")
    fp_mib = next(r for r in rows if r["kind"] == "fp32-torch")["size_mib"]
    out = []
    for label in dict.fromkeys(r["run"] for r in rows if r["run"] != "FP"):
        mine = {r["kind"]: r for r in rows if r["run"] == label}
        nb, int8 = mine["nbits-onnx"], mine["qdq-int8-onnx"]
        bits = int(label.split(" W")[1].split("A")[0])
        if bits <= 2:
            ok = nb["ms_b1"] < fp_onnx["ms_b1"] and nb["ms_b32"] < fp_onnx["ms_b32"]
            out.append(f"- {label}: W2 nbits graph faster than FP32 onnxruntime at batch 1 and 32 "
                       f"({nb['ms_b1']} / {nb['ms_b32']} ms against {fp_onnx['ms_b1']} / {fp_onnx['ms_b32']}): "
                       f"**{'met' if ok else 'not met'}**")
            goal = 10
        else:
            ok = nb["ms_b1"] <= int8["ms_b1"] and nb["ms_b32"] <= int8["ms_b32"] and nb["size_mib"] <= 0.6 * int8["size_mib"]
            out.append(f"- {label}: W4 nbits graph at least as fast as int8 QDQ at batch 1 and 32 with at most 60% "
                       f"of its bytes ({nb['ms_b1']} / {nb['ms_b32']} ms, {nb['size_mib']} MiB against "
                       f"{int8['ms_b1']} / {int8['ms_b32']} ms, {int8['size_mib']} MiB = "
                       f"{100 * nb['size_mib'] / int8['size_mib']:.0f}%): **{'met' if ok else 'not met'}**")
            goal = 6
        for kind in ("packed-torch", "nbits-onnx"):
            size = mine[kind]["size_mib"]
            out.append(f"- {label}: whole {kind} file at most 1/{goal} of the FP32 checkpoint ({size} of {fp_mib} MiB "
                       f"= {_ratio(size, fp_mib)}): **{'met' if size * goal <= fp_mib else 'not met'}**")
    return out


def write_report(out: Path, rows: list[dict], m: dict, labels: dict[str, str], header: list[str]) -> None:
    from squat_cli.tasks import get_task

    task = get_task(m["task"])
    key = task.main_metric
    fp = next(r for r in rows if r["kind"] == "fp32-torch")
    ort_version = next((r["ort_version"] for r in rows if "ort_version" in r), "-")
    lines = ["# Inference: latency, memory, size and accuracy of the exported models", "", *header,
             f"- onnxruntime {ort_version}", *(f"- {label}: `{path}`" for label, path in labels.items()),
             f"- task {m['task']} (all-MiniLM-L6-v2); sequence length of the batches: {fp['seq_b1']} (batch 1), "
             f"{fp['seq_b32']} (batch 32)", "",
             f"| run | model | file MiB | of FP32 | batch 1 ms | batch 32 ms | speed-up b32 vs FP32 torch | peak RSS MiB "
             f"(after imports) | dev {key} |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        metric = r.get("metric") or {}
        val = f"{100 * metric[key]:.2f}" if key in metric else "-"
        if r["kind"].startswith("fp32"):
            val += " (the FP run)"
        lines.append(f"| {r['run']} | {r['kind']} | {r['size_mib']} | {_ratio(r['size_mib'], fp['size_mib'])} | "
                     f"{r['ms_b1']} | {r['ms_b32']} | {fp['ms_b32'] / r['ms_b32']:.2f}x | "
                     f"{r['peak_rss_mib']} ({r['rss_after_imports_mib']}) | {val} |")
    lines += ["", "## Goals", "", *goal_verdicts(rows), "",
              "## Kernels: node types of each ONNX graph after onnxruntime's optimisations", "",
              "| run | model | node types (count) |", "|---|---|---|"]
    for r in rows:
        if "optimized_ops" in r:
            ops = ", ".join(f"{k} {v}" for k, v in r["optimized_ops"].items())
            lines.append(f"| {r['run']} | {r['kind']} | {ops} |")
    lines += ["", "Raw rows:", "", "```json", *(json.dumps(r) for r in rows), "```", ""]
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
