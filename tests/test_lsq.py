"""LSQ quantizer values and gradients against hand computation."""

import math

import pytest
import torch

from squat_cli.quant.lsq import LsqQuantizer, lsq_quantize, signed_range
from squat_cli.quant.q8bert import MaxQuantizer


def test_signed_ranges():
    assert signed_range(2) == (-2, 1)
    assert signed_range(3) == (-4, 3)
    assert signed_range(4) == (-8, 7)
    assert signed_range(8) == (-128, 127)


def test_two_bit_literal_example():
    # s = 0.5, 2 bits: levels {-2,-1,0,1} * 0.5
    w = torch.tensor([-1.2, -0.9, -0.3, 0.05, 0.2, 0.7, 1.6], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    g = 1 / math.sqrt(7 * 1)
    q = lsq_quantize(w, s, -2, 1, g)
    # w/s = [-2.4, -1.8, -0.6, 0.1, 0.4, 1.4, 3.2]
    assert q.tolist() == [-1.0, -1.0, -0.5, 0.0, 0.0, 0.5, 0.5]
    q.sum().backward()
    assert w.grad.tolist() == [0, 1, 1, 1, 1, 0, 0]  # STE inside (Qn, Qp), zero where clipped
    # dQ/ds: clipped low -> Qn=-2; inside -> round(w/s)-w/s: -0.2, -0.4, -0.1, -0.4; clipped high -> Qp=1, 1
    hand = (-2 - 0.2 - 0.4 - 0.1 - 0.4 + 1 + 1) * g
    assert s.grad.item() == pytest.approx(hand, abs=1e-6)


def _hand(w, s, bits, upstream):
    """Plain-Python LSQ: value, dQ/dw and the (unscaled) step gradient, element by element."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    vals, dws, ds = [], [], 0.0
    for x, u in zip(w, upstream):
        v = x / s
        if v <= qn:
            vals.append(qn * s), dws.append(0.0)
            ds += u * qn
        elif v >= qp:
            vals.append(qp * s), dws.append(0.0)
            ds += u * qp
        else:
            r = float(round(v))  # no exact halves in these inputs
            vals.append(r * s), dws.append(u)
            ds += u * (r - v)
    return vals, dws, ds


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_values_and_grads_match_hand_computation(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(50, generator=gen, dtype=torch.float64) * 0.25 * 2 ** (bits - 1)
    upstream = torch.randn(50, generator=gen, dtype=torch.float64)
    s_val = 0.23
    qn, qp = signed_range(bits)
    assert (w / s_val <= qn).any() and (w / s_val >= qp).any() and ((w / s_val > qn) & (w / s_val < qp)).any()
    wq = w.clone().requires_grad_()
    s = torch.tensor([s_val], dtype=torch.float64, requires_grad=True)
    g = 1 / math.sqrt(50 * qp)
    q = lsq_quantize(wq, s, qn, qp, g)
    (q * upstream).sum().backward()
    vals, dws, ds = _hand(w.tolist(), s_val, bits, upstream.tolist())
    assert q.tolist() == pytest.approx(vals, abs=1e-12)
    assert wq.grad.tolist() == pytest.approx(dws, abs=1e-12)
    assert s.grad.item() == pytest.approx(ds * g, rel=1e-10)


def _lsq_reference(x, s, qn, qp, g):
    """The LSQ paper's own formulation: gradient-scale and round-pass tricks through autograd."""
    s_scaled = (s - s * g).detach() + s * g
    v = torch.clamp(x / s_scaled, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s_scaled


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matches_autograd_reference(bits):
    torch.manual_seed(0)
    x = torch.randn(4, 9, dtype=torch.float64)
    qn, qp = signed_range(bits)
    g = 1 / math.sqrt(x.numel() * qp)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    sa = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    sb = sa.detach().clone().requires_grad_()
    up = torch.randn(4, 9, dtype=torch.float64)
    (lsq_quantize(a, sa, qn, qp, g) * up).sum().backward()
    (_lsq_reference(b, sb, qn, qp, g) * up).sum().backward()
    assert torch.allclose(a.grad, b.grad) and torch.allclose(sa.grad, sb.grad)


def test_quantizer_module_grad_scale_and_init():
    q = LsqQuantizer(3)
    w = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]])
    q.init_lsq(w)
    mean_abs = (0.5 + 1.0 + 0.25 + 2.0 + 0.0 + 0.75) / 6
    assert q.step.item() == pytest.approx(2 * mean_abs / math.sqrt(3))
    assert q.grad_scale(w) == pytest.approx(1 / math.sqrt(6 * 3))
    w.requires_grad_()
    q(w).sum().backward()
    s = q.step.item()
    _, _, ds = _hand(w.detach().flatten().tolist(), s, 3, [1.0] * 6)
    assert q.step.grad.item() == pytest.approx(ds / math.sqrt(18), rel=1e-5)


