"""The committed study pages are what `squat report` makes of the committed runs: each table and comparison is
regenerated from `experiments/` by the command its page documents, and must match the committed file byte for
byte. A change to the report code that moves a published number fails here, as does a committed page that was
edited by hand or left stale."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from squat_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]

STUDIES = {
    "replication": (["report", "results", "--out", "experiments/replication/runs", "--grid",
                     "recipes/replication/grid.yaml"], "docs/replication"),
    "distillation": (["report", "results", "--out", "experiments/distillation/runs", "--grid",
                      "recipes/distillation/grid.yaml"], "docs/distillation"),
    "distillation-long": (["report", "compare", "--out", "experiments/distillation/long", "--reference",
                           "experiments/distillation/runs", "--label", "8 QAT epochs", "--reference-label",
                           "2 QAT epochs"], "docs/distillation/long"),
    "distillation-half-scale": (["report", "compare", "--out", "experiments/distillation/half-scale", "--reference",
                                 "experiments/distillation/runs", "--label", "KD at half scale",
                                 "--reference-label", "KD (1 + 1)"], "docs/distillation/half-scale"),
    "replication-search": (["report", "search", "--out", "experiments/replication/search"],
                           "docs/replication/search"),
    "replication-ablations": (["report", "variants", "--out", "experiments/replication/ablations/runs", "--reference",
                               "experiments/replication/runs"], "docs/replication/ablations"),
    "efficient-squat": (["report", "variants", "--out", "experiments/efficient-squat/runs", "--reference",
                         "experiments/replication/runs", "--reference",
                         "experiments/efficient-squat/seed3-rerun/reference", "--timing",
                         "experiments/efficient-squat/lsq-timing"], "docs/efficient-squat"),
    "distillation-search": (["report", "search", "--out", "experiments/distillation/search"],
                            "experiments/distillation"),
    "embeddings-search": (["report", "search", "--out", "experiments/embeddings/runs"], "experiments/embeddings"),
}


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_committed_pages_regenerate_from_committed_runs(study, tmp_path, monkeypatch):
    args, committed = STUDIES[study]
    monkeypatch.chdir(ROOT)  # the commands as documented, paths relative to the repository root
    out = tmp_path / "reports"
    res = CliRunner().invoke(app, [*args, "--reports", str(out)])
    assert res.exit_code == 0, res.output
    made = sorted(p.name for p in out.iterdir() if p.suffix in (".md", ".csv"))
    assert made, "the report wrote no table"
    for name in made:
        page = ROOT / committed / name
        assert page.is_file(), f"{committed}/{name} is made by the report but not committed"
        assert (out / name).read_text() == page.read_text(), f"{committed}/{name} differs from its regeneration"
