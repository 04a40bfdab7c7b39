"""One step of each method against a hand-written reference; rho = 0 reductions, exactly."""

import contextlib
import copy
import math

import pytest
import torch
from torch.func import functional_call

from squat_cli.quant.convert import calibrate, quantize_model
from squat_cli.quant.qlinear import clamp_steps, quant_layers, step_parameters, weight_parameters
from squat_cli.recipe import QuantConfig, TrainConfig
from squat_cli.train.loop import build_optimizers
from squat_cli.train.strategies import StepContext, make_strategy
from tests.quant_helpers import batches, tiny_bert

LR, LR_S, RHO = 0.05, 10.0, 0.3


def _strategy(model, method, rho, optimizer="sgd", step_size_grad="fresh", abits=32, weight_ste="masked",
              dropout_replay=False):
    train = TrainConfig(optimizer=optimizer, lr=LR, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0,
                        max_grad_norm=None)
    quant = QuantConfig(method=method, step_lr=LR_S, abits=abits, step_size_grad=step_size_grad)
    w_opt, _, s_opt, _ = build_optimizers(model, train, quant, 10)
    ctx = StepContext(model=model, core=model, w_opt=w_opt, s_opt=s_opt, backward=lambda loss: loss.backward(),
                      autocast=contextlib.nullcontext, no_sync=contextlib.nullcontext, max_grad_norm=None, rho=rho,
                      weight_ste=weight_ste, dropout_replay=dropout_replay)
    return make_strategy(method, ctx, step_size_grad)


def _quantized(method="squat", wbits=2, abits=32, seed=0):
    model = tiny_bert(seed)
    names = quantize_model(model, QuantConfig(method=method, wbits=wbits, abits=abits))
    return model, names


# ------------------------------------------------------------------ reference (written from the paper)


