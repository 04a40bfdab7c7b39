"""`squat quantize` end to end on a tiny BERT: run folder, reload, every method, bad input."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.dev_scores import evaluate
from squat_cli.run_model import load_run_model
from squat_cli.runs import RunDir

runner = CliRunner()
FAST = ["--set", "data.train_subset=48", "--set", "data.eval_subset=40", "--set", "train.batch_size=16",
        "--set", "train.max_steps=3", "--set", "quant.calib_batches=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, tiny_bert):
    root = tmp_path_factory.mktemp("qruns")
    res = runner.invoke(app, ["finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
                              "--out", str(root), *FAST, "--set", "train.eval_strategy=end"])
    assert res.exit_code == 0, res.output
    return root


def _quantize(root, glue_dir, *args):
    return runner.invoke(app, ["quantize", "--task", "rte", "--data-dir", str(glue_dir), "--out", str(root),
                               *FAST, *args])


def test_quantized_run_folder_and_reload(runs, glue_dir):
    res = _quantize(runs, glue_dir, "--method", "lsq", "--wbits", "4", "--abits", "8")
    assert res.exit_code == 0, res.output
    run = RunDir(runs / "rte" / "lsq-w4a8" / "seed42")
    files = {p.name for p in run.path.iterdir()}
    assert {"recipe.yaml", "metrics.json", "metrics.jsonl", "environment.json", "model", "quantizer.safetensors"} <= files
    m = run.metrics()
    assert (m["method"], m["wbits"], m["abits"], m["steps"], m["quantized_modules"]) == ("lsq", 4, 8, 3, 12)
    assert m["from"] == str(runs / "rte" / "fp" / "seed42") and "accuracy" in m["fp_metrics"]
    hist = run.history()
    assert [h["step"] for h in hist] == [0, 3]  # the converted model is evaluated before training too
    assert m["mean_wstep_final"] != m["mean_wstep_init"]  # the step sizes learned
    with safe_open(str(run.quantizer_file), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["wbits"] == "4" and len(json.loads(f.metadata()["modules"])) == 12
    assert sum(k.endswith("wq.step") for k in keys) == 12 and sum(k.endswith("aq.step") for k in keys) == 12
    with safe_open(str(run.model_dir / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if ".wq." in k or ".aq." in k]
    # reload: same dev metrics, exactly
    model, tok, recipe, task = load_run_model(run)
    from squat_cli.task_data import load_task_data

    data = load_task_data(recipe, tok, need_train=False)
    again = evaluate(model, task, data.dev, 16, tok.pad_token_id, torch.device("cpu"))
    assert again["accuracy"] == m["accuracy"]
    assert again["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-6)
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.wq.bits == 4 and bool(q.aq.initialized)


@pytest.mark.parametrize(
    "method,args,variant",
    [
        ("squat", ["--wbits", "2", "--rho", "0.05"], "squat-w2a8"),
        ("squat", ["--wbits", "3", "--set", "quant.step_size_grad=reuse"], "squat-w3a8"),
        ("joint", ["--wbits", "2"], "joint-w2a8"),
        ("fp-sam", [], "fp-sam-w32a32"),
        ("q8bert", ["--wbits", "8", "--abits", "8"], "q8bert-w8a8"),
        ("ptq", ["--wbits", "4"], "ptq-w4a8"),
        ("gobo", ["--wbits", "2"], "gobo-w2a32"),
        ("gobo", ["--wbits", "3", "--set", "quant.gobo_embedding_bits=32"], "gobo-w3a32"),
        ("qbert", ["--wbits", "2", "--set", "quant.qbert_groups=16"], "qbert-w2a8"),
        ("qbert", ["--set", "quant.mixed=2/3", "--set", "quant.qbert_groups=16", "--set", "quant.hessian_examples=8",
                   "--set", "quant.hessian_subsets=2", "--set", "quant.hessian_iters=3"], "qbert-mp3-w2a8"),
    ],
)
def test_every_method_end_to_end(runs, glue_dir, method, args, variant):
    res = _quantize(runs, glue_dir, "--method", method, *args)
    assert res.exit_code == 0, res.output
    run = RunDir(runs / "rte" / variant / "seed42")
    m = run.metrics()
    assert m["method"] == method and 0 <= m["accuracy"] <= 1
    assert m["steps"] == (0 if method in ("ptq", "gobo") else 3)
    assert (m["cpu_share"] is None) == (method in ("ptq", "gobo"))  # no steps: no share of them
    assert m["fused_kernels"] == "on"  # compiled kernels throughout, for ten methods in one process
    assert m["job_time_s"] > m["wall_time_s"] >= 0  # PTQ too: loading, calibration, evaluation
    assert run.quantizer_file.is_file() == (method != "fp-sam")
    model, tok, recipe, task = load_run_model(run)
    assert model is not None
    if method in ("gobo", "qbert"):  # reloaded from the run folder: the same dev metrics, exactly
        from squat_cli.task_data import load_task_data

        data = load_task_data(recipe, tok, need_train=False)
        again = evaluate(model, task, data.dev, 16, tok.pad_token_id, torch.device("cpu"))
        assert again["accuracy"] == m["accuracy"] and again["eval_loss"] == pytest.approx(m["eval_loss"], rel=1e-6)
    if method == "gobo":
        shares = m["gobo_outlier_share"]
        assert len(shares) == (12 if variant == "gobo-w3a32" else 13)  # + the word embeddings
        assert all(0 <= v < 0.02 for v in shares.values())
        emb = model.bert.embeddings.word_embeddings
        assert (emb.wq.bits == 2) if variant == "gobo-w2a32" else not hasattr(emb, "wq")
        assert model.bert.encoder.layer[0].attention.self.query.aq is None  # A32
    if variant == "qbert-mp3-w2a8":
        layers = m["layer_bits"]
        assert sorted(v["bits"] for v in layers.values()) == [2, 3]  # 2 encoder layers: one of each
        hi = max(layers, key=lambda k: layers[k]["omega"])
        assert layers[hi]["bits"] == 3 and len(layers[hi]["eigenvalues"]) == 2
        bits = {n: mod.wq.bits for n, mod in model.named_modules() if n.endswith("attention.self.query")}
        assert sorted(bits.values()) == [2, 3]  # the per-layer bits travel with the quantizer state


@pytest.mark.parametrize(
    "args,message",
    [
        (["--wbits", "9"], "quant.wbits: 9 is outside 2..8"),
        (["--wbits", "1"], "quant.wbits: 1 is outside 2..8"),
        (["--abits", "1"], "quant.abits: 1 is outside 2..32"),
        (["--abits", "33"], "quant.abits: 33 is outside 2..32"),
        (["--rho", "-0.1"], "sam.rho: -0.1 must be >= 0"),
        (["--method", "magic"], "quant.method: 'magic' is not valid; expected one of ptq, q8bert, gobo, qbert, lsq, joint"),
        (["--seed", "5"], "no FP run at"),
        (["--from", "/no/such/run"], "no FP run at /no/such/run"),
    ],
)
def test_bad_input(runs, glue_dir, args, message):
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    res = _quantize(runs, glue_dir, *args)
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert len(out.splitlines()) == 1 and message in out and "Traceback" not in out
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before  # nothing written


def test_wrong_task_source(runs, glue_dir):
    res = runner.invoke(app, ["quantize", "--task", "mrpc", "--data-dir", str(glue_dir), "--out", str(runs),
                              "--from", str(runs / "rte" / "fp" / "seed42"), *FAST])
    assert res.exit_code == 2 and "is for task rte, not mrpc" in res.output


def test_sharpness_cli_deterministic_and_stored(runs, glue_dir):
    res = _quantize(runs, glue_dir, "--method", "lsq", "--wbits", "2")
    assert res.exit_code == 0, res.output
    run = runs / "rte" / "lsq-w2a8" / "seed42"
    args = ["sharpness", "--rho", "0.05", "--run", str(run), "--steps", "3", "--examples", "24", "--lr", "1.0",
            "--data-dir", str(glue_dir)]
    assert runner.invoke(app, args).exit_code == 0
    first = json.loads((run / "sharpness.json").read_text())["ascent/rho=0.05"]
    assert first["score"] == first["loss_final"] - first["loss0"] and first["delta_norm"] <= 0.05 * (1 + 1e-6)
    assert first["settings"]["examples"] == 24 and len(first["trajectory"]) == 4
    assert first["time_s"] > 0  # the measurement's wall time is recorded
    assert runner.invoke(app, args).exit_code == 0
    again = json.loads((run / "sharpness.json").read_text())["ascent/rho=0.05"]
    assert again["score"] == first["score"]  # deterministic for a fixed seed
    # every run under the root without a score at that rho
    res = runner.invoke(app, ["sharpness", "--rho", "0.05", "--out", str(runs), "--steps", "1", "--examples", "8",
                              "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output
    assert "rte/fp/seed42" in res.output and "lsq-w2a8" not in res.output
    assert "ascent/rho=0.05" in json.loads((runs / "rte" / "fp" / "seed42" / "sharpness.json").read_text())


@pytest.mark.parametrize("args,message", [
    (["--rho", "inf"], "--rho: inf is not a finite number"),
    (["--rho", "nan"], "--rho: nan is not a finite number"),
    (["--rho", "0.05", "--lr", "nan"], "--lr: nan is not a finite number"),
    (["--rho", "0"], "--rho: 0.0 must be > 0"),
    (["--rho", "-1"], "--rho: -1.0 must be > 0"),
    (["--rho", "0.1", "--run", "/no/such/run"], "no run folder at /no/such/run"),
])
def test_sharpness_bad_input(runs, args, message):
    res = runner.invoke(app, ["sharpness", *args, "--out", str(runs)])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_joint_rho0_with_dropout_replay_reproduces_lsq_run(runs, glue_dir, tmp_path):
    """sam.dropout_replay: every pass of a step sees the first pass's dropout masks, so joint at rho 0
    is the lsq run exactly (weights, steps, dev metrics), through the CLI with dropout on."""
    src = ["--from", str(runs / "rte" / "fp" / "seed42"), "--out", str(tmp_path), "--wbits", "2",
           "--set", "train.max_steps=4"]
    out = {}
    for method, extra in (("lsq", []), ("joint", ["--rho", "0", "--set", "sam.dropout_replay=true"]),
                          ("squat", ["--rho", "0", "--set", "sam.dropout_replay=false"])):
        res = _quantize(tmp_path, glue_dir, "--method", method, *src, *extra)
        assert res.exit_code == 0, res.output
        run = RunDir(tmp_path / "rte" / f"{method}-w2a8" / "seed42")
        with safe_open(str(run.model_dir / "model.safetensors"), framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(str(run.quantizer_file), framework="pt") as f:
            steps = {k: f.get_tensor(k) for k in f.keys()}
        out[method] = (weights, steps, run.metrics())
    (w_l, s_l, m_l), (w_j, s_j, m_j) = out["lsq"], out["joint"]
    assert all(torch.equal(w_l[k], w_j[k]) for k in w_l) and all(torch.equal(s_l[k], s_j[k]) for k in s_l)
    assert (m_j["accuracy"], m_j["eval_loss"], m_j["train_loss"]) == (m_l["accuracy"], m_l["eval_loss"],
                                                                       m_l["train_loss"])
    w_s = out["squat"][0]  # another method really is another run (the equality above can fail)
    assert not all(torch.equal(w_l[k], w_s[k]) for k in w_l)
    assert yaml_load(tmp_path / "rte" / "joint-w2a8" / "seed42" / "recipe.yaml")["sam"]["dropout_replay"] is True


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_include_matching_nothing_is_refused(runs, glue_dir):
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    for method, bits in (("joint", "4"), ("lsq", "3")):  # variants no other test of the module has finished
        res = _quantize(runs, glue_dir, "--method", method, "--wbits", bits, "--set", "quant.include=[nothing.*]")
        assert res.exit_code == 2, res.output
        assert "matches no linear layer of this model" in res.output and "Traceback" not in res.output
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before


def test_sharpness_skips_and_lists_a_damaged_run(runs, glue_dir, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(runs / "rte" / "fp", root / "rte" / "fp")
    good = root / "rte" / "fp" / "seed42"
    bad = root / "rte" / "fp" / "seed7"
    shutil.copytree(good, bad)
    (bad / "recipe.yaml").write_text("train: [unclosed\n")
    for run in (good, bad):
        (run / "sharpness.json").unlink(missing_ok=True)
    res = runner.invoke(app, ["sharpness", "--rho", "0.05", "--out", str(root), "--steps", "1", "--examples", "8",
                              "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output
    assert f"skipped {bad}" in res.output and "not valid YAML" in res.output
    assert "ascent/rho=0.05" in json.loads((good / "sharpness.json").read_text())
    res = runner.invoke(app, ["sharpness", "--rho", "0.05", "--out", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output
