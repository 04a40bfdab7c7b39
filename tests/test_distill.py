"""Distillation from the FP teacher: each loss term by hand, the score-returning attention, one teacher pass per
batch, distillation off is today's run, and the CLI, grid and report around it."""

import contextlib
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from squat_cli.cli import app
from squat_cli.quant.convert import calibrate, quantize_model
from squat_cli.recipe import DistillConfig, QuantConfig, TrainConfig, recipe_from_dict
from squat_cli.train.distill import Distiller, term_values, use_score_attention
from squat_cli.train.loop import build_optimizers
from squat_cli.train.sam_schedule import SamSchedule
from squat_cli.train.strategies import StepContext, make_strategy
from tests.conftest import finetune_tiny
from tests.quant_helpers import batches, tiny_bert

runner = CliRunner()


def _primed(cfg: DistillConfig, teacher_out: dict, regression: bool = False) -> Distiller:
    """A Distiller whose teacher outputs for the current batch are ``teacher_out`` (no model needed)."""
    kd = Distiller(torch.nn.Linear(1, 1), cfg, regression)
    kd._out = {"logits": teacher_out["logits"], "hidden": teacher_out.get("hidden", ()),
               "attention": teacher_out.get("attention", ())}
    kd._batch = {}
    return kd


def test_logits_term_soft_cross_entropy_by_hand():
    """Teacher [2, 0], student [0, 0], T = 2: soft targets softmax([1, 0]); the student's log-probs are -ln 2 each,
    so the soft cross-entropy is ln 2, times T^2 = 4: 2.7726."""
    kd = _primed(DistillConfig(logits=1.0, labels=0.0, temperature=2.0), {"logits": torch.tensor([[2.0, 0.0]])})
    out = SimpleNamespace(loss=torch.tensor(0.7), logits=torch.tensor([[0.0, 0.0]]))
    terms = kd.terms(out, 1)
    assert terms["logits"].item() == pytest.approx(4 * math.log(2), abs=1e-6)
    total, terms = kd.loss(out, 1)
    values = term_values(terms)
    assert total.item() == pytest.approx(4 * math.log(2), abs=1e-6)  # labels weight 0: the task loss is left out
    assert values["labels"] == pytest.approx(0.7)


def test_logits_term_regression_is_mse_and_weights_add_up():
    """STS-B: scores 1 and 2 against the teacher's 3 and 2: MSE (4 + 0) / 2 = 2; total 0.5 * 2 + 1 * 0.3."""
    kd = _primed(DistillConfig(logits=0.5, labels=1.0), {"logits": torch.tensor([[3.0], [2.0]])}, regression=True)
    out = SimpleNamespace(loss=torch.tensor(0.3), logits=torch.tensor([[1.0], [2.0]]))
    total, terms = kd.loss(out, 2)
    values = term_values(terms)
    assert values["logits"] == pytest.approx(2.0)
    assert total.item() == pytest.approx(0.5 * 2.0 + 0.3)


def test_hidden_and_attention_terms_sum_layer_mses_by_hand():
    """Two hidden states: the student's are 0, the teacher's 1 and 2 everywhere: 1 + 4 = 5. Attention: one layer,
    scores differing by 3 on one of four entries: 9 / 4."""
    t_hidden = (torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0))
    t_att = (torch.tensor([[[[0.0, 3.0], [0.0, 0.0]]]]),)
    kd = _primed(DistillConfig(logits=0.0, hidden=1.0, attention=2.0, labels=0.0),
                 {"logits": torch.zeros(1, 2), "hidden": t_hidden, "attention": t_att})
    out = SimpleNamespace(loss=torch.tensor(1.0), logits=torch.zeros(1, 2),
                          hidden_states=(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)),
                          attentions=(torch.zeros(1, 1, 2, 2),))
    total, terms = kd.loss(out, 1)
    values = term_values(terms)
    assert values["hidden"] == pytest.approx(5.0)
    assert values["attention"] == pytest.approx(9 / 4)
    assert total.item() == pytest.approx(5.0 + 2 * 9 / 4)


def test_teacher_outputs_are_cut_to_the_rows_a_pass_sees():
    kd = _primed(DistillConfig(logits=1.0), {"logits": torch.tensor([[1.0], [5.0]])}, regression=True)
    out = SimpleNamespace(loss=torch.tensor(0.0), logits=torch.tensor([[0.0]]))
    assert kd.terms(out, 1)["logits"].item() == pytest.approx(1.0)  # SAM's ascent on the first row only


