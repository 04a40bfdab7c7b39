"""Report tables from synthetic run folders with known metrics: exact means and stds, '-' for missing."""

import json
import statistics

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.report.build import write_report
from squat_cli.report.paper import paper_value

runner = CliRunner()


def make_run(root, task, variant, seed, metrics, recipe=None, sharp=None):
    d = root / task / variant / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"task": task, **metrics}))
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe or {"model": {"name_or_path": "bert-base-uncased"}}))
    if sharp:
        (d / "sharpness.json").write_text(json.dumps(sharp))
    return d


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "cola", "fp", 1, {"matthews_correlation": 0.55})
    for seed, v in zip((1, 2, 3), (0.50, 0.52, 0.57)):
        make_run(root, "cola", "lsq-w2a8", seed, {"matthews_correlation": v},
                 sharp={"ascent/rho=0.05": {"score": 0.2 + seed / 100, "loss0": 0.3},
                        "ascent/rho=0.01": {"score": 0.04, "loss0": 0.3}})
    for seed, v in zip((1, 2), (0.53, 0.54)):
        make_run(root, "cola", "squat-w2a8", seed, {"matthews_correlation": v},
                 sharp={"ascent/rho=0.05": {"score": 0.1, "loss0": 0.35}})
    make_run(root, "mrpc", "squat-w2a8", 1, {"accuracy": 0.84, "f1": 0.889})
    make_run(root, "cola", "joint-w2a8", 1, {"matthews_correlation": 0.49})
    # damaged runs
    (root / "rte" / "lsq-w2a8" / "seed1").mkdir(parents=True)  # incomplete
    bad = make_run(root, "sst2", "lsq-w2a8", 1, {"accuracy": 0.9})
    (bad / "metrics.json").write_text("{not json")
    make_run(root, "sst2", "lsq-w4a8", 1, {"loss": 1.0})  # metric missing
    return root


def test_means_stds_and_missing(grid, tmp_path):
    rep = write_report(grid, tmp_path / "reports")
    t1 = rep.tables[0].frame.set_index(["method", "W/A"])
    lsq = t1.loc[("LSQ", "2/8")]
    assert lsq["CoLA"] == pytest.approx(statistics.mean([50, 52, 57]))
    assert lsq["CoLA_std"] == pytest.approx(statistics.stdev([50, 52, 57]))
    assert lsq["CoLA_n"] == 3
    assert lsq["CoLA_paper"] == 51.3 and lsq["CoLA_diff"] == pytest.approx(53.0 - 51.3)
    sq = t1.loc[("SQuAT", "2/8")]
    assert sq["CoLA"] == pytest.approx(53.5) and sq["CoLA_std"] == pytest.approx(statistics.stdev([53, 54]))
    assert sq["MRPC"] == pytest.approx(84.0) and sq["MRPC_n"] == 1
    assert t1.loc[("FP32", "32/32")]["CoLA"] == pytest.approx(55.0)
    assert t1.loc[("Joint", "2/8")]["CoLA_paper"] is None or str(t1.loc[("Joint", "2/8")]["CoLA_paper"]) == "nan"
    md = (tmp_path / "reports" / "table1.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| LSQ | 2/8"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "53.00 ± 3.61 (n=3) · paper 51.3 (Δ +1.70)"
    assert cells[3] == "- · paper 92.2"  # SST-2: no valid run, paper number still shown
    sq_row = next(line for line in md.splitlines() if line.startswith("| SQuAT | 2/8"))
    assert "84.00 (n=1) · paper 84 (Δ +0.00)" in sq_row
    t2 = rep.tables[1].frame.set_index(["method", "W/A"])
    assert t2.loc[("SQuAT", "2/8")]["MRPC F1"] == pytest.approx(88.9)
    assert t2.loc[("SQuAT", "2/8")]["MRPC F1_paper"] == 88.9
    t4 = rep.tables[3].frame.set_index(["method", "W/A"])
    assert t4.loc[("LSQ", "2/8")]["CoLA"] == pytest.approx(statistics.mean([0.21, 0.22, 0.23]))
    assert t4.loc[("LSQ", "2/8")]["CoLA_loss0"] == pytest.approx(0.3)
    assert t4.loc[("LSQ", "2/8")]["CoLA_paper"] == pytest.approx(0.23983)
    t3 = rep.tables[2].frame.set_index(["method", "W/A"])
    assert t3.loc[("SQuAT", "2/8")]["CoLA_n"] == 0  # no rho=0.01 score for SQuAT runs
    csv = (tmp_path / "reports" / "table1.csv").read_text().splitlines()
    assert csv[0].startswith("method,W/A,CoLA,CoLA_std,CoLA_n,CoLA_paper,CoLA_diff")
    reasons = dict(rep.skipped)
    assert reasons[str(grid / "rte" / "lsq-w2a8" / "seed1")] == "incomplete (no metrics.json)"
    assert "not valid JSON" in reasons[str(grid / "sst2" / "lsq-w2a8" / "seed1")]
    assert reasons[str(grid / "sst2" / "lsq-w4a8" / "seed1")] == "metrics.json lacks accuracy"
    # SQuAT and LSQ share CoLA W2 seeds 1 and 2: their paired differences get a figure too
    assert {p.name for p in rep.figures} == {"fig2_sharpness.png", "fig3_joint_vs_alternate.png", "fig_pairs.png"}
    for p in rep.figures:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "reports" / "report.md").read_text()
    assert "Skipped runs" in text and "tasks: cola, mrpc only" in text


def test_figure3_draws_paired_differences_seed_by_seed(grid):
    """Figure 3's bars are means of paired differences (same task, bits, seed), not differences of means: CoLA W2
    joint - LSQ is seed 1 only (49 - 50 = -1); SQuAT - LSQ seeds 1 and 2 (53 - 50, 54 - 52), not 53.5 - 53.
    No W4 pairs: no W4 panel."""
    from squat_cli.report.claims import claim_summaries
    from squat_cli.report.collect import collect
    from squat_cli.report.figures import difference_series

    _, tables = claim_summaries(collect(grid).results)
    series = difference_series(tables, 2)
    assert series["Joint − LSQ"] == {"cola": pytest.approx([-1.0])}
    assert series["SQuAT (alternate) − LSQ"] == {"cola": pytest.approx([3.0, 2.0])}
    assert difference_series(tables, 4) == {}


