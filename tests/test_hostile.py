"""The second hostile pass (#31): signals during writes, full disks, stale temporaries, odd paths, odd data and
models, odd grids. Each case goes through the CLI and ends in one line on stderr, a non-zero exit, and nothing
damaged or left half-written."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from squat_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--set", "data.train_subset=32", "--set", "data.eval_subset=16", "--set", "train.batch_size=16",
        "--set", "train.max_steps=2", "--set", "quant.calib_batches=1", "--set", "train.eval_batch_size=16"]


def one_line(res, message, code=2):
    out = res.output.strip()
    assert res.exit_code == code, res.output
    assert len(out.splitlines()) == 1 and message in out and "Traceback" not in out, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, glue_dir, tiny_bert):
    root = tmp_path_factory.mktemp("hostile")
    common = ["--task", "rte", "--data-dir", str(glue_dir), "--out", str(root), *FAST]
    res = runner.invoke(app, ["finetune", "--model", str(tiny_bert), "--task", "rte", "--data-dir", str(glue_dir),
                              "--out", str(root), *FAST[:-4]])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["quantize", *common, "--method", "lsq", "--wbits", "4"])
    assert res.exit_code == 0, res.output
    return root


def _cli(args, env=None, preexec=None, script=None, timeout=300):
    """squat in a fresh process (signals and resource limits apply to it alone), its fused kernels off (they are
    tested in test_compiled.py; here they would only add seconds of torch.compile tracing per process)."""
    code = script or "import sys; from squat_cli.cli import main; sys.argv = ['squat'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "SQUAT_FUSED": "0", **(env or {})},
                          preexec_fn=preexec,
                          timeout=timeout)


TERM_DURING_WRITE = """
import os, signal, sys
import squat_cli.files as R
orig = R.save_tensors
def save(tensors, path, metadata=None):
    orig(tensors, path, metadata)
    with open(path, "r+b") as f:  # a partial file, then the signal
        f.truncate(100)
    os.kill(os.getpid(), signal.SIGTERM)