def lsq_ref(w, s, bits, identity=False):
    """LSQ written with autograd; ``identity``: dQ/dw = 1 for every element (Eq. 7 as written)."""
    if identity:
        return lsq_ref(w.detach(), s, bits) + (w - w.detach())
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = 1.0 / math.sqrt(w.numel() * qp)
    s = (s - s * g).detach() + s * g
    v = torch.clamp(w / s, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s


def ref_loss(fp, W, S, eps, batch, bits, identity=False):
    params = {}
    for n, p in W.items():
        layer = n[: -len(".weight")]
        params[n] = (lsq_ref(p, S[layer], bits, identity) if layer in S else p) + eps.get(n, 0.0)
    return functional_call(fp, params, args=(), kwargs=batch).loss


def ref_eps(fp, W, S, batch, bits, rho):
    """eps = rho * g / ||g|| with g the gradient w.r.t. Q(w) (quantized layers) and w (the rest)."""
    leaves = {}
    for n, p in W.items():
        layer = n[: -len(".weight")]
        leaves[n] = (lsq_ref(p, S[layer], bits) if layer in S else p).detach().requires_grad_()
    loss = functional_call(fp, leaves, args=(), kwargs=batch).loss
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    return {n: rho * g / (norm + 1e-12) for n, g in grads.items()}


def reference_step(method, seed, batch, bits=2, weight_ste="masked", eps_batch=None):
    fp = tiny_bert(seed)
    q, names = _quantized(seed=seed, wbits=bits)
    S = {n: q.get_submodule(n).wq.step.detach().clone() for n in names}
    W = {n: p.detach().clone() for n, p in fp.named_parameters()}
    eps = ref_eps(fp, W, S, eps_batch if eps_batch is not None else batch, bits, RHO)
    Wv = {n: p.clone().requires_grad_() for n, p in W.items()}
    Sv = {n: s.clone().requires_grad_(method == "joint") for n, s in S.items()}
    loss2 = ref_loss(fp, Wv, Sv, eps, batch, bits, identity=weight_ste == "identity")
    gW = torch.autograd.grad(loss2, list(Wv.values()), retain_graph=True)
    W1 = {n: W[n] - LR * g for n, g in zip(W, gW)}  # SGD (first step: momentum buffer = gradient)
    if method == "joint":  # s from the same perturbed pass
        gS = torch.autograd.grad(loss2, list(Sv.values()))
    else:  # squat: fresh pass at Q(w_{t+1}, s_t), w fixed
        Sv = {n: s.clone().requires_grad_() for n, s in S.items()}
        loss3 = ref_loss(fp, W1, Sv, {}, batch, bits)
        gS = torch.autograd.grad(loss3, list(Sv.values()))
    S1 = {n: S[n] - LR_S * g for n, g in zip(S, gS)}
    return W1, S1


@pytest.mark.parametrize("method", ["squat", "joint"])
@pytest.mark.parametrize("bits,weight_ste", [(2, "masked"), (4, "masked"), (2, "identity")])
def test_one_step_matches_reference(method, bits, weight_ste):
    batch = batches(1)[0]
    W1, S1 = reference_step(method, 0, batch, bits, weight_ste)
    model, names = _quantized(method, wbits=bits)
    s0 = {n: model.get_submodule(n).wq.step.detach().clone() for n in names}
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    _strategy(model, method, RHO, weight_ste=weight_ste).step(batch)
    got = dict(model.named_parameters())
    for n, ref in W1.items():
        assert torch.allclose(got[n], ref, atol=1e-6, rtol=1e-5), n
    for n, ref in S1.items():
        assert torch.allclose(got[f"{n}.wq.step"], ref, atol=1e-8, rtol=1e-5), n
    # the step really moved w and s (the comparison above is not between unchanged tensors)
    assert all(not torch.equal(got[f"{n}.weight"], w0[n]) for n in names)
    moved = [float((got[f"{n}.wq.step"].detach() - s0[n]).abs().max()) for n in names]
    assert sum(d > 1e-6 for d in moved) >= 4, moved


def test_squat_differs_from_joint_and_lsq():
    """The three methods give different parameters after one step (the references above are not vacuous)."""
    batch = batches(1)[0]
    out = {}
    for method in ("squat", "joint", "lsq"):
        m, _ = _quantized(method)
        _strategy(m, method, RHO).step(batch)
        out[method] = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert not torch.allclose(out["squat"], out["joint"])
    assert not torch.allclose(out["squat"], out["lsq"])


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(model, method, rho, steps, optimizer="adam", **kw):
    st = _strategy(model, method, rho, optimizer=optimizer, **kw)
    losses = [st.step(b) for b in batches(steps, seed=5)]
    return _params(model), losses


def _calibrated(method, seed=0):
    m, _ = _quantized(method, abits=8, seed=seed)
    calibrate(m, batches(2, seed=9))
    return m


def test_joint_rho0_is_lsq_exactly():
    a, la = _run(_calibrated("joint"), "joint", 0.0, 3)
    b, lb = _run(_calibrated("lsq"), "lsq", 0.0, 3)
    assert la == lb
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.wq.step"],
                           _calibrated("lsq").bert.encoder.layer[0].attention.self.query.wq.step)


