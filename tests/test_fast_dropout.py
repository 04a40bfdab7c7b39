"""The CPU dropout used in training: distribution, scaling, gradients, and model-level equivalence."""

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from squat_cli.train.fast_dropout import ATTENTION_NAME, FastDropout, dropout, keep_mask, use_fast_dropout


def test_keep_rate_and_independence():
    torch.manual_seed(0)
    n = 2_000_000
    m = keep_mask(torch.Size([n]), 0.1).double()
    sigma = (0.9 * 0.1 / n) ** 0.5
    assert abs(m.mean().item() - 0.9) < 5 * sigma
    # the two 32-bit halves of one 64-bit draw are independent: P(both kept) = 0.81
    both = (m[0::2] * m[1::2]).mean().item()
    assert abs(both - 0.81) < 5 * (0.81 * 0.19 / (n // 2)) ** 0.5
    # and neighbouring draws too
    assert abs((m[1:-1:2] * m[2::2]).mean().item() - 0.81) < 5 * (0.81 * 0.19 / (n // 2)) ** 0.5


def test_mask_follows_the_global_seed():
    torch.manual_seed(3)
    a = keep_mask(torch.Size([7, 5]), 0.5)
    torch.manual_seed(3)
    b = keep_mask(torch.Size([7, 5]), 0.5)
    c = keep_mask(torch.Size([7, 5]), 0.5)
    assert a.shape == (7, 5) and torch.equal(a, b) and not torch.equal(b, c)


def test_values_and_gradient():
    """x / (1 - p) where kept, 0 elsewhere; the gradient likewise."""
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.25)
    torch.manual_seed(5)
    kept = keep_mask(x.shape, 0.25)
    assert torch.equal(y, torch.where(kept, x * (1 / 0.75), 0.0))
    up = torch.randn(64, 33)
    y.backward(up)
    assert torch.equal(x.grad, torch.where(kept, up * (1 / 0.75), 0.0))
    assert 0 < kept.sum() < kept.numel()


def test_identity_cases():
    x = torch.randn(10)
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.3, training=False) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    assert torch.all(keep_mask(torch.Size([100]), 1e-12))  # threshold beyond the 32-bit range: keep all
    d = FastDropout(0.5).eval()
    assert d(x) is x


def _bert(attn_p: float, hidden_p: float) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, hidden_dropout_prob=hidden_p, attention_probs_dropout_prob=attn_p,
                     attn_implementation="sdpa")
    return BertForSequenceClassification(cfg)


def _batch() -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_model_swap_keeps_evaluation_identical():
    ref = _bert(0.1, 0.1).eval()
    fast = copy.deepcopy(ref)
    assert use_fast_dropout(fast) == 2 * 3 + 2  # embeddings, 2 per layer, classifier (attention dropout is in SDPA)
    assert fast.config._attn_implementation == ATTENTION_NAME
    assert fast.state_dict().keys() == ref.state_dict().keys()
    fast.eval()
    with torch.no_grad():
        assert torch.equal(fast(**_batch()).logits, ref(**_batch()).logits)


def test_explicit_attention_path_matches_sdpa():
    """Training with attention dropout takes the explicit path; with p tiny nothing is dropped, so it equals SDPA."""
    ref = _bert(1e-12, 0.0).train()
    fast = copy.deepcopy(ref)
    use_fast_dropout(fast)
    fast.train()
    a, b = fast(**_batch()).logits, ref(**_batch()).logits
    assert torch.allclose(a, b, atol=1e-6)
    a.sum().backward()
    b.sum().backward()
    ga = dict(fast.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"].grad
    gb = dict(ref.named_parameters())["bert.encoder.layer.0.attention.self.query.weight"].grad
    assert torch.allclose(ga, gb, atol=1e-6)


def test_training_with_dropout_is_seeded_and_random():
    m = _bert(0.1, 0.1)
    use_fast_dropout(m)
    m.train()
    torch.manual_seed(9)
    a = m(**_batch()).logits
    torch.manual_seed(9)
    b = m(**_batch()).logits
    c = m(**_batch()).logits
    assert torch.equal(a, b) and not torch.allclose(b, c)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(**_batch()).logits, m(**_batch()).logits)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mean_is_preserved(p):
    torch.manual_seed(4)
    x = torch.full((400_000,), 2.0)
    assert dropout(x, p).mean().item() == pytest.approx(2.0, rel=5e-3)
