"""The export format table: one record per format (how to write it, load it back, and recognise it on disk).

``squat export --format`` and ``squat evaluate`` consult it; a new format is
one new module under ``export/`` and one record here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from squat_cli.errors import RunError
from squat_cli.export.folder import MANIFEST_FILE


def _export_packed(run: Path, to: Optional[Path], **options) -> dict[str, Any]:
    from squat_cli.export.packed import export_packed

    return export_packed(run, to)


def _load_packed(path: Path):
    from squat_cli.export.loader import load_packed

    return load_packed(path)


def _export_onnx(run: Path, to: Optional[Path], weight_type: Optional[str] = None, **options) -> dict[str, Any]:
    from squat_cli.export.onnx import export_onnx

    return export_onnx(run, to, weight_type, **{k: v for k, v in options.items() if v is not None})


def _load_onnx(path: Path):
    from squat_cli.export.onnx_runtime import load_onnx

    return load_onnx(path)


def _manifest_format(folder: Path) -> Optional[str]:
    """The ``format`` an export folder's manifest declares (None: no readable manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return manifest.get("format") if isinstance(manifest, dict) else None


def _is_onnx(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".onnx"
    declared = _manifest_format(path) if path.is_dir() else None
    return declared == "squat-onnx" or declared is None and path.is_dir() and (path / "model.onnx").is_file()


def _is_packed(path: Path) -> bool:
    if not path.is_dir() or not (path / MANIFEST_FILE).is_file():
        return False
    declared = _manifest_format(path)
    return declared == "squat-packed" or declared not in ("squat-onnx",) and not (path / "model.onnx").is_file()


@dataclass(frozen=True)
class ExportFormat:
    name: str
    help: str
    export: Callable[..., dict[str, Any]]
    """(run folder, destination or None, **format options) -> the manifest written."""
    load: Callable[[Path], tuple]
    """path -> (model-like runner, tokenizer, manifest), checked against the manifest."""
    detect: Callable[[Path], bool]
    """Whether ``path`` holds an export of this format."""
    runs_in: Optional[str] = None
    """The precision it always runs in (ONNX graphs: fp32); None: the run's own."""
    options: tuple[str, ...] = ()
    """The format options ``export`` takes (``weight_type``, ``accuracy_level``, ``block_size``)."""

    def folder(self, path: Path) -> Path:
        """The export folder of ``path`` (a folder, or the file inside one)."""
        return path if path.is_dir() else path.parent


FORMATS: dict[str, ExportFormat] = {
    "packed": ExportFormat("packed", "safetensors of packed integer codes + manifest", _export_packed, _load_packed,
                           _is_packed),
    "onnx": ExportFormat("onnx", "graph for onnxruntime (QDQ; MatMulNBits kernels with --weight-type nbits)",
                         _export_onnx, _load_onnx, _is_onnx, runs_in="fp32",
                         options=("weight_type", "accuracy_level", "block_size")),
}


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise RunError(f"--format: {name!r} is not one of {', '.join(FORMATS)}")
    return FORMATS[name]


def detect(path: Path) -> str:
    """The format of what ``path`` holds (``packed``, ``onnx``), or ``run`` for a run folder; refused otherwise."""
    path = Path(path)
    for fmt in FORMATS.values():
        if fmt.detect(path):
            return fmt.name
    if path.is_dir() and ((path / "recipe.yaml").is_file() or (path / "metrics.json").is_file()):
        return "run"
    if not path.exists():
        raise RunError(f"no such file or folder: {path}")
    raise RunError(f"{path}: not a run folder, a packed export (manifest.json) or an ONNX export (.onnx)")
