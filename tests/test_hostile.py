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
    """squat in a fresh process (signals and resource limits apply to it alone)."""
    code = script or "import sys; from squat_cli.cli import main; sys.argv = ['squat'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, preexec_fn=preexec,
                          timeout=timeout)


TERM_DURING_WRITE = """
import os, signal, sys
import squat_cli.runs as R
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