R.save_tensors = save
import squat_cli.export.packed as P
P.save_tensors = save
from squat_cli.cli import main
sys.argv = ["squat"] + sys.argv[1:]
main()
"""


def test_sigterm_during_export_leaves_nothing_half_written(runs, tmp_path):
    run = runs / "rte" / "lsq-w4a8" / "seed42"
    dest = tmp_path / "exp"
    proc = _cli(["export", str(run), "--to", str(dest)], script=TERM_DURING_WRITE)
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: terminated"
    assert not dest.exists() and not list(tmp_path.glob(".*"))  # no .exp.tmp-PID
    # over an earlier export: the earlier one stays whole
    assert runner.invoke(app, ["export", str(run), "--to", str(dest)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    proc = _cli(["export", str(run), "--to", str(dest)], script=TERM_DURING_WRITE)
    assert proc.returncode == 143
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before and not list(tmp_path.glob(".*"))


def test_stale_temporaries_of_dead_processes_are_swept(runs, tmp_path):
    run = runs / "rte" / "lsq-w4a8" / "seed42"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".exp.tmp-{pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    alive = tmp_path / f".exp.tmp-{os.getppid()}"  # a live process's temporary is left alone
    alive.mkdir()
    assert runner.invoke(app, ["export", str(run), "--to", str(tmp_path / "exp")]).exit_code == 0
    assert not stale.exists() and alive.exists()


def _fsize(limit_bytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.parametrize("command", ["finetune", "quantize", "export"])
def test_file_size_limit_gives_one_line_and_leaves_nothing(runs, tmp_path, glue_dir, tiny_bert, command):
    """ulimit -f: the write fails with EFBIG (Python ignores SIGXFSZ); one line naming the file, exit 2, no folder."""
    out = tmp_path / "out"
    if command == "finetune":
        args = ["finetune", "--model", str(tiny_bert), "--task", "rte", "--data-dir", str(glue_dir), "--out", str(out),
                *FAST[:-4], "--set", "train.save_every=null"]
    elif command == "quantize":
        shutil.copytree(runs / "rte" / "fp", out / "rte" / "fp")
        args = ["quantize", "--task", "rte", "--method", "lsq", "--wbits", "4", "--data-dir", str(glue_dir),
                "--out", str(out), *FAST]
    else:
        args = ["export", str(runs / "rte" / "lsq-w4a8" / "seed42"), "--to", str(out / "exp")]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = _cli(args, preexec=_fsize(1 << 20), env={"SQUAT_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (progress lines come before it)
    assert last.startswith("error: ") and "cannot write (File too large)" in last, proc.stderr
    assert "Traceback" not in proc.stderr and ".tmp-" not in last  # the path the user knows, not a temporary's
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    new = [p for p in after if p not in before and not (p == Path("out") and not any((tmp_path / p).iterdir()))]
    assert new == [], new  # (an empty runs root may stay: the user named it)


def test_a_run_is_known_by_its_own_files_not_its_path(runs, tmp_path, glue_dir, monkeypatch):
    """`cd RUN && squat export .` and a run folder copied to myruns/best-model work like the original."""
    run = runs / "rte" / "lsq-w4a8" / "seed42"
    copy = tmp_path / "myruns" / "best-model"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    res = runner.invoke(app, ["evaluate", str(copy), "--data-dir", str(glue_dir), "--out", str(tmp_path / "m.json")])
    assert res.exit_code == 0, res.output
    ref = json.loads((run / "metrics.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text())["accuracy"] == ref["accuracy"]
    res = runner.invoke(app, ["export", str(copy), "--to", str(tmp_path / "e1")])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(copy)
    res = runner.invoke(app, ["export", ".", "--to", str(tmp_path / "e2")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sharpness", "--rho", "0.01", "--steps", "1", "--examples", "8", "--run", ".",
                              "--data-dir", str(glue_dir)])
    assert res.exit_code == 0, res.output
    assert "ascent/rho=0.01" in json.loads((copy / "sharpness.json").read_text())
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.json").write_text("{}")
    one_line(runner.invoke(app, ["export", "."]), "has no saved model")


GRID = """
sweep: {tasks: [rte], methods: [lsq], wbits: [2], seeds: [1], sharpness_rhos: []}
finetune: {train: {epochs: 1}}
quantize: {train: {epochs: 1}}
"""


@pytest.mark.parametrize("section,value,message", [
    ("finetune", "[1, 2]", "finetune: expected a mapping, got list"),
    ("quantize", "'fast'", "quantize: expected a mapping, got str"),
    ("sharpness", "[1]", "sharpness: expected a mapping, got list"),
    ("sweep", "", "sweep: empty"),
    ("sweep", "{tasks: []}", "sweep: needs at least one task and one seed"),
])
def test_grid_sections_of_the_wrong_type(tmp_path, section, value, message):
    lines = [line for line in GRID.strip().splitlines() if not line.startswith(f"{section}:")]
    path = tmp_path / "g.yaml"
    path.write_text("\n".join([*lines, f"{section}: {value}"]) + "\n")
    for extra in ([], ["--dry-run"]):
        one_line(runner.invoke(app, ["sweep", str(path), "--out", str(tmp_path / "r"), *extra]), message)


def test_absurd_grids_are_refused_fast_and_duplicates_planned_once(tmp_path, monkeypatch):
    from squat_cli.grid import Grid

    built = []
    orig = Grid.quant_recipe
    monkeypatch.setattr(Grid, "quant_recipe", lambda self, *a, **k: built.append(a) or orig(self, *a, **k))
    path = tmp_path / "huge.yaml"
    path.write_text(GRID.replace("seeds: [1]", f"seeds: {list(range(3000))}").replace(
        "tasks: [rte]", "tasks: [rte, mrpc, stsb, cola, sst2, qnli, qqp, mnli, wnli]").replace(
        "methods: [lsq]", "methods: [lsq, squat, joint, ptq, q8bert, qbert]").replace(
        "wbits: [2]", "wbits: [2, 3, 4, 5, 6, 7, 8]"))
    res = runner.invoke(app, ["sweep", str(path), "--dry-run"])
    one_line(res, "sweep: the grid plans up to 1,161,000 jobs (more than 20,000)")
    assert built == []  # refused before any recipe is built
    path.write_text(GRID.replace("seeds: [1]", f"seeds: {list(range(120))}"))
    res = runner.invoke(app, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and "plan: 240 jobs" in res.output
    assert len(built) == 2  # one (method, bits) and one task checked, not 120 seeds' recipes one by one
    path.write_text(GRID.replace("tasks: [rte]", "tasks: [rte, rte]").replace("wbits: [2]", "wbits: [2, 2]")
                    .replace("seeds: [1]", "seeds: [1, 1]").replace("methods: [lsq]", "methods: [lsq, lsq]"))
    res = runner.invoke(app, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and "plan: 2 jobs" in res.output


def _pair_dir(tmp_path, glue_dir, task_dir, rows):
    """A GLUE folder holding one task whose train/dev files have the given extra rows (same layout)."""
    d = tmp_path / "glue"
    shutil.copytree(glue_dir / task_dir, d / task_dir)
    for split in ("train", "dev"):
        f = d / task_dir / f"{split}.tsv"
        f.write_text(f.read_text(encoding="utf-8").rstrip("\n") + "\n" + rows + "\n", encoding="utf-8")
    return d


def test_unicode_line_separators_inside_a_sentence_are_text(tmp_path, glue_dir, tiny_bert):
    """U+2028, NEL and a form feed inside a sentence do not split GLUE's row (rows end at \\n only)."""
    from squat_cli.data import read_tsv
    from squat_cli.tasks import get_task

    odd = "4000\tA sentence\u2028with a line separator,\x85a NEL\x0cand a form feed.\tAnother one.\tentailment"
    d = _pair_dir(tmp_path, glue_dir, "RTE", odd)
    ex = read_tsv(get_task("rte"), d / "RTE" / "dev.tsv")
    assert ex.text_a[-1] == "A sentence\u2028with a line separator,\x85a NEL\x0cand a form feed."
    res = runner.invoke(app, ["finetune", "--model", str(tiny_bert), "--task", "rte", "--data-dir", str(d),
                              "--out", str(tmp_path / "r"), *FAST[:-4]])
    assert res.exit_code == 0, res.output