def test_paper_numbers_shipped():
    assert paper_value("table1", "squat", 3, "mrpc", "accuracy") == 86.2
    assert paper_value("table1", "fp", 32, "mnli", "accuracy") == 84.34
    assert paper_value("table2", "lsq", 4, "mnli", "accuracy_mm") == 84.7
    assert paper_value("table3", "squat", 4, "rte", "sharpness") == 0.03905
    assert paper_value("table4", "lsq", 3, "qqp", "sharpness") == 0.07237
    assert paper_value("table1", "q8bert", 8, "rte", "accuracy") == 68.8
    assert paper_value("table1", "lsq", 2, "mnli", "accuracy") == 83.6
    assert paper_value("table1", "joint", 2, "cola", "matthews_correlation") is None


def test_report_cli_prints_table1(grid, tmp_path):
    res = runner.invoke(app, ["report", "results", "--out", str(grid), "--reports", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "Table 1" in res.output and "53.00 ± 3.61 (n=3)" in res.output
    assert "skipped" in res.output and "differs from the paper" in res.output
    assert "deprecated" not in res.output


def test_old_report_spelling_still_works_with_a_notice_and_the_same_files(grid, variants, tmp_path):
    old = runner.invoke(app, ["report", "--out", str(grid), "--reports", str(tmp_path / "old")])
    new = runner.invoke(app, ["report", "results", "--out", str(grid), "--reports", str(tmp_path / "new")])
    assert old.exit_code == new.exit_code == 0, old.output
    assert "notice: `squat report` without a subcommand is deprecated" in old.output and "report results" in old.output
    ref, var = variants
    old_v = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(tmp_path / "old_v"),
                                "--reference", str(ref)])
    new_v = runner.invoke(app, ["report", "variants", "--out", str(var), "--reports", str(tmp_path / "new_v"),
                                "--reference", str(ref)])
    assert old_v.exit_code == new_v.exit_code == 0 and "use `squat report variants`" in old_v.output
    for a, b in (("old", "new"), ("old_v", "new_v")):
        names = sorted(p.name for p in (tmp_path / a).iterdir() if p.suffix in (".md", ".csv"))
        assert names and names == sorted(p.name for p in (tmp_path / b).iterdir() if p.suffix in (".md", ".csv"))
        for name in names:
            assert (tmp_path / a / name).read_text() == (tmp_path / b / name).read_text(), name
    res = runner.invoke(app, ["report", "variants", "--out", str(var)])
    assert res.exit_code == 2 and "--reference: give the runs root" in res.output


def test_report_empty_and_missing(tmp_path):
    res = runner.invoke(app, ["report", "results", "--out", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "runs folder" in res.output and "does not exist" in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["report", "--out", str(tmp_path / "empty"), "--reports", str(tmp_path / "r")])
    assert res.exit_code == 0
    assert "No runs." in (tmp_path / "r" / "table1.md").read_text()
    assert not (tmp_path / "r" / "fig_pairs.png").exists()  # no pairs, no figure of them


def test_sharpness_scores_whose_ascent_stopped_inside_the_ball_are_flagged(tmp_path):
    root = tmp_path / "runs"
    for seed, norm in ((1, 0.05), (2, 0.012), (3, 0.0499999)):  # seed 2 stopped at a quarter of rho
        make_run(root, "rte", "lsq-w2a8", seed, {"accuracy": 0.6},
                 sharp={"ascent/rho=0.05": {"score": 0.1, "loss0": 0.6, "delta_norm": norm},
                        "ascent/rho=0.01": {"score": 0.02, "loss0": 0.6, "delta_norm": 0.01, "reached_edge": True}})
    rep = write_report(root, tmp_path / "rep")
    t3, t4 = (t.frame.set_index(["method", "W/A"]).loc[("LSQ", "2/8")] for t in rep.tables[2:4])
    assert t4["RTE_short"] == 1 and t3["RTE_short"] == 0
    # the cell shows the smallest final ||delta_T|| among its ascents: seed 2's 0.012 at rho 0.05
    assert t4["RTE_delta"] == pytest.approx(0.012) and t3["RTE_delta"] == pytest.approx(0.01)
    md4 = (tmp_path / "rep" / "table4.md").read_text()
    assert "0.10000 ± 0.00000 (n=3), L0 0.600, ‖δ‖ 0.0120 †1" in md4 and "stopped inside the ball" in md4
    assert "0.02000 ± 0.00000 (n=3), L0 0.600, ‖δ‖ 0.0100" in (tmp_path / "rep" / "table3.md").read_text()
    assert "†" not in (tmp_path / "rep" / "table3.md").read_text()
    assert "RTE_short" in (tmp_path / "rep" / "table4.csv").read_text().splitlines()[0]
    assert "RTE_delta" in (tmp_path / "rep" / "table4.csv").read_text().splitlines()[0]


def test_paired_claims_by_hand(tmp_path):
    """SQuAT - LSQ per (task, bits, seed): diffs +2, +1, -0.5 at W2 (mean 0.8333), known bootstrap bounds,
    won/lost 2/1; sharpness pairs with a short ascent are left out; cost: median time and median ratio to LSQ."""
    from squat_cli.report.claims import bootstrap_ci

    root = tmp_path / "runs"
    for seed, (lsq, sq) in zip((1, 2, 3), ((0.50, 0.52), (0.60, 0.61), (0.55, 0.545))):
        make_run(root, "rte", "lsq-w2a8", seed, {"accuracy": lsq, "steps": 10, "train_time_s": 100.0},
                 sharp={"ascent/rho=0.05": {"score": 0.3, "loss0": 0.5, "delta_norm": 0.05}})
        slow = 900.0 if seed == 2 else 300.0  # one run slowed by other work on the machine, recorded as such
        make_run(root, "rte", "squat-w2a8", seed, {"accuracy": sq, "steps": 10, "train_time_s": slow,
                                                   "cpu_share": 0.35 if seed == 2 else 0.93},
                 sharp={"ascent/rho=0.05": {"score": 0.1, "loss0": 0.6,
                                            "delta_norm": 0.05 if seed != 3 else 0.01}})
        make_run(root, "rte", "fp", seed, {"accuracy": 0.5, "steps": 10, "train_time_s": 90.0})
    write_report(root, tmp_path / "rep")
    md = (tmp_path / "rep" / "claims.md").read_text()
    lo, hi = bootstrap_ci(np.array([2.0, 1.0, -0.5]))
    assert -0.5 <= lo < 0.8333 < hi <= 2.0
    assert f"| C1 | SQuAT - LSQ, main dev metric (points) | W2 | 3 | +0.83 | [{lo:+.2f}, {hi:+.2f}] | 2/1 |" in md
    # two usable sharpness pairs (seed 3's SQuAT ascent stopped short): -0.2 each, so SQuAT is flatter
    assert "| C2 | SQuAT - LSQ, sharpness at rho 0.05 (negative: SQuAT flatter) | W2 | 2 | -0.20000 |" in md
    assert [line for line in md.splitlines() if line.startswith("| C2 | SQuAT - LSQ, sharpness at rho 0.05")][0] \
        .endswith("| 1 |")
    # the run that shared the CPU (cpu_share 0.35) is left out of the cost and counted
    assert "| squat | 2/8 | 2 | 300 | 3.00x | 1 |" in md and "| lsq | 2/8 | 3 | 100 | 1.00x | 0 |" in md
    # every pair on its own, seed by seed; the short sharpness pair marked and left out of the row's mean
    assert "| C1 | SQuAT - LSQ, main dev metric (points) | rte | W2 | +2.00 | +1.00 | -0.50 | +0.83 |" in md
    assert ("| C2 | SQuAT - LSQ, sharpness at rho 0.05 | rte | W2 | -0.2000 (L0 +0.1000) | -0.2000 (L0 +0.1000) | "
            "-0.2000 (L0 +0.1000) † | -0.2000 |") in md
    assert "SQuAT - FP" not in md.split("### Per-seed paired differences")[1]  # no W3/W4 runs: no C4 pairs
    assert "over 2 pairs" not in md  # two usable pairs with equal differences: no correlation to give
    pairs = (tmp_path / "rep" / "pairs.csv").read_text().splitlines()
    assert pairs[0] == "comparison,task,wbits,seed,value_a,value_b,diff,short,loss0_diff"
    assert "squat-vs-lsq,rte,2,1,52,50,2,False," in "\n".join(pairs)
    assert "sharpness-0.05,rte,2,3,0.1,0.3,-0.2,True,0.1" in "\n".join(pairs)


def test_gobo_and_qbert_rows_beside_the_papers(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "stsb", "gobo-w2a32", 1, {"pearson": 0.80, "spearmanr": 0.79})
    make_run(root, "stsb", "gobo-w3a32", 1, {"pearson": 0.86, "spearmanr": 0.85})
    make_run(root, "sst2", "qbert-w2a8", 1, {"accuracy": 0.85})
    make_run(root, "sst2", "qbert-mp3-w2a8", 1, {"accuracy": 0.88})
    make_run(root, "mnli", "qbert-w3a8", 1, {"accuracy": 0.8, "accuracy_mm": 0.81})
    rep = write_report(root, tmp_path / "rep")
    t1 = rep.tables[0].frame.set_index(["method", "W/A"])
    assert t1.loc[("GOBO", "2/32")]["STS-B_paper"] == 82.7 and t1.loc[("GOBO", "2/32")]["STS-B"] == pytest.approx(80)
    assert t1.loc[("GOBO", "3/32")]["STS-B_paper"] == 88.3
    assert t1.loc[("Q-BERT", "2/8")]["SST-2_paper"] == 84.6
    assert t1.loc[("Q-BERT MP 2/3", "2/8")]["SST-2"] == pytest.approx(88.0)
    t2 = rep.tables[1].frame.set_index(["method", "W/A"])
    assert t2.loc[("Q-BERT", "3/8")]["MNLI-mm_paper"] == 83.8 and t2.loc[("Q-BERT", "3/8")]["MNLI-mm"] == \
        pytest.approx(81.0)
    order = list(rep.tables[0].frame["method"])
    assert order.index("GOBO") < order.index("Q-BERT") < order.index("Q-BERT MP 2/3")


def test_grid_note_and_speed_options_in_the_header(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "rte", "lsq-w2a8", 1, {"accuracy": 0.6},
             recipe={"model": {"name_or_path": "bert-base-uncased"}, "train": {"precision": "bf16",
                                                                                "group_by_length": True}})
    rep = write_report(root, tmp_path / "rep", note="A miniature: the evidence is in docs/replication/README.md")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert md.splitlines()[2] == "> A miniature: the evidence is in docs/replication/README.md"
    assert "bf16 autocast in training (lsq; paper: fp32)" in rep.header
    assert "batches grouped by length (lsq; paper: random batches)" in rep.header


def test_alias_bomb_in_a_run_folder_recipe_does_not_stall_the_report(tmp_path):
    import time

    root = tmp_path / "runs"
    run = make_run(root, "rte", "lsq-w2a8", 1, {"accuracy": 0.6})
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 10) + "]" for i in range(1, 9)]
    (run / "recipe.yaml").write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    rep = write_report(root, tmp_path / "rep")
    assert time.perf_counter() - t0 < 10
    assert rep.tables[0].frame.set_index(["method", "W/A"]).loc[("LSQ", "2/8")]["RTE"] == pytest.approx(60.0)


