"""Real low-bit models from squat runs: packed integer codes (safetensors + manifest) and ONNX graphs (QDQ or
onnxruntime's low-bit kernels).

The format table is ``formats.py``; ``load_packed`` and ``export_packed`` are loaded on first use (the CLI
reads the table without importing torch)."""

__all__ = ["export_packed", "load_onnx", "load_packed"]


def __getattr__(name: str):
    if name == "load_packed":
        from squat_cli.export.loader import load_packed

        return load_packed
    if name == "load_onnx":
        from squat_cli.export.onnx_runtime import load_onnx

        return load_onnx
    if name == "export_packed":
        from squat_cli.export.packed import export_packed

        return export_packed
    raise AttributeError(name)
