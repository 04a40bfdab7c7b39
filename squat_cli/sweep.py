"""A grid of runs: expand, order by dependency, skip what is done, shard across workers (the grid itself:
``grid.py``).

Jobs form chains, one per (task, seed): the FP run, then each quantized run
starting from it, then the sharpness scores of all of them. ``--shard i/n``
gives worker i every n-th chain, so no worker waits on another and the shards
together cover the grid exactly once. A per-job lock file (``flock``, released
when a process dies) keeps two workers sharing one runs folder from running the
same job at once. Finished runs (``metrics.json``) and stored scores are
skipped and unfinished runs resume from their last checkpoint, so a rerun after
an interruption continues where it stopped; failed
runs (``FAILED.json``) are reported, not retried, unless asked. A finished run
made with another recipe than the grid's is reported (the first differing key).
"""

from __future__ import annotations

import copy
import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from squat_cli.errors import SquatError
from squat_cli.grid import Grid, is_grid_recipe, load_grid  # noqa: F401  (the sweep's entry points)
from squat_cli.quant.methods import get_method
from squat_cli.recipe import Recipe, recipe_from_dict
from squat_cli.runs import RunDir, variant_name
from squat_cli.sharpness_settings import SharpnessSettings
from squat_cli.tasks import get_task
from squat_cli.yaml_safe import read_yaml

# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Job:
    kind: str  # fp | quantize | sharpness
    task: str
    seed: int
    variant: str
    method: str = "fp"
    wbits: int = 32
    rho: Optional[float] = None
    setting: str = ""
    """Name of the grid setting (settings search); empty for an ordinary grid and for FP runs."""

    @property
    def id(self) -> str:
        base = f"{self.task}/{self.variant}/seed{self.seed}"
        if self.setting:
            base = f"{self.setting}/{base}"
        return base if self.kind != "sharpness" else f"{base}#sharpness@{self.rho:g}"

    @property
    def chain(self) -> tuple[str, int]:
        return (self.task, self.seed)


def plan(grid: Grid) -> list[Job]:
    """Every job of the grid in dependency order, chain by chain; each job once, however often a list repeats
    an entry. Linear in the number of jobs."""
    jobs: list[Job] = []
    tasks = list(dict.fromkeys(get_task(t).name for t in grid.sweep.tasks))
    for t in tasks:
        for seed in dict.fromkeys(grid.sweep.seeds):
            chain = [Job("fp", t, seed, "fp")]
            seen = set(chain)
            for name in grid.setting_names():
                for m in dict.fromkeys(grid.sweep.methods):
                    for b in dict.fromkeys(grid.sweep.method_wbits.get(m, grid.sweep.wbits)):
                        b, a = get_method(m).variant_bits(b, grid.sweep.abits)  # fp-sam: one w32a32 run
                        variant = variant_name(m, b, a)
                        job = Job("quantize", t, seed, variant, m, b, setting=name)
                        if job not in seen:
                            seen.add(job)
                            chain.append(job)
            runs = [j for j in chain if grid.sweep.sharpness_methods is None or j.method in grid.sweep.sharpness_methods]
            for rho in dict.fromkeys(grid.sweep.sharpness_rhos):
                chain += [Job("sharpness", r.task, r.seed, r.variant, r.method, r.wbits, rho, r.setting)
                          for r in runs]
            jobs += chain
    return jobs


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SquatError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise SquatError(f"--shard {text!r}: need 0 <= i < n")
    return i, n


def shard(jobs: list[Job], i: int, n: int) -> list[Job]:
    """Worker ``i`` of ``n`` gets every n-th chain (in the grid's order)."""
    chains = list(dict.fromkeys(j.chain for j in jobs))  # in the grid's order, each once
    mine = {c for k, c in enumerate(chains) if k % n == i}
    return [j for j in jobs if j.chain in mine]


def job_status(job: Job, root: Path, sharpness_method: str = "ascent") -> str:
    """done | failed | todo; ``root`` is the runs root holding the job's run (``Grid.root_of``)."""
    run = RunDir.for_run(root, job.task, job.variant, job.seed)
    if job.kind == "sharpness":
        key = SharpnessSettings(rho=job.rho, method=sharpness_method).key()
        return "done" if run.is_complete() and key in run.sharpness_scores() else "todo"
    if run.is_complete():
        return "done"
    if run.is_failed():
        return "failed"
    return "todo"


@contextmanager
def job_lock(root: Path, job: Job) -> Iterator[bool]:
    """Yield True if this process holds the job's lock (another worker holds it: False)."""
    lock_dir = root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / (job.id.replace("/", "__").replace("#", "_") + ".lock")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@dataclass
class SweepOutcome:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _job_recipe(grid: Grid, job: Job, data_dir: Optional[str]) -> Recipe:
    if job.kind == "fp":
        return grid.fp_recipe(job.task, job.seed, data_dir)
    return grid.quant_recipe(job.task, job.seed, job.method, job.wbits, data_dir, job.setting)