@pytest.fixture
def variants(tmp_path):
    """Reference LSQ and SQuAT runs (RTE W2, seeds 1-3) and three variants with hand-chosen results."""
    ref, var = tmp_path / "grid", tmp_path / "variants"
    for seed, lsq, sq in zip((1, 2, 3), (0.60, 0.62, 0.64), (0.66, 0.64, 0.68)):
        make_run(ref, "rte", "lsq-w2a8", seed, {"accuracy": lsq, "steps": 10, "train_time_s": 100.0})
        make_run(ref, "rte", "squat-w2a8", seed, {"accuracy": sq, "steps": 10, "train_time_s": 300.0})
        make_run(ref, "rte", "lsq-w4a8", seed, {"accuracy": 0.9, "steps": 10, "train_time_s": 100.0})  # not run
        make_run(ref, "rte", "joint-w2a8", seed, {"accuracy": 0.9, "steps": 10, "train_time_s": 100.0})
    runs = {"cheap": ((0.65, 0.65, 0.66), (120.0, 130.0, 125.0)),   # -1, +1, -2 points; 1.25x
            "bad": ((0.55, 0.56, 0.57), (110.0, 110.0, 110.0)),     # -11, -8, -11; 1.1x
            "slow": ((0.66, 0.64, 0.68), (250.0, 250.0, 250.0))}    # 0, 0, 0; 2.5x
    for name, (vals, times) in runs.items():
        for seed, v, t in zip((1, 2, 3), vals, times):
            make_run(var / name, "rte", "squat-w2a8", seed, {"accuracy": v, "steps": 10, "train_time_s": t},
                     sharp={"ascent/rho=0.01": {"score": 0.01 * seed, "loss0": 0.5, "delta_norm": 0.01}})
    # a fourth variant timed while the CPU was shared on seed 2: that time is no cost (left out, shown as -)
    for seed, t, share in ((1, 200.0, 0.95), (2, 900.0, 0.4), (3, 200.0, 0.95)):
        make_run(var / "shared", "rte", "squat-w2a8", seed,
                 {"accuracy": 0.66, "steps": 10, "train_time_s": t, "cpu_share": share})
    return ref, var


