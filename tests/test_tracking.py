"""train.report_to=tensorboard: the event file holds the loss, lr, SAM's gradient norm, step sizes, evaluations."""

import json

import pytest
from typer.testing import CliRunner

from squat_cli.cli import app

runner = CliRunner()
FAST = ["--set", "data.train_subset=48", "--set", "data.eval_subset=24", "--set", "train.batch_size=16",
        "--set", "quant.calib_batches=1"]


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((folder / "squat").glob("events.out.tfevents.*"))  # the scalars (hparams sit in a subfolder)
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_the_logged_values(tmp_path, glue_dir, tiny_bert):
    base = ["--task", "rte", "--data-dir", str(glue_dir), "--out", str(tmp_path)]
    res = runner.invoke(app, ["finetune", *base, "--model", str(tiny_bert), "--set", "data.train_subset=32",
                              "--set", "train.max_steps=2", "--set", "train.eval_strategy=end"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", *base, "--method", "squat", "--wbits", "2", "--rho", "0.05", *FAST,
                              "--set", "train.max_steps=4", "--set", "train.log_every=1", "--set", "train.lr=1e-4",
                              "--set", "train.scheduler=constant", "--set", "train.report_to=tensorboard"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "rte" / "squat-w2a8" / "seed42"
    s = _scalars(run / "tensorboard")
    assert [st for st, _ in s["train/loss"]] == [1, 2, 3, 4]
    assert all(v == pytest.approx(1e-4) for _, v in s["train/lr"])
    assert len(s["train/sam_grad_norm"]) == 4 and all(v > 0 for _, v in s["train/sam_grad_norm"])
    hist = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.json").read_text())
    # every evaluation (step 0 and the end), exactly as metrics.jsonl / metrics.json have it
    assert [st for st, _ in s["eval/accuracy"]] == [h["step"] for h in hist] == [0, 3, 4]  # start, epoch 1, end
    assert s["eval/accuracy"][-1][1] == pytest.approx(metrics["accuracy"])
    assert s["eval/eval_loss"][0][1] == pytest.approx(hist[0]["eval_loss"], rel=1e-6)
    assert s["quant/mean_wstep"][-1][1] == pytest.approx(hist[-1]["mean_wstep"], rel=1e-6)
    assert s["quant/mean_astep"][-1][1] == pytest.approx(hist[-1]["mean_astep"], rel=1e-6)
    # the train loss is each step's first-pass loss; metrics.json's train_loss is the last epoch's mean (step 4 alone)
    assert s["train/loss"][-1][1] == pytest.approx(metrics["train_loss"], rel=1e-5)


def test_off_by_default(tmp_path, glue_dir, tiny_bert):
    res = runner.invoke(app, ["finetune", "--task", "rte", "--data-dir", str(glue_dir), "--out", str(tmp_path),
                              "--model", str(tiny_bert), "--set", "data.train_subset=16", "--set", "train.max_steps=1",
                              "--set", "train.eval_strategy=end"])
    assert res.exit_code == 0 and not (tmp_path / "rte" / "fp" / "seed42" / "tensorboard").exists()
