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

A settings search: a top-level ``settings`` mapping names variants of the
quantize section (``{name: {dotted.key: value}}``, e.g. ``{lr3e-5: {train.lr:
3.0e-5}}``). Every quantized run and score is then made once per setting, into
its own runs root ``<out>/<name>/``, all starting from the same FP runs. Those
live in ``sweep.fp_runs`` when set (a runs root, shared with another grid), else
in ``<out>``.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from squat_cli.errors import RecipeError, SquatError
from squat_cli.glue import get_task
from squat_cli.recipe import (
    METHODS,
    QUANTIZE_DEFAULTS,
    WEIGHT_ONLY_METHODS,
    Recipe,
    _build,
    _merge,
    apply_overrides,
    read_yaml,
    recipe_from_dict,
)
from squat_cli.runs import RunDir, variant_name
from squat_cli.sharpness import SharpnessSettings

SAM_METHODS = ("joint", "squat", "fp-sam")
MIXED_RE = re.compile(r"^qbert-mp([2-8])$")
"""Grid method names for Q-BERT's mixed precision: ``qbert-mp3`` is W/3 for each W of its bit widths."""


@dataclass
class SweepSection:
    tasks: list[str]
    methods: list[str] = field(default_factory=lambda: ["lsq", "squat"])
    wbits: list[int] = field(default_factory=lambda: [2, 3, 4])
    abits: int = 8
    seeds: list[int] = field(default_factory=lambda: [42])
    sharpness_rhos: list[float] = field(default_factory=lambda: [0.01, 0.05])
    fp_runs: Optional[str] = None
    """Runs root of the FP runs (made there if missing); None: the sweep's ``--out``."""
    sharpness_methods: Optional[list[str]] = None
    """Methods whose runs get sharpness scores (``fp`` for the FP runs); None: every run."""
    method_wbits: dict[str, list[int]] = field(default_factory=dict)
    """Weight bit widths for a method instead of ``wbits`` (``{q8bert: [8]}``)."""
    note: Optional[str] = None
    """One line printed at the top of the grid's report (e.g. where the full results are)."""


@dataclass
class Grid:
    sweep: SweepSection
    finetune: dict[str, Any]
    quantize: dict[str, Any]
    sharpness: SharpnessSettings
    """Settings for every score; the radius comes from ``sweep.sharpness_rhos``."""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named variants of the quantize section (dotted keys), each run into ``<out>/<name>/``."""

    def setting_names(self) -> list[str]:
        return list(self.settings) or [""]

    def root_of(self, job: "Job", out: Path) -> Path:
        """The runs root holding ``job``'s run folder."""
        if job.kind == "fp":
            return Path(self.sweep.fp_runs) if self.sweep.fp_runs else out
        return out / job.setting if job.setting else out

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

    def quant_recipe(self, task: str, seed: int, method: str, wbits: int, data_dir: Optional[str] = None,
                     setting: str = "") -> Recipe:
        d = apply_overrides({}, dict(QUANTIZE_DEFAULTS))
        _merge(d, copy.deepcopy(self.quantize))
        if setting:
            apply_overrides(d, dict(self.settings[setting]))
        over = {"data.task": task, "train.seed": seed, "quant.method": method, "quant.wbits": wbits,
                "quant.abits": 32 if method in WEIGHT_ONLY_METHODS else self.sweep.abits}
        mixed = MIXED_RE.match(method)
        if mixed:  # qbert-mp<H>: Q-BERT with mixed precision W/H
            over.update({"quant.method": "qbert", "quant.mixed": f"{wbits}/{mixed.group(1)}"})
        if data_dir:
            over["data.data_dir"] = data_dir
        rho = (d.get("sam") or {}).get("rho")
        if isinstance(rho, dict):  # per-bits radius: {2: 0.1, 4: 0.15}
            if wbits in rho:
                over["sam.rho"] = rho[wbits]
            elif method in SAM_METHODS:
                raise RecipeError(f"quantize.sam.rho: no radius for W{wbits} (have {sorted(rho)})")
            else:  # no SAM: the radius is unused
                over["sam.rho"] = None
        return recipe_from_dict(apply_overrides(d, over)).validate()

    def sharpness_settings(self, rho: float) -> SharpnessSettings:
        return dataclasses.replace(self.sharpness, rho=rho)


def is_grid_recipe(path: Path | str) -> bool:
    data = read_yaml(path)
    return isinstance(data, dict) and "sweep" in data