def test_variants_verdicts_match_hand_computation(variants, tmp_path):
    from squat_cli.report.variants import write_variants

    ref, var = variants
    found = {v.method: v for v in write_variants(var, ref, tmp_path / "out")}
    assert sorted(found) == ["bad", "cheap", "shared", "slow"]
    assert found["shared"].cost == pytest.approx(2.0)  # seeds 1 and 3; seed 2's 900 s shared the CPU
    cheap, bad, slow = found["cheap"], found["bad"], found["slow"]
    # squat's seeds 66 / 64 / 68: variance 4, noise 2 points
    assert cheap.noise == pytest.approx(2.0)
    assert cheap.pairs == 3 and cheap.mean == pytest.approx(-2 / 3)
    assert cheap.lo < 0 < cheap.hi and cheap.cost == pytest.approx(1.25)
    assert cheap.within_noise and cheap.meets_cost
    assert bad.mean == pytest.approx(-10.0) and bad.cost == pytest.approx(1.1)
    assert not bad.within_noise and bad.meets_cost
    assert slow.mean == 0 and slow.lo == slow.hi == 0 and slow.within_noise
    assert slow.cost == pytest.approx(2.5) and not slow.meets_cost
    rows = (tmp_path / "out" / "variants.csv").read_text().splitlines()
    assert len(rows) == 1 + 18  # 4 variants + LSQ + SQuAT, 3 seeds each; the W4 and joint reference runs left out
    md = (tmp_path / "out" / "variants.md").read_text()
    assert "| shared | rte | 2/8 | 2 | 66.00 | - | - | - | - |" in md
    assert "| cheap | rte | 2/8 | 3 | 66.00 | 125 | 1.25x | 0.03000 | - |" in md
    assert "Variants that do both: cheap." in md
    # per method: cheap 65 / 65 / 66 (sd 0.577), minus LSQ's 60 / 62 / 64 = 5, 3, 2; sharpness 0.01 / 0.02 / 0.03
    assert "| cheap | 2/8 | 3 | 65.33 ± 0.58 | +3.33 | 0.02000 | - | 125 | 1.25x |" in md
    assert "| lsq | 2/8 | 3 | 62.00 ± 2.00 | +0.00 | - | - | 100 | 1.00x |" in md
    assert "| shared | 2/8 | 3 | 66.00 ± 0.00 | +4.00 | - | - | 200 | 2.00x |" in md
    table = md[md.index("### Per method"):md.index("### Every run")]
    assert table.index("| lsq |") < table.index("| squat |") < table.index("| bad |") < table.index("| cheap |")
    assert (tmp_path / "out" / "variants.png").read_bytes()[:4] == b"\x89PNG"


def test_variants_report_cli_and_bad_input(variants, tmp_path):
    ref, var = variants
    out = tmp_path / "rep"
    r = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(out), "--reference", str(ref)])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # the console wraps long lines
    assert "cheap: -0.67 points vs squat (3 pairs), 1.25x lsq; within noise: yes, cost goal: yes" in said
    assert (out / "search.md").is_file() and (out / "variants.md").is_file()
    r = runner.invoke(app, ["report", "--out", str(var), "--reports", str(out), "--reference", str(ref)])
    assert r.exit_code == 2 and "give it with --search" in r.output
    (var / "lsq" / "rte").mkdir(parents=True)
    make_run(var / "lsq", "rte", "squat-w2a8", 1, {"accuracy": 0.5})
    r = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(out), "--reference", str(ref)])
    assert r.exit_code == 2 and "named like a reference method" in r.output


def test_variants_cost_from_timed_reruns_of_the_reference(variants, tmp_path):
    """--timing: reruns of reference LSQ runs give the baseline's times; dev metrics stay the reference's, and the
    report says how many reruns repeated the reference's dev metric exactly."""
    from squat_cli.report.variants import write_variants

    ref, var = variants
    timing = tmp_path / "timing"
    make_run(timing, "rte", "lsq-w2a8", 1, {"accuracy": 0.60, "steps": 10, "train_time_s": 80.0})
    make_run(timing, "rte", "lsq-w2a8", 2, {"accuracy": 0.63, "steps": 10, "train_time_s": 100.0})  # not the same
    make_run(timing, "rte", "lsq-w4a8", 1, {"accuracy": 0.9, "steps": 10, "train_time_s": 10.0})  # no variant ran
    found = {v.method: v for v in write_variants(var, ref, tmp_path / "out", timing=timing)}
    cheap = found["cheap"]
    assert cheap.cost == pytest.approx(1.3)  # 120 / 80, 130 / 100, 125 / 100 (seed 3 keeps the reference's time)
    assert cheap.mean == pytest.approx(-2 / 3) and cheap.noise == pytest.approx(2.0)  # accuracy untouched
    assert found["slow"].cost == pytest.approx(2.5)  # 250 / 80, 250 / 100, 250 / 100
    md = (tmp_path / "out" / "variants.md").read_text()
    assert "| lsq | rte | 2/8 | 1 | 60.00 | 80 | 1.00x |" in md
    assert "| lsq | rte | 2/8 | 2 | 62.00 | 100 | 1.00x |" in md  # the reference's dev metric, the rerun's time
    assert "Training times of 2 reference runs come from their reruns" in md
    assert "1 of 2 reruns gave the reference's dev metric exactly" in md
    said = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(tmp_path / "r"),
                               "--timing", str(timing)])
    assert said.exit_code == 2 and "give it with --search --reference" in said.output
    said = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(tmp_path / "r"),
                               "--reference", str(ref), "--timing", str(tmp_path / "nowhere")])
    assert said.exit_code == 2 and "does not exist" in said.output
    said = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(tmp_path / "r"),
                               "--reference", str(ref), "--timing", str(timing)])
    assert said.exit_code == 0 and "cheap: -0.67 points vs squat (3 pairs), 1.30x lsq" in " ".join(said.output.split())


def test_variants_within_noise_unknown_with_one_target_seed(variants, tmp_path):
    """One SQuAT seed gives no seed noise: the verdict says it cannot tell instead of 'no'."""
    from squat_cli.report.variants import write_variants

    ref, var = variants
    for seed in (2, 3):
        for f in (ref / "rte" / "squat-w2a8" / f"seed{seed}").iterdir():
            f.unlink()
        (ref / "rte" / "squat-w2a8" / f"seed{seed}").rmdir()
    found = {v.method: v for v in write_variants(var, ref, tmp_path / "out")}
    assert found["cheap"].pairs == 1 and found["cheap"].mean == pytest.approx(-1.0)
    assert found["cheap"].within_noise is None
    assert "| cheap | 1 | -1.00 | [-1.00, -1.00] | - | - | 1.25x | yes |" in (tmp_path / "out" / "variants.md").read_text()