def test_per_channel():
    q = LsqQuantizer(2, channels=2)
    w = torch.tensor([[0.1, -0.4, 0.35], [2.0, -1.0, 0.5]])
    q.init_lsq(w)
    assert q.step.shape == (2, 1)
    assert q.step[:, 0].tolist() == pytest.approx([2 * (0.85 / 3), 2 * (3.5 / 3)])
    assert q.grad_scale(w) == pytest.approx(1 / math.sqrt(3 * 1))
    w.requires_grad_()
    q(w).sum().backward()
    for row in range(2):
        s = q.step[row].item()
        _, _, ds = _hand(w[row].detach().tolist(), s, 2, [1.0] * 3)
        assert q.step.grad[row, 0].item() == pytest.approx(ds / math.sqrt(3), rel=1e-5)


def test_steps_stay_positive():
    q = LsqQuantizer(2)
    q.init_lsq(torch.randn(10))
    opt = torch.optim.SGD([q.step], lr=100.0)
    x = torch.full((10,), 5.0)
    q(x).sum().backward()  # every element clipped at Qp: grad = Qp * g * 10 > 0, so SGD shrinks the step
    assert q.step.grad.item() == pytest.approx(1 * 10 / math.sqrt(10 * 1))
    opt.step()
    assert q.step.item() < 0  # the raw SGD update went negative
    q.clamp_()
    assert q.step.item() > 0
    out = q(x)
    assert torch.isfinite(out).all()


def test_init_max_and_mse():
    q = LsqQuantizer(4)
    w = torch.tensor([0.1, -0.2, 0.3, -1.4, 0.05, 0.6])
    q.init_max(w)
    assert q.step.item() == pytest.approx(1.4 / 7)
    mse = LsqQuantizer(4)
    mse.init_mse(w)

    def err(s):
        return ((w / s).clamp(-8, 7).round() * s - w).pow(2).sum().item()

    assert err(mse.step.item()) <= err(q.step.item()) + 1e-12
    assert mse.step.item() <= q.step.item() + 1e-9


def test_uninitialised_activation_quantizer_passes_through():
    q = LsqQuantizer(8)
    x = torch.randn(3, 4)
    assert torch.equal(q(x), x)


def test_q8bert_max_quantizer():
    w = torch.tensor([0.5, -1.27, 0.013, 0.0049])
    q = MaxQuantizer(8)
    out = q(w)
    scale = 1.27 / 127
    assert out.tolist() == pytest.approx([50 * scale, -127 * scale, 1 * scale, 0.0])
    act = MaxQuantizer(8, ema=0.9)
    act.init_max(torch.tensor([2.0]))
    act.train()
    act(torch.tensor([4.0, -1.0]))
    assert act.running_max.item() == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)


@pytest.mark.parametrize("shape,step_shape", [((6, 40, 33), (1,)), ((24, 17), (1,)), ((24, 17), (24, 1))])
@pytest.mark.parametrize("needs", ["x", "s", "both"])
def test_fused_kernels_equal_the_unfused_ops(monkeypatch, shape, step_shape, needs):
    """The compiled kernels give the eager ops' values exactly and the same gradients (up to summation order)."""
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(shape, generator=gen) * 0.3
    s0 = torch.rand(step_shape, generator=gen) * 0.05 + 0.02
    up = torch.randn(shape, generator=gen)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SQUAT_FUSED", flag)
        x = x0.clone().requires_grad_(needs in ("x", "both"))
        s = s0.clone().requires_grad_(needs in ("s", "both"))
        q = lsq_quantize(x, s, -8, 7, 0.1)
        (q * up).sum().backward()
        results.append((q.detach(), x.grad, s.grad))
    (qa, gxa, gsa), (qb, gxb, gsb) = results
    assert torch.equal(qa, qb)
    assert (gxa is None) == (gxb is None) and (gxa is None or torch.equal(gxa, gxb))
    assert (gsa is None) == (gsb is None) and (gsa is None or torch.allclose(gsa, gsb, rtol=1e-5, atol=1e-7))
    assert (gxa is not None) == (needs != "s") and (gsa is not None) == (needs != "x")
    # the kernels in use really are compiled ones (a machine without a compiler would fall back)
    from squat_cli.quant.lsq import fake_quant_kernel

    assert not fake_quant_kernel.failed, fake_quant_kernel.reason
