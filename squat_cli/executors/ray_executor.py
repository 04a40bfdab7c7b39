"""The Ray executor: each job a Ray task with the grid's resources, dependencies as object references.

- ``address`` None: join the cluster ``RAY_ADDRESS`` names, else start Ray on this machine (Ray's own default);
  ``auto`` or ``ray://host:port`` join a cluster.
- Each job asks for ``sweep.resources`` (``{cpus: 4, gpus: 1, <custom>: n}``; default one CPU); torch's threads
  follow its CPUs, and Ray gives a GPU job only its own GPU (``CUDA_VISIBLE_DEVICES``). A node with k GPUs
  runs k one-GPU jobs at once.
- A quantized run is submitted with its FP run's reference as an argument, so it starts when that run has
  finished; sibling quantized runs of one FP model run in parallel; a score waits for its run.
- The runs root must be one folder every node sees (a shared filesystem): each node reads the driver's probe
  and writes its own before anything runs; the nodes that cannot are named in one line.
- A task whose worker or node dies is retried (``sweep.max_retries``, default 2) and resumes from its run's
  checkpoint; a job that fails for its own reasons (divergence, bad input) returns a failed outcome and is not
  retried. A killed driver, rerun, skips what finished; the per-job locks keep a Ray sweep and a ``--shard``
  worker (or a stale task) off the same job.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from squat_cli.errors import SquatError
from squat_cli.sweep import Grid, Job, JobOutcome, SweepOutcome, depends_on, execute_job, record, run_key


def _need_ray():
    try:
        import ray
    except ImportError:
        raise SquatError("--launcher ray needs Ray: pip install 'squat[ray]'") from None
    return ray


def _task(grid: Grid, job: Job, root: str, data_dir: Optional[str], retry_failed: bool, threads: int,
          *needed: JobOutcome) -> JobOutcome:
    """One job on a Ray worker (``needed``: the outcomes it waits for)."""
    import ray
    import torch

    if any(n.status in ("failed", "busy") or n.message.startswith("needs a run") for n in needed):
        return JobOutcome("skipped", "needs a run that did not finish")
    torch.set_num_threads(max(1, threads))
    node = ray.get_runtime_context().get_node_id()
    return execute_job(grid, job, Path(root), data_dir, retry_failed, None, where=node)


def _probe(path: str, token: str) -> str:
    """On one node: read the driver's probe, write this node's; return the node's id when both worked."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        if Path(path, f".probe-{token}").read_text() != token:
            return ""
        Path(path, f".probe-{token}-{node}").write_text(node)
    except OSError:
        return ""
    return node


def check_storage(ray, root: Path) -> None:
    """Every alive node must see the runs root; one line naming the nodes that cannot."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    (root / f".probe-{token}").write_text(token)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0)(_probe)
    try:
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(root.absolute()), token) for n in nodes}
        seen = dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
    finally:
        for p in root.glob(f".probe-{token}*"):
            p.unlink(missing_ok=True)
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in nodes if seen.get(n["NodeID"]) != n["NodeID"]]
    if blind:
        raise SquatError(f"runs root {root}: not visible from node(s) {', '.join(blind)}; every node needs it on a "
                         "shared filesystem at the same path")


def _options(grid: Grid) -> tuple[dict[str, Any], int]:
    res = dict(grid.sweep.resources or {})
    cpus = float(res.pop("cpus", 1))
    gpus = float(res.pop("gpus", 0))
    opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": grid.sweep.max_retries,
                            "retry_exceptions": False}
    if res:
        opts["resources"] = {k: float(v) for k, v in res.items()}
    return opts, max(1, int(cpus))


def run(grid: Grid, root: Path, jobs: list[Job], data_dir: Optional[str] = None, retry_failed: bool = False,
        reporter_factory: Callable[[], Any] = lambda: None, log: Callable[[str], None] = lambda s: None,
        address: Optional[str] = None) -> SweepOutcome:
    ray = _need_ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                               if k.startswith(("SQUAT_", "HF_"))}})
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise SquatError(f"--address {address}: cannot join the Ray cluster ({str(exc).splitlines()[0][:120]})") \
                from None
    try:
        root = Path(root).absolute()
        check_storage(ray, root)
        opts, threads = _options(grid)
        task = ray.remote(_task).options(**opts)
        refs: dict[tuple, Any] = {}
        order: list[tuple[Job, Any]] = []
        for job in jobs:
            needs = [refs[k] for k in (("", job.task, "fp", job.seed), depends_on(job)) if k in refs and
                     job.kind != "fp"]
            ref = task.remote(grid, job, str(root), data_dir, retry_failed, threads, *dict.fromkeys(needs))
            if job.kind != "sharpness":
                refs[run_key(job)] = ref
            order.append((job, ref))
        return _collect(ray, root, order, log)
    finally:
        if started_here:
            ray.shutdown()


def _collect(ray, root: Path, order: list[tuple[Job, Any]], log: Callable[[str], None]) -> SweepOutcome:
    """Wait for every task, showing done / running (with node) / waiting / failed as they change."""
    from squat_cli.executors.progress import running_jobs

    results: dict[int, JobOutcome] = {}
    pending = {id(ref): i for i, (_, ref) in enumerate(order)}
    refs = [ref for _, ref in order]
    shown = None
    while len(results) < len(order):
        ready, _ = ray.wait([r for r in refs if pending.get(id(r)) not in results], num_returns=1, timeout=2.0)
        for r in ready:
            i = pending[id(r)]
            try:
                results[i] = ray.get(r)
            except ray.exceptions.RayTaskError as exc:  # the job raised something other than a SquatError
                results[i] = JobOutcome("failed", str(exc.cause if exc.cause is not None else exc).splitlines()[0])
            except Exception as exc:  # noqa: BLE001 - retries spent: the worker or node kept dying
                results[i] = JobOutcome("failed", f"lost its worker after retries ({type(exc).__name__})")
        running = running_jobs(root)
        failed = sum(1 for o in results.values() if o.status == "failed")
        view = (len(results), len(running), len(order) - len(results) - len(running), failed)
        if view != shown:
            where = ", ".join(f"{j} on {n[:8]}" for j, n in sorted(running.items()))
            log(f"ray: done {view[0]} / running {view[1]}{f' ({where})' if where else ''} / waiting "
                f"{max(view[2], 0)} / failed {view[3]}")
            shown = view
        time.sleep(0.05)
    out = SweepOutcome()
    for i, (job, _) in enumerate(order):
        record(out, job, results[i], log)
    return out