def recipe_difference(run: RunDir, expected: Recipe) -> Optional[str]:
    """The first recipe key where a finished run differs from what the grid would run now (None: the same).
    Both sides are compared with defaults filled in, so fields added later with their old behaviour match."""
    try:
        stored = recipe_from_dict(read_yaml(run.recipe_file)).complete().to_dict()
    except SquatError:
        return "its recipe.yaml is unreadable"
    want = copy.deepcopy(expected).to_dict()
    if want.get("quant") is None:  # FP runs record no quant section
        want.pop("quant", None)
    for section in sorted(set(stored) | set(want)):
        a, b = stored.get(section) or {}, want.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if key == "data_dir":  # where the same data was read from does not change the run
                continue
            if section == "model" and key == "name_or_path" and want.get("quant") is not None:
                continue  # a quantized run takes its model from the FP run it starts from
            if a.get(key) != b.get(key):
                return f"{section}.{key}: {a.get(key)!r} here, {b.get(key)!r} in the grid"
    return None


@dataclass
class JobOutcome:
    status: str
    """ran | skipped | failed | busy"""
    message: str = ""
    warning: Optional[str] = None


JOB_LOG = ".sweep-jobs.jsonl"
"""In the runs root: one line per job start and end (job id, outcome, host, process), from every worker."""


def log_job(root: Path, job: "Job", event: str, **fields: Any) -> None:
    """Append one line to the runs root's job log (a single ``O_APPEND`` write: whole lines from every process)."""
    import json
    import socket
    import time

    root.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"job": job.id, "event": event, "host": socket.gethostname(), "pid": os.getpid(),
                       "time": round(time.time(), 3), **fields}) + "\n"
    fd = os.open(root / JOB_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def execute_job(grid: Grid, job: Job, root: Path, data_dir: Optional[str] = None, retry_failed: bool = False,
                reporter: Any = None, log: Callable[[str], None] = lambda s: None, where: str = "",
                on_start: Callable[[], None] = lambda: None) -> JobOutcome:
    """Run one job if it is not done (any executor calls this): skipped when finished, refused when failed
    earlier (unless ``retry_failed``), busy when another worker holds its lock; failures are outcomes, not
    exceptions. ``where`` names the worker (a node) in the job log."""
    from squat_cli import training as J
    from squat_cli.sharpness_jobs import measure_sharpness

    job_root = grid.root_of(job.kind, job.setting, root)
    status = job_status(job, job_root, grid.sharpness.method)
    if status == "done":
        warning = None
        if job.kind != "sharpness":
            differs = recipe_difference(RunDir.for_run(job_root, job.task, job.variant, job.seed),
                                        _job_recipe(grid, job, data_dir))
            if differs:
                warning = f"{job.id}: finished with another recipe ({differs}); counted as done, not rerun"
                log(f"warning: {warning}")
        return JobOutcome("skipped", warning=warning)
    if status == "failed" and not retry_failed:
        return JobOutcome("failed", "failed earlier (FAILED.json); rerun with --retry-failed")
    with job_lock(job_root, job) as mine:
        if not mine:
            return JobOutcome("busy")
        if job_status(job, job_root, grid.sharpness.method) == "done":  # finished by another worker meanwhile
            return JobOutcome("skipped")
        log_job(root, job, "start", where=where)
        on_start()
        try:
            if job.kind == "fp":
                J.finetune(grid.fp_recipe(job.task, job.seed, data_dir), job_root, reporter=reporter, resume=True,
                           force=status == "failed")
            elif job.kind == "quantize":
                fp_run = RunDir.for_run(grid.root_of("fp", "", root), job.task, "fp", job.seed)
                J.quantize(grid.quant_recipe(job.task, job.seed, job.method, job.wbits, data_dir, job.setting),
                           job_root, from_path=fp_run.path, reporter=reporter, resume=True, force=status == "failed")
            else:
                run = RunDir.for_run(job_root, job.task, job.variant, job.seed)
                measure_sharpness(run, grid.sharpness_settings(job.rho), data_dir, reporter)
        except SquatError as exc:
            log_job(root, job, "end", outcome="failed", where=where)
            return JobOutcome("failed", str(exc))
        log_job(root, job, "end", outcome="ran", where=where)
        return JobOutcome("ran")


def depends_on(job: Job) -> Optional[tuple]:
    """The key of the run a job waits for: a quantized run its FP run, a score its run (None: an FP run)."""
    if job.kind == "fp":
        return None
    if job.kind == "quantize":
        return ("", job.task, "fp", job.seed)
    return (job.setting, job.task, job.variant, job.seed)


def run_key(job: Job) -> tuple:
    return ("" if job.kind == "fp" else job.setting, job.task, job.variant, job.seed)


def record(out: SweepOutcome, job: Job, result: JobOutcome, log: Callable[[str], None] = lambda s: None) -> None:
    """Add one job's outcome to the sweep's summary."""
    if result.status == "ran":
        out.ran.append(job.id)
    elif result.status == "skipped":
        out.skipped.append(job.id + (f" ({result.message})" if result.message else ""))
    elif result.status == "busy":
        out.busy.append(job.id)
    else:
        out.failed.append((job.id, result.message))
        if "failed earlier" not in result.message:
            log(f"failed {job.id}: {result.message}")
    if result.warning:
        out.warnings.append(result.warning)


def describe(grid: Grid, jobs: list[Job], root: Path) -> list[tuple[str, str]]:
    return [(j.id, job_status(j, grid.root_of(j.kind, j.setting, root), grid.sharpness.method)) for j in jobs]
