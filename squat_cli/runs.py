"""Run folders: layout, discovery, completeness (the safe writes they use are ``squat_cli.files``).

    <runs>/<task>/<variant>/seed<k>/
      recipe.yaml            the resolved recipe, exactly what ran
      environment.json       versions, device, command line
      metrics.jsonl          one line per evaluation
      metrics.json           final metrics; its presence marks the run complete
      model/                 save_pretrained output (safetensors) + tokenizer
      quantizer.safetensors  step sizes and quantizer settings (quantized runs)
      sharpness.json         {key: score and settings} (after ``squat sharpness``)

``<variant>`` is ``fp`` or ``<method>-w<W>a<A>`` (``squat-w2a8``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from squat_cli.errors import RunError
from squat_cli.files import read_json, write_text

RUN_RE = re.compile(r"^seed(\d+)$")


def variant_name(method: Optional[str], wbits: int = 32, abits: int = 32) -> str:
    """``fp`` for plain fine-tuning, else ``<method>-w<W>a<A>``."""
    if method in (None, "fp"):
        return "fp"
    return f"{method}-w{wbits}a{abits}"


def parse_variant(variant: str) -> tuple[str, int, int]:
    """Inverse of ``variant_name``: ("fp", 32, 32) or (method, wbits, abits)."""
    if variant == "fp":
        return "fp", 32, 32
    m = re.match(r"^(.+)-w(\d+)a(\d+)$", variant)
    if not m:
        raise RunError(f"{variant!r} is not a run variant (fp or <method>-w<W>a<A>)")
    return m.group(1), int(m.group(2)), int(m.group(3))


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def for_run(cls, root: Path | str, task: str, variant: str, seed: int) -> "RunDir":
        return cls(Path(root) / task / variant / f"seed{seed}")

    # identity -----------------------------------------------------------
    def identity(self) -> tuple[str, str, int]:
        """(task, variant, seed): from the path when it is laid out as ``<task>/<variant>/seed<k>`` (``.`` and
        relative paths resolved), else from the run's own recipe, so a run folder copied or renamed
        (``myruns/best-model``) is still the run it was."""
        here = self.path.absolute()
        m = RUN_RE.match(here.name)
        if m and here.parent.name and here.parent.parent.name:
            try:
                parse_variant(here.parent.name)
                return here.parent.parent.name, here.parent.name, int(m.group(1))
            except RunError:
                pass
        return self._identity_from_recipe()

    def _identity_from_recipe(self) -> tuple[str, str, int]:
        from squat_cli.errors import SquatError
        from squat_cli.recipe import recipe_from_dict
        from squat_cli.yaml_safe import read_yaml

        if not self.recipe_file.is_file():
            raise RunError(f"{self.path}: not a run folder (no recipe.yaml, and not laid out as "
                           ".../<task>/<variant>/seed<k>)")
        try:
            recipe = recipe_from_dict(read_yaml(self.recipe_file)).complete()
        except SquatError as exc:
            raise RunError(f"{self.recipe_file}: {exc}") from None
        from squat_cli.tasks import task_name

        variant = "fp" if recipe.quant is None else variant_name(*recipe.variant_parts())
        return task_name(recipe.data.task), variant, recipe.train.seed

    @property
    def task(self) -> str:
        return self.identity()[0]

    @property
    def variant(self) -> str:
        return self.identity()[1]

    @property
    def seed(self) -> int:
        return self.identity()[2]

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def history_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def quantizer_file(self) -> Path:
        return self.path / "quantizer.safetensors"

    @property
    def sharpness_file(self) -> Path:
        return self.path / "sharpness.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def failed_file(self) -> Path:
        return self.path / "FAILED.json"

    # replacing a finished run (--force) ----------------------------------
    def _previous(self) -> list[Path]:
        return sorted(self.path.parent.glob(f".{self.path.name}.previous-*"))

    def set_aside(self) -> None:
        """Before a forced rerun: move a finished run out of the way (kept until the new one completes)."""
        if self.path.exists() and self.is_complete() and not self._previous():
            os.replace(self.path, self.path.with_name(f".{self.path.name}.previous-{os.getpid()}"))
        elif self.path.exists():
            shutil.rmtree(self.path)

    def restore_previous(self) -> bool:
        """The new run failed or was interrupted: put the finished run set aside back. True if there was one."""
        prev = self._previous()
        if not prev:
            return False
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(prev[-1], self.path)
        return True

    def drop_previous(self) -> None:
        """The new run completed: the one it replaces goes."""
        for p in self._previous():
            shutil.rmtree(p, ignore_errors=True)

    def recover(self) -> None:
        """Before a run starts again: a finished run left aside by a killed forced rerun comes back (unless the
        rerun can resume from a checkpoint), and stale temporary folders of killed writes are removed."""
        if self._previous() and not self.is_complete() and not (self.checkpoint_dir / "manifest.json").is_file():
            self.restore_previous()
        if self.path.is_dir():
            for stale in [*self.path.glob(".*.tmp-*"), *self.path.glob(".*.old-*")]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

    # state ----------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.metrics_file.is_file()

    def is_failed(self) -> bool:
        return self.failed_file.is_file() and not self.is_complete()

    def metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_file)

    def sharpness_scores(self) -> dict[str, Any]:
        """Stored sharpness scores by key (``ascent/rho=0.05``); empty if none or unreadable."""
        if not self.sharpness_file.is_file():
            return {}
        try:
            scores = read_json(self.sharpness_file)
        except RunError:
            return {}
        return scores if isinstance(scores, dict) else {}

    def append_history(self, record: dict[str, Any]) -> None:
        old = self.history_file.read_text(encoding="utf-8") if self.history_file.is_file() else ""
        write_text(self.history_file, old + json.dumps(record) + "\n")

    def write_history(self, records: list[dict[str, Any]]) -> None:
        write_text(self.history_file, "".join(json.dumps(r) + "\n" for r in records))

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        return [json.loads(line) for line in self.history_file.read_text(encoding="utf-8").splitlines() if line]


def discover(root: Path | str) -> list[RunDir]:
    """Every ``<task>/<variant>/seed<k>`` folder under ``root`` (complete or not), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [RunDir(p) for p in root.glob("*/*/seed*") if p.is_dir() and RUN_RE.match(p.name)]
    return sorted(found, key=lambda r: (r.task, r.variant, r.seed))


def environment(device: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Versions, device and command line, for ``environment.json``."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("squat", "torch", "transformers", "accelerate", "datasets", "safetensors", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    import torch

    env = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "device": device,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        # bf16 CPU kernels are chosen by the CPU's features: the same seed and versions can train differently on
        # another CPU, so the run says which one it had
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": sys.argv,
    }
    env.update(extra or {})
    return env


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[str]:
    """The CPU's model name (Linux: /proc/cpuinfo's first ``model name``; elsewhere ``platform.processor()``)."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None