def test_a_huge_line_is_cut_before_tokenising(tmp_path, minilm_dir):
    """Two 100 KB fields: each text is cut to 16 tokens' worth of characters per position before the tokenizer
    sees it (it would otherwise build a pair of 20,000-token lists to truncate)."""
    from squat_cli.data import CHARS_PER_TOKEN, Examples, encode
    from squat_cli.models import load_tokenizer

    tok = load_tokenizer(str(minilm_dir))
    seen = []
    orig = type(tok).__call__

    def spy(self, a, b=None, **kw):
        seen.append(max(len(t) for t in [*a, *(b or [])]))
        return orig(self, a, b, **kw)

    type(tok).__call__ = spy
    try:
        long = "word " * 20_000
        enc = encode(Examples([long, "short"], [long, "also short"], [0, 1], "x:long"), tok, 64, False, use_cache=False)
    finally:
        type(tok).__call__ = orig
    assert seen == [CHARS_PER_TOKEN * 64]
    assert int(enc.offsets[1] - enc.offsets[0]) == 64  # still a full sequence


@pytest.mark.parametrize("length,message", [(1, "cannot hold a sentence pair"), (4, "cannot hold a sentence pair")])
def test_lengths_that_cannot_hold_the_special_tokens(tmp_path, glue_dir, tiny_bert, length, message):
    res = runner.invoke(app, ["finetune", "--model", str(tiny_bert), "--task", "rte", "--data-dir", str(glue_dir),
                              "--out", str(tmp_path / "r"), "--set", f"data.max_seq_length={length}"])
    one_line(res, f"data.max_seq_length: {length} {message}")
    assert not (tmp_path / "r" / "rte").exists()


def test_a_correlation_needs_two_examples(tmp_path, glue_dir, tiny_bert):
    res = runner.invoke(app, ["finetune", "--model", str(tiny_bert), "--task", "stsb", "--data-dir", str(glue_dir),
                              "--out", str(tmp_path / "r"), "--set", "data.eval_subset=1"])
    one_line(res, "a correlation (pearson, spearmanr) needs at least two")


