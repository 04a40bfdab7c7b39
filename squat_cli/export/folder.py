"""What every export format shares: the export folder's manifest and its integrity record, where an export may be
written, which runs can be exported, and the source-run facts a manifest records (so ``squat evaluate`` scores it as
the run was scored).

Integrity (format version 2): the manifest lists every file the export wrote with its SHA-256 (``files``: weights
or graph, ``config.json``, the tokenizer's files) and carries the SHA-256 of its own content (``manifest_sha256``,
over the manifest without that key, as canonical JSON). A reader refuses the folder when the manifest's content,
any listed file, or the set of files differs, and refuses any referenced file that is not a plain name inside the
folder, before it reads that file. This catches damage and edits; it is not a signature (whoever can write the
folder can write a new consistent manifest).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from squat_cli.errors import RunError
from squat_cli.files import file_in_the_way, sha256_file
from squat_cli.runs import RunDir

MANIFEST_FILE = "manifest.json"
EXPORT_FORMATS = ("squat-packed", "squat-onnx")
UNLISTED = (MANIFEST_FILE, "eval_metrics.json")
"""Files an export folder may hold beyond its manifest's list: the manifest itself and ``squat evaluate``'s output."""
LEGACY_FILES = {"model.safetensors", "model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "vocab.txt", "added_tokens.json", "README.md"}
"""What format version 1 exports held (they list no files): a folder of only these may be replaced."""


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def seal(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Add the integrity record: every file in ``folder`` (but the manifest) with its SHA-256, then the
    manifest's own digest. Returns the manifest to write."""
    folder = Path(folder)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in UNLISTED}
    sealed = {**manifest, "files": files}
    sealed["manifest_sha256"] = manifest_digest(sealed)
    return sealed


def plain_name(manifest: dict[str, Any], key: str, file: Path) -> str:
    """``manifest[key]`` as a file name inside the folder: no path, no ``..``, listed in ``files``."""
    name = manifest.get(key)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise RunError(f"{file}: {key} {name!r} is not a file name inside the export folder")
    if name not in (manifest.get("files") or {}):
        raise RunError(f"{file}: {key} {name!r} is not among the files the manifest lists")
    return name


def verify(manifest: dict[str, Any], folder: Path) -> None:
    """The export folder is as written: manifest digest, every listed file's SHA-256, no file added or missing."""
    folder = Path(folder)
    file = folder / MANIFEST_FILE
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise RunError(f"{file}: its content differs from its SHA-256 record: the manifest is damaged or was altered")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise RunError(f"{file}: no valid list of files")
    for name in files:
        if Path(name).name != name or name in (".", ".."):
            raise RunError(f"{file}: lists {name!r}, which is not a file name inside the export folder")
    present = {p.name for p in folder.iterdir() if p.name not in UNLISTED}
    if present - set(files):
        raise RunError(f"{folder}: holds files the export did not write ({', '.join(sorted(present - set(files))[:3])})")
    for name, digest in files.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise RunError(f"{path}: missing")
        if sha256_file(path) != digest:
            raise RunError(f"{path}: its SHA-256 differs from the manifest's: the file is damaged or was altered")


def read_manifest_file(folder: Path, fmt: str, version: int, hint: str) -> dict[str, Any]:
    """``folder/manifest.json``, checked to be a ``fmt`` manifest of format ``version`` whose folder is as written
    (``verify``); ``hint`` says how to make one when it is missing."""
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
    if not isinstance(found, int) or isinstance(found, bool):
        raise RunError(f"{file}: format version {found!r} is not a whole number")
    if found > version:
        raise RunError(f"{file}: format version {found} is newer than this squat reads ({version})")
    if found < version:
        raise RunError(f"{file}: format version {found} was written by an older squat and carries no integrity "
                       "record; export the run again")
    verify(manifest, folder)
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


def source_settings(manifest: dict[str, Any], file: Path) -> dict[str, Any]:
    """The manifest's ``source_run`` checked as a recipe would be (task, data settings, batch size, precision):
    what ``squat evaluate`` scores the export with. One line naming the key on anything wrong."""
    from squat_cli.errors import SquatError
    from squat_cli.recipe import recipe_from_dict
    from squat_cli.tasks import get_task

    src = manifest.get("source_run")
    if not isinstance(src, dict):
        raise RunError(f"{file}: no source_run record (which run, task and data settings)")
    for key in ("task", "data", "eval_batch_size", "precision"):
        if key not in src:
            raise RunError(f"{file}: source_run lacks {key}")
    if not isinstance(src["data"], dict):
        raise RunError(f"{file}: source_run.data is not a mapping")
    try:
        ref = src["data"].get("task") if isinstance(src["data"].get("task"), dict) else src["task"]
        get_task(ref)
        recipe_from_dict({"data": {**src["data"], "task": ref},
                          "train": {"eval_batch_size": src["eval_batch_size"], "precision": src["precision"]}}
                         ).complete()
    except SquatError as exc:
        raise RunError(f"{file}: source_run: {exc}") from None
    return src


def source_task(src: dict[str, Any]):
    """The task of a manifest's (checked) ``source_run``: a user task's definition is stored in its data."""
    from squat_cli.tasks import get_task

    ref = src["data"].get("task")
    return get_task(ref if isinstance(ref, dict) else src["task"])


def check_destination(out: Path) -> None:
    """An export replaces only an earlier squat export (its manifest says so and the folder holds nothing squat did
    not write) or an empty folder; anything else is refused, so no other file is ever deleted."""
    out = Path(out)
    if out.is_symlink():
        raise RunError(f"--to {out}: is a symbolic link; give the folder itself")
    blocker = file_in_the_way(out)
    if blocker == out:
        raise RunError(f"--to {out}: a file is in the way (an export is a folder)")
    if blocker is not None:
        raise RunError(f"--to {out}: {blocker} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    refuse = f"--to {out}: the folder exists and is not a squat export; choose a new or empty folder"
    try:
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        raise RunError(refuse) from None
    if not isinstance(manifest, dict) or manifest.get("format") not in EXPORT_FORMATS:
        raise RunError(refuse)
    listed = manifest.get("files")
    allowed = set(listed) if isinstance(listed, dict) else LEGACY_FILES
    extra = sorted(p.name for p in out.iterdir() if p.name not in allowed and p.name not in UNLISTED)
    if extra or any(p.is_dir() for p in out.iterdir()):
        what = ", ".join(extra[:3]) or "a sub-folder"
        raise RunError(f"--to {out}: holds files squat did not write ({what}); choose a new or empty folder")


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