def test_verdict_cells_and_rules_by_hand():
    from squat_cli.report.verdicts import Cell, cell, combine

    assert cell("a", np.array([1.0, 2.0, 3.0]), +1).side == "for"
    assert cell("a", np.array([-1.0, -2.0, -3.0]), +1).side == "against"
    assert cell("a", np.array([-1.0, -2.0, -3.0]), -1).side == "for"
    mixed = cell("a", np.array([-1.0, 2.0, 0.5]), +1)
    assert mixed.side == "undecided" and mixed.mean == pytest.approx(0.5) and mixed.n == 3
    c = {s: Cell("x", 3, 0.0, 0.0, 0.0, s) for s in ("for", "against", "undecided")}
    assert combine([c["for"], c["for"]]) == "holds"
    assert combine([c["for"], c["against"]]) == "partly"
    assert combine([c["undecided"], c["against"]]) == "contradicted"
    assert combine([c["undecided"], c["undecided"]]) == "not shown"
    assert combine([]) == "no data"


@pytest.fixture
def claims_grid(tmp_path):
    """RTE and CoLA, 3 seeds, FP 60 everywhere. SQuAT - LSQ: W2 +1/+2/+3 points on both tasks, W4 -1/+1/+0.5 on
    both. Sharpness: SQuAT 0.1 under LSQ at both radii (one RTE rho 0.05 pair short). joint W2: -1/0/+2 against
    LSQ, -2/-2/-1 against SQuAT. SQuAT W4 on CoLA is 60/61/60 (FP 60), under FP everywhere else."""
    root = tmp_path / "runs"
    metric = {"rte": "accuracy", "cola": "matthews_correlation"}
    table = {  # (task, bits) -> per seed (lsq, squat)
        ("rte", 2): ((0.50, 0.51), (0.51, 0.53), (0.52, 0.55)),
        ("cola", 2): ((0.50, 0.51), (0.51, 0.53), (0.52, 0.55)),
        ("rte", 4): ((0.59, 0.58), (0.58, 0.59), (0.575, 0.58)),
        ("cola", 4): ((0.61, 0.60), (0.60, 0.61), (0.595, 0.60)),
    }
    for (task, bits), rows in table.items():
        m = metric[task]
        for seed, (lsq, sq) in zip((1, 2, 3), rows):
            short = task == "rte" and bits == 2 and seed == 3
            make_run(root, task, f"lsq-w{bits}a8", seed, {m: lsq},
                     sharp={"ascent/rho=0.01": {"score": 0.3, "loss0": 0.5, "delta_norm": 0.01},
                            "ascent/rho=0.05": {"score": 0.6, "loss0": 0.5, "delta_norm": 0.05}})
            make_run(root, task, f"squat-w{bits}a8", seed, {m: sq},
                     sharp={"ascent/rho=0.01": {"score": 0.2, "loss0": 0.6, "delta_norm": 0.01},
                            "ascent/rho=0.05": {"score": 0.5, "loss0": 0.6, "delta_norm": 0.01 if short else 0.05}})
    for task in ("rte", "cola"):
        for seed, joint in zip((1, 2, 3), (0.49, 0.51, 0.54)):
            make_run(root, task, "fp", seed, {metric[task]: 0.60})
            make_run(root, task, "joint-w2a8", seed, {metric[task]: joint})
    return root


def test_verdicts_by_hand(claims_grid, tmp_path):
    from squat_cli.report.collect import collect
    from squat_cli.report.verdicts import all_verdicts

    results = collect(claims_grid).results
    v = {x.claim: x for x in all_verdicts(results)}
    # C1: W2 every pair +1..+3 (for), W4 -1/+1/+0.5 twice (undecided): partly; pooled (12 + 1) / 12 = 1.08
    assert v["C1"].verdict == "partly" and not v["C1"].provisional
    assert "W2 +2.00" in v["C1"].evidence and "(n=6, for)" in v["C1"].evidence
    assert "W4 +0.17" in v["C1"].evidence and "(n=6, undecided)" in v["C1"].evidence
    assert "Pooled over 12 pairs: +1.08" in v["C1"].evidence and "is inside it" in v["C1"].evidence
    # C2: SQuAT 0.1 flatter in every (task, radius) cell; the short RTE pair left out (5 of 6 there)
    assert v["C2"].verdict == "holds"
    assert "rte rho 0.05 -0.1000 [-0.1000, -0.1000] (n=5, for)" in v["C2"].evidence
    assert "Left out (an ascent stopped inside the ball): 1 pair at rho 0.05" in v["C2"].evidence
    assert v["C2"].provisional  # the pair left out leaves RTE W2 at rho 0.05 with 2 seeds
    assert "L(W0) difference SQuAT - LSQ over the cells: +0.1000" in v["C2"].evidence
    # C3: joint under SQuAT on every pair (-2/-2/-1); under LSQ on seed 1 of each task only
    assert v["C3"].verdict == "holds" and "W2 -1.67" in v["C3"].evidence and "(n=6, for)" in v["C3"].evidence
    assert "joint under LSQ in 2 of 6 pairs (not often), mean +0.33" in v["C3"].evidence
    # C4: SQuAT W4 vs FP 60: RTE 58/59/58 (under), CoLA 60/61/60 (mean +0.33, one cell above, not decided)
    assert v["C4"].verdict == "holds"
    assert "1 of 2 (task, bits) cells have SQuAT's mean above FP's (cola W4); 0 with the whole interval" \
        in v["C4"].evidence
    assert "cola W4 +0.33" in v["C4"].evidence


def test_verdicts_provisional_until_every_cell_has_three_seeds(claims_grid, tmp_path):
    import shutil

    from squat_cli.report.collect import collect
    from squat_cli.report.verdicts import all_verdicts

    shutil.rmtree(claims_grid / "cola" / "squat-w4a8" / "seed3")
    v = {x.claim: x for x in all_verdicts(collect(claims_grid).results)}
    assert v["C1"].provisional and v["C4"].provisional and v["C2"].provisional
    assert not v["C3"].provisional  # joint and SQuAT W2 still have 3 seeds everywhere
    write_report(claims_grid, tmp_path / "rep")
    md = (tmp_path / "rep" / "claims.md").read_text()
    assert md.startswith("### Verdicts") and "| C1 | partly (provisional) |" in md and "| C3 | holds |" in md


def test_verdicts_provisional_while_a_task_has_no_pairs_yet(claims_grid):
    from squat_cli.report.collect import collect
    from squat_cli.report.verdicts import all_verdicts

    make_run(claims_grid, "mrpc", "fp", 1, {"accuracy": 0.8, "f1": 0.85})  # the next task's FP run has finished
    v = {x.claim: x for x in all_verdicts(collect(claims_grid).results)}
    assert all(x.provisional for x in v.values())
    assert v["C1"].verdict == "partly"  # the verdict itself rests on the pairs there are