def test_fp_sam_rho0_is_plain_finetuning_exactly():
    a, _ = _run(tiny_bert(), "fp-sam", 0.0, 3)
    b, _ = _run(tiny_bert(), "fp", 0.0, 3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c, _ = _run(tiny_bert(), "fp-sam", 0.5, 3)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_squat_rho0_is_alternating_lsq_exactly():
    a, _ = _run(_calibrated("squat"), "squat", 0.0, 3)
    # reference: w by Adam with s fixed, then s by SGD with w fixed at w_{t+1}
    m = _calibrated("squat")
    train = TrainConfig(optimizer="adam", lr=LR, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0)
    w_opt, _, s_opt, _ = build_optimizers(m, train, QuantConfig(step_lr=LR_S), 10)
    steps = step_parameters(m)
    ws = [p for _, p in weight_parameters(m)]
    for b in batches(3, seed=5):
        for p in steps:
            p.requires_grad_(False)
        m(**b).loss.backward()
        w_opt.step()
        w_opt.zero_grad()
        for p in steps:
            p.requires_grad_(True)
        for p in ws:
            p.requires_grad_(False)
        m(**b).loss.backward()
        s_opt.step()
        s_opt.zero_grad()
        clamp_steps(m)
        for p in ws:
            p.requires_grad_(True)
    b_ = _params(m)
    assert all(torch.equal(a[n], b_[n]) for n in a)


def test_squat_reuse_takes_step_grad_from_next_first_pass():
    bs = batches(2, seed=5)
    m = _calibrated("squat")
    st = _strategy(m, "squat", RHO, optimizer="adam", step_size_grad="reuse")
    s0 = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".step")}
    st.step(bs[0])
    s_after_1 = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".step")}
    assert all(torch.equal(s0[n], s_after_1[n]) for n in s0)  # no s step before a weight step happened
    # reference: grad_s L(Q(w_1, s_0)) on the next batch, one SGD step
    ref = copy.deepcopy(m)
    for p in weight_parameters(ref):
        p[1].requires_grad_(False)
    ref(**bs[1]).loss.backward()
    expected = {n: (p - LR_S * p.grad).detach() for n, p in ref.named_parameters() if n.endswith(".step")}
    st.step(bs[1])
    got = {n: p.detach() for n, p in m.named_parameters() if n.endswith(".step")}
    assert all(torch.allclose(got[n], expected[n].clamp_min(1e-8), atol=1e-8) for n in got)
    assert any(not torch.equal(got[n], s0[n]) for n in got)


def test_perturbation_has_norm_rho_and_is_restored():
    from squat_cli.train.sam import Perturbation

    m = _calibrated("joint")
    before = _params(m)
    p = Perturbation(m)
    p.capture(True)
    m(**batches(1)[0]).loss.backward()
    p.apply(0.25)
    eps = [layer.eps for _, layer in quant_layers(m)]
    eps += [m_p - before[n] for n, m_p in m.named_parameters() if n in {k for k, _ in weight_parameters(m)}
            and not any(n == f"{ln}.weight" for ln, _ in quant_layers(m))]
    total = torch.sqrt(sum((e.double() ** 2).sum() for e in eps))
    assert float(total.detach()) == pytest.approx(0.25, rel=1e-4)
    p.restore()
    assert all(torch.equal(before[n], q) for n, q in _params(m).items())
    assert all(layer.eps is None for _, layer in quant_layers(m))


def test_nonfinite_loss_is_reported():
    from squat_cli.errors import DivergenceError

    m = _calibrated("lsq")
    with torch.no_grad():
        m.classifier.weight.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="non-finite loss .* at step 1"):
        _strategy(m, "lsq", 0.0).step(batches(1)[0])


@pytest.mark.parametrize("step_size_grad", ["fresh", "reuse"])
def test_aux_precision_runs_only_the_steering_passes_in_bf16(step_size_grad):
    """train.aux_precision=bf16: SAM's ascent and SQuAT's step-size pass in bf16, the weight pass as the run."""
    model, _ = _quantized(abits=8)
    calibrate(model, batches(1, seed=5))
    strategy = _strategy(model, "squat", RHO, step_size_grad=step_size_grad)
    seen: list[str] = []
    strategy.ctx.autocast = lambda: _tagged(seen, "main", contextlib.nullcontext())
    strategy.ctx.aux_autocast = lambda: _tagged(seen, "aux", torch.autocast("cpu", dtype=torch.bfloat16))
    dtypes = []
    hook = model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    for b in batches(2):
        strategy.step(b)
    hook.remove()
    if step_size_grad == "fresh":  # ascent, weight pass, step-size pass
        assert seen == ["aux", "main", "aux"] * 2
        assert dtypes == [torch.bfloat16, torch.float32, torch.bfloat16] * 2
    else:  # ascent (with the previous step's step-size gradient), weight pass
        assert seen == ["aux", "main"] * 2
        assert dtypes == [torch.bfloat16, torch.float32] * 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


@contextlib.contextmanager
def _tagged(seen: list, tag: str, inner):
    seen.append(tag)
    with inner:
        yield
