"""A grid recipe: what to run (tasks x methods x bits x seeds, sharpness radii, settings) and the recipe of
each run.

A grid recipe has a ``sweep`` section (tasks x methods x bits x seeds, and the
sharpness radii), plus ``finetune`` and ``quantize`` sections holding ordinary
recipe sections (model/data/train/quant/sam) and a ``sharpness`` section.

``method_settings`` (top level) overrides the quantize section for one method
(``{squat: {quant.step_lr: 1.0}}``): what a search chose for that method alone.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from squat_cli.errors import RecipeError
from squat_cli.quant.methods import METHODS, MIXED_RE, get_method, is_known, split_kd
from squat_cli.recipe import DISTILL_DEFAULTS, QUANTIZE_DEFAULTS, Recipe, apply_overrides, merge_sections, recipe_from_dict
from squat_cli.sharpness_settings import SharpnessSettings
from squat_cli.tasks import get_task, task_ref
from squat_cli.typed import build
from squat_cli.yaml_safe import read_yaml


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
    resources: Optional[dict[str, float]] = None
    """What each job asks of a Ray cluster (``--launcher ray``): ``{cpus: 4, gpus: 1}`` and custom resources;
    None: one CPU. torch's threads follow ``cpus``."""
    max_retries: int = 2
    """``--launcher ray``: how often a job whose worker or node died is retried (it resumes from its checkpoint)."""


@dataclass
class Grid:
    sweep: SweepSection
    finetune: dict[str, Any]
    quantize: dict[str, Any]
    sharpness: SharpnessSettings
    """Settings for every score; the radius comes from ``sweep.sharpness_rhos``."""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Named variants of the quantize section (dotted keys), each run into ``<out>/<name>/``."""
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per method, overrides of the quantize section (dotted keys): settings searched for one method only.
    A distilled method (``squat+kd``) takes its base method's settings, then its own."""
    distill: Optional[dict[str, Any]] = None
    """The ``distill`` section of every distilled method's runs (``lsq+kd``); None: ``DISTILL_DEFAULTS``."""

    def setting_names(self) -> list[str]:
        return list(self.settings) or [""]

    def root_of(self, kind: str, setting: str, out: Path) -> Path:
        """The runs root holding the run folder of a job of this ``kind`` (fp, quantize, sharpness) and setting."""
        if kind == "fp":
            return Path(self.sweep.fp_runs) if self.sweep.fp_runs else out
        return out / setting if setting else out

    @property
    def tasks(self) -> list[str]:
        return self.sweep.tasks

    @property
    def seeds(self) -> list[int]:
        return self.sweep.seeds

    def fp_recipe(self, task: str, seed: int, data_dir: Optional[str] = None) -> Recipe:
        d = copy.deepcopy(self.finetune)
        over = {"data.task": task_ref(task), "train.seed": seed}
        if data_dir:
            over["data.data_dir"] = data_dir
        return recipe_from_dict(apply_overrides(d, over)).complete()

    def quant_recipe(self, task: str, seed: int, method: str, wbits: int, data_dir: Optional[str] = None,
                     setting: str = "") -> Recipe:
        """The recipe of one quantized run; ``method`` is a grid method name (``squat``, ``lsq+kd``, ``qbert-mp3``).
        Only distilled methods have a ``distill`` section: settings' ``distill.*`` keys act on them alone."""
        base, kd = split_kd(method)
        d = apply_overrides({}, dict(QUANTIZE_DEFAULTS))
        merge_sections(d, copy.deepcopy(self.quantize))
        d.pop("distill", None)
        if kd:
            d["distill"] = copy.deepcopy(self.distill) if self.distill is not None else \
                apply_overrides({}, dict(DISTILL_DEFAULTS))["distill"]
        for name in dict.fromkeys((base, method)):
            if name in self.method_settings:
                apply_overrides(d, dict(self.method_settings[name]))
        if setting:
            apply_overrides(d, dict(self.settings[setting]))
        if not kd:
            d.pop("distill", None)
        over = {"data.task": task_ref(task), "train.seed": seed, "quant.method": base, "quant.wbits": wbits,
                "quant.abits": 32 if get_method(method).weight_only else self.sweep.abits}
        mixed = MIXED_RE.match(base)
        if mixed:  # qbert-mp<H>: Q-BERT with mixed precision W/H
            over.update({"quant.method": "qbert", "quant.mixed": f"{wbits}/{mixed.group(1)}"})
        if data_dir:
            over["data.data_dir"] = data_dir
        rho = (d.get("sam") or {}).get("rho")
        if isinstance(rho, dict):  # per-bits radius: {2: 0.1, 4: 0.15}
            if wbits in rho:
                over["sam.rho"] = rho[wbits]
            elif get_method(method).uses_sam:
                raise RecipeError(f"quantize.sam.rho: no radius for W{wbits} (have {sorted(rho)})")
            else:  # no SAM: the radius is unused
                over["sam.rho"] = None
        return recipe_from_dict(apply_overrides(d, over)).complete()

    def sharpness_settings(self, rho: float) -> SharpnessSettings:
        return dataclasses.replace(self.sharpness, rho=rho)