def test_step_size_table_by_hand(tmp_path):
    """Weight step sizes: LSQ 0.10 -> 0.09 and 0.10 -> 0.08 (-10%, -20%: mean -15%, grew 0/2); SQuAT 0.10 -> 0.11
    and 0.10 -> 0.09 (+10%, -10%: mean 0%, grew 1/2). PTQ (no training) is left out; runs without the fields too."""
    from squat_cli.report.collect import collect
    from squat_cli.report.stepsizes import step_size_table

    root = tmp_path / "runs"
    for seed, (lsq, sq) in zip((1, 2), ((0.09, 0.11), (0.08, 0.09))):
        for variant, end in (("lsq-w2a8", lsq), ("squat-w2a8", sq)):
            make_run(root, "rte", variant, seed, {"accuracy": 0.6, "mean_wstep_init": 0.10, "mean_wstep_final": end,
                                                  "mean_astep_init": 0.07, "mean_astep_final": 0.07})
        make_run(root, "rte", "ptq-w2a8", seed, {"accuracy": 0.5, "mean_wstep_init": 0.07, "mean_wstep_final": 0.07})
    make_run(root, "rte", "fp", 1, {"accuracy": 0.7})
    t = step_size_table(collect(root).results)
    w = t[t.kind == "weight"].set_index("method")
    assert list(w.index) == ["lsq", "squat"] and set(t.method) == {"lsq", "squat"}
    assert w.loc["lsq", "final"] == pytest.approx(0.085) and w.loc["lsq", "change"] == pytest.approx(-0.15)
    assert w.loc["squat", "change"] == pytest.approx(0.0) and w.loc["squat", "grew"] == 1
    assert w.loc["lsq", "grew"] == 0 and w.loc["lsq", "seeds"] == 2
    write_report(root, tmp_path / "rep")
    md = (tmp_path / "rep" / "stepsizes.md").read_text()
    assert "| rte | weight step | LSQ | 2/8 | 2 | 0.10000 | 0.08500 | -15.0% | 0/2 |" in md
    assert "| rte | weight step | SQuAT | 2/8 | 2 | 0.10000 | 0.10000 | +0.0% | 1/2 |" in md
    assert "| rte | activation step | LSQ | 2/8 | 2 | 0.07000 | 0.07000 | +0.0% | 0/2 |" in md
    assert "PTQ" not in md


def test_compute_spent_by_hand(tmp_path):
    """FP: 2 runs, steps 3600 + 1800 s (1.5 h), loop walls 3960 + 1980 s (evaluations 360 + 180 s = 0.15 h), one job timed
    (4320 s = 1.2 h). QAT: LSQ 720 s of steps (shared CPU), PTQ without steps. Sharpness: 3 scores, 2 timed
    (90 + 270 s = 0.1 h)."""
    from squat_cli.report.collect import collect
    from squat_cli.report.compute import compute_table

    root = tmp_path / "runs"
    make_run(root, "rte", "fp", 1, {"accuracy": 0.6, "steps": 100, "train_time_s": 3600.0, "wall_time_s": 3960.0,
                                    "job_time_s": 4320.0, "cpu_share": 0.97},
             sharp={"ascent/rho=0.01": {"score": 0.1, "loss0": 0.2, "time_s": 90.0},
                    "ascent/rho=0.05": {"score": 0.3, "loss0": 0.2, "time_s": 270.0}})
    make_run(root, "rte", "fp", 2, {"accuracy": 0.6, "steps": 100, "train_time_s": 1800.0, "wall_time_s": 1980.0},
             sharp={"ascent/rho=0.01": {"score": 0.1, "loss0": 0.2}})
    make_run(root, "rte", "lsq-w2a8", 1, {"accuracy": 0.55, "steps": 10, "train_time_s": 720.0,
                                          "wall_time_s": 720.0, "cpu_share": 0.5})
    make_run(root, "rte", "ptq-w2a8", 1, {"accuracy": 0.5, "steps": 0, "train_time_s": 0.0, "wall_time_s": 0.0,
                                          "job_time_s": 36.0, "cpu_share": 0.0})
    t = compute_table(collect(root).results).set_index(["task", "part"])
    fp = t.loc[("rte", "fp")]
    assert fp["count"] == 2 and fp.steps_h == pytest.approx(1.5) and fp.eval_h == pytest.approx(0.15)
    assert fp.timed == 1 and fp.jobs_h == pytest.approx(1.2) and fp.contended == 0
    qat = t.loc[("rte", "qat")]
    assert qat.steps_h == pytest.approx(0.2) and qat.timed == 0 and np.isnan(qat.jobs_h) and qat.contended == 1
    post = t.loc[("rte", "post")]
    assert post.contended == 0 and post.jobs_h == pytest.approx(0.01)  # no steps: its cpu_share means nothing
    sharp = t.loc[("rte", "sharpness")]
    assert sharp["count"] == 3 and sharp.timed == 2 and sharp.jobs_h == pytest.approx(0.1)
    assert t.loc[("all", "fp")].steps_h == pytest.approx(1.5)
    write_report(root, tmp_path / "rep")
    md = (tmp_path / "rep" / "compute.md").read_text()
    assert "| rte | FP fine-tuning | 2 | 1.50 | 0.15 | 1 | 1.20 | 0 |" in md
    assert "| rte | QAT | 1 | 0.20 | 0.00 | 0 | - | 1 |" in md and "| rte | sharpness | 3 | - | - | 2 | 0.10 | 0 |" in md


def test_sharpness_and_start_loss_correlation_by_hand(tmp_path):
    """Sharpness differences 0.1 / 0.2 / 0.3 against L(W0) differences 1 / 2 / 4: deviations (-0.1, 0, 0.1) and
    (-4/3, -1/3, 5/3), r = 0.3 / sqrt(0.02 * 42/9) = 0.982."""
    root = tmp_path / "runs"
    for seed, (score, loss0) in zip((1, 2, 3), ((0.6, 2.0), (0.7, 3.0), (0.8, 5.0))):
        make_run(root, "rte", "lsq-w2a8", seed, {"accuracy": 0.5},
                 sharp={"ascent/rho=0.05": {"score": 0.5, "loss0": 1.0, "delta_norm": 0.05}})
        make_run(root, "rte", "squat-w2a8", seed, {"accuracy": 0.5},
                 sharp={"ascent/rho=0.05": {"score": score, "loss0": loss0, "delta_norm": 0.05}})
    write_report(root, tmp_path / "rep")
    md = (tmp_path / "rep" / "claims.md").read_text()
    assert "- rho 0.05: over 3 pairs, the sharpness difference and the L(W0) difference correlate with Pearson " \
           "r = +0.98." in md
    assert "- rho 0.01" not in md  # no scores at that radius


