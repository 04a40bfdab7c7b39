"""Only the intended modules are quantized; the FP parts are untouched; other encoder families work."""

import pytest
import torch
from transformers import (
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from squat_cli.quant.convert import calibrate, quantize_model
from squat_cli.quant.lsq import LsqQuantizer
from squat_cli.quant.q8bert import MaxQuantizer
from squat_cli.quant.qlinear import QuantEmbedding, QuantLinear, step_parameters
from squat_cli.recipe import QuantConfig
from tests.quant_helpers import batches, tiny_bert

BERT_LAYER = [
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense",
]


def test_bert_default_selection_and_untouched_fp_parts():
    model = tiny_bert(layers=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = quantize_model(model, QuantConfig(method="lsq", wbits=2, abits=8))
    assert names == [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in BERT_LAYER]
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert name in names
            assert isinstance(mod.wq, LsqQuantizer) and isinstance(mod.aq, LsqQuantizer)
        elif isinstance(mod, torch.nn.Linear):
            assert name in ("bert.pooler.dense", "classifier")
    # every original tensor is still there with the same name and value; only step sizes were added
    after = dict(model.named_parameters())
    for n, v in before.items():
        assert torch.equal(after[n], v), n
    added = set(after) - set(before)
    assert added == {f"{n}.wq.step" for n in names} | {f"{n}.aq.step" for n in names}
    assert len(step_parameters(model)) == 2 * len(names)
    # embeddings, LayerNorm, pooler, classifier stay as they were
    assert type(model.bert.embeddings.word_embeddings) is torch.nn.Embedding
    assert type(model.classifier) is torch.nn.Linear


def test_weight_step_init_and_quantized_forward():
    model = tiny_bert()
    w = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    quantize_model(model, QuantConfig(method="lsq", wbits=2, abits=32))
    q = model.bert.encoder.layer[0].attention.self.query
    assert q.aq is None
    assert q.wq.step.item() == (2 * w.abs().mean() / 1.0).item()
    wq = q.quantized_weight().detach()
    assert len(torch.unique(wq)) <= 4
    levels = torch.unique(torch.round(wq / q.wq.step.detach()))
    assert set(levels.tolist()) <= {-2.0, -1.0, 0.0, 1.0}


def test_include_exclude_and_embeddings():
    model = tiny_bert(layers=2)
    cfg = QuantConfig(method="lsq", include=["*layer.1.*"], exclude=["*intermediate*"], quantize_embeddings=True)
    names = quantize_model(model, cfg)
    assert names == [f"bert.encoder.layer.1.{m}" for m in BERT_LAYER if m != "intermediate.dense"] + [
        "bert.embeddings.word_embeddings"
    ]
    assert isinstance(model.bert.embeddings.word_embeddings, QuantEmbedding)
    assert type(model.bert.embeddings.position_embeddings) is torch.nn.Embedding
    out = model(**{k: v for k, v in batches(1)[0].items()})
    assert torch.isfinite(out.loss)


def test_per_channel_steps():
    model = tiny_bert()
    quantize_model(model, QuantConfig(method="lsq", per_channel=True))
    q = model.bert.encoder.layer[0].intermediate.dense
    assert q.wq.step.shape == (32, 1)
    assert torch.allclose(q.wq.step[:, 0], 2 * q.weight.detach().abs().mean(1) / 7**0.5)


def test_distilbert_and_roberta():
    torch.manual_seed(0)
    d = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32))
    names = quantize_model(d, QuantConfig(method="lsq"))
    assert names == [f"distilbert.transformer.layer.0.{m}" for m in
                     ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1", "ffn.lin2")]
    assert type(d.pre_classifier) is torch.nn.Linear and type(d.classifier) is torch.nn.Linear
    r = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40))
    names = quantize_model(r, QuantConfig(method="lsq"))
    assert names == [f"roberta.encoder.layer.0.{m}" for m in BERT_LAYER]
    assert type(r.classifier.dense) is torch.nn.Linear
    for model in (d, r):
        b = batches(1)[0]
        b.pop("token_type_ids", None)
        calibrate(model, [b])
        out = model(**b)
        out.loss.backward()
        assert all(p.grad is not None for p in step_parameters(model))


def test_calibration_sets_activation_steps():
    model = tiny_bert()
    quantize_model(model, QuantConfig(method="lsq", abits=8))
    q = model.bert.encoder.layer[0].attention.self.query
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs().max()))
    bs = batches(3)
    used = calibrate(model, bs, "max")
    h.remove()
    assert used == 3 and bool(q.aq.initialized)
    assert q.aq.step.item() == pytest.approx(torch.stack(seen).max().item() / 127, rel=1e-6)


