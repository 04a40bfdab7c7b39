"""`squat report compare`: two grids of the same tasks, bits and seeds, and how each paired comparison changes."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.report.compare import compare_roots

runner = CliRunner()


def make_run(root, task, variant, seed, value, epochs=2.0, data_dir="/data/a"):
    d = root / task / variant / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({"task": task, "accuracy": value}))
    (d / "recipe.yaml").write_text(yaml.safe_dump({"train": {"epochs": epochs, "seed": seed},
                                                   "data": {"task": task, "data_dir": data_dir}}))


@pytest.fixture
def two_grids(tmp_path):
    """Reference (2 epochs): FP 70/72/68, LSQ 60/62/61, SQuAT 61/60/62 (+ a seed 4 pair only here).
    Long (8 epochs, no FP of its own): LSQ 63/64/62, SQuAT 66/65/66."""
    ref, long = tmp_path / "ref", tmp_path / "long"
    for seed, (fp, lsq, sq) in enumerate(((0.70, 0.60, 0.61), (0.72, 0.62, 0.60), (0.68, 0.61, 0.62),
                                          (0.70, 0.60, 0.60)), 1):
        make_run(ref, "rte", "fp", seed, fp)
        make_run(ref, "rte", "lsq-w2a8", seed, lsq)
        make_run(ref, "rte", "squat-w2a8", seed, sq)
    for seed, (lsq, sq) in enumerate(((0.63, 0.66), (0.64, 0.65), (0.62, 0.66)), 1):
        make_run(long, "rte", "lsq-w2a8", seed, lsq, epochs=8.0, data_dir="/data/b")
        make_run(long, "rte", "squat-w2a8", seed, sq, epochs=8.0, data_dir="/data/b")
    return long, ref


def test_changes_by_hand(two_grids):
    long, ref = two_grids
    c = compare_roots(long, ref, "8 epochs", "2 epochs")
    rows = {ch.comparison: ch for ch in c.changes}
    c1 = rows["SQuAT - LSQ"]
    # SQuAT - LSQ: reference +1, -2, +1 (seed 4's 0 has no partner in the long grid); long +3, +1, +4
    assert c1.n == 3 and c1.ref_mean == pytest.approx(0.0) and c1.mean == pytest.approx(8 / 3)
    assert c1.change.mean == pytest.approx(8 / 3) and (c1.change.wins, c1.change.losses) == (3, 0)
    assert c1.change.lo == pytest.approx(2.0) and c1.change.hi == pytest.approx(3.0)  # the bootstrap of {2, 3, 3}
    assert c1.left_out == 1
    # one method across the grids: LSQ +3, +2, +1
    assert rows["lsq (same method)"].change.mean == pytest.approx(2.0)
    assert rows["lsq (same method)"].ref_mean == pytest.approx(61.0)
    # against FP, from the reference's FP runs: reference -9, -12, -6; long -4, -7, -2; change +5, +5, +4
    assert c.fp_from_reference
    fp = rows["SQuAT - FP (same seed)"]
    assert fp.change.mean == pytest.approx(14 / 3) and fp.mean == pytest.approx(-13 / 3)
    assert [r for r in c.changes if "SQuAT - FP" in r.comparison] == [fp]  # C4's pairs counted once
    assert not [r for r in c.changes if "+KD" in r.comparison]
    # the recipes differ in the QAT epochs; the data folder is no difference
    assert c.differs == {"train.epochs": (["2.0"], ["8.0"])}
    per_seed = c.per_seed[c.per_seed.comparison == "SQuAT - LSQ"].sort_values("seed")
    assert per_seed["change"].tolist() == pytest.approx([2.0, 3.0, 3.0])


def test_compare_cli_writes_the_page_and_refuses_bad_input(two_grids, tmp_path):
    long, ref = two_grids
    out = tmp_path / "reports"
    r = runner.invoke(app, ["report", "compare", "--out", str(long), "--reference", str(ref), "--reports", str(out),
                            "--label", "8 epochs", "--reference-label", "2 epochs"])
    assert r.exit_code == 0, r.output
    assert "SQuAT - LSQ [W2]: +0.00 -> +2.67, change +2.67 [+2.00, +3.00] over 3 pairs" in r.output
    page = (out / "compare.md").read_text()
    assert page.startswith("# 8 epochs against 2 epochs")
    assert "- `train.epochs`: 2.0 -> 8.0" in page and "FP runs" in page
    assert "| SQuAT - LSQ | W2 | 3 | +0.00 | +2.67 | +2.67 | [+2.00, +3.00] | 3/0 |" in page
    assert "compare.csv" in {p.name for p in out.iterdir()} and not [p for p in out.iterdir() if p.name[0] == "."]
    r = runner.invoke(app, ["report", "compare", "--out", str(long), "--reports", str(out)])
    assert r.exit_code == 2 and "--reference" in r.output
    other = tmp_path / "other"
    make_run(other, "rte", "lsq-w4a8", 1, 0.8)  # no W4 run in the reference
    r = runner.invoke(app, ["report", "compare", "--out", str(other), "--reference", str(ref), "--reports",
                            str(tmp_path / "r2")])
    assert r.exit_code == 2 and "no comparison has pairs in both" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r2" / "compare.md").exists()
