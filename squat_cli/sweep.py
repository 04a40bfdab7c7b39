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


def run_sweep(
    grid: Grid, root: Path, jobs: list[Job], data_dir: Optional[str] = None, retry_failed: bool = False,
    reporter_factory: Callable[[], Any] = lambda: None, log: Callable[[str], None] = lambda s: None,
) -> SweepOutcome:
    from squat_cli import training as J
    from squat_cli.sharpness_jobs import measure_sharpness

    out = SweepOutcome()
    blocked: set[tuple] = set()  # runs that failed or are missing: their dependents wait
    for job in jobs:
        run_key = (job.setting, job.task, job.variant, job.seed)
        fp_key = ("", job.task, "fp", job.seed)
        if job.kind != "fp" and (fp_key in blocked or (job.kind == "sharpness" and run_key in blocked)):
            out.skipped.append(f"{job.id} (needs a run that did not finish)")
            continue
        job_root = grid.root_of(job.kind, job.setting, root)
        status = job_status(job, job_root, grid.sharpness.method)
        if status == "done":
            out.skipped.append(job.id)
            if job.kind != "sharpness":
                differs = recipe_difference(RunDir.for_run(job_root, job.task, job.variant, job.seed),
                                            _job_recipe(grid, job, data_dir))
                if differs:
                    out.warnings.append(f"{job.id}: finished with another recipe ({differs}); counted as done, "
                                        "not rerun")
                    log(f"warning: {out.warnings[-1]}")
            continue
        if status == "failed" and not retry_failed:
            out.failed.append((job.id, "failed earlier (FAILED.json); rerun with --retry-failed"))
            blocked.add(run_key)
            continue
        with job_lock(job_root, job) as mine:
            if not mine:
                out.busy.append(job.id)
                blocked.add(run_key)
                continue
            if job_status(job, job_root, grid.sharpness.method) == "done":  # finished by another worker meanwhile
                out.skipped.append(job.id)
                continue
            log(f"[{len(out.ran) + 1}] {job.id}")
            try:
                if job.kind == "fp":
                    J.finetune(grid.fp_recipe(job.task, job.seed, data_dir), job_root, reporter=reporter_factory(),
                               resume=True, force=status == "failed")
                elif job.kind == "quantize":
                    fp_run = RunDir.for_run(grid.root_of("fp", "", root), job.task, "fp",
                                            job.seed)
                    J.quantize(grid.quant_recipe(job.task, job.seed, job.method, job.wbits, data_dir, job.setting),
                               job_root, from_path=fp_run.path, reporter=reporter_factory(), resume=True,
                               force=status == "failed")
                else:
                    run = RunDir.for_run(job_root, job.task, job.variant, job.seed)
                    measure_sharpness(run, grid.sharpness_settings(job.rho), data_dir, reporter_factory())
                out.ran.append(job.id)
            except SquatError as exc:
                out.failed.append((job.id, str(exc)))
                blocked.add(run_key)
                log(f"failed {job.id}: {exc}")
    return out


def describe(grid: Grid, jobs: list[Job], root: Path) -> list[tuple[str, str]]:
    return [(j.id, job_status(j, grid.root_of(j.kind, j.setting, root), grid.sharpness.method)) for j in jobs]
