"""The export format table (export/formats.py): every format is recognised on disk by its own record only, and
the CLI's --format choices are the table's."""

import pytest
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.errors import RunError
from squat_cli.export.formats import FORMATS, detect, get_format

runner = CliRunner()


def _layout(tmp_path, kind):
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    if kind == "onnx":
        (folder / "model.onnx").write_bytes(b"")
    return folder


def test_each_format_detects_its_own_folder_only(tmp_path):
    folders = {name: _layout(tmp_path, name) for name in FORMATS}
    for name, folder in folders.items():
        assert [f.name for f in FORMATS.values() if f.detect(folder)] == [name]
        assert detect(folder) == name
    assert detect(folders["onnx"] / "model.onnx") == "onnx"  # the graph file itself
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("{}")
    assert detect(run) == "run"
    with pytest.raises(RunError, match="no such file or folder"):
        detect(tmp_path / "missing")
    with pytest.raises(RunError, match="not a run folder, a packed export"):
        detect(tmp_path)


def test_format_choices_come_from_the_table(tmp_path):
    with pytest.raises(RunError, match="--format: 'zip' is not one of packed, onnx"):
        get_format("zip")
    res = runner.invoke(app, ["export", str(tmp_path), "--format", "zip"])
    assert res.exit_code == 2 and "is not one of packed, onnx" in res.output
    res = runner.invoke(app, ["export", "--help"])
    assert all(f"{f.name}: {f.help}" in " ".join(res.output.split()) for f in FORMATS.values())
