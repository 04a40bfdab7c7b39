"""What the benchmark scripts share: the machine header, the GLUE folder, a `squat finetune` run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from squat_cli.allocator import tune_allocator  # noqa: E402
from squat_cli.data import resolve_data_dir  # noqa: E402

ALLOCATOR = tune_allocator()  # as `squat` training does (SQUAT_CPU_ALLOCATOR=system: glibc's defaults)


def machine_lines() -> list[str]:
    """The report header: machine, versions and the command that produced it."""
    import transformers

    return [f"- machine: {platform.machine()}, {torch.get_num_threads()} threads ({os.cpu_count()} CPUs), "
            f"{platform.platform()}",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
            f"- command: `python {' '.join(sys.argv)}`", f"- CPU allocator: {ALLOCATOR}"]


def glue_dir(option: str | None) -> Path:
    """``--data-dir`` or ``$SQUAT_DATA_DIR``; the benchmarks never fall back to the hub."""
    path = resolve_data_dir(option)
    if path is None:
        raise SystemExit("pass --data-dir or set SQUAT_DATA_DIR to the GLUE folder")
    return path


def squat_finetune(task: str, data_dir: Path, out: Path, *sets: str, **options: str) -> dict:
    """Run ``squat finetune`` (the CLI, packaged MiniLM, no evaluation until the end, nothing saved); its metrics."""
    cmd = [sys.executable, "-m", "squat_cli", "finetune", "--task", task, "--model", "packaged-minilm",
           "--data-dir", str(data_dir), "--out", str(out), "--force",
           "--set", "train.eval_strategy=end", "--set", "train.save_model=false", "--set", "train.save_every=null"]
    for key, value in options.items():
        cmd += [f"--{key}", value]
    for kv in sets:
        cmd += ["--set", kv]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(next(out.rglob("metrics.json")).read_text())
