"""The three conventions the paper leaves open, as options: SAM's weight STE, the activation
step-gradient scale, and dropout masks shared by the passes of one step."""

import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from squat_cli.quant.convert import calibrate, quantize_model
from squat_cli.quant.lsq import LsqQuantizer, lsq_quantize
from squat_cli.recipe import QuantConfig
from tests.quant_helpers import batches
from tests.step_reference import RHO, quantized, reference_step, strategy_for

# ---------------------------------------------------------------- (a) SAM's weight step: masked or identity STE


@pytest.mark.parametrize("fused", ["1", "0"])
def test_identity_ste_passes_every_element_hand_values(monkeypatch, fused):
    """2-bit, s = 1: -3.0 and 2.5 are clipped; LSQ masks them, the identity STE does not."""
    monkeypatch.setenv("SQUAT_FUSED", fused)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    out = {}
    for identity in (False, True):
        x = torch.tensor([-3.0, -1.2, 0.4, 0.6, 2.5], requires_grad=True)
        s = torch.tensor([1.0], requires_grad=True)
        q = lsq_quantize(x, s, -2, 1, 1.0, identity)
        assert q.tolist() == [-2.0, -1.0, 0.0, 1.0, 1.0]
        (q * up).sum().backward()
        out[identity] = (x.grad.tolist(), s.grad.item())
    assert out[False][0] == [0.0, 2.0, 3.0, 4.0, 0.0]
    assert out[True][0] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # dQ/ds = -2, 0.2, -0.4, 0.4, 1 -> sum of up * dQ/ds = -2 + 0.4 - 1.2 + 1.6 + 5 = 3.8, in both modes
    assert out[False][1] == pytest.approx(3.8, abs=1e-6)
    assert out[True][1] == pytest.approx(3.8, abs=1e-6)


@pytest.mark.parametrize("method", ["squat", "joint"])
def test_identity_weight_step_differs_from_masked_where_weights_clip(method):
    """At W2 some weights sit outside the clip range; the two conventions move them differently."""
    batch = batches(1)[0]
    masked, _ = reference_step(method, 0, batch, 2, "masked")
    ident, _ = reference_step(method, 0, batch, 2, "identity")
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    model, _ = quantized(method)
    layer = model.get_submodule(name[: -len(".weight")])
    ratio = layer.weight / layer.wq.step
    clipped = (ratio <= layer.wq.qn) | (ratio >= layer.wq.qp)
    assert 0 < int(clipped.sum()) < clipped.numel()
    w0 = layer.weight.detach()
    assert torch.equal(masked[name][clipped], w0[clipped])  # LSQ's STE: clipped weights get no gradient
    assert int((ident[name][clipped] != w0[clipped]).sum()) == int(clipped.sum())  # identity: they move
    assert torch.allclose(masked[name][~clipped], ident[name][~clipped], rtol=0, atol=1e-7)  # the rest: alike
    # the strategy leaves no quantizer in identity mode after its step
    st = strategy_for(model, method, RHO, weight_ste="identity")
    st.step(batch)
    assert not any(q.identity_ste for q in st.wquantizers)


# ---------------------------------------------------------------- (b) activation step-gradient scale


def test_token_grad_scale_hand_values():
    """N = every element (2*3*4 = 24) or one token's features (4); 8-bit Qp = 127."""
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    tensor, token = LsqQuantizer(8), LsqQuantizer(8, grad_scale="token")
    assert tensor.grad_scale(x) == pytest.approx(1 / math.sqrt(24 * 127))
    assert token.grad_scale(x) == pytest.approx(1 / math.sqrt(4 * 127))
    assert token.grad_scale(torch.zeros(5, 7, 4)) == token.grad_scale(x)  # whatever the batch shape
    grads = []
    for q in (tensor, token):
        q.set_step(torch.tensor([0.01]))
        (q(x) * torch.arange(24.0).view(2, 3, 4)).sum().backward()
        grads.append(q.step.grad.item())
    assert grads[1] / grads[0] == pytest.approx(math.sqrt(6), rel=1e-5)
    with pytest.raises(ValueError, match="grad_scale"):
        LsqQuantizer(8, grad_scale="batch")


def test_recipe_option_reaches_the_activation_quantizers():
    from tests.quant_helpers import tiny_bert

    m = tiny_bert()
    quantize_model(m, QuantConfig(method="lsq", wbits=2, abits=8, act_grad_scale="token"))
    q = m.bert.encoder.layer[0].attention.self.query
    assert q.aq.grad_scale_mode == "token" and q.wq.grad_scale_mode == "tensor"


# ---------------------------------------------------------------- (c) dropout masks across SAM's passes


def _dropout_bert(method, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.3,
                     attention_probs_dropout_prob=0.3)
    m = BertForSequenceClassification(cfg)
    quantize_model(m, QuantConfig(method=method, wbits=2, abits=8))
    calibrate(m, batches(2, seed=9))
    m.train()
    return m


def _train(method, rho, replay, steps=4):
    m = _dropout_bert(method)
    st = strategy_for(m, method, rho, optimizer="adam", dropout_replay=replay)
    torch.manual_seed(123)
    losses = [st.step(b) for b in batches(steps, seed=5)]
    return {n: p.detach().clone() for n, p in m.named_parameters()}, losses, torch.get_rng_state()


def test_joint_rho0_with_replay_is_lsq_exactly_with_dropout():
    lsq, l_lsq, rng_lsq = _train("lsq", 0.0, False)
    joint, l_joint, rng_joint = _train("joint", 0.0, True)
    assert l_joint == l_lsq
    assert all(torch.equal(lsq[n], joint[n]) for n in lsq)
    assert torch.equal(rng_lsq, rng_joint)  # the random stream advanced as after one pass per step
    fresh, _, _ = _train("joint", 0.0, False)  # new masks in pass 2: another run
    assert not all(torch.equal(lsq[n], fresh[n]) for n in lsq)


@pytest.mark.parametrize("replay", [True, False])
def test_squat_passes_share_masks_only_with_replay(replay):
    m = _dropout_bert("squat")
    st = strategy_for(m, "squat", RHO, optimizer="adam", dropout_replay=replay)
    masks = []
    hook = m.dropout.register_forward_hook(lambda mod, i, o: masks.append(o == 0))
    torch.manual_seed(7)
    st.step(batches(1)[0])
    hook.remove()
    assert len(masks) == 3  # ascent, weight step, step-size step
    same = [torch.equal(masks[0], k) for k in masks[1:]]
    assert same == ([True, True] if replay else [False, False])
