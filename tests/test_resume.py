"""Runs that survive: exact resume after SIGKILL, divergence guard, damaged checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.train.checkpoint import read_checkpoint
from tests.conftest import finetune_tiny

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# 64 examples, batch 8: 8 steps an epoch, 2 epochs; checkpoints every 3 steps and at epoch ends.
SETS = ["--set", "data.train_subset=64", "--set", "data.eval_subset=24", "--set", "train.batch_size=8",
        "--set", "train.epochs=2", "--set", "train.save_every=3", "--set", "train.eval_batch_size=8"]

KILLER = """
import os, signal, sys
import squat_cli.train.strategies as s
kill_after = int(os.environ["KILL_AFTER_STEP"])
orig = s.Strategy.step if "{cls}" == "Strategy" else s.{cls}.step
def step(self, batch):
    out = orig(self, batch)
    if self.step_count == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(s.{cls}, "step", step)
sys.argv = ["squat"] + sys.argv[1:]
from squat_cli.cli import main
main()
"""


def _killed(args, kill_after, cls="Strategy"):
    env = dict(os.environ, KILL_AFTER_STEP=str(kill_after), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", KILLER.format(cls=cls), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr  # really killed by SIGKILL
    return proc


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: m[k] for k in ("accuracy", "eval_loss", "steps", "train_loss")}


def test_finetune_killed_mid_epoch_resumes_exactly(tmp_path, glue_dir, tiny_bert):
    base = ["finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir), *SETS]
    ref = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert ref.exit_code == 0, ref.output
    _killed([*base, "--out", str(tmp_path / "b")], kill_after=11)  # epoch 2, after the checkpoint at step 9
    run_b = tmp_path / "b" / "rte" / "fp" / "seed42"
    assert not (run_b / "metrics.json").exists()
    _, _, _, state = read_checkpoint(run_b / "checkpoint")
    assert state["loop"]["step"] == 9 and state["loop"]["epoch"] == 1 and state["loop"]["batch"] == 1
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "pass --resume to continue it or --force" in res.output
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--resume"])
    assert res.exit_code == 0, res.output
    run_a = tmp_path / "a" / "rte" / "fp" / "seed42"
    assert _metrics(run_a) == _metrics(run_b)
    _same_tensors(run_a / "model" / "model.safetensors", run_b / "model" / "model.safetensors")
    hist_a = [json.loads(x) for x in (run_a / "metrics.jsonl").read_text().splitlines()]
    hist_b = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist_b] == [h["step"] for h in hist_a] == [8, 16]
    assert not (run_b / "checkpoint").exists()  # removed once the run finished


@pytest.fixture(scope="module")
def fp_root(tmp_path_factory, glue_dir, tiny_bert):
    return finetune_tiny(tmp_path_factory.mktemp("resume_fp"), glue_dir, tiny_bert, SETS)


@pytest.mark.parametrize("extra", [[], ["--set", "quant.step_size_grad=reuse"],
                                   ["--set", "sam.every=2", "--set", "sam.probability=0.7"],
                                   ["--distill", "--set", "distill.attention=1", "--set", "distill.hidden=1"]],
                         ids=["fresh", "reuse", "every2-rst", "distill"])
def test_squat_killed_resumes_exactly(tmp_path, glue_dir, fp_root, extra):
    import shutil

    for name in ("a", "b"):
        shutil.copytree(fp_root / "rte" / "fp", tmp_path / name / "rte" / "fp")
    base = ["quantize", "--task", "rte", "--method", "squat", "--wbits", "2", "--rho", "0.05", "--data-dir",
            str(glue_dir), *SETS, "--set", "train.lr=1e-3", *extra]
    ref = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert ref.exit_code == 0, ref.output
    _killed([*base, "--out", str(tmp_path / "b")], kill_after=5, cls="SQuAT")  # mid-epoch 1, after step 3's checkpoint
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--resume"])
    assert res.exit_code == 0, res.output
    variant = "squat+kd-w2a8" if "--distill" in extra else "squat-w2a8"
    a, b = (tmp_path / n / "rte" / variant / "seed42" for n in "ab")
    assert _metrics(a) == _metrics(b)
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()  # the loss terms too
    _same_tensors(a / "model" / "model.safetensors", b / "model" / "model.safetensors")
    _same_tensors(a / "quantizer.safetensors", b / "quantizer.safetensors")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, glue_dir, tiny_bert, monkeypatch):
    import squat_cli.train.strategies as s

    orig = s.Strategy.loss

    def poisoned(self, batch):
        if self.step_count == 4:  # the 5th step
            with torch.no_grad():
                self.ctx.core.classifier.bias.fill_(float("nan"))
        return orig(self, batch)

    monkeypatch.setattr(s.Strategy, "loss", poisoned)
    res = runner.invoke(app, ["finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
                              "--out", str(tmp_path), *SETS])
    assert res.exit_code == 2
    out = res.output.strip()
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: non-finite loss (nan) at step 5"] and "Traceback" not in out
    run = tmp_path / "rte" / "fp" / "seed42"
    assert (run / "FAILED.json").is_file() and not (run / "metrics.json").exists()
    model_t, _, _, state = read_checkpoint(run / "checkpoint")
    assert state["loop"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in model_t.values() if v.is_floating_point())
    from squat_cli.sweep import Job, job_status

    assert job_status(Job("fp", "rte", 42, "fp"), tmp_path) == "failed"


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_refused(tmp_path, glue_dir, tiny_bert, damage):
    base = ["finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
            "--out", str(tmp_path), *SETS]
    _killed(base, kill_after=4)
    f = tmp_path / "rte" / "fp" / "seed42" / "checkpoint" / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-10] ^= 0xFF
        f.write_bytes(bytes(data))
    res = runner.invoke(app, [*base, "--resume"])
    assert res.exit_code == 2
    assert "model.safetensors does not match its recorded hash (truncated or modified)" in res.output
    assert "Traceback" not in res.output


def test_resume_with_other_recipe_is_refused(tmp_path, glue_dir, tiny_bert):
    base = ["finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
            "--out", str(tmp_path), *SETS]
    _killed(base, kill_after=4)
    res = runner.invoke(app, [*base, "--resume", "--set", "train.lr=0.1"])
    assert res.exit_code == 2 and "the recipe differs from the one its checkpoint was made with" in res.output


def test_run_folders_hold_no_pickles(fp_root):
    run = fp_root / "rte" / "fp" / "seed42"
    files = [p.name for p in run.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert "trust_remote_code: false" in (run / "recipe.yaml").read_text()
