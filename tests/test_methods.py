"""The method table (quant/methods.py): every method converts, trains (or evaluates) and reports; no method facts
live anywhere else."""

import contextlib
import re
from pathlib import Path

import pytest
import torch

from squat_cli.quant import methods
from squat_cli.quant.convert import calibrate, quantize_model
from squat_cli.quant.qlinear import QuantLinear, step_parameters
from squat_cli.recipe import QuantConfig, TrainConfig
from squat_cli.report.paper import PAPER_METHOD, paper_value
from squat_cli.report.tables import _row_order
from squat_cli.train.loop import build_optimizers
from squat_cli.train.strategies import StepContext, make_strategy
from tests.quant_helpers import batches, tiny_bert

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", methods.METHODS)
def test_every_method_converts_trains_one_step_and_reports(name):
    m = methods.get_method(name)
    cfg = QuantConfig(method=name, wbits=4, abits=32 if m.weight_only else 8, qbert_groups=4)
    model = tiny_bert(0)
    names = quantize_model(model, cfg)
    layers = [mod for mod in model.modules() if isinstance(mod, QuantLinear)]
    assert len(layers) == (6 if m.quantizes else 0) and len(names) >= len(layers)
    assert all((layer.aq is None) == m.weight_only for layer in layers)
    assert bool(step_parameters(model)) == m.learned_steps
    data = batches(3)
    calibrate(model, data[:1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if m.post_training:
        with pytest.raises(ValueError, match="makes no training step"):
            make_strategy(name, None)
    else:
        train = TrainConfig(optimizer="sgd", lr=0.05, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0)
        w_opt, _, s_opt, _ = build_optimizers(model, train, cfg, 10)
        ctx = StepContext(model=model, core=model, w_opt=w_opt, s_opt=s_opt, backward=lambda loss: loss.backward(),
                          autocast=contextlib.nullcontext, no_sync=contextlib.nullcontext, rho=0.05 if m.uses_sam else 0)
        strategy = make_strategy(name, ctx)
        assert strategy.__class__.__name__ == {"plain": "Plain", "joint": "JointSam", "squat": "SQuAT"}[m.strategy]
        loss = strategy.step(data[1])
        assert torch.isfinite(torch.tensor(loss))
        moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert any(k.endswith("attention.self.query.weight") for k in moved)  # the weights trained
        assert any(k.endswith("wq.step") for k in moved) == m.learned_steps  # and only LSQ-family steps
    # the report knows it: a label, a place among the rows, the paper's number where the paper has one
    assert methods.label(name, 4) != name or name == "fp"
    assert _row_order([(name, 4, 8), ("fp", 32, 32)])[0][0] == "fp"
    assert (PAPER_METHOD.get(name) is not None) == (m.paper_label is not None)
    if name in ("lsq", "squat"):  # the paper's Table 1 prints both at W4 on RTE
        assert paper_value("table1", name, 4, "rte", "accuracy") is not None


def test_table_facts():
    assert methods.METHODS == ("ptq", "q8bert", "gobo", "qbert", "lsq", "joint", "squat", "fp-sam")
    assert methods.names_where(post_training=True) == ("ptq", "gobo")
    assert methods.names_where(uses_sam=True) == ("joint", "squat", "fp-sam")
    assert methods.names_where(weight_only=True, selectable=True) == ("gobo", "fp-sam")
    assert methods.get_method("fp-sam").variant_bits(4, 8) == (32, 32)
    assert methods.get_method("gobo").variant_bits(3, 8) == (3, 32)
    assert methods.get_method("qbert-mp3").name == "qbert"
    assert methods.label("qbert-mp3", 2) == "Q-BERT MP 2/3"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        methods.get_method("nope")


def test_no_method_name_decides_behaviour_outside_the_table():
    """A grep of the package: method names compared as strings (== "gobo", in ("lsq", ...)) only in the table.
    Report code that names the paper's claims (C1 is SQuAT against LSQ) compares runs, not method facts."""
    names = "|".join(re.escape(n) for n in methods.METHODS)
    pattern = re.compile(rf"""(method[\w"'\]]*|\bm)\s*(==|!=|in|not in)\s*[\(\[]?\s*["']({names})["']""")
    allowed = {"quant/methods.py", "report/claims.py", "report/verdicts.py", "report/figures.py", "report/build.py",
               "report/variants.py"}
    offenders = []
    for path in (REPO / "squat_cli").rglob("*.py"):
        rel = path.relative_to(REPO / "squat_cli").as_posix()
        if rel in allowed:
            continue
        for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{k}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
