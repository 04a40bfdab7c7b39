"""What every export format shares: the export folder's manifest, where an export may be written, which runs can
be exported, and the source-run facts a manifest records (so ``squat evaluate`` scores it as the run was scored)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from squat_cli.errors import RunError
from squat_cli.runs import RunDir

MANIFEST_FILE = "manifest.json"


def read_manifest_file(folder: Path, fmt: str, version: int, hint: str) -> dict[str, Any]:
    """``folder/manifest.json``, checked to be a ``fmt`` manifest no newer than ``version``; ``hint`` says how to
    make one when it is missing."""
    file = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{file}: missing ({hint})") from None
    except (ValueError, UnicodeDecodeError):
        raise RunError(f"{file}: damaged (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise RunError(f"{file}: not a {fmt} manifest")
    found = manifest.get("format_version")
    if not isinstance(found, int) or found > version:
        raise RunError(f"{file}: format version {found!r} is newer than this squat reads ({version})")
    return manifest


def run_facts(run: RunDir, recipe) -> dict[str, Any]:
    m = run.metrics()
    keep = ("task", "method", "wbits", "abits", "seed", "model", "main_metric", "eval_loss")
    facts = {k: m[k] for k in keep if k in m}
    facts["path"] = str(run.path)
    facts["precision"] = recipe.train.precision
    facts["eval_batch_size"] = recipe.train.eval_batch_size
    facts["data"] = {**asdict(recipe.data), "data_dir": None}  # the reader says where its GLUE files are
    return facts


def check_destination(out: Path) -> None:
    """An export replaces only an earlier export (or an empty folder): never a folder holding anything else."""
    out = Path(out)
    if out.is_file() or out.is_symlink():
        raise RunError(f"--to {out}: a file is in the way (an export is a folder)")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise RunError(f"--to {out}: the folder exists and is not a squat export; choose a new or empty folder")


def check_exportable(run: RunDir) -> None:
    if not run.path.is_dir():
        raise RunError(f"no run folder at {run.path}")
    if run.is_failed():
        raise RunError(f"{run.path} is a failed run (FAILED.json): nothing to export")
    if not run.is_complete():
        raise RunError(f"{run.path} is not a finished run (no metrics.json)")
    try:
        json.loads(run.metrics_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise RunError(f"{run.metrics_file}: damaged (not JSON)") from None
