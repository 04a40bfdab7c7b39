"""Sharpness (Algorithm 2) against a hand-written reference; ball constraint; behaviour at a minimum."""

import copy
import math

import pytest
import torch
from torch.func import functional_call

from squat_cli.quant.convert import quantize_model
from squat_cli.recipe import QuantConfig
from squat_cli.sharpness import ascent_sharpness, keskar_sharpness
from tests.quant_helpers import batches, tiny_bert
from tests.step_reference import lsq_ref

TARGETS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"]


def reference_algorithm2(fp, W0, bs, rho, steps, lr, normalized=False):
    """Algorithm 2 written out: W_{t+1} = W_t + lr * grad L(W_t), projected onto ||W - W0|| <= rho.
    ``normalized``: W_{t+1} = W_t + lr * rho * g / ||g|| instead."""
    fp.eval()
    n = sum(len(b["labels"]) for b in bs)
    names = list(W0)

    def loss(W):
        return sum(functional_call(fp, W, args=(), kwargs=b).loss * len(b["labels"]) / n for b in bs)

    W = {k: v.clone() for k, v in W0.items()}
    losses = [float(loss(W).detach())]
    for _ in range(steps):
        leaves = {k: W[k].clone().requires_grad_() for k in names}
        g = torch.autograd.grad(loss(leaves), [leaves[k] for k in names])
        step = lr * rho / math.sqrt(sum(float((gi.double() ** 2).sum()) for gi in g)) if normalized else lr
        W = {k: W[k] + step * gi for k, gi in zip(names, g)}
        d = math.sqrt(sum(float(((W[k] - W0[k]) ** 2).sum()) for k in names))
        if d > rho:
            W = {k: W0[k] + rho * (W[k] - W0[k]) / d for k in names}
        losses.append(float(loss(W).detach()))
    return losses


def _target_names(model):
    return [f"bert.encoder.layer.0.{t}.weight" for t in TARGETS]


@pytest.mark.parametrize("rho,lr", [(0.05, 0.5), (1.0, 0.5)])
def test_fp_model_matches_reference(rho, lr):
    model = tiny_bert(3)
    fp = copy.deepcopy(model)
    W0 = {n: p.detach().clone() for n, p in fp.named_parameters() if n in _target_names(fp)}
    bs = batches(2, seed=4)
    ref = reference_algorithm2(fp, W0, bs, rho, 4, lr)
    res = ascent_sharpness(model, bs, rho, 4, lr)
    assert res.trajectory == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert res.score == pytest.approx(ref[-1] - ref[0], rel=1e-4, abs=1e-7)
    assert res.delta_norm <= rho * (1 + 1e-6)


def test_quantized_model_matches_reference():
    """The perturbed tensors are the quantized weights Q(w, s), step sizes fixed."""
    model = tiny_bert(3)
    quantize_model(model, QuantConfig(method="lsq", wbits=2, abits=32))
    fp = tiny_bert(3)
    W0 = {}
    for t in TARGETS:
        q = model.get_submodule(f"bert.encoder.layer.0.{t}")
        W0[f"bert.encoder.layer.0.{t}.weight"] = lsq_ref(q.weight.detach(), q.wq.step.detach(), 2).detach()
    bs = batches(2, seed=4)
    steps = [model.get_submodule(f"bert.encoder.layer.0.{t}").wq.step.detach().clone() for t in TARGETS]
    ref = reference_algorithm2(fp, W0, bs, 0.1, 3, 0.5)
    res = ascent_sharpness(model, bs, 0.1, 3, 0.5)
    assert res.trajectory == pytest.approx(ref, rel=1e-5, abs=1e-7)
    after = [model.get_submodule(f"bert.encoder.layer.0.{t}").wq.step.detach() for t in TARGETS]
    assert all(torch.equal(a, b) for a, b in zip(steps, after))


def test_never_leaves_the_ball():
    model = tiny_bert(3)
    norms = []
    import squat_cli.sharpness as sh

    real_norm = sh._norm

    def spy(ts):
        ts = list(ts)
        value = real_norm(ts)
        norms.append(value)
        return value

    sh._norm = spy
    try:
        res = ascent_sharpness(model, batches(1), 0.02, 6, 10.0)  # huge lr: every step projects
    finally:
        sh._norm = real_norm
    assert res.delta_norm == pytest.approx(0.02, rel=1e-5)
    assert max(norms[:-1]) > 0.02  # steps did leave the ball before projection ...
    assert res.delta_norm <= 0.02 * (1 + 1e-6)  # ... and were put back


@pytest.fixture(scope="module")
def converged():
    model = tiny_bert(5)
    bs = batches(1, seed=7, size=8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**bs[0]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < 0.01
    return model, bs


def test_converged_toy_nonnegative_and_grows_with_rho(converged):
    model, bs = converged
    # near a minimum the gradient is tiny: plain ascent needs a large lr to reach the ball's edge
    scores = [ascent_sharpness(copy.deepcopy(model), bs, rho, 10, 1000.0).score for rho in (0.01, 0.05, 0.25, 1.0)]
    assert scores[0] > 0
    assert scores == sorted(scores) and scores[-1] > 100 * scores[0]


def test_keskar_variant(converged):
    model, bs = converged
    a = keskar_sharpness(copy.deepcopy(model), bs, 1e-2, subspace=4, maxiter=5, seed=0)
    b = keskar_sharpness(copy.deepcopy(model), bs, 1e-2, subspace=4, maxiter=5, seed=0)
    assert a.score == b.score and a.score > 0
    big = keskar_sharpness(copy.deepcopy(model), bs, 1.0, subspace=4, maxiter=5, seed=0)
    assert big.score > a.score


def test_normalized_steps_match_reference_and_reach_the_edge_where_raw_steps_stop_short():
    """Raw steps of lr 0.1 on a tiny gradient stay deep inside the ball, so rho 0.01 and 0.05 give the same
    score; steps of 0.5 rho along the gradient reach ||delta|| = rho, and the two radii differ."""
    from squat_cli.sharpness_settings import reached_edge

    bs = batches(2, seed=4)
    fp = tiny_bert(3)
    W0 = {n: p.detach().clone() for n, p in fp.named_parameters() if n in _target_names(fp)}
    ref = reference_algorithm2(copy.deepcopy(fp), W0, bs, 0.05, 4, 0.5, normalized=True)
    res = ascent_sharpness(tiny_bert(3), bs, 0.05, 4, 0.5, step="normalized")
    assert res.trajectory == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert res.delta_norm == pytest.approx(0.05, rel=1e-6) and reached_edge(res.delta_norm, 0.05)
    raw = {rho: ascent_sharpness(tiny_bert(3), bs, rho, 4, 0.1, step="raw") for rho in (0.01, 0.05)}
    assert raw[0.01].delta_norm < 0.5 * 0.01 and not reached_edge(raw[0.01].delta_norm, 0.01)
    assert raw[0.01].score == raw[0.05].score  # both stopped inside: the radius made no difference
    norm = {rho: ascent_sharpness(tiny_bert(3), bs, rho, 4, 0.5, step="normalized") for rho in (0.01, 0.05)}
    assert all(reached_edge(norm[r].delta_norm, r) for r in norm)
    assert norm[0.05].score > norm[0.01].score > 0
    with pytest.raises(ValueError, match="step must be"):
        ascent_sharpness(tiny_bert(3), bs, 0.05, 1, 0.5, step="big")