def test_verdicts_provisional_until_every_task_of_the_grid_has_pairs(claims_grid, tmp_path):
    """claims_grid has RTE and CoLA complete: without the grid the verdicts are final; with the replication grid
    (STS-B, MRPC, RTE, CoLA) MRPC and STS-B have no pairs yet, so every verdict is provisional."""
    alone = runner.invoke(app, ["report", "--out", str(claims_grid), "--reports", str(tmp_path / "a")])
    assert alone.exit_code == 0, alone.output
    assert "| C3 | holds |" in (tmp_path / "a" / "claims.md").read_text()
    res = runner.invoke(app, ["report", "--out", str(claims_grid), "--reports", str(tmp_path / "g"),
                              "--grid", "recipes/replication/grid.yaml"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "g" / "claims.md").read_text()
    assert "| C3 | holds (provisional) |" in md and "| C1 | partly (provisional) |" in md
    assert "or in the grid (stsb, mrpc, rte, cola)" in md
    assert "correlate" not in md  # every sharpness pair differs by the same 0.1 (up to rounding): no correlation
    assert "The replication grid" in (tmp_path / "g" / "report.md").read_text()  # the grid's note heads it
    bad = runner.invoke(app, ["report", "--out", str(claims_grid), "--reports", str(tmp_path / "b"),
                              "--grid", str(tmp_path / "nope.yaml")])
    assert bad.exit_code == 2 and "no such file" in bad.output and "Traceback" not in bad.output
    both = runner.invoke(app, ["report", "--out", str(claims_grid), "--reports", str(tmp_path / "s"), "--search",
                               "--grid", "recipes/replication/grid.yaml"])
    assert both.exit_code == 2 and "--grid" in both.output and not (tmp_path / "s").exists()


def test_variants_later_reference_root_replaces_runs_whole(variants, tmp_path):
    """A second --reference root: its runs replace the same runs of the first whole (dev metric, sharpness, time),
    and a --timing rerun of a replaced run no longer prices it."""
    from squat_cli.report.variants import write_variants

    ref, var = variants
    again = tmp_path / "again"  # seed 3 retrained: LSQ 0.62 in 90 s, SQuAT 0.70 (was 0.64 and 0.68)
    make_run(again, "rte", "lsq-w2a8", 3, {"accuracy": 0.62, "steps": 10, "train_time_s": 90.0},
             sharp={"ascent/rho=0.01": {"score": 0.5, "loss0": 0.5, "delta_norm": 0.01}})
    make_run(again, "rte", "squat-w2a8", 3, {"accuracy": 0.70, "steps": 10, "train_time_s": 300.0})
    timing = tmp_path / "timing"
    make_run(timing, "rte", "lsq-w2a8", 1, {"accuracy": 0.60, "steps": 10, "train_time_s": 80.0})
    make_run(timing, "rte", "lsq-w2a8", 3, {"accuracy": 0.64, "steps": 10, "train_time_s": 50.0})  # of the old run
    found = {v.method: v for v in write_variants(var, [ref, again], tmp_path / "out", timing=timing)}
    cheap = found["cheap"]
    # pairs vs squat 66 / 64 / 70: -1, +1, -4; squat's seeds variance 9.333, noise 3.055
    assert cheap.pairs == 3 and cheap.mean == pytest.approx(-4 / 3)
    assert cheap.noise == pytest.approx(np.sqrt(28 / 3))
    assert cheap.cost == pytest.approx(125 / 90)  # median of 120 / 80, 130 / 100, 125 / 90 (not 125 / 50)
    md = (tmp_path / "out" / "variants.md").read_text()
    assert "| lsq | rte | 2/8 | 3 | 62.00 | 90 | 1.00x | 0.50000 | - |" in md
    assert f"2 reference runs come from `{again}` (lsq W2 seed 3, squat W2 seed 3)" in md
    assert "Training times of 1 reference runs come from their reruns" in md  # seed 3's rerun priced a run now gone
    assert "1 of 1 reruns gave the reference's dev metric exactly" in md
    r = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(tmp_path / "r"),
                            "--reference", str(ref), "--reference", str(again)])
    assert r.exit_code == 0 and "cheap: -1.33 points vs squat (3 pairs)" in " ".join(r.output.split())
    r = runner.invoke(app, ["report", "--search", "--out", str(var), "--reports", str(tmp_path / "r"),
                            "--reference", str(ref), "--reference", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_runs_named_in_contended_json_leave_the_cost_table(tmp_path):
    """A run known to have shared the CPU but made before cpu_share was recorded is listed in the runs root's
    contended.json; its time leaves the cost figures as a low recorded share does (hand values: LSQ's median
    time 110 of 100, 110, 500 becomes 105 of 100, 110; SQuAT's ratios 3.0, 3.0, 0.62 become 3.0, 3.0)."""
    from squat_cli.report.claims import cost_table
    from squat_cli.report.collect import collect

    root = tmp_path / "runs"
    for seed, (t_lsq, t_sq) in enumerate(((100.0, 300.0), (110.0, 330.0), (500.0, 310.0)), 1):
        make_run(root, "rte", "lsq-w2a8", seed, {"accuracy": 0.6, "steps": 10, "train_time_s": t_lsq})
        make_run(root, "rte", "squat-w2a8", seed, {"accuracy": 0.6, "steps": 10, "train_time_s": t_sq})
    before = cost_table(collect(root).results).set_index("method")
    assert before.loc["squat", "vs_lsq"] == pytest.approx(3.0) and before.loc["lsq", "train_s"] == pytest.approx(110)
    (root / "contended.json").write_text(json.dumps({"runs": {"rte/lsq-w2a8/seed3": "beside the tests"}}))
    after = cost_table(collect(root).results).set_index("method")
    assert after.loc["lsq", "runs"] == 2 and after.loc["lsq", "contended"] == 1
    assert after.loc["lsq", "train_s"] == pytest.approx(105.0)
    assert after.loc["squat", "vs_lsq"] == pytest.approx(3.0)  # the pair of seed 3 has no LSQ time now
    (root / "contended.json").write_text("[1, 2]")
    with pytest.raises(Exception, match="contended.json: expected"):
        collect(root)


def test_runs_whose_fused_kernels_fell_back_leave_the_cost_table(tmp_path):
    """A run whose fused LSQ kernels fell back to the eager ops ran slower steps than its method costs: its time
    leaves the cost figures and is counted, while "on" and "off" (a whole run unfused by choice) stay. Hand values:
    LSQ times 100, 120, 400 (seed 3 fell back) give a median of 110 from the first two, not 120; SQuAT's ratios
    3.0, 2.5 (seed 3's pair has no LSQ time) give a median of 2.75."""
    from squat_cli.report.claims import claims_markdown, cost_table
    from squat_cli.report.collect import collect, slowed

    root = tmp_path / "runs"
    states = ("on", "off", "fell back: lsq_forward (Hard failure due to fullgraph=True)")
    for seed, (t_lsq, t_sq, state) in enumerate(zip((100.0, 120.0, 400.0), (300.0, 300.0, 310.0), states), 1):
        make_run(root, "rte", "lsq-w2a8", seed, {"accuracy": 0.6, "steps": 10, "train_time_s": t_lsq,
                                                 "fused_kernels": state})
        make_run(root, "rte", "squat-w2a8", seed, {"accuracy": 0.6, "steps": 10, "train_time_s": t_sq,
                                                   "fused_kernels": "on"})
    cost = cost_table(collect(root).results).set_index("method")
    assert cost.loc["lsq", "runs"] == 2 and cost.loc["lsq", "contended"] == 1
    assert cost.loc["lsq", "train_s"] == pytest.approx(110.0)
    assert cost.loc["squat", "runs"] == 3 and cost.loc["squat", "vs_lsq"] == pytest.approx(2.75)
    assert "left out (CPU shared or unfused)" in claims_markdown([], cost.reset_index())
    assert [slowed(m) for m in ({}, {"fused_kernels": "on"}, {"fused_kernels": "off"}, {"fused_kernels": 1},
                                {"fused_kernels": states[2]})] == [False, False, False, False, True]


def test_distilled_runs_get_their_own_paired_comparisons(tmp_path):
    """With +kd runs the claims add the distillation study's pairs (hand values: LSQ+KD - LSQ = +2 and +4 points,
    mean +3; LSQ+KD - FP = -1 and -3, mean -2); without them nothing is added."""
    from squat_cli.report.claims import claim_summaries
    from squat_cli.report.collect import collect

    root = tmp_path / "runs"
    for seed, (fp, lsq) in enumerate(((0.70, 0.67), (0.72, 0.65)), 1):
        make_run(root, "rte", "fp", seed, {"accuracy": fp})
        make_run(root, "rte", "lsq-w2a8", seed, {"accuracy": lsq})
    rows, _ = claim_summaries(collect(root).results)
    assert not [r for r in rows if r.claim == "KD"]
    for seed, kd in ((1, 0.69), (2, 0.69)):
        make_run(root, "rte", "lsq+kd-w2a8", seed, {"accuracy": kd})
    rows, tables = claim_summaries(collect(root).results)
    kd_rows = {r.comparison.split(",")[0]: r for r in rows if r.claim == "KD"}
    assert kd_rows["LSQ+KD - LSQ"].mean == pytest.approx(3.0) and kd_rows["LSQ+KD - LSQ"].n == 2
    assert kd_rows["LSQ+KD - FP (same seed)"].mean == pytest.approx(-2.0)
    assert kd_rows["LSQ - FP (same seed)"].mean == pytest.approx(-5.0)
    assert "kd:lsq+kd-vs-lsq" in tables


def test_cost_of_distillation_against_the_same_method_without(tmp_path):
    """With +kd runs the cost table gives each distilled method's time against its plain twin (hand values:
    LSQ+KD 130 / 100 and 150 / 100 -> median 1.40x; SQuAT+KD 310 / 300, 290 / 290 -> 1.0167x, 1.0x -> median
    1.0083x), and a cell whose runs all shared the CPU keeps its row with 0 runs."""
    from squat_cli.report.claims import claims_markdown, cost_table
    from squat_cli.report.collect import collect

    root = tmp_path / "runs"
    times = {"lsq": (100.0, 100.0), "lsq+kd": (130.0, 150.0), "squat": (300.0, 290.0), "squat+kd": (310.0, 290.0)}
    for method, ts in times.items():
        for seed, t in enumerate(ts, 1):
            make_run(root, "rte", f"{method}-w2a8", seed, {"accuracy": 0.6, "steps": 10, "train_time_s": t})
    make_run(root, "rte", "joint-w2a8", 1, {"accuracy": 0.6, "steps": 10, "train_time_s": 400.0, "cpu_share": 0.5})
    cost = cost_table(collect(root).results).set_index("method")
    assert cost.loc["lsq+kd", "vs_plain"] == pytest.approx(1.4)
    assert cost.loc["squat+kd", "vs_plain"] == pytest.approx((310 / 300 + 1.0) / 2)
    assert np.isnan(cost.loc["squat", "vs_plain"]) and cost.loc["squat", "vs_lsq"] == pytest.approx(2.95)
    assert cost.loc["joint", "runs"] == 0 and cost.loc["joint", "contended"] == 1
    md = claims_markdown([], cost.reset_index())
    assert "| lsq+kd | 2/8 | 2 | 140 | 1.40x | 1.40x | 0 |" in md and "| joint | 2/8 | 0 | - | - | - | 1 |" in md
    plain = cost_table(collect(root).results.query("not method.str.endswith('+kd')", engine="python"))
    assert "vs_plain" not in plain.columns


def test_a_runs_root_may_set_its_own_contended_share(tmp_path):
    """contended.json's cpu_share_below replaces the default 0.75 for the root's recorded shares (hand values: LSQ
    times 100 (share 0.99), 110 (0.8), 500 (0.5): by default 100 and 110 count (median 105); under 0.9, 100 alone)."""
    from squat_cli.report.claims import cost_table
    from squat_cli.report.collect import collect

    root = tmp_path / "runs"
    for seed, (t, share) in enumerate(((100.0, 0.99), (110.0, 0.8), (500.0, 0.5)), 1):
        make_run(root, "rte", "lsq-w2a8", seed, {"accuracy": 0.6, "steps": 10, "train_time_s": t, "cpu_share": share})
    before = cost_table(collect(root).results).set_index("method")
    assert before.loc["lsq", "runs"] == 2 and before.loc["lsq", "train_s"] == pytest.approx(105.0)
    (root / "contended.json").write_text(json.dumps({"cpu_share_below": 0.9}))
    after = cost_table(collect(root).results).set_index("method")
    assert after.loc["lsq", "runs"] == 1 and after.loc["lsq", "contended"] == 2
    assert after.loc["lsq", "train_s"] == pytest.approx(100.0)
    for bad in ({"cpu_share_below": 0}, {"cpu_share_below": True}, {"cpu_share_below": "0.9"}):
        (root / "contended.json").write_text(json.dumps(bad))
        with pytest.raises(Exception, match="contended.json: expected"):
            collect(root)