def test_score_attention_returns_masked_prescores_and_keeps_the_model_output():
    """The attentions output becomes (q k^T) / sqrt(d) per head, masked keys 0; the logits stay eager's."""
    model = tiny_bert(3).eval()
    batch = batches(1)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = model(**inputs).logits
        use_score_attention(model)
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    assert torch.allclose(out.logits, ref, atol=1e-5)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1  # the embeddings' output included
    attn = model.bert.encoder.layer[0].attention.self
    h = out.hidden_states[0]
    q = attn.query(h).view(4, 8, 2, 8).transpose(1, 2)
    k = attn.key(h).view(4, 8, 2, 8).transpose(1, 2)
    scores = q @ k.transpose(2, 3) / math.sqrt(8)
    masked = batch["attention_mask"][:, None, None, :].expand_as(scores) == 0
    scores[masked] = 0.0
    assert torch.allclose(out.attentions[0], scores, atol=1e-5)
    assert (out.attentions[0][0, :, :, -3:] == 0).all()  # example 0's three padded keys


def _ctx(model, method, distiller, rho=0.05, fraction=1.0):
    train = TrainConfig(optimizer="sgd", lr=0.05, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0)
    quant = QuantConfig(method=method, wbits=2, abits=8, step_lr=1.0)
    w_opt, _, s_opt, _ = build_optimizers(model, train, quant, 10)
    return StepContext(model=model, core=model, w_opt=w_opt, s_opt=s_opt, backward=lambda loss: loss.backward(),
                       autocast=contextlib.nullcontext, no_sync=contextlib.nullcontext, rho=rho,
                       schedule=SamSchedule(fraction=fraction), distiller=distiller)


@pytest.mark.parametrize("method,fraction", [("lsq", 1.0), ("joint", 0.5), ("squat", 1.0), ("squat", 0.5)])
def test_one_teacher_pass_per_batch(method, fraction):
    """SQuAT makes three passes a step (ascent, weight, step size); the teacher runs once, on the whole batch."""
    teacher = tiny_bert(0)
    student = tiny_bert(0)
    quantize_model(student, QuantConfig(method=method, wbits=2, abits=8))
    data = batches(4)
    calibrate(student, data[:1])
    kd = Distiller(teacher, DistillConfig(logits=1.0, hidden=1.0), regression=False)
    calls = []
    teacher.register_forward_hook(lambda mod, args, out: calls.append(len(out.logits)))
    strategy = make_strategy(method, _ctx(student, method, kd, fraction=fraction))
    for b in data[1:]:
        strategy.step(b)
    assert kd.teacher_passes == 3 and calls == [4, 4, 4]
    assert set(strategy.last_terms) == {"labels", "logits", "hidden"}


@pytest.mark.parametrize("regression", [False, True])
def test_w8_student_of_its_own_teacher_starts_near_zero(regression):
    """A W8A8 LSQ copy of the teacher matches it closely: hidden and logits terms near 0 (classification: the soft
    cross-entropy minus the teacher's own entropy, i.e. the KL part)."""
    teacher = tiny_bert(5, num_labels=1 if regression else 2).eval()
    student = tiny_bert(5, num_labels=1 if regression else 2).eval()
    quantize_model(student, QuantConfig(method="lsq", wbits=8, abits=8))
    batch = batches(1, seed=2)[0]
    if regression:
        batch["labels"] = batch["labels"].float()
    calibrate(student, [batch])
    kd = Distiller(teacher, DistillConfig(logits=1.0, hidden=1.0), regression=regression)
    kd.prepare(batch)
    with torch.no_grad():
        terms = kd.terms(student(**batch, **kd.student_kwargs()), 4)
    assert terms["hidden"].item() < 1e-3
    if regression:
        assert terms["logits"].item() < 1e-4
    else:
        p = torch.softmax(kd._out["logits"], -1)
        entropy = float(-(p * p.log()).sum(-1).mean())
        assert abs(terms["logits"].item() - entropy) < 1e-3
    far = tiny_bert(6, num_labels=1 if regression else 2).eval()  # an unrelated student is far off
    with torch.no_grad():
        assert kd.terms(far(**batch, **kd.student_kwargs()), 4)["hidden"].item() > 100 * terms["hidden"].item()


# ---------------------------------------------------------------- through the CLI

SETS = ["--set", "data.train_subset=48", "--set", "data.eval_subset=24", "--set", "train.batch_size=8",
        "--set", "train.epochs=1", "--set", "train.eval_batch_size=8", "--set", "train.lr=1e-3"]


@pytest.fixture(scope="module")
def fp_root(tmp_path_factory, glue_dir, tiny_bert):
    return finetune_tiny(tmp_path_factory.mktemp("kd_fp"), glue_dir, tiny_bert, SETS)


def _quantize(root, glue_dir, *extra):
    return runner.invoke(app, ["quantize", "--task", "rte", "--method", "squat", "--wbits", "2", "--rho", "0.05",
                               "--data-dir", str(glue_dir), "--out", str(root), *SETS, *extra])


