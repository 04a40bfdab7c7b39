"""Run folders survive mistakes: --force keeps the finished run until the new one completes; killed checkpoint
writes leave nothing stale and lose no complete checkpoint; unwritable outputs fail early with one line."""

import json
import os
import shutil

import pytest
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.runs import RunDir

runner = CliRunner()
SETS = ["--set", "data.train_subset=32", "--set", "data.eval_subset=16", "--set", "train.batch_size=16",
        "--set", "train.max_steps=2", "--set", "train.eval_strategy=end"]


def _finetune(root, glue_dir, tiny_bert, *extra):
    return runner.invoke(app, ["finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
                               "--out", str(root), *SETS, *extra])


@pytest.fixture
def finished(tmp_path, glue_dir, tiny_bert):
    res = _finetune(tmp_path, glue_dir, tiny_bert)
    assert res.exit_code == 0, res.output
    run = RunDir.for_run(tmp_path, "rte", "fp", 42)
    return run, run.metrics_file.read_text()


@pytest.mark.parametrize("failure", ["interrupt", "divergence", "error"])
def test_force_keeps_the_finished_run_until_the_new_one_completes(finished, glue_dir, tiny_bert, monkeypatch,
                                                                   failure):
    import squat_cli.train.strategies as S
    from squat_cli.errors import DivergenceError, SquatError

    run, before = finished
    exc = {"interrupt": KeyboardInterrupt(), "divergence": DivergenceError("non-finite loss (nan) at step 1"),
           "error": SquatError("boom")}[failure]

    def broken(self, batch):
        raise exc

    monkeypatch.setattr(S.Plain, "step", broken)
    res = _finetune(run.path.parents[2], glue_dir, tiny_bert, "--force", "--set", "train.lr=3e-5")
    assert res.exit_code != 0
    assert run.metrics_file.read_text() == before  # the old run is back, whole
    assert not run.failed_file.exists() and (run.model_dir / "model.safetensors").is_file()
    assert not list(run.path.parent.glob(".seed42.previous-*"))
    monkeypatch.undo()
    res = _finetune(run.path.parents[2], glue_dir, tiny_bert, "--force", "--set", "train.lr=3e-5")
    assert res.exit_code == 0, res.output
    assert run.metrics_file.read_text() != before and not list(run.path.parent.glob(".seed42.previous-*"))


def test_killed_forced_rerun_gives_the_old_run_back(finished, glue_dir, tiny_bert):
    """SIGKILL during a forced rerun, before its first checkpoint: the next start restores the finished run."""
    run, before = finished
    aside = run.path.with_name(".seed42.previous-999999")
    os.replace(run.path, aside)
    run.path.mkdir()
    (run.path / "recipe.yaml").write_text("train: {}\n")  # the killed rerun's partial folder
    res = _finetune(run.path.parents[2], glue_dir, tiny_bert)  # no --force: the finished run counts
    assert res.exit_code == 0 and "skipped" in res.output.lower()
    assert run.metrics_file.read_text() == before and not aside.exists()


def test_stale_checkpoint_folders_are_cleaned_and_a_complete_one_recovered(tmp_path, tiny_bert):
    """Killed mid-write: .checkpoint.tmp-<pid> leftovers go; killed between the two renames (no checkpoint/, the
    old and the new copy aside): the newest complete copy becomes checkpoint/ instead of a silent restart."""
    import torch

    from squat_cli.train.checkpoint import checkpoint_step, recover_checkpoint, save_checkpoint
    from tests.quant_helpers import tiny_bert as tiny

    run = RunDir.for_run(tmp_path, "rte", "fp", 1)
    run.path.mkdir(parents=True)
    model = tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (3, 6):
        save_checkpoint(run.checkpoint_dir, model, {"w": opt}, {}, {"step": step, "history": []})
    pid = 4242
    old = run.path / f".checkpoint.old-{pid}"
    os.replace(run.checkpoint_dir, old)  # the step-6 checkpoint, moved aside by the next write
    save_checkpoint(run.path / "next", model, {"w": opt}, {}, {"step": 9, "history": []})
    os.replace(run.path / "next", run.path / f".checkpoint.tmp-{pid}")  # the complete new copy, not yet renamed
    (run.path / ".checkpoint.tmp-77").mkdir()  # a write killed half-way: incomplete
    (run.path / ".checkpoint.tmp-77" / "model.safetensors").write_bytes(b"partial")
    assert recover_checkpoint(run.checkpoint_dir) == run.checkpoint_dir
    assert checkpoint_step(run.checkpoint_dir) == 9
    shutil.copytree(old, tmp_path / "kept")
    run.recover()
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoint"]
    shutil.rmtree(run.checkpoint_dir)
    os.replace(tmp_path / "kept", old)  # only the old copy survived: it is used
    assert recover_checkpoint(run.checkpoint_dir) and checkpoint_step(run.checkpoint_dir) == 6


@pytest.mark.parametrize("case", ["file", "readonly", "long"])
def test_unwritable_out_fails_first_with_one_line(tmp_path, glue_dir, tiny_bert, case):
    if case == "file":
        out = tmp_path / "afile"
        out.write_text("x")
    elif case == "readonly":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    else:
        out = tmp_path / ("x" * 300)
    res = _finetune(out, glue_dir, tiny_bert)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "Traceback" not in res.output
    res = runner.invoke(app, ["report", "--out", str(tmp_path), "--reports", str(tmp_path / "afile" / "sub")
                              if case == "file" else str(out)])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_metrics_json_content_untouched_by_a_skip(finished, glue_dir, tiny_bert):
    run, before = finished
    assert _finetune(run.path.parents[2], glue_dir, tiny_bert).exit_code == 0
    assert run.metrics_file.read_text() == before and json.loads(before)["steps"] == 2
