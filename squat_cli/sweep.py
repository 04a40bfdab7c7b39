"""A grid of runs from one recipe: expand, order by dependency, skip what is done, shard across workers.

A grid recipe has a ``sweep`` section (tasks x methods x bits x seeds, and the
sharpness radii), plus ``finetune`` and ``quantize`` sections holding ordinary
recipe sections (model/data/train/quant/sam) and a ``sharpness`` section.

Jobs form chains, one per (task, seed): the FP run, then each quantized run
starting from it, then the sharpness scores of all of them. ``--shard i/n``
gives worker i every n-th chain, so no worker waits on another and the shards
together cover the grid exactly once. A per-job lock file (``flock``, released
when a process dies) keeps two workers sharing one runs folder from running the
same job at once. Finished runs (``metrics.json``) and stored scores are
skipped and unfinished runs resume from their last checkpoint, so a rerun after
an interruption continues where it stopped; failed
runs (``FAILED.json``) are reported, not retried, unless asked.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from squat_cli.errors import RecipeError, SquatError
from squat_cli.glue import get_task
from squat_cli.recipe import QUANTIZE_DEFAULTS, Recipe, _build, _merge, apply_overrides, read_yaml, recipe_from_dict
from squat_cli.runs import RunDir, variant_name
from squat_cli.sharpness import SharpnessSettings


@dataclass
class SweepSection:
    tasks: list[str]
    methods: list[str] = field(default_factory=lambda: ["lsq", "squat"])
    wbits: list[int] = field(default_factory=lambda: [2, 3, 4])
    abits: int = 8
    seeds: list[int] = field(default_factory=lambda: [42])
    sharpness_rhos: list[float] = field(default_factory=lambda: [0.01, 0.05])


@dataclass
class Grid:
    sweep: SweepSection
    finetune: dict[str, Any]
    quantize: dict[str, Any]
    sharpness: SharpnessSettings
    """Settings for every score; the radius comes from ``sweep.sharpness_rhos``."""

    @property
    def tasks(self) -> list[str]:
        return self.sweep.tasks

    @property
    def seeds(self) -> list[int]:
        return self.sweep.seeds

    def fp_recipe(self, task: str, seed: int, data_dir: Optional[str] = None) -> Recipe:
        d = copy.deepcopy(self.finetune)
        over = {"data.task": task, "train.seed": seed}
        if data_dir:
            over["data.data_dir"] = data_dir
        return recipe_from_dict(apply_overrides(d, over)).validate()

    def quant_recipe(self, task: str, seed: int, method: str, wbits: int, data_dir: Optional[str] = None) -> Recipe:
        d = apply_overrides({}, dict(QUANTIZE_DEFAULTS))
        _merge(d, copy.deepcopy(self.quantize))
        over = {"data.task": task, "train.seed": seed, "quant.method": method, "quant.wbits": wbits,
                "quant.abits": self.sweep.abits}
        if data_dir:
            over["data.data_dir"] = data_dir
        rho = (d.get("sam") or {}).get("rho")
        if isinstance(rho, dict):  # per-bits radius: {2: 0.1, 4: 0.15}
            if wbits not in rho:
                raise RecipeError(f"quantize.sam.rho: no radius for W{wbits} (have {sorted(rho)})")
            over["sam.rho"] = rho[wbits]
        return recipe_from_dict(apply_overrides(d, over)).validate()

    def sharpness_settings(self, rho: float) -> SharpnessSettings:
        return dataclasses.replace(self.sharpness, rho=rho)


def is_grid_recipe(path: Path | str) -> bool:
    data = read_yaml(path)
    return isinstance(data, dict) and "sweep" in data


def load_grid(path: Path | str) -> Grid:
    data = read_yaml(path)
    allowed = ("sweep", "finetune", "quantize", "sharpness")
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{key}: unknown key; allowed: {', '.join(allowed)}")
    if "sweep" not in data:
        raise RecipeError(f"{path}: a grid recipe needs a sweep section")
    sweep = _build(SweepSection, data["sweep"] or {}, "sweep")
    sharp_data = data.get("sharpness") or {}
    if "rho" in sharp_data:
        raise RecipeError("sharpness.rho: set the radii in sweep.sharpness_rhos")
    sharp = _build(SharpnessSettings, {"rho": 1.0, **sharp_data}, "sharpness")
    if sharp.method not in ("ascent", "keskar"):
        raise RecipeError(f"sharpness.method: {sharp.method!r} is not one of ascent, keskar")
    grid = Grid(sweep, data.get("finetune") or {}, data.get("quantize") or {}, sharp)
    for t in sweep.tasks:
        get_task(t)
    if any(r <= 0 for r in sweep.sharpness_rhos):
        raise RecipeError("sweep.sharpness_rhos: every radius must be > 0")
    # validate every recipe the grid will use, before anything runs
    for t in sweep.tasks:
        for seed in sweep.seeds:
            grid.fp_recipe(t, seed)
            for m in sweep.methods:
                for b in sweep.wbits:
                    grid.quant_recipe(t, seed, m, b)
    return grid


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

    @property
    def id(self) -> str:
        base = f"{self.task}/{self.variant}/seed{self.seed}"
        return base if self.kind != "sharpness" else f"{base}#sharpness@{self.rho:g}"

    @property
    def chain(self) -> tuple[str, int]:
        return (self.task, self.seed)


def plan(grid: Grid) -> list[Job]:
    """Every job of the grid in dependency order, chain by chain."""
    jobs: list[Job] = []
    for task in grid.sweep.tasks:
        t = get_task(task).name
        for seed in grid.sweep.seeds:
            chain = [Job("fp", t, seed, "fp")]
            for m in grid.sweep.methods:
                for b in grid.sweep.wbits:
                    if m == "fp-sam":  # unquantized: one run, whatever the bits
                        b = 32
                    job = Job("quantize", t, seed, variant_name(m, b, 32 if m == "fp-sam" else grid.sweep.abits), m, b)
                    if job not in chain:
                        chain.append(job)
            runs = list(chain)
            for rho in grid.sweep.sharpness_rhos:
                chain += [Job("sharpness", r.task, r.seed, r.variant, r.method, r.wbits, rho) for r in runs]
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
    chains: list[tuple[str, int]] = []
    for j in jobs:
        if j.chain not in chains:
            chains.append(j.chain)
    mine = {c for k, c in enumerate(chains) if k % n == i}
    return [j for j in jobs if j.chain in mine]


def job_status(job: Job, root: Path, sharpness_method: str = "ascent") -> str:
    """done | failed | todo."""
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


def run_sweep(
    grid: Grid, root: Path, jobs: list[Job], data_dir: Optional[str] = None, retry_failed: bool = False,
    reporter_factory: Callable[[], Any] = lambda: None, log: Callable[[str], None] = lambda s: None,
) -> SweepOutcome:
    from squat_cli import jobs as J

    out = SweepOutcome()
    blocked: set[tuple] = set()  # runs that failed or are missing: their dependents wait
    for job in jobs:
        run_key = (job.task, job.variant, job.seed)
        fp_key = (job.task, "fp", job.seed)
        if job.kind != "fp" and (fp_key in blocked or (job.kind == "sharpness" and run_key in blocked)):
            out.skipped.append(f"{job.id} (needs a run that did not finish)")
            continue
        status = job_status(job, root, grid.sharpness.method)
        if status == "done":
            out.skipped.append(job.id)
            continue
        if status == "failed" and not retry_failed:
            out.failed.append((job.id, "failed earlier (FAILED.json); rerun with --retry-failed"))
            blocked.add(run_key)
            continue
        with job_lock(root, job) as mine:
            if not mine:
                out.busy.append(job.id)
                blocked.add(run_key)
                continue
            if job_status(job, root, grid.sharpness.method) == "done":  # finished by another worker meanwhile
                out.skipped.append(job.id)
                continue
            log(f"[{len(out.ran) + 1}] {job.id}")
            try:
                if job.kind == "fp":
                    J.finetune(grid.fp_recipe(job.task, job.seed, data_dir), root, reporter=reporter_factory(),
                               resume=True, force=status == "failed")
                elif job.kind == "quantize":
                    J.quantize(grid.quant_recipe(job.task, job.seed, job.method, job.wbits, data_dir), root,
                               reporter=reporter_factory(), resume=True, force=status == "failed")
                else:
                    run = RunDir.for_run(root, job.task, job.variant, job.seed)
                    J.measure_sharpness(run, grid.sharpness_settings(job.rho), data_dir, reporter_factory())
                out.ran.append(job.id)
            except SquatError as exc:
                out.failed.append((job.id, str(exc)))
                blocked.add(run_key)
                log(f"failed {job.id}: {exc}")
    return out


def describe(jobs: list[Job], root: Path, sharpness_method: str = "ascent") -> list[tuple[str, str]]:
    return [(j.id, job_status(j, root, sharpness_method)) for j in jobs]