def load_grid(path: Path | str) -> Grid:
    data = read_yaml(path)
    allowed = ("sweep", "finetune", "quantize", "sharpness", "settings")
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
    if sharp.step not in ("normalized", "raw"):
        raise RecipeError(f"sharpness.step: {sharp.step!r} is not one of normalized, raw")
    if sharp.split not in ("train", "dev"):
        raise RecipeError(f"sharpness.split: {sharp.split!r} is not one of train, dev")
    for key in ("steps", "examples", "batch_size", "subspace", "maxiter", "lr"):
        value = getattr(sharp, key)
        if not (value > 0 and math.isfinite(value)):
            raise RecipeError(f"sharpness.{key}: {value} must be > 0")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise RecipeError("settings: expected a mapping of names to {dotted.key: value} mappings")
    for name in settings:
        if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == "fp":
            raise RecipeError(f"settings: {name!r} is not a usable folder name")
    grid = Grid(sweep, data.get("finetune") or {}, data.get("quantize") or {}, sharp, settings)
    for t in sweep.tasks:
        get_task(t)
    known = {"fp", *METHODS}
    for m in [*sweep.methods, *(sweep.sharpness_methods or []), *sweep.method_wbits]:
        if m not in known and not MIXED_RE.match(m):
            raise RecipeError(f"sweep: unknown method {m!r}; allowed: {', '.join(sorted(known))}, "
                              "qbert-mp<H> (Q-BERT mixed precision W/H)")
    if any(r <= 0 for r in sweep.sharpness_rhos):
        raise RecipeError("sweep.sharpness_rhos: every radius must be > 0")
    # validate every recipe the grid will use, before anything runs
    for t in sweep.tasks:
        for seed in sweep.seeds:
            grid.fp_recipe(t, seed)
            for m in sweep.methods:
                for b in sweep.method_wbits.get(m, sweep.wbits):
                    for name in grid.setting_names():
                        grid.quant_recipe(t, seed, m, b, setting=name)
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
    """Every job of the grid in dependency order, chain by chain."""
    jobs: list[Job] = []
    for task in grid.sweep.tasks:
        t = get_task(task).name
        for seed in grid.sweep.seeds:
            chain = [Job("fp", t, seed, "fp")]
            for name in grid.setting_names():
                for m in grid.sweep.methods:
                    for b in grid.sweep.method_wbits.get(m, grid.sweep.wbits):
                        if m == "fp-sam":  # unquantized: one run, whatever the bits
                            b = 32
                        variant = variant_name(m, b, 32 if m in WEIGHT_ONLY_METHODS else grid.sweep.abits)
                        job = Job("quantize", t, seed, variant, m, b, setting=name)
                        if job not in chain:
                            chain.append(job)
            runs = [j for j in chain if grid.sweep.sharpness_methods is None or j.method in grid.sweep.sharpness_methods]
            for rho in grid.sweep.sharpness_rhos:
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
    chains: list[tuple[str, int]] = []
    for j in jobs:
        if j.chain not in chains:
            chains.append(j.chain)
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
        stored = recipe_from_dict(read_yaml(run.recipe_file)).validate().to_dict()
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
    from squat_cli import jobs as J

    out = SweepOutcome()
    blocked: set[tuple] = set()  # runs that failed or are missing: their dependents wait
    for job in jobs:
        run_key = (job.setting, job.task, job.variant, job.seed)
        fp_key = ("", job.task, "fp", job.seed)
        if job.kind != "fp" and (fp_key in blocked or (job.kind == "sharpness" and run_key in blocked)):
            out.skipped.append(f"{job.id} (needs a run that did not finish)")
            continue
        job_root = grid.root_of(job, root)
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
                    fp_run = RunDir.for_run(grid.root_of(Job("fp", job.task, job.seed, "fp"), root), job.task, "fp",
                                            job.seed)
                    J.quantize(grid.quant_recipe(job.task, job.seed, job.method, job.wbits, data_dir, job.setting),
                               job_root, from_path=fp_run.path, reporter=reporter_factory(), resume=True,
                               force=status == "failed")
                else:
                    run = RunDir.for_run(job_root, job.task, job.variant, job.seed)
                    J.measure_sharpness(run, grid.sharpness_settings(job.rho), data_dir, reporter_factory())
                out.ran.append(job.id)
            except SquatError as exc:
                out.failed.append((job.id, str(exc)))
                blocked.add(run_key)
                log(f"failed {job.id}: {exc}")
    return out


def describe(grid: Grid, jobs: list[Job], root: Path) -> list[tuple[str, str]]:
    return [(j.id, job_status(j, grid.root_of(j, root), grid.sharpness.method)) for j in jobs]