def _history(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_distill_off_is_todays_run_and_labels_only_distillation_matches_it(tmp_path, glue_dir, fp_root):
    """With the section absent nothing changes (no key in recipe.yaml); with only the label term on, the teacher
    runs every batch but the run is the same bit for bit (the teacher pass draws no random numbers)."""
    for name in ("a", "b"):
        shutil.copytree(fp_root / "rte" / "fp", tmp_path / name / "rte" / "fp")
    res = _quantize(tmp_path / "a", glue_dir)
    assert res.exit_code == 0, res.output
    res = _quantize(tmp_path / "b", glue_dir, "--set", "distill.labels=1", "--set", "distill.logits=0")
    assert res.exit_code == 0, res.output
    a = tmp_path / "a" / "rte" / "squat-w2a8" / "seed42"
    b = tmp_path / "b" / "rte" / "squat+kd-w2a8" / "seed42"
    assert "distill" not in (a / "recipe.yaml").read_text()
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["accuracy"] == mb["accuracy"] and ma["eval_loss"] == mb["eval_loss"]
    assert ma["train_loss"] == mb["train_loss"]
    assert mb["distill"] == {"teacher": str(tmp_path / "b" / "rte" / "fp" / "seed42" / "model"), "terms": ["labels"]}
    hb = _history(b)
    assert all("train_kd_labels" not in h for h in _history(a))
    assert hb[-1]["train_kd_labels"] == pytest.approx(hb[-1]["train_loss"], rel=0.2)


def test_distilled_run_learns_records_terms_and_reports_its_own_row(tmp_path, glue_dir, fp_root):
    shutil.copytree(fp_root / "rte" / "fp", tmp_path / "rte" / "fp")
    res = _quantize(tmp_path, glue_dir, "--distill", "--set", "distill.attention=1", "--set", "distill.hidden=1")
    assert res.exit_code == 0, res.output
    run = tmp_path / "rte" / "squat+kd-w2a8" / "seed42"
    hist = _history(run)
    assert hist[0]["step"] == 0 and "train_kd_hidden" not in hist[0]  # eval at start: no step yet
    last = hist[-1]
    for term in ("labels", "logits", "hidden", "attention"):
        assert last[f"train_kd_{term}"] > 0
    res = runner.invoke(app, ["evaluate", str(run), "--data-dir", str(glue_dir)])  # the run loads back
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", "--out", str(tmp_path), "--reports", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "rep" / "table1.csv").read_text()
    assert "SQuAT+KD" in table


def test_teacher_that_does_not_match_is_refused_in_one_line(tmp_path, glue_dir, fp_root, minilm_dir):
    from transformers import BertConfig, BertForSequenceClassification

    shutil.copytree(fp_root / "rte" / "fp", tmp_path / "rte" / "fp")
    other = tmp_path / "wide"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=128)).save_pretrained(other)
    res = _quantize(tmp_path, glue_dir, "--distill", "--set", f"distill.teacher={other}")
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: distill.teacher:")
    assert "hidden_size 48, the student 32" in res.output
    assert not (tmp_path / "rte" / "squat+kd-w2a8").exists()
    res = _quantize(tmp_path, glue_dir, "--distill", "--set", f"distill.teacher={tmp_path / 'nowhere'}")
    assert res.exit_code == 2 and "holds no model" in res.output


@pytest.mark.parametrize("sets,message", [
    (["distill.logits=-1"], "distill.logits: -1.0 must be >= 0"),
    (["distill.logits=0", "distill.labels=0"], "distill: every weight is 0"),
    (["distill.temperature=0"], "distill.temperature: 0.0 must be > 0"),
    (["distill.hiden=1"], "distill.hiden"),
])
def test_bad_distill_values(sets, message):
    from squat_cli.recipe import load_recipe

    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        load_recipe(sets=["quant.method=lsq", *sets])


def test_grid_distilled_methods_take_the_distill_section_alone(tmp_path):
    from squat_cli.grid import load_grid
    from squat_cli.sweep import plan

    path = tmp_path / "g.yaml"
    path.write_text("""
sweep: {tasks: [rte], methods: [lsq, squat+kd], wbits: [2], seeds: [1], sharpness_rhos: []}
quantize: {train: {epochs: 1}}
distill: {logits: 1.0, hidden: 1.0, labels: 0.0}
method_settings: {squat: {quant.step_lr: 1.0}}
settings: {t2: {distill.temperature: 2.0}, lr: {train.lr: 3.0e-4}}
""")
    grid = load_grid(path)
    lsq = grid.quant_recipe("rte", 1, "lsq", 2, setting="t2")
    kd = grid.quant_recipe("rte", 1, "squat+kd", 2, setting="t2")
    assert lsq.distill is None and lsq.quant.method == "lsq"
    assert kd.quant.method == "squat" and kd.quant.step_lr == 1.0  # squat's settings reach squat+kd
    assert (kd.distill.hidden, kd.distill.labels, kd.distill.temperature) == (1.0, 0.0, 2.0)
    assert sorted({j.variant for j in plan(grid) if j.kind == "quantize"}) == ["lsq-w2a8", "squat+kd-w2a8"]
    assert recipe_from_dict(kd.to_dict()).variant_parts() == ("squat+kd", 2, 8)
