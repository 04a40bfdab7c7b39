"""Multi-process data parallel (gloo, 2 CPU processes via torchrun) and bf16 autocast."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from squat_cli.cli import app
from tests.conftest import make_tiny_bert

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
SETS = ["--set", "data.train_subset=32", "--set", "data.eval_subset=16", "--set", "train.batch_size=8",
        "--set", "train.eval_strategy=end", "--set", "train.eval_at_start=false", "--set", "quant.calib_batches=1"]


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory, glue_dir, minilm_dir):
    """An FP run of a dropout-free tiny BERT (so one and two processes see identical passes)."""
    root = tmp_path_factory.mktemp("par")
    model = make_tiny_bert(root / "model", minilm_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    res = runner.invoke(app, ["finetune", "--task", "rte", "--model", str(model), "--data-dir", str(glue_dir),
                              "--out", str(root / "runs"), *SETS, "--set", "train.max_steps=2"])
    assert res.exit_code == 0, res.output
    return root / "runs"


def _torchrun(args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "squat_cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _copy_fp(src: Path, dst: Path) -> None:
    shutil.copytree(src / "rte" / "fp", dst / "rte" / "fp")


@pytest.mark.parametrize("method", ["squat", "joint"])
def test_two_processes_synced_equal_one_process(tmp_path, glue_dir, fp_run, method):
    for name in ("one", "two"):
        _copy_fp(fp_run, tmp_path / name)
    q = ["quantize", "--task", "rte", "--method", method, "--wbits", "2", "--rho", "0.05", "--data-dir",
         str(glue_dir), *SETS, "--set", "train.max_steps=3", "--set", "train.optimizer=sgd", "--set", "train.lr=0.5",
         "--set", "sam.sync_perturbation=true"]
    res = runner.invoke(app, [*q, "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    _torchrun([*q, "--out", str(tmp_path / "two")])
    a, b = (tmp_path / n / "rte" / f"{method}-w2a8" / "seed42" for n in ("one", "two"))
    assert json.loads((b / "environment.json").read_text())["processes"] == 2
    ta, tb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    start = load_file(str(fp_run / "rte" / "fp" / "seed42" / "model" / "model.safetensors"))
    moved = max(float((ta[k] - start[k]).abs().max()) for k in ta)
    diff = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert moved > 1e-3 and diff < 1e-5  # same parameters, to float tolerance
    qa, qb = load_file(str(a / "quantizer.safetensors")), load_file(str(b / "quantizer.safetensors"))
    assert all(torch.allclose(qa[k].float(), qb[k].float(), atol=1e-6) for k in qa)


def test_default_per_process_perturbation_learns(tmp_path, glue_dir, fp_run):
    _copy_fp(fp_run, tmp_path)
    _torchrun(["quantize", "--task", "rte", "--method", "squat", "--wbits", "4", "--rho", "0.05", "--data-dir",
               str(glue_dir), "--out", str(tmp_path), "--set", "data.train_subset=16", "--set",
               "data.eval_subset=16", "--set", "train.batch_size=8", "--set", "train.epochs=40", "--set",
               "train.lr=1e-2", "--set", "quant.calib_batches=1", "--set", "train.eval_at_start=false"])
    hist = [json.loads(x) for x in (tmp_path / "rte" / "squat-w4a8" / "seed42" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 40
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]  # memorises 16 examples


@pytest.mark.parametrize("method", ["lsq", "squat"])
def test_bf16_end_to_end(tmp_path, glue_dir, fp_run, method):
    _copy_fp(fp_run, tmp_path)
    res = runner.invoke(app, ["quantize", "--task", "rte", "--method", method, "--wbits", "2", "--data-dir",
                              str(glue_dir), "--out", str(tmp_path), *SETS, "--set", "train.max_steps=3",
                              "--set", "train.precision=bf16", "--set", "train.lr=1e-3"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "rte" / f"{method}-w2a8" / "seed42"
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 3 and torch.isfinite(torch.tensor(m["eval_loss"]))
    assert json.loads((run / "environment.json").read_text())["precision"] == "bf16"


def test_aux_precision_end_to_end(tmp_path, glue_dir, fp_run):
    """squat with train.aux_precision=bf16 through the CLI: trains, records the choice; the loop's autocasts."""
    from squat_cli.recipe import TrainConfig
    from squat_cli.train.loop import aux_autocast, make_accelerator

    _copy_fp(fp_run, tmp_path)
    res = runner.invoke(app, ["quantize", "--task", "rte", "--method", "squat", "--wbits", "2", "--data-dir",
                              str(glue_dir), "--out", str(tmp_path), *SETS, "--set", "train.max_steps=3",
                              "--set", "train.aux_precision=bf16", "--set", "train.lr=1e-3"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "rte" / "squat-w2a8" / "seed42"
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 3 and torch.isfinite(torch.tensor(m["eval_loss"]))
    assert "aux_precision: bf16" in (run / "recipe.yaml").read_text()
    acc = make_accelerator("fp32")
    assert aux_autocast(TrainConfig(), acc) is None
    assert aux_autocast(TrainConfig(precision="bf16", aux_precision="bf16"), acc) is None  # already the run's
    with aux_autocast(TrainConfig(aux_precision="bf16"), acc)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_bf16_autocast_is_on_and_sam_stays_fp32():
    from squat_cli.quant.convert import calibrate, quantize_model
    from squat_cli.recipe import QuantConfig
    from squat_cli.train.loop import make_accelerator
    from squat_cli.train.sam import Perturbation
    from tests.quant_helpers import batches, tiny_bert

    acc = make_accelerator("bf16")
    model = tiny_bert()
    quantize_model(model, QuantConfig(method="lsq", wbits=2))
    calibrate(model, batches(1))
    p = Perturbation(model)
    p.capture(True)
    with acc.autocast():
        out = model(**batches(1)[0])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    p.apply(0.1)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.eps.dtype == torch.float32
    p.restore()
    make_accelerator("fp32")
