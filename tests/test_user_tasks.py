"""Bring your own task: a task file (CSV, JSON Lines) through finetune, quantize, export, predict, evaluate and
report; bad data as one line; the model card."""

import csv
import json
import random

import pytest
import yaml
from typer.testing import CliRunner

from squat_cli.cli import app

runner = CliRunner()
FAST = ["--set", "train.batch_size=8", "--set", "train.max_steps=4", "--set", "train.eval_batch_size=8",
        "--set", "data.max_seq_length=32"]
GOOD = ["good", "great", "fine", "lovely", "fun"]
BAD = ["bad", "awful", "dull", "poor", "boring"]


def _reviews(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        rows.append({"id": f"r{seed}-{i}", "review": f"the film was {word} and the cast was {rng.choice(GOOD + BAD)}",
                     "sentiment": "positive" if positive else "negative"})
    return rows


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def csv_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("csvtask")
    (d / "data").mkdir()
    _write_csv(d / "data" / "train.csv", _reviews(48, 1))
    _write_csv(d / "data" / "dev.csv", _reviews(20, 2))
    (d / "task.yaml").write_text(yaml.safe_dump({
        "name": "reviews", "train": "data/train.csv", "dev": "data/dev.csv", "text": ["review"],
        "label": "sentiment", "labels": ["negative", "positive"], "metrics": ["accuracy", "f1"]}))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, csv_task, tiny_bert):
    out = tmp_path_factory.mktemp("utruns")
    task = str(csv_task / "task.yaml")
    res = runner.invoke(app, ["finetune", "--task", task, "--model", str(tiny_bert), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", "--task", task, "--method", "squat", "--wbits", "4", "--rho", "0.05",
                              "--out", str(out), *FAST, "--set", "quant.calib_batches=1"])
    assert res.exit_code == 0, res.output
    run = out / "reviews" / "squat-w4a8" / "seed42"
    for fmt in ("packed", "onnx"):
        res = runner.invoke(app, ["export", str(run), "--format", fmt])
        assert res.exit_code == 0, res.output
    return out, run


