"""Q-BERT: group ranges by hand, power iteration against the exact Hessian, the mixed-precision order."""

import pytest
import torch

from squat_cli.quant.hessian import Sensitivity, layer_sensitivity, mixed_bits, top_eigenvalue
from squat_cli.quant.qbert import EmaRangeQuantizer, GroupQuantizer, group_ranges
from tests.quant_helpers import batches, tiny_bert


def test_group_ranges_and_values_by_hand():
    """Rows {0,1} and {2,3}: ranges [0, 3] and [4, 10]; 2 bits = 3 steps of 1 and of 2.
    Group 2: (x - 4) / 2 = 0, 0.5, 1, 3 -> round half to even 0, 0, 1, 3 -> 4, 4, 6, 10."""
    w = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 10.0]], requires_grad=True)
    lo, hi = group_ranges(w, 2)
    assert lo.flatten().tolist() == [0.0, 4.0] and hi.flatten().tolist() == [3.0, 10.0]
    q = GroupQuantizer(2, groups=2)(w)
    assert q.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 4.0], [6.0, 10.0]]
    q.sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0]] * 4  # straight-through
    with pytest.raises(ValueError, match="cannot be split into 3 equal groups"):
        group_ranges(w, 3)


def test_activation_range_is_an_ema_of_batch_extremes():
    aq = EmaRangeQuantizer(8, momentum=0.5)
    aq.init_range([torch.tensor([-1.0, 2.0])])
    aq.train()
    aq(torch.tensor([-3.0, 4.0]))
    assert (float(aq.running_min), float(aq.running_max)) == (-2.0, 3.0)  # 0.5 * old + 0.5 * batch
    aq.eval()
    out = aq(torch.tensor([-5.0, 0.0, 3.0]))
    assert float(out[0]) == -2.0 and float(out[2]) == 3.0  # clipped to the range


def test_power_iteration_matches_the_exact_top_eigenvalue():
    model = tiny_bert(4)
    model.set_attn_implementation("eager")  # double backward (the exact Hessian below) needs eager attention
    model.eval()
    bs = batches(2, seed=3)
    layer = model.bert.encoder.layer[0].attention.self.query
    for p in model.parameters():
        p.requires_grad_(False)
    layer.weight.requires_grad_(True)
    w0 = layer.weight.detach().clone()

    def loss_of(flat):
        from torch.func import functional_call

        params = {"bert.encoder.layer.0.attention.self.query.weight": flat.view_as(w0)}
        n = sum(len(b["labels"]) for b in bs)
        return sum(functional_call(model, params, args=(), kwargs=b).loss * len(b["labels"]) / n for b in bs)

    h = torch.autograd.functional.hessian(loss_of, w0.reshape(-1).double().float())
    eigs = torch.linalg.eigvalsh(h.double())
    exact = float(eigs[eigs.abs().argmax()])
    got = top_eigenvalue(model, [layer.weight], bs, iters=500, tol=1e-9)
    assert got == pytest.approx(exact, rel=1e-3)
    # layer_sensitivity switches to eager attention itself, then restores it, every requires_grad flag
    # and the training mode
    model.set_attn_implementation("sdpa")
    model.train()
    sens = layer_sensitivity(model, {"q": [layer.weight]}, [bs, bs[:1]], iters=50)
    assert model.training and layer.weight.requires_grad and not model.classifier.weight.requires_grad
    assert model.config._attn_implementation == "sdpa"
    assert sens[0].eigenvalues[0] == pytest.approx(exact, rel=1e-2)


def test_omega_and_mixed_precision_order():
    """Omega = |mean| + std (population): a 1, b |1| + 2 = 3, c 2, d 0.5; the top half (b, c) get 3 bits."""
    sens = [Sensitivity("a", [1.0, 1.0]), Sensitivity("b", [3.0, -1.0]), Sensitivity("c", [-2.0, -2.0]),
            Sensitivity("d", [0.5, 0.5])]
    assert [s.omega for s in sens] == pytest.approx([1.0, 3.0, 2.0, 0.5])
    assert mixed_bits(sens, 2, 3) == {"a": 2, "b": 3, "c": 3, "d": 2}
    assert mixed_bits(sens, 2, 4, share=0.25) == {"a": 2, "b": 4, "c": 2, "d": 2}
    tie = [Sensitivity("x", [1.0]), Sensitivity("y", [1.0])]
    assert mixed_bits(tie, 2, 3) == {"x": 3, "y": 2}  # ties: the earlier layer
