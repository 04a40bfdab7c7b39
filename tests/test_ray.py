"""squat sweep --launcher ray on a real multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a
head with no CPUs and two one-CPU workers, a custom resource standing in for GPUs): every job finished exactly
once, the same tables as a local sweep, and still so when a worker node dies mid-job or the driver is killed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from squat_cli.cli import app  # noqa: E402
from squat_cli.sweep import JOB_LOG  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
TABLES = ("table1.md", "table1.csv", "table2.md", "table3.md", "table4.md")
"""The report files that hold results only (cost and compute tables measure time, which differs run to run)."""


@pytest.fixture(scope="module", autouse=True)
def unfused():
    """The fused kernels off in this module's processes, Ray's workers included (they inherit the environment):
    these tests are about scheduling, and each worker would otherwise trace its own torch.compile kernels. The
    kernels are tested against the eager code in test_compiled.py."""
    before = os.environ.get("SQUAT_FUSED")
    os.environ["SQUAT_FUSED"] = "0"
    yield
    if before is None:
        del os.environ["SQUAT_FUSED"]
    else:
        os.environ["SQUAT_FUSED"] = before


@pytest.fixture(scope="module")
def cluster(unfused):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _grid(tmp_path, glue_dir, tiny_bert, steps=2):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "sweep": {"tasks": ["rte"], "methods": ["lsq", "ptq"], "wbits": [4], "seeds": [1, 2], "sharpness_rhos": [],
                  "resources": {"cpus": 1, "slot": 1}},
        "finetune": {"model": {"name_or_path": str(tiny_bert)},
                     "data": {"data_dir": str(glue_dir), "train_subset": 32, "eval_subset": 16},
                     "train": {"max_steps": steps, "batch_size": 8, "eval_batch_size": 8, "save_every": 2}},
        "quantize": {"data": {"data_dir": str(glue_dir), "train_subset": 32, "eval_subset": 16},
                     "train": {"max_steps": 2, "batch_size": 8, "eval_batch_size": 8}, "quant": {"calib_batches": 1}},
    }))
    return path


def _log(root):
    return [json.loads(x) for x in (root / JOB_LOG).read_text().splitlines()]


def _ran_once(root, n_jobs):
    ends = [e["job"] for e in _log(root) if e["event"] == "end" and e.get("outcome") == "ran"]
    assert len(ends) == n_jobs and len(set(ends)) == n_jobs, ends
    assert len(list(root.rglob("metrics.json"))) == n_jobs


def _same_tables_as_local(grid_path, ray_root, tmp_path):
    """The report of the Ray runs against a local sweep of the same grid (one torch thread, as each Ray job)."""
    import torch

    from squat_cli.report.build import write_report

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = runner.invoke(app, ["sweep", str(grid_path), "--out", str(tmp_path / "local"), "--reports",
                                  str(tmp_path / "rep_local")])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    write_report(ray_root, tmp_path / "rep_ray")
    for name in TABLES:
        assert (tmp_path / "rep_ray" / name).read_bytes() == (tmp_path / "rep_local" / name).read_bytes(), name


def test_ray_sweep_runs_every_job_once_and_reports_as_local(cluster, tmp_path, glue_dir, tiny_bert):
    import torch

    grid = _grid(tmp_path, glue_dir, tiny_bert)
    res = runner.invoke(app, ["sweep", str(grid), "--launcher", "ray", "--out", str(tmp_path / "ray"),
                              "--reports", str(tmp_path / "rep_ray")])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "sweep: 6 ran, 0 already done or waiting, 0 failed" in said and "ray: done 6" in said
    _ran_once(tmp_path / "ray", 6)
    nodes = {e["where"] for e in _log(tmp_path / "ray") if e["event"] == "start"}
    assert len(nodes) == 2  # both workers took jobs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray job (one CPU)
    try:
        res = runner.invoke(app, ["sweep", str(grid), "--out", str(tmp_path / "local"),
                                  "--reports", str(tmp_path / "rep_local")])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    for name in TABLES:
        assert (tmp_path / "rep_ray" / name).read_bytes() == (tmp_path / "rep_local" / name).read_bytes(), name
    res = runner.invoke(app, ["sweep", str(grid), "--launcher", "ray", "--out", str(tmp_path / "ray"), "--no-report"])
    assert res.exit_code == 0 and "sweep: 0 ran, 6 already done" in " ".join(res.output.split())


def test_a_worker_node_lost_mid_job_is_retried_and_the_grid_completes(tmp_path, glue_dir, tiny_bert):
    from ray.cluster_utils import Cluster

    from squat_cli.executors import run_sweep
    from squat_cli.sweep import load_grid, plan

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [c.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    try:
        grid_path = _grid(tmp_path, glue_dir, tiny_bert, steps=40)
        grid = load_grid(grid_path)
        root = tmp_path / "runs"
        result = {}
        thread = threading.Thread(target=lambda: result.update(out=run_sweep(grid, root, plan(grid), launcher="ray")))
        thread.start()
        victim = None
        deadline = time.time() + 120
        while victim is None and time.time() < deadline:  # a worker node that is running an FP job
            if (root / JOB_LOG).is_file():
                started = [e["where"] for e in _log(root) if e["event"] == "start" and "/fp/" in e["job"]]
                victim = next((w for w in workers if w.node_id in started), None)
            time.sleep(0.2)
        assert victim is not None
        c.remove_node(victim)
        thread.join(timeout=300)
        out = result["out"]
        assert not out.failed and len(out.ran) == 6, (out.failed, out.ran)
        _ran_once(root, 6)
        lost = [e for e in _log(root) if e["event"] == "start" and e["where"] == victim.node_id]
        assert lost  # the killed attempt started there and never ended there
        assert not [e for e in _log(root) if e["event"] == "end" and e["where"] == victim.node_id
                    and e["job"] == lost[0]["job"]]
        _same_tables_as_local(grid_path, root, tmp_path)
    finally:
        ray.shutdown()
        c.shutdown()


DRIVER = """
import sys
from squat_cli.cli import main
sys.argv = ["squat"] + sys.argv[1:]
main()
"""


def test_a_killed_driver_rerun_skips_what_finished(tmp_path, glue_dir, tiny_bert):
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        c.add_node(num_cpus=1, resources={"slot": 1})
    try:
        grid = _grid(tmp_path, glue_dir, tiny_bert, steps=20)
        root = tmp_path / "runs"
        args = [sys.executable, "-c", DRIVER, "sweep", str(grid), "--launcher", "ray", "--address", c.address,
                "--out", str(root), "--no-report"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while time.time() < deadline:
            if (root / JOB_LOG).is_file() and any(e["event"] == "end" for e in _log(root)):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done = {str(p.parent.relative_to(root)) for p in root.rglob("metrics.json")}
        assert 1 <= len(done) < 6
        logged = len(_log(root))
        rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        said = " ".join(rerun.stdout.split())
        assert "already done" in said
        # a job killed after its metrics.json and before its "end" line is done without one, so the log alone
        # cannot count six ends: what had finished is not run again, nothing runs twice, all six are done
        ran_now = [e["job"] for e in _log(root)[logged:] if e["event"] == "end" and e.get("outcome") == "ran"]
        assert not set(ran_now) & done and len(ran_now) == len(set(ran_now)), (ran_now, done)
        assert len(list(root.rglob("metrics.json"))) == 6
        _same_tables_as_local(grid, root, tmp_path)
    finally:
        c.shutdown()


def test_without_ray_or_with_a_bad_launcher_one_line(tmp_path, glue_dir, tiny_bert, monkeypatch):
    grid = _grid(tmp_path, glue_dir, tiny_bert)
    res = runner.invoke(app, ["sweep", str(grid), "--launcher", "slurm", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--launcher: 'slurm' is not one of local, ray" in res.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    res = runner.invoke(app, ["sweep", str(grid), "--launcher", "ray", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "pip install 'squat[ray]'" in res.output
    res = runner.invoke(app, ["sweep", str(grid), "--address", "auto", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--address joins a Ray cluster" in res.output