def test_q8bert_and_ptq_and_fp_sam_conversion():
    m = tiny_bert()
    quantize_model(m, QuantConfig(method="q8bert", wbits=8, abits=8))
    q = m.bert.encoder.layer[0].output.dense
    assert isinstance(q.wq, MaxQuantizer) and isinstance(q.aq, MaxQuantizer)
    assert step_parameters(m) == []
    p = tiny_bert()
    quantize_model(p, QuantConfig(method="ptq", wbits=4, ptq_step="mse"))
    assert step_parameters(p) == []  # frozen steps
    f = tiny_bert()
    assert quantize_model(f, QuantConfig(method="fp-sam")) == []


def _family(name):
    import transformers as T

    common = dict(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=64, num_labels=2)
    if name == "bert":
        return tiny_bert(layers=2), "bert.encoder.layer"
    if name == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(**common, pad_token_id=1)), "roberta.encoder.layer"
    if name == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                 max_position_embeddings=64, num_labels=2)
        return T.DistilBertForSequenceClassification(cfg), "distilbert.transformer.layer"
    if name == "electra":
        cfg = T.ElectraConfig(**common, embedding_size=16)
        return T.ElectraForSequenceClassification(cfg), "electra.encoder.layer"
    if name == "deberta-v2":
        return T.DebertaV2ForSequenceClassification(T.DebertaV2Config(**common)), "deberta.encoder.layer"
    if name == "modernbert":
        cfg = T.ModernBertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                                 global_attn_every_n_layers=1)
        return T.ModernBertForSequenceClassification(cfg), "model.layers"
    raise ValueError(name)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "deberta-v2", "modernbert"])
def test_default_layers_found_by_structure_in_every_family(family):
    """No name patterns: every nn.Linear of the repeated encoder blocks, nothing else; then one SQuAT step trains."""
    from tests.step_reference import strategy_for

    torch.manual_seed(0)
    model, blocks = _family(family)
    expected = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(f"{blocks}.")]
    names = quantize_model(model, QuantConfig(method="squat", wbits=2, abits=8))
    assert names == expected and len(names) >= 2 * 4
    assert not any(isinstance(m, QuantLinear) for n, m in model.named_modules() if not n.startswith(f"{blocks}."))
    calibrate(model, batches(1, seed=9))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = strategy_for(model, "squat", 0.05, optimizer="adam").step(batches(1, seed=4)[0])
    assert loss == loss and loss > 0  # finite
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith(".weight") and n.startswith(blocks) for n in changed)
    assert any(n.endswith("wq.step") for n in changed)


@pytest.mark.parametrize("method", ["lsq", "squat", "joint", "ptq"])
def test_embedding_bits_quantizes_the_word_embeddings_per_row(method):
    model = tiny_bert()
    table = model.bert.embeddings.word_embeddings.weight.detach().clone()
    quantize_model(model, QuantConfig(method=method, wbits=2, embedding_bits=3))
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, QuantEmbedding) and emb.wq.bits == 3
    assert emb.wq.step.shape == (table.shape[0], 1)  # one step per token row
    if method != "ptq":  # LSQ's init, row by row: 2 * mean|row| / sqrt(Qp), Qp = 3 at 3 bits
        assert torch.allclose(emb.wq.step[:, 0], 2 * table.abs().mean(1) / 3**0.5)
        assert emb.wq.step.requires_grad
    q = emb.quantized_weight().detach() / emb.wq.step.detach()
    assert torch.equal(q, q.round()) and int(q.min()) >= -4 and int(q.max()) <= 3
    ids = torch.tensor([[5, 7, 5]])
    assert torch.equal(emb(ids)[0, 0], emb(ids)[0, 2])
    assert torch.equal(emb(ids)[0, 1], (q[7] * emb.wq.step[7]).detach())
    # the encoder's layers keep their own width
    assert model.bert.encoder.layer[0].intermediate.dense.wq.bits == 2


def test_quantize_embeddings_uses_the_weights_width_and_embedding_bits_overrides_it():
    model = tiny_bert()
    quantize_model(model, QuantConfig(method="lsq", wbits=4, quantize_embeddings=True))
    assert model.bert.embeddings.word_embeddings.wq.bits == 4
    model = tiny_bert()
    quantize_model(model, QuantConfig(method="lsq", wbits=4, quantize_embeddings=True, embedding_bits=2))
    assert model.bert.embeddings.word_embeddings.wq.bits == 2


@pytest.mark.parametrize("quant,message", [
    ({"method": "lsq", "embedding_bits": 1}, "quant.embedding_bits: 1 is outside 2..8"),
    ({"method": "lsq", "embedding_bits": 9}, "quant.embedding_bits: 9 is outside 2..8"),
    ({"method": "gobo", "wbits": 2, "abits": 32, "embedding_bits": 4}, "quant.embedding_bits: an option of"),
    ({"method": "qbert", "quantize_embeddings": True}, "quant.quantize_embeddings: an option of"),
    ({"method": "q8bert", "wbits": 8, "embedding_bits": 4}, "quant.embedding_bits: an option of"),
])
def test_embedding_bits_refused_where_it_does_not_apply(quant, message):
    from squat_cli.errors import RecipeError
    from squat_cli.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"quant": quant}).complete()
