"""Real low-bit models from squat runs: packed integer codes (safetensors + manifest) and ONNX QDQ graphs."""

from squat_cli.export.loader import load_packed
from squat_cli.export.packed import export_packed

__all__ = ["export_packed", "load_packed"]