def is_grid_recipe(path: Path | str) -> bool:
    data = read_yaml(path)
    return isinstance(data, dict) and "sweep" in data


MAX_JOBS = 20_000
"""A grid planning more jobs than this is refused (years of compute on one machine, most likely a typo)."""


def load_grid(path: Path | str) -> Grid:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a grid recipe is a mapping of sections (sweep, finetune, quantize, ...)")
    allowed = ("sweep", "finetune", "quantize", "sharpness", "settings", "method_settings", "distill")
    for key in data:
        if key not in allowed:
            raise RecipeError(f"{key}: unknown key; allowed: {', '.join(allowed)}")
    if "sweep" not in data:
        raise RecipeError(f"{path}: a grid recipe needs a sweep section")
    for key in allowed:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise RecipeError(f"{key}: expected a mapping, got {type(data[key]).__name__} {data[key]!r:.40}")
    if not data["sweep"]:
        raise RecipeError("sweep: empty; it needs at least tasks (e.g. tasks: [rte])")
    sweep = build(SweepSection, data["sweep"], "sweep")
    sharp_data = data.get("sharpness") or {}
    if "rho" in sharp_data:
        raise RecipeError("sharpness.rho: set the radii in sweep.sharpness_rhos")
    sharp = build(SharpnessSettings, {"rho": 1.0, **sharp_data}, "sharpness")
    sharp.validate()
    settings = data.get("settings") or {}
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise RecipeError("settings: expected a mapping of names to {dotted.key: value} mappings")
    for name in settings:
        if not isinstance(name, str) or not name or "/" in name or name.startswith(".") or name == "fp":
            raise RecipeError(f"settings: {name!r} is not a usable folder name")
    method_settings = data.get("method_settings") or {}
    if not isinstance(method_settings, dict) or not all(isinstance(v, dict) for v in method_settings.values()):
        raise RecipeError("method_settings: expected a mapping of methods to {dotted.key: value} mappings")
    distill = data.get("distill")
    if distill is not None and not isinstance(distill, dict):
        raise RecipeError("distill: expected a mapping of distillation settings (logits, hidden, attention, ...)")
    for m in method_settings:
        if m not in sweep.methods and m not in {split_kd(x)[0] for x in sweep.methods}:
            raise RecipeError(f"method_settings: {m!r} is not one of the grid's methods ({', '.join(sweep.methods)})")
    grid = Grid(sweep, data.get("finetune") or {}, data.get("quantize") or {}, sharp, settings, method_settings,
                distill)
    for t in sweep.tasks:
        get_task(t)
    for m in [*sweep.methods, *(sweep.sharpness_methods or []), *sweep.method_wbits]:
        if not is_known(m):
            raise RecipeError(f"sweep: unknown method {m!r}; allowed: {', '.join(sorted({'fp', *METHODS}))}, "
                              "qbert-mp<H> (Q-BERT mixed precision W/H)")
    if sweep.max_retries < 0:
        raise RecipeError(f"sweep.max_retries: {sweep.max_retries} must be >= 0")
    for key, value in (sweep.resources or {}).items():
        if not key or value < 0:
            raise RecipeError(f"sweep.resources.{key}: {value} must be >= 0")
    if any(r <= 0 for r in sweep.sharpness_rhos):
        raise RecipeError("sweep.sharpness_rhos: every radius must be > 0")
    if not sweep.tasks or not sweep.seeds:
        raise RecipeError("sweep: needs at least one task and one seed")
    per_chain = 1 + len(grid.setting_names()) * sum(len(set(sweep.method_wbits.get(m, sweep.wbits)))
                                                    for m in set(sweep.methods))
    per_chain *= 1 + len(set(sweep.sharpness_rhos))  # at most: every run scored at every radius
    jobs = len(set(sweep.tasks)) * len(set(sweep.seeds)) * per_chain
    if jobs > MAX_JOBS:
        raise RecipeError(f"sweep: the grid plans up to {jobs:,} jobs (more than {MAX_JOBS:,}); split it or cut "
                          "tasks, seeds, methods or bit widths")
    # validate every recipe the grid will use, before anything runs: a recipe differs across tasks and seeds only
    # in data.task and train.seed, so each task, each seed and each (method, bits, setting) is checked once
    first_task, first_seed = sweep.tasks[0], sweep.seeds[0]
    for t in dict.fromkeys(sweep.tasks):
        grid.fp_recipe(t, first_seed)
    for seed in dict.fromkeys(sweep.seeds):
        grid.fp_recipe(first_task, seed)
    for m in dict.fromkeys(sweep.methods):
        for b in dict.fromkeys(sweep.method_wbits.get(m, sweep.wbits)):
            for name in grid.setting_names():
                grid.quant_recipe(first_task, first_seed, m, b, setting=name)
    for t in dict.fromkeys(sweep.tasks):  # each task once through a quantized recipe as well
        for m in sweep.methods[:1]:
            for b in sweep.method_wbits.get(m, sweep.wbits)[:1]:
                grid.quant_recipe(t, first_seed, m, b, setting=grid.setting_names()[0])
    return grid
