"""GPU check, ready to run on any single-GPU CUDA machine; on a machine without CUDA it says so and exits 0.

    python bench/gpu_check.py [--out bench/gpu] [--skip-tests] [--rounds 5]

1. The test suite's device-independent tests (``-m "not slow"``, multi-process
   tests left out) with CUDA visible, so every training test goes through
   accelerate on the GPU. Needs GLUE's files (``$SQUAT_DATA_DIR``); without them
   this step is reported as skipped.
2. One short training run of every method in fp32 and in bf16 on a tiny random
   BERT (the packaged MiniLM's tokenizer), through the CLI, on the STS-B data
   packaged with squat: 20 steps, dev Pearson, wall time, device as recorded in
   ``environment.json``.
3. The step benchmark on CUDA (``bench/step_times.py --device cuda --bf16``).
4. A Ray sweep of a tiny grid with one job per GPU (``bench/launchers.py --gpus``).

Everything goes to ``--out``: ``RESULTS-gpu.md`` (the summary to commit),
``RESULTS-steps-gpu.md``, ``steps-gpu.json`` and ``tests.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = [("fp", []), ("lsq", ["--wbits", "2"]), ("joint", ["--wbits", "2", "--rho", "0.05"]),
        ("squat", ["--wbits", "2", "--rho", "0.05"]),
        ("squat", ["--wbits", "3", "--rho", "0.05", "--set", "quant.step_size_grad=reuse"]),
        ("fp-sam", ["--rho", "0.05"]), ("q8bert", ["--wbits", "8"]), ("ptq", ["--wbits", "4"]),
        ("gobo", ["--wbits", "3"]), ("qbert", ["--wbits", "4", "--set", "quant.qbert_groups=16"])]
SMALL = ["--set", "data.train_subset=256", "--set", "data.eval_subset=256", "--set", "train.max_steps=20",
         "--set", "train.batch_size=16", "--set", "data.fallback=embedded", "--set", "quant.calib_batches=2"]


def squat(*args: str, env: dict) -> tuple[int, str, float]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "squat_cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    return res.returncode, (res.stdout + res.stderr).strip(), time.perf_counter() - t


def tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from squat_cli.models import resolve_model_path

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=128, num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model_path("packaged-minilm")).save_pretrained(folder)
    return folder


def training_runs(env: dict) -> list[str]:
    rows = ["| method | args | precision | exit | dev Pearson | steps | device | wall s |", "|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "tiny")
        env = {k: v for k, v in env.items() if k != "SQUAT_DATA_DIR"}  # the packaged STS-B
        for precision in ("fp32", "bf16"):
            root = Path(tmp) / precision
            base = ["--task", "stsb", "--out", str(root), "--set", f"train.precision={precision}", *SMALL]
            for method, extra in RUNS:
                if method == "fp":
                    args = ["finetune", "--model", str(model), *base]
                else:
                    args = ["quantize", "--method", method, *extra, *base]
                code, out, wall = squat(*args, env=env)
                metrics, device = {}, "-"
                if code == 0:
                    found = sorted(root.glob(f"stsb/{'fp' if method == 'fp' else method + '-*'}/seed42/metrics.json"),
                                   key=lambda p: p.stat().st_mtime)
                    metrics = json.loads(found[-1].read_text())
                    device = json.loads((found[-1].parent / "environment.json").read_text()).get("device", "-")
                else:
                    print(out[-2000:], file=sys.stderr)
                pearson = f"{100 * metrics['pearson']:.2f}" if "pearson" in metrics else "-"
                rows.append(f"| {method} | {' '.join(extra) or '-'} | {precision} | {code} | {pearson} | "
                            f"{metrics.get('steps', '-')} | {device} | {wall:.1f} |")
                print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "bench" / "gpu"))
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; nothing to check")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    lines = ["# GPU check", "", f"- device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
             f"torch {torch.__version__}", "- command: `python bench/gpu_check.py`", ""]
    glue = os.environ.get("SQUAT_DATA_DIR")
    if args.skip_tests or not glue:
        lines += ["## Tests", "", f"skipped ({'--skip-tests' if args.skip_tests else 'no SQUAT_DATA_DIR'})", ""]
    else:
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "--ignore",
                              "tests/test_parallel.py", "-p", "no:cacheprovider"], cwd=REPO, env=env,
                             capture_output=True, text=True)
        (out / "tests.log").write_text(res.stdout + res.stderr)
        last = (res.stdout.strip().splitlines() or ["(no output)"])[-1]
        lines += ["## Tests (device-independent, CUDA visible)", "", f"exit {res.returncode}: {last}", ""]
    lines += ["## One short run per method (tiny BERT, packaged STS-B, 20 steps)", "", *training_runs(env), ""]
    steps_md = out / "RESULTS-steps-gpu.md"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "step_times.py"), "--device", "cuda", "--bf16",
                          "--rounds", str(args.rounds), "--methods", "fp,lsq,joint,squat,squat-reuse,fp-sam,q8bert",
                          "--out", str(steps_md), "--json", str(out / "steps-gpu.json")], cwd=REPO, env=env,
                         capture_output=True, text=True)
    lines += ["## Step benchmark on CUDA", "",
              f"exit {res.returncode}; tables in [{steps_md.name}]({steps_md.name})" if res.returncode == 0
              else f"exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1]}", ""]
    res = subprocess.run([sys.executable, str(REPO / "bench" / "launchers.py"), "--gpus", "--out", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True)
    lines += ["## Ray sweep, one job per GPU (`bench/launchers.py --gpus`)", "",
              f"exit {res.returncode}; table in [RESULTS-launchers-gpu.md](RESULTS-launchers-gpu.md)"
              if res.returncode == 0 else f"exit {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1]}", ""]
    (out / "RESULTS-gpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