def test_the_run_records_its_task_inline_and_reports_it(trained, csv_task, tmp_path):
    out, run = trained
    stored = yaml.safe_load((run / "recipe.yaml").read_text())["data"]["task"]
    assert stored["name"] == "reviews" and stored["train"] == str(csv_task / "data" / "train.csv")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "reviews" and set(metrics) >= {"accuracy", "f1"}
    res = runner.invoke(app, ["report", "results", "--out", str(out), "--reports", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "rep" / "table1.md").read_text()
    assert "| reviews |" in table.splitlines()[2] or "reviews" in table.splitlines()[2]
    row = next(line for line in table.splitlines() if line.startswith("| SQuAT"))
    assert f"{100 * metrics['accuracy']:.2f}" in row


@pytest.mark.parametrize("kind", ["run", "packed", "onnx"])
def test_predictions_on_the_dev_file_equal_what_evaluate_scores(trained, csv_task, tmp_path, kind):
    pytest.importorskip("onnx")
    _, run = trained
    model = run if kind == "run" else run / "export" / kind
    res = runner.invoke(app, ["evaluate", str(model), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    scored = json.loads((tmp_path / "m.json").read_text())
    res = runner.invoke(app, ["predict", str(model), "--input", str(csv_task / "data" / "dev.csv"),
                              "--output", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 0, res.output
    preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    dev = list(csv.DictReader(open(csv_task / "data" / "dev.csv", encoding="utf-8")))
    assert [p["id"] for p in preds] == [r["id"] for r in dev]  # other columns pass through, in order
    assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)
    accuracy = sum(p["label"] == r["sentiment"] for p, r in zip(preds, dev)) / len(dev)
    assert accuracy == pytest.approx(scored["accuracy"], abs=1e-12)


def test_predict_streams_stdin_jsonl_and_refuses_bad_rows(trained):
    _, run = trained
    model = str(run / "export" / "packed")
    lines = "".join(json.dumps({"review": t}) + "\n" for t in ("a good film", "an awful film"))
    res = runner.invoke(app, ["predict", model], input=lines)
    assert res.exit_code == 0, res.output
    out = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [o["review"] for o in out] == ["a good film", "an awful film"]
    assert all(o["label"] in ("negative", "positive") for o in out)
    res = runner.invoke(app, ["predict", model], input='{"review": "fine"}\n{"text": "no review"}\n')
    assert res.exit_code == 2 and "<stdin>:2: no column 'review'" in res.output
    res = runner.invoke(app, ["predict", model], input='{"review": ""}\n')
    assert res.exit_code == 2 and "<stdin>:1: review is empty" in res.output


def test_predict_refuses_an_output_that_would_replace_its_input_or_cannot_be_written(trained, tmp_path):
    """--output naming the --input file (or a link to it) would replace the user's rows with predictions: refused
    in one line and the file is left as it was; a file of the model being run, a folder, a missing folder or a
    file above it likewise."""
    _, run = trained
    model = str(run / "export" / "packed")
    rows = tmp_path / "new.jsonl"
    rows.write_text(json.dumps({"review": "a good film"}) + "\n")
    (tmp_path / "link.jsonl").symlink_to(rows)
    (tmp_path / "afile").write_text("mine")
    for output, message in ((rows, "is the --input file"), (tmp_path / "link.jsonl", "is the --input file"),
                            (tmp_path, "is a folder; name a file"),
                            (tmp_path / "nodir" / "p.jsonl", f"its folder {tmp_path / 'nodir'} does not exist"),
                            (tmp_path / "afile" / "p.jsonl", f"{tmp_path / 'afile'} is a file, not a folder"),
                            (run / "export" / "packed" / "manifest.json", "is one of the files of")):
        res = runner.invoke(app, ["predict", model, "--input", str(rows), "--output", str(output)])
        out = res.output.strip()
        assert res.exit_code == 2 and len(out.splitlines()) == 1 and message in out, out
    assert rows.read_text() == json.dumps({"review": "a good film"}) + "\n"
    assert (tmp_path / "link.jsonl").is_symlink() and (tmp_path / "afile").read_text() == "mine"
    assert json.loads((run / "export" / "packed" / "manifest.json").read_text())["format"] == "squat-packed"
    res = runner.invoke(app, ["predict", model, "--input", str(rows), "--output", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 0 and len((tmp_path / "p.jsonl").read_text().splitlines()) == 1


def test_model_card_says_what_the_run_says(trained):
    _, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    for fmt in ("packed", "onnx"):
        card = (run / "export" / fmt / "README.md").read_text()
        assert card.startswith("---\n")
        header = yaml.safe_load(card.split("---\n")[1])
        got = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
        assert got == {"accuracy": pytest.approx(metrics["accuracy"], abs=1e-6),
                       "f1": pytest.approx(metrics["f1"], abs=1e-6)}
        assert header["library_name"] == "squat" and "squat predict" in card
        assert "README.md" in json.loads((run / "export" / fmt / "manifest.json").read_text())["files"]


def test_a_jsonl_pair_task_with_string_labels(tmp_path, tiny_bert):
    rng = random.Random(3)
    for split, n in (("train", 32), ("dev", 12)):
        with open(tmp_path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                same = i % 2 == 0
                a = f"a question about {rng.choice(GOOD)} things"
                f.write(json.dumps({"q1": a, "q2": a if same else "something else entirely",
                                    "dup": "same" if same else "different"}) + "\n")
    (tmp_path / "pairs.yaml").write_text(yaml.safe_dump({
        "name": "pairs", "train": "train.jsonl", "dev": "dev.jsonl", "text": ["q1", "q2"], "label": "dup",
        "labels": ["different", "same"]}))
    res = runner.invoke(app, ["finetune", "--task", str(tmp_path / "pairs.yaml"), "--model", str(tiny_bert),
                              "--out", str(tmp_path / "r"), *FAST])
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "r" / "pairs" / "fp" / "seed42" / "metrics.json").read_text())
    assert metrics["main_metric"] == "accuracy" and metrics["dev_sizes"] == {"dev": 12}
    res = runner.invoke(app, ["quantize", "--task", str(tmp_path / "pairs.yaml"), "--method", "squat", "--wbits", "4",
                              "--rho", "0.05", "--out", str(tmp_path / "r"), *FAST, "--set", "quant.calib_batches=1"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "r" / "pairs" / "squat-w4a8" / "seed42"
    for fmt in ("packed", "onnx"):
        assert runner.invoke(app, ["export", str(run), "--format", fmt]).exit_code == 0
        model = run / "export" / fmt
        assert runner.invoke(app, ["evaluate", str(model), "--out", str(tmp_path / "m.json")]).exit_code == 0
        res = runner.invoke(app, ["predict", str(model), "--input", str(tmp_path / "dev.jsonl"), "--output",
                                  str(tmp_path / "p.jsonl")])
        assert res.exit_code == 0, res.output
        preds = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
        gold = [json.loads(x)["dup"] for x in (tmp_path / "dev.jsonl").read_text().splitlines()]
        scored = json.loads((tmp_path / "m.json").read_text())["accuracy"]
        assert sum(p["label"] == g for p, g in zip(preds, gold)) / len(gold) == pytest.approx(scored, abs=1e-12)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(text=["body"]), "no column 'body' (columns: id, review, sentiment)"),
    (lambda d: d.update(labels=["negative", "neutral"]), "label 'positive' is not one of negative, neutral"),
    (lambda d: d.update(train="data/empty.csv"), "no rows"),
    (lambda d: d.update(train="data/blank.csv"), "review is empty"),
    (lambda d: d.update(train="data/missing.csv"), "no such file"),
    (lambda d: d.update(train="data/bad.bin"), "unknown file type '.bin'"),
    (lambda d: d.update(labels=None, regression=True, metrics=None), "dev.csv:2: sentiment 'positive' is not a number"),
    (lambda d: d.update(train="data/mixed.jsonl"), "data/mixed.jsonl"),
    (lambda d: d.update(name="rte"), "is a GLUE task's name"),
    (lambda d: d.update(labels=None), "give labels (the class order) for classification"),
])
def test_bad_task_data_is_one_line_and_no_run_folder(csv_task, tmp_path, tiny_bert, change, message):
    d = yaml.safe_load((csv_task / "task.yaml").read_text())
    data = csv_task / "data"
    (data / "empty.csv").write_text("id,review,sentiment\n")
    (data / "blank.csv").write_text("id,review,sentiment\nr1,,positive\n")
    (data / "mixed.jsonl").write_text('{"id": 1, "review": "fine", "sentiment": "positive"}\n'
                                      '{"id": "x", "review": 5, "sentiment": 1}\n')
    (data / "bad.bin").write_bytes(b"\x00")
    change(d)
    path = csv_task / f"bad-{abs(hash(message))}.yaml"
    path.write_text(yaml.safe_dump(d))
    res = runner.invoke(app, ["finetune", "--task", str(path), "--model", str(tiny_bert), "--out",
                              str(tmp_path / "r"), *FAST])
    out = res.output.strip()
    assert res.exit_code == 2 and len(out.splitlines()) == 1 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("metrics.json"))


def test_a_grid_entry_can_be_a_task_file(csv_task, tiny_bert, tmp_path):
    """sweep.tasks takes a task file; its runs record the definition inline, so a rerun counts them as done."""
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({
        "sweep": {"tasks": [str(csv_task / "task.yaml")], "methods": ["lsq"], "wbits": [4], "seeds": [1],
                  "sharpness_rhos": [0.01], "sharpness_methods": ["lsq"]},
        "finetune": {"model": {"name_or_path": str(tiny_bert)}, "train": {"max_steps": 2, "batch_size": 8}},
        "quantize": {"train": {"max_steps": 2, "batch_size": 8}, "quant": {"calib_batches": 1}},
        "sharpness": {"steps": 1, "examples": 8}}))
    args = ["sweep", str(grid), "--out", str(tmp_path / "r"), "--reports", str(tmp_path / "rep")]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "sweep: 3 ran" in " ".join(res.output.split())
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "sweep: 0 ran, 3 already done" in " ".join(res.output.split())
    assert "another recipe" not in res.output
    assert "reviews" in (tmp_path / "rep" / "table1.md").read_text()


def test_a_parquet_regression_task(tmp_path, tiny_bert):
    import pandas as pd

    rng = random.Random(5)
    for split, n in (("train", 24), ("dev", 10)):
        rows = [{"a": f"a sentence about {rng.choice(GOOD)} things", "b": f"another about {rng.choice(BAD)} ones",
                 "score": round(rng.uniform(0, 5), 2)} for _ in range(n)]
        pd.DataFrame(rows).to_parquet(tmp_path / f"{split}.parquet")
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump({
        "name": "sim", "train": "train.parquet", "dev": "dev.parquet", "text": ["a", "b"], "label": "score",
        "regression": True}))
    res = runner.invoke(app, ["finetune", "--task", str(tmp_path / "sim.yaml"), "--model", str(tiny_bert),
                              "--out", str(tmp_path / "r"), *FAST])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "r" / "sim" / "fp" / "seed42" / "metrics.json").read_text())
    assert m["main_metric"] == "pearson" and -1 <= m["pearson"] <= 1 and "spearmanr" in m
