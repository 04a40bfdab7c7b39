"""`squat finetune` end to end on a tiny random BERT; bad input through the CLI."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from squat_cli.cli import app

runner = CliRunner()

FAST = ["--set", "data.train_subset=64", "--set", "data.eval_subset=32", "--set", "train.batch_size=16",
        "--set", "train.max_steps=6", "--set", "train.eval_strategy=end"]


def _finetune(tmp_path, glue_dir, model, *extra):
    return runner.invoke(app, ["finetune", "--task", "rte", "--model", str(model), "--data-dir", str(glue_dir),
                               "--out", str(tmp_path / "runs"), *FAST, *extra])


def test_tiny_run_folder_skip_and_force(tmp_path, glue_dir, tiny_bert):
    res = _finetune(tmp_path, glue_dir, tiny_bert)
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "rte" / "fp" / "seed42"
    names = {p.name for p in run.iterdir()}
    assert {"recipe.yaml", "metrics.json", "metrics.jsonl", "environment.json", "model"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary leftovers
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "rte" and m["steps"] == 6 and m["dev_sizes"] == {"dev": 32}
    assert 0 <= m["accuracy"] <= 1 and m["wall_time_s"] > 0 and m["train_examples"] == 64
    # training time excludes evaluation and saving; samples/s counts the examples of the 6 steps' epochs
    assert 0 < m["train_time_s"] < m["wall_time_s"] < m["job_time_s"]  # the job adds loading to the loop's time
    assert 0 < m["cpu_share"] < 4  # CPU time of the steps over their wall time x torch's threads (about 1 alone)
    assert m["train_samples_per_s"] == pytest.approx(64 * m["epochs"] / m["train_time_s"], rel=0.05)
    rec = yaml.safe_load((run / "recipe.yaml").read_text())
    assert rec["data"]["task"] == "rte" and rec["train"]["max_steps"] == 6 and rec["model"]["name_or_path"] == str(tiny_bert)
    env = json.loads((run / "environment.json").read_text())
    assert env["device"] == "cpu" and env["versions"]["torch"]
    assert env["cpu_capability"] in {"DEFAULT", "AVX2", "AVX512", "ZVECTOR", "VSX", "SVE256"} and env["cpu"]
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert not list((run / "model").glob("*.bin"))
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert hist[-1]["step"] == 6 and hist[-1]["accuracy"] == m["accuracy"]

    stamp = (run / "metrics.json").stat().st_mtime_ns
    res = _finetune(tmp_path, glue_dir, tiny_bert)
    assert res.exit_code == 0 and "skipped" in res.output
    assert (run / "metrics.json").stat().st_mtime_ns == stamp

    res = _finetune(tmp_path, glue_dir, tiny_bert, "--force")
    assert res.exit_code == 0 and "skipped" not in res.output
    assert (run / "metrics.json").stat().st_mtime_ns != stamp
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["accuracy"] == m["accuracy"] and m2["eval_loss"] == m["eval_loss"]  # seeded: same result


def test_seed_changes_result_and_folder(tmp_path, glue_dir, tiny_bert):
    assert _finetune(tmp_path, glue_dir, tiny_bert, "--seed", "7").exit_code == 0
    assert (tmp_path / "runs" / "rte" / "fp" / "seed7" / "metrics.json").is_file()


def test_regression_task_runs(tmp_path, glue_dir, tiny_bert):
    res = runner.invoke(app, ["finetune", "--task", "stsb", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
                              "--out", str(tmp_path / "runs"), *FAST])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "runs" / "stsb" / "fp" / "seed42" / "metrics.json").read_text())
    assert set(m) >= {"pearson", "spearmanr"}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "nope"], "unknown task 'nope'; choose one of: cola"),
        (["--task", "rte", "--data-dir", "/no/such/dir"], "data folder /no/such/dir does not exist"),
        (["--task", "qnli"], "train.tsv not found"),
        (["--task", "rte", "--set", "train.lr=fast"], "train.lr: 'fast' is not valid; expected a number"),
        (["--task", "rte", "--set", "train.bogus=1"], "train.bogus: unknown key; allowed: epochs"),
        (["--task", "rte", "--model", "/no/such/model"], "model folder /no/such/model does not exist"),
        (["--task", "rte", "--model", "bert-base-uncased"], "cannot reach the Hugging Face hub"),
        (["--task", "rte", "--recipe", "/no/such.yaml"], "recipe /no/such.yaml: no such file"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, glue_dir, tiny_bert, args, message, monkeypatch):
    monkeypatch.setattr("squat_cli.data.hub_reachable", lambda timeout=3.0: False)
    base = {"--data-dir": str(glue_dir), "--model": str(tiny_bert)}
    for i, a in enumerate(args[:-1]):
        if a in base:
            base[a] = args[i + 1]
    full = ["finetune", *[x for kv in base.items() for x in kv], *args, "--out", str(tmp_path / "runs")]
    res = runner.invoke(app, full)
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert message in out and "Traceback" not in out
    assert len(out.splitlines()) == 1 and out.startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_not_a_model_folder(tmp_path, glue_dir):
    bad = tmp_path / "notamodel"
    bad.mkdir()
    (bad / "readme.txt").write_text("hi")
    res = runner.invoke(app, ["finetune", "--task", "rte", "--model", str(bad), "--data-dir", str(glue_dir),
                              "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "is not a model folder (no config.json)" in res.output
    assert not (tmp_path / "runs").exists()


def test_malformed_tsv_no_partial_folder(tmp_path, glue_dir, tiny_bert):
    data = tmp_path / "glue" / "RTE"
    data.mkdir(parents=True)
    (data / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tbroken row\n")
    (data / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    res = runner.invoke(app, ["finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir",
                              str(tmp_path / "glue"), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "train.tsv:3: expected 4 tab-separated fields, found 2" in res.output
    assert not (tmp_path / "runs").exists()


def test_help_shows_examples():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "squat finetune --task" in res.output
    for cmd in ("finetune", "quantize"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and f"Example: squat {cmd}" in res.output


def test_model_folder_without_tokenizer_is_refused(tmp_path, glue_dir, tiny_bert):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_bert / f, bare / f)
    res = runner.invoke(app, ["finetune", "--task", "rte", "--model", str(bare), "--data-dir", str(glue_dir),
                              "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "has no tokenizer files" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


def test_version_and_short_help():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("squat ")
    assert runner.invoke(app, ["-h"]).exit_code == 0
    res = runner.invoke(app, ["sharpness", "-h"])
    assert res.exit_code == 0 and "--rho" in res.output


def test_refused_remote_code_is_our_first_line(tmp_path, glue_dir, tiny_bert):
    """A model folder that needs its own code: without --trust-remote-code, stderr starts with our one line."""
    import os
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "remote"
    shutil.copytree(tiny_bert, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="squat-test-remote", auto_map={"AutoConfig": "configuration_remote.RemoteConfig",
                                                          "AutoModelForSequenceClassification": "modeling_remote.M"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_remote.py").write_text("raise SystemExit('remote code ran')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "squat_cli", "finetune", "--task", "rte", "--model", str(folder),
                          "--data-dir", str(glue_dir), "--out", str(tmp_path / "runs"), "--set", "train.max_steps=1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    first = res.stderr.strip().splitlines()[0]
    assert first.startswith("error:") and "remote code ran" not in res.stdout + res.stderr, res.stderr


def test_cpu_model_read_from_cpuinfo(tmp_path):
    from squat_cli.runs import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
                    "processor\t: 1\nmodel name\t: Other\n")
    assert cpu_model(info) == "Intel(R) Xeon(R) Processor"
    import platform

    assert cpu_model(tmp_path / "missing") == (platform.processor() or None)
