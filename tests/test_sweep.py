"""Sweep: plan expansion, sharding, interruption and resume, on a tiny model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from squat_cli.errors import RecipeError, SquatError
from squat_cli.sweep import describe, load_grid, parse_shard, plan, shard

REPO = Path(__file__).resolve().parents[1]


def test_paper_grid_is_the_paper():
    grid = load_grid(REPO / "recipes" / "paper.yaml")
    jobs = plan(grid)
    assert grid.sweep.tasks == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"]
    fp = [j for j in jobs if j.kind == "fp"]
    q = [j for j in jobs if j.kind == "quantize"]
    sh = [j for j in jobs if j.kind == "sharpness"]
    # per task and seed: Q8BERT 8/8, GOBO W2/W3, Q-BERT, LSQ and SQuAT at W2/W3/W4; sharpness for FP, LSQ, SQuAT
    assert len(fp) == 8 * 3 and len(q) == 8 * 3 * (1 + 2 + 3 * 3) and len(sh) == 2 * 8 * 3 * (1 + 2 * 3)
    assert {j.variant for j in q} >= {"q8bert-w8a8", "gobo-w2a32", "gobo-w3a32", "qbert-w2a8", "qbert-w4a8"}
    assert grid.quant_recipe("rte", 1, "gobo", 2).quant.abits == 32
    mp = grid.quant_recipe("rte", 1, "qbert-mp3", 2).quant
    assert (mp.method, mp.mixed, mp.wbits, mp.variant_parts()) == ("qbert", "2/3", 2, ("qbert-mp3", 2, 8))
    r = grid.quant_recipe("rte", 1, "squat", 4)
    assert (r.sam.rho, r.train.epochs, r.train.lr, r.train.optimizer, r.train.scheduler) == (0.15, 32, 1e-5, "adam",
                                                                                            "cosine")
    assert grid.quant_recipe("rte", 1, "squat", 3).sam.rho == 0.1
    assert grid.fp_recipe("cola", 2).train.epochs == 5 and grid.fp_recipe("cola", 2).model.name_or_path == \
        "bert-base-uncased"


def test_dependency_order():
    jobs = plan(load_grid(REPO / "recipes" / "demo.yaml"))
    ids = [j.id for j in jobs]
    assert ids[0] == "stsb/fp/seed1"
    for j in jobs:
        if j.kind == "quantize":
            assert ids.index(f"{j.task}/fp/seed{j.seed}") < ids.index(j.id)
        if j.kind == "sharpness":
            assert ids.index(f"{j.task}/{j.variant}/seed{j.seed}") < ids.index(j.id)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_shards_cover_grid_exactly_once(n):
    jobs = plan(load_grid(REPO / "recipes" / "paper.yaml"))
    parts = [shard(jobs, i, n) for i in range(n)]
    flat = [j.id for p in parts for j in p]
    assert sorted(flat) == sorted(j.id for j in jobs) and len(set(flat)) == len(flat)
    chains = [{j.chain for j in p} for p in parts]
    assert all(chains)  # every worker has work
    assert sum(len(c) for c in chains) == len(set().union(*chains))  # a (task, seed) chain never spans two shards


def test_bad_shard_and_grid(tmp_path):
    with pytest.raises(SquatError, match="need 0 <= i < n"):
        parse_shard("2/2")
    with pytest.raises(SquatError, match="expected i/n"):
        parse_shard("x")
    p = tmp_path / "g.yaml"
    p.write_text("sweep:\n  tasks: [cola]\n  bits: [2]\n")
    with pytest.raises(RecipeError, match="sweep.bits: unknown key"):
        load_grid(p)
    p.write_text("sweep:\n  tasks: [cola]\nquantize:\n  train:\n    lr: fast\n")
    with pytest.raises(RecipeError, match="train.lr: 'fast' is not valid"):
        load_grid(p)


def _tiny_grid(tmp_path, tiny_bert, glue_dir) -> Path:
    grid = {
        "sweep": {"tasks": ["rte"], "methods": ["lsq", "squat"], "wbits": [2], "seeds": [1, 2],
                  "sharpness_rhos": [0.05]},
        "finetune": {"model": {"name_or_path": str(tiny_bert)},
                     "data": {"data_dir": str(glue_dir), "train_subset": 32, "eval_subset": 16},
                     "train": {"max_steps": 2, "batch_size": 16, "eval_strategy": "end"}},
        "quantize": {"data": {"data_dir": str(glue_dir), "train_subset": 32, "eval_subset": 16},
                     "train": {"max_steps": 2, "batch_size": 16, "eval_strategy": "end", "eval_at_start": False},
                     "quant": {"calib_batches": 1}, "sam": {"rho": 0.05}},
        "sharpness": {"steps": 2, "examples": 16},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _sweep(args, **kw):
    # These tests are about the sweep's bookkeeping: the fused kernels (tested against eager code in
    # test_compiled.py) are off in the child, which saves each child its seconds of torch.compile tracing.
    env = dict(os.environ, HF_HUB_OFFLINE="1", SQUAT_FUSED="0")
    return subprocess.Popen([sys.executable, "-m", "squat_cli", "sweep", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_sweep_resumes_without_repeating(tmp_path, tiny_bert, glue_dir):
    recipe = _tiny_grid(tmp_path, tiny_bert, glue_dir)
    runs = tmp_path / "runs"
    proc = _sweep([str(recipe), "--out", str(runs), "--no-report"])
    first = runs / "rte" / "lsq-w2a8" / "seed1" / "metrics.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.exists(), proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.json")}
    grid = load_grid(recipe)
    status = dict(describe(grid, plan(grid), runs))
    assert "todo" in status.values() and "done" in status.values()
    out = _sweep([str(recipe), "--out", str(runs), "--reports", str(tmp_path / "rep")]).communicate(timeout=300)[0]
    assert all(s == "done" for s in dict(describe(grid, plan(grid), runs)).values()), out
    for p, stamp in done_before.items():
        assert p.stat().st_mtime_ns == stamp, f"{p} was run again"
    assert "Table 1" in out and (tmp_path / "rep" / "table1.md").is_file()


def test_two_shards_share_one_runs_folder(tmp_path, tiny_bert, glue_dir):
    recipe = _tiny_grid(tmp_path, tiny_bert, glue_dir)
    runs = tmp_path / "runs"
    workers = [_sweep([str(recipe), "--out", str(runs), "--shard", f"{i}/2", "--no-report"]) for i in range(2)]
    outs = [w.communicate(timeout=300)[0] for w in workers]  # two workers at once, as on a cluster
    grid = load_grid(recipe)
    assert all(s == "done" for s in dict(describe(grid, plan(grid), runs)).values())
    ran = [line for o in outs for line in o.splitlines() if line.startswith("[")]
    assert len(ran) == len(plan(grid))  # every job ran exactly once across the two workers
    assert "seed1" in outs[0] and "seed2" not in outs[0] and "seed2" in outs[1]


def test_settings_search_runs_each_setting_into_its_own_root(tmp_path, tiny_bert, glue_dir):
    """A settings grid: every quantized run once per named setting, under <out>/<setting>/, all from the
    FP runs in sweep.fp_runs; the search table lists every run with the settings that ran."""
    path = _tiny_grid(tmp_path, tiny_bert, glue_dir)
    data = yaml.safe_load(path.read_text())
    fp_root = tmp_path / "fp-runs"
    data["sweep"].update(methods=["lsq"], wbits=[2], seeds=[1], sharpness_rhos=[], fp_runs=str(fp_root))
    data["settings"] = {"lr-a": {"train.lr": 1.0e-4}, "lr-b": {"train.lr": 3.0e-4, "quant.step_lr": 0.01}}
    path.write_text(yaml.safe_dump(data))
    grid = load_grid(path)
    assert [j.id for j in plan(grid)] == ["rte/fp/seed1", "lr-a/rte/lsq-w2a8/seed1", "lr-b/rte/lsq-w2a8/seed1"]
    assert grid.quant_recipe("rte", 1, "lsq", 2, setting="lr-b").quant.step_lr == 0.01
    runs = tmp_path / "search"
    out = _sweep([str(path), "--out", str(runs), "--reports", str(tmp_path / "rep")]).communicate(timeout=300)[0]
    assert "search: 2 runs (2 finished)" in out, out
    assert (fp_root / "rte" / "fp" / "seed1" / "metrics.json").is_file() and not (runs / "rte").exists()
    for name, lr in (("lr-a", 1.0e-4), ("lr-b", 3.0e-4)):
        run = runs / name / "rte" / "lsq-w2a8" / "seed1"
        assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["lr"] == lr
        assert json.loads((run / "metrics.json").read_text())["from"] == str(fp_root / "rte" / "fp" / "seed1")
    table = (tmp_path / "rep" / "search.md").read_text()
    assert "| lr-a | rte | lsq-w2a8 | 1 | 0.0001 | 0.1 |" in table and "| lr-b | rte | lsq-w2a8 | 1 | 0.0003 | 0.01 |" in table
    assert "| lr-a | rte | lsq-w2a8 | 1 | 0.0001 | 0.1 | - | - | tensor | - |" in table  # SAM settings: not for lsq
    runs_table = table.split("\n\n")[0].splitlines()
    assert len({line.count("|") for line in runs_table}) == 1  # header, delimiter and rows: one column count
    # the same table from `squat report --search`
    res = subprocess.run([sys.executable, "-m", "squat_cli", "report", "--search", "--out", str(runs), "--reports",
                          str(tmp_path / "rep2")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "rep2" / "search.md").read_text() == table


@pytest.mark.parametrize("text,message", [
    ("settings:\n  a: 3\n", "settings: expected a mapping"),
    ("settings:\n  fp: {train.lr: 1.0e-5}\n", "'fp' is not a usable folder name"),
    ("settings:\n  a: {train.lr: fast}\n", "train.lr: 'fast' is not valid"),
    ("sharpness:\n  examples: 0\n", "sharpness.examples: 0 must be > 0"),
    ("sharpness:\n  split: test\n", "sharpness.split: 'test' is not one of train, dev"),
    ("  sharpness_methods: [magic]\n", "unknown method 'magic'"),
    ("  method_wbits: {q8bert: eight}\n", "sweep.method_wbits.q8bert: 'eight' is not valid; expected a list"),
])
def test_bad_grid_sections(tmp_path, text, message):
    p = tmp_path / "g.yaml"
    p.write_text("sweep:\n  tasks: [rte]\n" + text)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        load_grid(p)


def test_sharpness_only_for_the_methods_asked(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("sweep:\n  tasks: [rte]\n  methods: [lsq, squat, joint]\n  wbits: [2]\n  seeds: [1]\n"
                 "  sharpness_rhos: [0.01, 0.05]\n  sharpness_methods: [fp, lsq, squat]\n")
    sh = [j for j in plan(load_grid(p)) if j.kind == "sharpness"]
    assert sorted({j.variant for j in sh}) == ["fp", "lsq-w2a8", "squat-w2a8"] and len(sh) == 6
    p.write_text("sweep:\n  tasks: [rte]\n  methods: [lsq, q8bert]\n  wbits: [2, 4]\n  seeds: [1]\n"
                 "  sharpness_rhos: []\n  method_wbits: {q8bert: [8]}\n")
    assert [j.variant for j in plan(load_grid(p))] == ["fp", "lsq-w2a8", "lsq-w4a8", "q8bert-w8a8"]


def test_a_finished_run_with_another_recipe_is_reported(tmp_path, tiny_bert, glue_dir):
    from squat_cli.executors import run_sweep
    from squat_cli.sweep import recipe_difference

    path = _tiny_grid(tmp_path, tiny_bert, glue_dir)
    data = yaml.safe_load(path.read_text())
    data["sweep"].update(methods=[], seeds=[1], sharpness_rhos=[])
    path.write_text(yaml.safe_dump(data))
    grid = load_grid(path)
    run = tmp_path / "runs" / "rte" / "fp" / "seed1"
    run.mkdir(parents=True)
    rec = grid.fp_recipe("rte", 1)
    (run / "metrics.json").write_text("{}")
    (run / "recipe.yaml").write_text(rec.dump())
    from squat_cli.runs import RunDir

    assert recipe_difference(RunDir(run), rec) is None
    other = yaml.safe_load(rec.dump())
    other["train"]["lr"] = 1.0
    del other["sam"]  # a field missing from an older recipe.yaml counts as its default
    (run / "recipe.yaml").write_text(yaml.safe_dump(other))
    assert recipe_difference(RunDir(run), rec) == "train.lr: 1.0 here, 2e-05 in the grid"
    logged = []
    out = run_sweep(grid, tmp_path / "runs", plan(grid), log=logged.append)
    assert out.skipped == ["rte/fp/seed1"] and out.ran == []
    assert out.warnings == ["rte/fp/seed1: finished with another recipe (train.lr: 1.0 here, 2e-05 in the grid); "
                            "counted as done, not rerun"]
    assert logged == [f"warning: {out.warnings[0]}"]


def test_method_settings_override_one_method(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text("sweep:\n  tasks: [rte]\n  methods: [lsq, squat, joint]\n  wbits: [2]\n  seeds: [1]\n"
                 "quantize:\n  quant: {step_lr: 0.1}\n  sam: {rho: 0.01}\n"
                 "method_settings:\n  squat: {quant.step_lr: 1.0, sam.rho: 0.005}\n  joint: {quant.step_lr: 1.0}\n")
    g = load_grid(p)
    assert g.quant_recipe("rte", 1, "lsq", 2).quant.step_lr == 0.1
    sq = g.quant_recipe("rte", 1, "squat", 2)
    assert (sq.quant.step_lr, sq.sam.rho) == (1.0, 0.005)
    jt = g.quant_recipe("rte", 1, "joint", 2)
    assert (jt.quant.step_lr, jt.sam.rho) == (1.0, 0.01)
    p.write_text("sweep:\n  tasks: [rte]\n  methods: [lsq]\nmethod_settings:\n  squat: {quant.step_lr: 1.0}\n")
    with pytest.raises(RecipeError, match="'squat' is not one of the grid's methods"):
        load_grid(p)
