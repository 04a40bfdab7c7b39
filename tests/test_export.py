"""`squat export` and `squat evaluate` end to end on tiny BERT runs: exact packed round trips, ONNX, bad input."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.export import load_packed
from squat_cli.export.folder import manifest_digest
from squat_cli.run_model import load_run_model
from squat_cli.runs import RunDir
from squat_cli.task_data import load_task_data

runner = CliRunner()
FAST = ["--set", "data.train_subset=48", "--set", "data.eval_subset=40", "--set", "train.batch_size=16",
        "--set", "train.max_steps=3", "--set", "quant.calib_batches=1"]
METHODS = {
    "squat-w2a8": ["--method", "squat", "--wbits", "2", "--rho", "0.05", "--set", "train.precision=bf16"],
    "squat-w3a8": ["--method", "squat", "--wbits", "3", "--rho", "0.05"],
    "squat-w4a8": ["--method", "squat", "--wbits", "4", "--set", "quant.per_channel=true"],
    "q8bert-w8a8": ["--method", "q8bert", "--wbits", "8"],
    "ptq-w4a8": ["--method", "ptq", "--wbits", "4"],
    "gobo-w2a32": ["--method", "gobo", "--wbits", "2"],  # word embeddings too (2-bit codebook)
    "qbert-w3a8": ["--method", "qbert", "--wbits", "3", "--set", "quant.qbert_groups=16"],
    "lsq-w2a8": ["--method", "lsq", "--wbits", "2", "--embedding-bits", "3"],  # 3-bit word embeddings
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, tiny_bert):
    root = tmp_path_factory.mktemp("xruns")
    common = ["--task", "rte", "--data-dir", str(glue_dir), "--out", str(root), *FAST]
    res = runner.invoke(app, ["finetune", "--model", str(tiny_bert), *common, "--set", "train.eval_strategy=end"])
    assert res.exit_code == 0, res.output
    for args in METHODS.values():
        res = runner.invoke(app, ["quantize", *common, *args])
        assert res.exit_code == 0, res.output
    return root


def _run(runs, variant):
    return runs / "rte" / variant / "seed42"


def _logits(model, batches, autocast=None):
    out = []
    with torch.no_grad():
        for b in batches:
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out.append(model(**b).logits.float())
            else:
                out.append(model(**b).logits.float())
    return torch.cat(out)


@pytest.mark.parametrize("variant", list(METHODS))
def test_packed_export_reproduces_the_run_exactly(runs, glue_dir, tmp_path, variant):
    run = _run(runs, variant)
    res = runner.invoke(app, ["export", str(run), "--to", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    assert "quantized layers:" in res.output and "whole file:" in res.output
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["format"] == "squat-packed" and manifest["format_version"] == 2
    assert set(p.name for p in (tmp_path / "x").iterdir()) >= {"model.safetensors", "manifest.json", "config.json"}
    res = runner.invoke(app, ["evaluate", str(tmp_path / "x"), "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "x" / "eval_metrics.json").read_text())
    want = RunDir(run).metrics()
    assert (got["accuracy"], got["eval_loss"]) == (want["accuracy"], want["eval_loss"])  # exactly
    assert got["dev_sizes"] == want["dev_sizes"] and got["format"] == "packed"
    # equal logits: the exported model against the fake-quant run model, on real dev examples
    fq, tok, recipe, task = load_run_model(RunDir(run))
    ex, _, _ = load_packed(tmp_path / "x")
    data = load_task_data(recipe, tok, need_train=False)
    from squat_cli.batching import eval_loader

    loader, _ = eval_loader(next(iter(data.dev.values())), 16, tok.pad_token_id)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in loader]
    bf16 = recipe.train.precision == "bf16"
    assert torch.equal(_logits(ex, batches, bf16), _logits(fq, batches, bf16))
    # the loader gives a plain transformers model: the quantized layers are nn.Linear with the decoded weight
    q = ex.bert.encoder.layer[0].attention.self.query
    assert isinstance(q, torch.nn.Linear) and torch.equal(q.weight, fq.bert.encoder.layer[0].attention.self.query.wq(
        fq.bert.encoder.layer[0].attention.self.query.weight))
    bits = manifest["layers"]["bert.encoder.layer.0.attention.self.query"]["bits"]
    assert bits == int(variant.split("-w")[1].split("a")[0])


def test_size_report_by_hand(runs, tmp_path):
    res = runner.invoke(app, ["export", str(_run(runs, "squat-w2a8")), "--to", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    size = json.loads((tmp_path / "x" / "manifest.json").read_text())["size"]
    row = size["quantized_layers"]["bert.encoder.layer.0.attention.self.query"]
    # 32x32 at 2 bits = 256 bytes of codes, + weight step 4 + activation step 4 + FP32 bias 128
    assert row == {"bytes": 256 + 4 + 4 + 128, "fp32_bytes": 32 * 32 * 4 + 128, "ratio": round(392 / 4224, 5)}
    ffn = size["quantized_layers"]["bert.encoder.layer.0.intermediate.dense"]  # 64x32
    assert ffn["bytes"] == 64 * 32 // 4 + 8 + 64 * 4
    assert size["file_bytes"] == (tmp_path / "x" / "model.safetensors").stat().st_size
    assert size["quantized_layers_bytes"] == sum(r["bytes"] for r in size["quantized_layers"].values())


def test_gobo_export_keeps_outliers_and_shrinks_the_embeddings(runs, tmp_path):
    res = runner.invoke(app, ["export", str(_run(runs, "gobo-w2a32")), "--to", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "x" / "manifest.json").read_text())
    emb = m["layers"]["bert.embeddings.word_embeddings"]
    assert emb["kind"] == "codebook" and emb["bits"] == 2 and emb["input"] is None
    shares = RunDir(_run(runs, "gobo-w2a32")).metrics()["gobo_outlier_share"]  # as the run counted them
    for name, layer in m["layers"].items():
        n = layer["shape"][0] * layer["shape"][1]
        assert layer["outliers"] == pytest.approx(shares[name] * n, abs=1e-6 * n)
    assert sum(v["outliers"] for v in m["layers"].values()) > 0
    assert m["size"]["file_ratio"] < 0.15  # the 30522 x 32 word embeddings dominate the tiny model


def test_python_loader_example(runs, tmp_path):
    for _ in range(2):  # a second export replaces the first (an export folder, never anything else)
        assert runner.invoke(app, ["export", str(_run(runs, "squat-w4a8")), "--to", str(tmp_path / "x")]).exit_code == 0
    model, tokenizer, manifest = load_packed(tmp_path / "x")
    logits = model(**tokenizer("A man plays.", "A man is playing.", return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training


def test_evaluate_a_run_folder_matches_its_metrics(runs, glue_dir):
    run = _run(runs, "q8bert-w8a8")
    res = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(glue_dir), "--out", str(run.parent / "e.json")])
    assert res.exit_code == 0, res.output
    got, want = json.loads((run.parent / "e.json").read_text()), RunDir(run).metrics()
    assert (got["accuracy"], got["eval_loss"]) == (want["accuracy"], want["eval_loss"])


@pytest.mark.parametrize("variant", ["squat-w2a8", "squat-w4a8", "q8bert-w8a8"])
def test_onnx_export_runs_in_onnxruntime_within_tolerance(runs, glue_dir, tmp_path, variant):
    onnx = pytest.importorskip("onnx")
    run = _run(runs, variant)
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--to", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(".codes")]
    assert len(weight_dq) == 12
    for dq in weight_dq:  # each feeds a MatMul whose other input is a quantized activation: Q -> DQ -> MatMul <- DQ
        mm = [n for n in graph.node if n.op_type == "MatMul" and dq.output[0] in n.input]
        assert len(mm) == 1 and mm[0].input[1] == dq.output[0]
        act = producer[mm[0].input[0]]
        assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "QuantizeLinear"
    codes = [i for i in graph.initializer if i.name.endswith(".codes")]
    want_type = onnx.TensorProto.INT8 if variant.startswith("q8bert") else onnx.TensorProto.INT4
    assert len(codes) == 12 and {c.data_type for c in codes} == {want_type}
    assert not [i for i in graph.initializer if i.name.endswith("weight_t")]  # no FP32 copy of the weights left
    # scored with onnxruntime against the same model evaluated by torch in FP32
    res = runner.invoke(app, ["evaluate", str(tmp_path / "o"), "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "o" / "eval_metrics.json").read_text())
    res = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(glue_dir), "--precision", "fp32",
                              "--out", str(tmp_path / "fp32.json")])
    ref = json.loads((tmp_path / "fp32.json").read_text())
    assert got["format"] == "onnx" and got["precision"] == "fp32"
    assert abs(got["accuracy"] - ref["accuracy"]) <= 1 / 40 + 1e-9  # at most one of the 40 dev examples flips
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=2e-3)


def test_onnx_graph_is_checked_against_its_manifest(runs, glue_dir, tmp_path):
    """Another task's manifest (the graph's 2 logits are not STS-B's 1), inputs the graph does not take, a dropped
    input: one line each, with the manifest sealed consistently so that the graph check is what refuses."""
    pytest.importorskip("onnx")
    good = tmp_path / "good"
    res = runner.invoke(app, ["export", str(_run(runs, "squat-w4a8")), "--format", "onnx", "--to", str(good)])
    assert res.exit_code == 0, res.output

    def variant(name, fn):
        d = tmp_path / name
        shutil.copytree(good, d)
        m = json.loads((d / "manifest.json").read_text())
        fn(m)
        m["manifest_sha256"] = manifest_digest(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return runner.invoke(app, ["evaluate", str(d), "--data-dir", str(glue_dir)])

    _one_line_error(variant("task", lambda m: m["source_run"].update(task="stsb")), "a graph of another task")
    _one_line_error(variant("bogus", lambda m: m.update(inputs=["input_ids", "attention_mask", "bogus"])),
                    "do not match the graph's")
    _one_line_error(variant("dropped", lambda m: m.update(inputs=["input_ids", "attention_mask"])),
                    "do not match the graph's")
    missing = tmp_path / "missing"
    shutil.copytree(good, missing)
    (missing / "model.onnx").unlink()
    _one_line_error(runner.invoke(app, ["evaluate", str(missing), "--data-dir", str(glue_dir)]), "model.onnx: missing")


def test_deberta_v2_exports_to_onnx_with_the_inputs_it_takes(tmp_path, glue_dir, minilm_dir):
    """DeBERTa-v2 has no token types (type_vocab_size 0): the graph takes input_ids and attention_mask only."""
    pytest.importorskip("onnx")
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification

    torch.manual_seed(0)
    model_dir = tmp_path / "deberta"
    DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=2)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(model_dir)
    common = ["--task", "rte", "--data-dir", str(glue_dir), "--out", str(tmp_path / "runs"), *FAST]
    assert runner.invoke(app, ["finetune", "--model", str(model_dir), *common]).exit_code == 0
    res = runner.invoke(app, ["quantize", *common, "--method", "lsq", "--wbits", "4"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "rte" / "lsq-w4a8" / "seed42"
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--to", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["inputs"] == ["input_ids", "attention_mask"]
    res = runner.invoke(app, ["evaluate", str(tmp_path / "o"), "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("variant,why", [("gobo-w2a32", "a codebook weight (GOBO or Q-BERT) has no exact ONNX QDQ form"),
                                        ("qbert-w3a8", "a group weight (GOBO or Q-BERT) has no exact ONNX QDQ form")])
def test_onnx_refuses_what_has_no_qdq_form(runs, tmp_path, variant, why):
    pytest.importorskip("onnx")
    res = runner.invoke(app, ["export", str(_run(runs, variant)), "--format", "onnx", "--to", str(tmp_path / "o")])
    assert res.exit_code == 2 and why in res.output and "--format packed" in res.output
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())  # nothing half-written


def _one_line_error(res, message):
    out = res.output.strip()
    assert res.exit_code == 2, res.output
    assert len(out.splitlines()) == 1 and message in out and "Traceback" not in out, out


def test_bad_exports(runs, tmp_path):
    src = _run(runs, "squat-w3a8")
    unfinished = tmp_path / "rte" / "lsq-w2a8" / "seed1"
    shutil.copytree(src, unfinished)
    (unfinished / "metrics.json").unlink()
    _one_line_error(runner.invoke(app, ["export", str(unfinished)]), "is not a finished run (no metrics.json)")
    (unfinished / "FAILED.json").write_text("{}")
    _one_line_error(runner.invoke(app, ["export", str(unfinished)]), "is a failed run")
    damaged = tmp_path / "rte" / "lsq-w2a8" / "seed2"
    shutil.copytree(src, damaged)
    (damaged / "metrics.json").write_text("{not json")
    _one_line_error(runner.invoke(app, ["export", str(damaged)]), "damaged (not JSON)")
    nomodel = tmp_path / "rte" / "lsq-w2a8" / "seed3"
    shutil.copytree(src, nomodel)
    shutil.rmtree(nomodel / "model")
    _one_line_error(runner.invoke(app, ["export", str(nomodel)]), "has no saved model")
    _one_line_error(runner.invoke(app, ["export", str(src), "--format", "zip"]), "--format: 'zip' is not one of packed, onnx")
    _one_line_error(runner.invoke(app, ["export", str(runs / "rte" / "fp" / "seed42")]), "a full-precision run")
    assert not list(tmp_path.rglob("export"))  # nothing written by any of them
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for fmt in ("packed", "onnx"):
        _one_line_error(runner.invoke(app, ["export", str(src), "--format", fmt, "--to", str(keep)]),
                        "the folder exists and is not a squat export")
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]  # never replaced
    (keep / "manifest.json").write_text('{"name": "x"}')  # an unrelated manifest does not make it an export
    for fmt in ("packed", "onnx"):
        _one_line_error(runner.invoke(app, ["export", str(src), "--format", fmt, "--to", str(keep)]),
                        "the folder exists and is not a squat export")
    assert sorted(p.name for p in keep.iterdir()) == ["manifest.json", "notes.txt"]
    earlier = tmp_path / "earlier"
    assert runner.invoke(app, ["export", str(src), "--to", str(earlier)]).exit_code == 0
    assert runner.invoke(app, ["export", str(src), "--to", str(earlier)]).exit_code == 0  # an export is replaced
    (earlier / "mine.txt").write_text("mine")  # ... unless it holds a file squat did not write
    _one_line_error(runner.invoke(app, ["export", str(src), "--to", str(earlier)]),
                    "holds files squat did not write (mine.txt)")
    assert (earlier / "mine.txt").read_text() == "mine"
    (tmp_path / "link").symlink_to(earlier)
    _one_line_error(runner.invoke(app, ["export", str(src), "--to", str(tmp_path / "link")]), "is a symbolic link")
    (tmp_path / "afile").write_text("x")
    _one_line_error(runner.invoke(app, ["export", str(src), "--to", str(tmp_path / "afile")]), "a file is in the way")
    _one_line_error(runner.invoke(app, ["export", str(src), "--to", str(tmp_path / "afile" / "x")]),
                    f"{tmp_path / 'afile'} is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "x"


def test_corrupt_or_tampered_exports_are_refused(runs, glue_dir, tmp_path):
    good = tmp_path / "good"
    assert runner.invoke(app, ["export", str(_run(runs, "squat-w2a8")), "--to", str(good)]).exit_code == 0

    def variant(name, change):
        d = tmp_path / name
        shutil.copytree(good, d)
        change(d)
        return runner.invoke(app, ["evaluate", str(d), "--data-dir", str(glue_dir)])

    def flip_byte(d):
        data = bytearray((d / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(data))

    def edit_manifest(fn, reseal=True):
        """Edit the manifest; ``reseal``: with a consistent digest, so the deeper checks are what refuses it."""
        def change(d):
            m = json.loads((d / "manifest.json").read_text())
            fn(m)
            if reseal:
                m["manifest_sha256"] = manifest_digest(m)
            (d / "manifest.json").write_text(json.dumps(m))
        return change

    layer0 = "bert.encoder.layer.0.output.dense"
    _one_line_error(variant("unsealed", edit_manifest(lambda m: m["layers"][layer0].update(offset=1), reseal=False)),
                    "the manifest is damaged or was altered")
    _one_line_error(variant("config", lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"gelu"', '"relu"'))), "config.json: its SHA-256 differs")
    _one_line_error(variant("outside", edit_manifest(lambda m: m.update(weights_file="../good/model.safetensors"))),
                    "is not a file name inside the export folder")
    _one_line_error(variant("absolute", edit_manifest(lambda m: m.update(weights_file="/etc/passwd"))),
                    "is not a file name inside the export folder")
    _one_line_error(variant("added", lambda d: (d / "added_tokens.json").write_text("{}")),
                    "holds files the export did not write (added_tokens.json)")
    _one_line_error(variant("reversed", edit_manifest(lambda m: m["layers"][layer0].update(
        shape=m["layers"][layer0]["shape"][::-1]))), "the model of config.json takes")
    _one_line_error(variant("eight", edit_manifest(lambda m: m["layers"][layer0]["input"].update(bits="eight"))),
                    "input bits 'eight' is not a whole number")
    _one_line_error(variant("strinput", edit_manifest(lambda m: m["layers"][layer0].update(input="lsq"))),
                    "input 'lsq' is not a mapping")
    _one_line_error(variant("nosource", edit_manifest(lambda m: m.pop("source_run"))), "no source_run record")
    _one_line_error(variant("nodata", edit_manifest(lambda m: m["source_run"].pop("data"))), "source_run lacks data")
    _one_line_error(variant("batch0", edit_manifest(lambda m: m["source_run"].update(eval_batch_size=0))),
                    "train.eval_batch_size: 0 must be > 0")
    _one_line_error(variant("batchabc", edit_manifest(lambda m: m["source_run"].update(eval_batch_size="abc"))),
                    "train.eval_batch_size")
    _one_line_error(variant("len", edit_manifest(lambda m: m["source_run"]["data"].update(max_seq_length=100000))),
                    "data.max_seq_length: 100000 is too large")
    _one_line_error(variant("subset", edit_manifest(lambda m: m["source_run"]["data"].update(eval_subset=-1))),
                    "data.eval_subset: -1 must be > 0")
    _one_line_error(variant("vstr", edit_manifest(lambda m: m.update(format_version="1"))),
                    "format version '1' is not a whole number")
    _one_line_error(variant("v1", edit_manifest(lambda m: m.update(format_version=1))),
                    "written by an older squat and carries no integrity record")

    _one_line_error(variant("flip", flip_byte), "SHA-256 differs from the manifest's")
    _one_line_error(variant("trunc", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10)), "SHA-256 differs")
    _one_line_error(variant("bits", edit_manifest(
        lambda m: m["layers"]["bert.encoder.layer.0.output.dense"].update(bits=3))), "expected uint8")
    _one_line_error(variant("kind", edit_manifest(
        lambda m: m["layers"]["bert.encoder.layer.0.output.dense"].update(kind="magic"))), "unknown weight kind 'magic'")
    _one_line_error(variant("ver", edit_manifest(lambda m: m.update(format_version=99))), "format version 99 is newer")
    _one_line_error(variant("json", lambda d: (d / "manifest.json").write_text("{")), "damaged (not JSON)")
    _one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "nothing")]), "no such file or folder")
    _one_line_error(runner.invoke(app, ["evaluate", str(tmp_path)]), "not a run folder, a packed export")
    _one_line_error(runner.invoke(app, ["evaluate", str(good), "--precision", "fp16"]), "--precision: 'fp16'")


def test_evaluate_never_writes_over_the_files_of_what_it_scores(runs, glue_dir, tmp_path):
    """--out naming a file the run or the export is made of (metrics.json marks a run finished and holds its
    numbers; the manifest checks the export) is refused before scoring and the file is left as it was; an earlier
    eval_metrics.json may be replaced; a folder, a missing folder or a file above it is one line too."""
    run = _run(runs, "lsq-w2a8")
    packed = tmp_path / "packed"
    assert runner.invoke(app, ["export", str(run), "--to", str(packed)]).exit_code == 0
    (tmp_path / "afile").write_text("mine")
    for folder, own in ((run, run / "metrics.json"), (run, run / "recipe.yaml"), (packed, packed / "manifest.json")):
        before = own.read_bytes()
        _one_line_error(runner.invoke(app, ["evaluate", str(folder), "--data-dir", str(glue_dir), "--out", str(own)]),
                        f"is one of the files of {folder}")
        assert own.read_bytes() == before
    for out, message in ((tmp_path, "is a folder; name a file"),
                         (tmp_path / "nodir" / "m.json", f"its folder {tmp_path / 'nodir'} does not exist"),
                         (tmp_path / "afile" / "m.json", f"{tmp_path / 'afile'} is a file, not a folder")):
        _one_line_error(runner.invoke(app, ["evaluate", str(packed), "--data-dir", str(glue_dir), "--out", str(out)]),
                        message)
    for _ in range(2):  # the default file, written and then replaced
        assert runner.invoke(app, ["evaluate", str(packed), "--data-dir", str(glue_dir),
                                   "--out", str(packed / "eval_metrics.json")]).exit_code == 0


def _lowbit_nodes(graph, op):
    return [n for n in graph.node if n.op_type == op and n.domain == "com.microsoft"]


def _init(graph, name):
    from onnx import numpy_helper

    return numpy_helper.to_array(next(i for i in graph.initializer if i.name == name))


def _ort_vs_torch(run, folder, glue_dir):
    """The largest |logit difference| between the ONNX graph and the run evaluated by torch in FP32, on the dev set."""
    from squat_cli.export.onnx_runtime import load_onnx

    fq, tok, recipe, task = load_run_model(RunDir(run))
    ort_model, _, _ = load_onnx(folder)
    data = load_task_data(recipe, tok, need_train=False)
    from squat_cli.batching import eval_loader

    loader, _ = eval_loader(next(iter(data.dev.values())), 16, tok.pad_token_id)
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in loader]
    return float((_logits(ort_model, batches) - _logits(fq.float(), batches)).abs().max())


def test_quantized_word_embeddings_export_as_an_exact_lowbit_lookup(runs, glue_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    from squat_cli.export.onnx_lowbit import decode_block_quantized

    run = _run(runs, "lsq-w2a8")
    fq, _, _, _ = load_run_model(RunDir(run))
    emb = fq.bert.embeddings.word_embeddings
    table = emb.wq(emb.weight.detach().float()).detach()
    # packed: 3-bit codes + one step per row
    res = runner.invoke(app, ["export", str(run), "--to", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    layer = json.loads((tmp_path / "p" / "manifest.json").read_text())["layers"]["bert.embeddings.word_embeddings"]
    assert (layer["bits"], layer["granularity"], layer["module"]) == (3, "channel", "QuantEmbedding")
    # ONNX: a GatherBlockQuantized in 4-bit fields whose table decodes to the run's, bit for bit
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--to", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    (gbq,) = _lowbit_nodes(graph, "GatherBlockQuantized")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gbq.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["quantize_axis"] == 1
    data, scales = _init(graph, gbq.input[0]), _init(graph, gbq.input[2])
    assert data.shape == (30522, 16) and scales.shape == (30522, 1)  # 32 features in 4-bit fields, 1 block per row
    assert torch.equal(decode_block_quantized(data, scales, 4, 32), table)
    assert not [i for i in graph.initializer if i.name.endswith("word_embeddings.weight")]  # no FP32 table left
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["kernels"]["embeddings"] == {"op": "GatherBlockQuantized", "bits": 3, "field_bits": 4}
    size = manifest["size"]  # the FP32 checkpoint: the FP run's weights file, less its safetensors header
    fp_file = (RunDir(run).path.parent.parent / "fp" / "seed42" / "model" / "model.safetensors").stat().st_size
    assert 0 < fp_file - size["fp32_checkpoint_bytes"] < 64 * 1024
    assert "1/" in res.output and "of the FP32 checkpoint" in res.output
    assert _ort_vs_torch(run, tmp_path / "o", glue_dir) < 1e-3
    res = runner.invoke(app, ["evaluate", str(tmp_path / "o"), "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("variant,field", [("squat-w2a8", 2), ("squat-w3a8", 4), ("squat-w4a8", 4),
                                           ("q8bert-w8a8", 8), ("lsq-w2a8", 2)])
def test_nbits_graph_weights_decode_to_the_run_weights_bit_for_bit(runs, glue_dir, tmp_path, variant, field):
    onnx = pytest.importorskip("onnx")
    from squat_cli.export.onnx_lowbit import decode_block_quantized
    from squat_cli.quant.qlinear import QuantLinear, quant_layers

    run = _run(runs, variant)
    out = tmp_path / "n"
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--weight-type", "nbits", "--to", str(out)])
    assert res.exit_code == 0, res.output
    graph = onnx.load(str(out / "model.onnx")).graph
    nodes = _lowbit_nodes(graph, "MatMulNBits")
    assert len(nodes) == 12
    assert not [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]  # level 4: none left
    fq, _, _, _ = load_run_model(RunDir(run))
    weights = {f"model.{n}.weight_t.nbits": layer for n, layer in quant_layers(fq) if isinstance(layer, QuantLinear)}
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layer = weights[node.input[1]]
        w = layer.wq(layer.weight.detach().float()).detach()
        assert (attrs["N"], attrs["K"]) == tuple(w.shape) and attrs["bits"] == field and attrs["accuracy_level"] == 4
        packed, scales = _init(graph, node.input[1]), _init(graph, node.input[2])
        block = attrs["block_size"]
        assert block == w.shape[1]  # K is 32 or 64: the largest block up to 128 that divides it
        assert packed.shape == (w.shape[0], w.shape[1] // block, block * field // 8)
        got = decode_block_quantized(packed, scales.reshape(w.shape[0], -1), field, w.shape[1])
        assert torch.equal(got, w), node.input[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weight_type"] == "nbits" and manifest["kernels"]["linear"]["accuracy_level"] == 4
    # scored: int8 activations per block instead of the run's steps; within the QDQ graphs' tolerance
    res = runner.invoke(app, ["evaluate", str(out), "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output
    got = json.loads((out / "eval_metrics.json").read_text())
    res = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(glue_dir), "--precision", "fp32",
                              "--out", str(tmp_path / "fp32.json")])
    ref = json.loads((tmp_path / "fp32.json").read_text())
    assert abs(got["accuracy"] - ref["accuracy"]) <= 1 / 40 + 1e-9
    assert got["eval_loss"] == pytest.approx(ref["eval_loss"], abs=5e-3)


def test_nbits_accuracy_level_0_is_the_exact_graph(runs, glue_dir, tmp_path):
    onnx = pytest.importorskip("onnx")
    run = _run(runs, "squat-w2a8")
    out = tmp_path / "n0"
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--weight-type", "nbits",
                              "--accuracy-level", "0", "--block-size", "16", "--to", str(out)])
    assert res.exit_code == 0, res.output
    graph = onnx.load(str(out / "model.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}
    nodes = _lowbit_nodes(graph, "MatMulNBits")
    assert len(nodes) == 12
    for node in nodes:  # the run's activation step in front of each layer: Q -> DQ -> MatMulNBits
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["accuracy_level"] == 0 and attrs["block_size"] == 16
        act = producer[node.input[0]]
        assert act.op_type == "DequantizeLinear" and producer[act.input[0]].op_type == "QuantizeLinear"
    level0 = _ort_vs_torch(run, out, glue_dir)
    res = runner.invoke(app, ["export", str(run), "--format", "onnx", "--weight-type", "nbits", "--to",
                              str(tmp_path / "n4")])
    assert res.exit_code == 0, res.output
    level4 = _ort_vs_torch(run, tmp_path / "n4", glue_dir)
    import onnxruntime

    assert level0 < 1e-4  # level 0 computes the run's function
    if tuple(int(x) for x in onnxruntime.__version__.split(".")[:2]) >= (1, 29):
        assert level4 > 10 * level0  # level 4 quantizes the activations per block (2-bit int8 kernels since 1.29)


@pytest.mark.parametrize("args,message", [
    (["--format", "onnx", "--weight-type", "nbits"], "(GOBO or Q-BERT) has no exact"),
    (["--format", "onnx", "--weight-type", "int2"], "--weight-type: 'int2' is not one of int8, int4, nbits"),
    (["--format", "onnx", "--accuracy-level", "0"], "--accuracy-level: 0 needs --weight-type nbits"),
    (["--format", "onnx", "--weight-type", "nbits", "--accuracy-level", "2"], "needs --weight-type nbits and one of"),
    (["--format", "onnx", "--weight-type", "nbits", "--block-size", "48"], "--block-size: 48 is not one of"),
    (["--format", "packed", "--weight-type", "nbits"], "--weight-type: an option of --format onnx"),
])
def test_nbits_refusals(runs, tmp_path, args, message):
    pytest.importorskip("onnx")
    run = _run(runs, "qbert-w3a8" if "no exact" in message else "squat-w2a8")
    res = runner.invoke(app, ["export", str(run), *args, "--to", str(tmp_path / "o")])
    _one_line_error(res, message)
    assert not (tmp_path / "o").exists()
