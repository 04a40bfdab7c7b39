"""Local against Ray: one tiny-model grid (STS-B packaged with squat, 2 seeds x FP + 5 quantized runs = 12 jobs)
run by each executor, wall time and Ray's overhead per job.

    python bench/launchers.py [--out bench] [--workers 2] [--gpus]

Ray runs on this machine as a multi-node cluster (``ray.cluster_utils.Cluster``: a head with no CPUs and
``--workers`` one-CPU workers); the local executor runs the same grid in one process with one torch thread, so a
job costs the same in both. Overhead per job = (Ray's wall time x workers - the jobs' own time) / jobs: what
scheduling, process start and imports add to each. ``--gpus``: one job per GPU on the machine's GPUs instead
(the GPU check's Ray sweep). Writes ``RESULTS-launchers.md`` and ``launchers.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gpu_check import tiny_model  # noqa: E402  (the GPU check's tiny BERT: the same model in both benches)


def grid_file(folder: Path, model: Path, resources: dict) -> Path:
    import yaml

    path = folder / "grid.yaml"
    small = {"data": {"fallback": "embedded", "train_subset": 256, "eval_subset": 128},
             "train": {"max_steps": 20, "batch_size": 16, "eval_batch_size": 64}}
    path.write_text(yaml.safe_dump({
        "sweep": {"tasks": ["stsb"], "methods": ["lsq", "squat", "ptq", "joint", "q8bert"], "wbits": [4],
                  "method_wbits": {"q8bert": [8]}, "seeds": [1, 2], "sharpness_rhos": [], "resources": resources},
        "finetune": {"model": {"name_or_path": str(model)}, **small},
        "quantize": {**small, "quant": {"calib_batches": 1}, "sam": {"rho": 0.05}},
    }))
    return path


def job_seconds(root: Path) -> float:
    """The jobs' own time: each job's start-to-end span in the job log."""
    from squat_cli.sweep import JOB_LOG

    starts, total = {}, 0.0
    for line in (root / JOB_LOG).read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "start":
            starts[e["job"]] = e["time"]
        elif e.get("outcome") == "ran":
            total += e["time"] - starts[e["job"]]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpus", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("SQUAT_DATA_DIR", None)  # the packaged STS-B
    import ray
    import torch
    from ray.cluster_utils import Cluster

    from squat_cli.executors import run_sweep
    from squat_cli.sweep import load_grid, plan

    out = Path(args.out)
    results: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "ray_version": ray.__version__,
                     "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "tiny")
        if args.gpus:
            n_gpus = torch.cuda.device_count()
            grid = load_grid(grid_file(tmp, model, {"cpus": 1, "gpus": 1}))
            ray.init(num_gpus=n_gpus, log_to_driver=False)
            t = time.perf_counter()
            res = run_sweep(grid, tmp / "gpu", plan(grid), launcher="ray", log=print)
            results["gpu"] = {"gpus": n_gpus, "jobs": len(res.ran), "failed": len(res.failed),
                              "wall_s": round(time.perf_counter() - t, 2), "job_s": round(job_seconds(tmp / "gpu"), 2)}
            ray.shutdown()
        else:
            grid = load_grid(grid_file(tmp, model, {"cpus": 1, "slot": 1}))
            torch.set_num_threads(1)
            t = time.perf_counter()
            res = run_sweep(grid, tmp / "local", plan(grid))
            local = {"jobs": len(res.ran), "wall_s": round(time.perf_counter() - t, 2),
                     "job_s": round(job_seconds(tmp / "local"), 2)}
            t0 = time.perf_counter()
            c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
            for _ in range(args.workers):
                c.add_node(num_cpus=1, resources={"slot": 1})
            ray.init(address=c.address, log_to_driver=False)
            t = time.perf_counter()
            res = run_sweep(grid, tmp / "ray", plan(grid), launcher="ray")
            wall = time.perf_counter() - t
            job_s = job_seconds(tmp / "ray")
            ray.shutdown()
            c.shutdown()
            results["local"] = local
            results["ray"] = {"workers": args.workers, "jobs": len(res.ran), "failed": len(res.failed),
                              "wall_s": round(wall, 2), "startup_s": round(t - t0, 2), "job_s": round(job_s, 2),
                              "overhead_per_job_s": round((wall * args.workers - job_s) / max(len(res.ran), 1), 2)}
    out.mkdir(parents=True, exist_ok=True)
    name = "launchers-gpu" if args.gpus else "launchers"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Sweep executors: {'Ray on GPUs' if args.gpus else 'local against Ray'}", "",
             f"- machine: {results['machine']}, {results['cpus']} CPUs; ray {results['ray_version']}, torch {results['torch']}",
             "- grid: STS-B (packaged), tiny BERT (2 layers, hidden 64), 20 steps a run, 2 seeds x (FP + LSQ, SQuAT, "
             "PTQ, joint W4, Q8BERT W8) = 12 jobs", "", "| executor | jobs | wall s | jobs' own s | overhead per job s |",
             "|---|---:|---:|---:|---:|"]
    if "local" in results:
        r = results["local"]
        lines.append(f"| local (1 thread) | {r['jobs']} | {r['wall_s']} | {r['job_s']} | - |")
        r = results["ray"]
        lines.append(f"| ray, {r['workers']} one-CPU workers | {r['jobs']} | {r['wall_s']} (+{r['startup_s']} "
                     f"start) | {r['job_s']} | {r['overhead_per_job_s']} |")
    else:
        r = results["gpu"]
        lines.append(f"| ray, one job per GPU ({r['gpus']} GPUs) | {r['jobs']} | {r['wall_s']} | {r['job_s']} | - |")
    (out / f"RESULTS-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