def test_models_that_do_not_fit_are_refused(tmp_path, glue_dir, tiny_bert, minilm_dir):
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_bert, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "model_type": "roberta",
                                                   "architectures": ["RobertaForSequenceClassification"]}))
    base = ["finetune", "--task", "rte", "--data-dir", str(glue_dir), "--out", str(tmp_path / "r"), *FAST[:-4]]
    one_line(runner.invoke(app, [*base, "--model", str(wrong)]), "encoder weights of the roberta model")
    small = tmp_path / "small"
    shutil.copytree(tiny_bert, small)
    from transformers import BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig(**{**cfg, "vocab_size": 100})).save_pretrained(small)
    one_line(runner.invoke(app, [*base, "--model", str(small)]), "the model's word embeddings have 100 rows")
    one_line(runner.invoke(app, [*base, "--model", "my model"]), "not a valid hub id")
    for flag in ("--model", "--data-dir", "--out"):
        args = [*base, "--model", str(tiny_bert)]
        args[args.index(flag) + 1] = "~nosuchuser/x"
        one_line(runner.invoke(app, args), "names no user on this machine")
    res = runner.invoke(app, [*base, "--model", str(tiny_bert)], env={"SQUAT_CACHE_DIR": "~nosuchuser/c"})
    one_line(res, "SQUAT_CACHE_DIR '~nosuchuser/c': ~nosuchuser names no user")
    (tmp_path / "afile").write_text("x")
    args = [*base, "--model", str(tiny_bert)]
    args[args.index("--data-dir") + 1] = str(tmp_path / "afile")
    one_line(runner.invoke(app, args), "is a file, not a folder")
    assert not (tmp_path / "r" / "rte").exists()


def _fake_runs(root):
    """Run folders with small files only, enough for every table and figure of a report."""
    for variant, values in (("lsq-w2a8", (0.60, 0.62, 0.61)), ("squat-w2a8", (0.63, 0.64, 0.60)),
                            ("joint-w2a8", (0.64, 0.61, 0.62))):
        for seed, v in enumerate(values, 1):
            d = root / "rte" / variant / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"task": "rte", "accuracy": v, "steps": 10,
                                                        "train_time_s": 10.0 * seed}))
            (d / "recipe.yaml").write_text("model: {name_or_path: bert-base-uncased}\n")
            (d / "sharpness.json").write_text(json.dumps({"ascent/rho=0.05": {"score": 0.1 * seed, "loss0": 0.3}}))
    return root


def test_an_interrupted_report_leaves_the_previous_set(tmp_path, monkeypatch):
    import squat_cli.report.build as B

    runs = _fake_runs(tmp_path / "runs")
    reports = tmp_path / "rep"
    reports.mkdir()
    (reports / "README.md").write_text("a page that lives here")
    assert runner.invoke(app, ["report", "results", "--out", str(runs), "--reports", str(reports)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in reports.iterdir()}
    (runs / "rte" / "lsq-w2a8" / "seed1" / "metrics.json").write_text(json.dumps(
        {"task": "rte", "accuracy": 0.1, "steps": 10, "train_time_s": 10.0}))  # the tables would change

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "figure_pairs", interrupted)  # after the tables and two figures were written
    res = runner.invoke(app, ["report", "results", "--out", str(runs), "--reports", str(reports)])
    assert res.exit_code == 130 and "interrupted" in res.output
    assert {p.name: p.read_bytes() for p in reports.iterdir()} == before  # the old set, whole; no temporaries


def test_a_file_in_the_way_of_the_reports_folder_is_one_line(tmp_path):
    """--reports naming a file, or a folder under one: one line naming the file, for every kind of report, and
    the file is left as it was."""
    runs = _fake_runs(tmp_path / "runs")
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    for where in (blocker, blocker / "sub" / "rep"):
        for kind in (["results"], ["search"], ["variants", "--reference", str(runs)],
                     ["compare", "--reference", str(runs)]):
            res = runner.invoke(app, ["report", *kind, "--out", str(runs), "--reports", str(where)])
            one_line(res, f"cannot write to {where}: {blocker} is a file, not a folder")
    assert blocker.read_text() == "mine"


def test_a_full_disk_during_report_names_the_file(tmp_path):
    runs = _fake_runs(tmp_path / "runs")
    proc = _cli(["report", "results", "--out", str(runs), "--reports", str(tmp_path / "rep")], preexec=_fsize(4096))
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tmp_path / "rep") in last and "File too large" in last, proc.stderr
    assert ".tmp-" not in last and "Traceback" not in proc.stderr
    assert not list((tmp_path / "rep").iterdir())  # nothing of the set was written
