"""One step of each method against a hand-written reference; rho = 0 reductions, exactly."""

import contextlib
import copy

import pytest
import torch

from squat_cli.quant.convert import calibrate
from squat_cli.quant.qlinear import clamp_steps, quant_layers, step_parameters, weight_parameters
from squat_cli.recipe import QuantConfig, TrainConfig
from squat_cli.train.loop import build_optimizers
from tests.quant_helpers import batches, tiny_bert
from tests.step_reference import (
    LR,
    LR_S,
    RHO,
    calibrated,
    params_of,
    quantized,
    reference_step,
    strategy_for,
)


@pytest.mark.parametrize("method", ["squat", "joint"])
@pytest.mark.parametrize("bits,weight_ste", [(2, "masked"), (4, "masked"), (2, "identity")])
def test_one_step_matches_reference(method, bits, weight_ste):
    batch = batches(1)[0]
    W1, S1 = reference_step(method, 0, batch, bits, weight_ste)
    model, names = quantized(method, wbits=bits)
    s0 = {n: model.get_submodule(n).wq.step.detach().clone() for n in names}
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    strategy_for(model, method, RHO, weight_ste=weight_ste).step(batch)
    got = dict(model.named_parameters())
    for n, ref in W1.items():
        assert torch.allclose(got[n], ref, atol=1e-6, rtol=1e-5), n
    for n, ref in S1.items():
        assert torch.allclose(got[f"{n}.wq.step"], ref, atol=1e-8, rtol=1e-5), n
    # the step really moved w and s (the comparison above is not between unchanged tensors)
    assert all(not torch.equal(got[f"{n}.weight"], w0[n]) for n in names)
    moved = [float((got[f"{n}.wq.step"].detach() - s0[n]).abs().max()) for n in names]
    assert sum(d > 1e-6 for d in moved) >= 4, moved


@pytest.mark.parametrize("method", ["squat", "joint"])
def test_one_step_with_quantized_embeddings_matches_reference(method):
    """Word embeddings at 3 bits, one learned step per row: SAM perturbs them and both passes train their steps."""
    batch = batches(1)[0]
    emb = "bert.embeddings.word_embeddings"
    W1, S1 = reference_step(method, 0, batch, 2, embedding_bits=3)
    model, names = quantized(method, wbits=2, embedding_bits=3)
    assert emb in names and model.get_submodule(emb).wq.bits == 3
    s0 = model.get_submodule(emb).wq.step.detach().clone()
    assert s0.shape == (model.get_submodule(emb).num_embeddings, 1)
    strategy_for(model, method, RHO).step(batch)
    got = dict(model.named_parameters())
    for n, ref in W1.items():
        assert torch.allclose(got[n], ref, atol=1e-6, rtol=1e-5), n
    for n, ref in S1.items():  # steps are kept positive after the update (a 3-bit row's step can overshoot 0)
        assert torch.allclose(got[f"{n}.wq.step"], ref.clamp_min(1e-8), atol=1e-8, rtol=1e-5), n
    moved = (got[f"{emb}.wq.step"].detach() - s0).abs().reshape(-1)
    attended = batch["input_ids"][batch["attention_mask"].bool()].unique()
    assert float(moved[attended].min()) > 0  # the step of every row the encoder attends to moved
    unused = torch.ones_like(moved, dtype=torch.bool)
    unused[batch["input_ids"].unique()] = False
    assert float(moved[unused].abs().max()) == 0.0  # rows no token looked up have no gradient


def test_squat_differs_from_joint_and_lsq():
    """The three methods give different parameters after one step (the references above are not vacuous)."""
    batch = batches(1)[0]
    out = {}
    for method in ("squat", "joint", "lsq"):
        m, _ = quantized(method)
        strategy_for(m, method, RHO).step(batch)
        out[method] = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert not torch.allclose(out["squat"], out["joint"])
    assert not torch.allclose(out["squat"], out["lsq"])


def _run(model, method, rho, steps, optimizer="adam", **kw):
    st = strategy_for(model, method, rho, optimizer=optimizer, **kw)
    losses = [st.step(b) for b in batches(steps, seed=5)]
    return params_of(model), losses


def test_joint_rho0_is_lsq_exactly():
    a, la = _run(calibrated("joint"), "joint", 0.0, 3)
    b, lb = _run(calibrated("lsq"), "lsq", 0.0, 3)
    assert la == lb
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.wq.step"],
                           calibrated("lsq").bert.encoder.layer[0].attention.self.query.wq.step)


def test_fp_sam_rho0_is_plain_finetuning_exactly():
    a, _ = _run(tiny_bert(), "fp-sam", 0.0, 3)
    b, _ = _run(tiny_bert(), "fp", 0.0, 3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    c, _ = _run(tiny_bert(), "fp-sam", 0.5, 3)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_squat_rho0_is_alternating_lsq_exactly():
    a, _ = _run(calibrated("squat"), "squat", 0.0, 3)
    # reference: w by Adam with s fixed, then s by SGD with w fixed at w_{t+1}
    m = calibrated("squat")
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
    b_ = params_of(m)
    assert all(torch.equal(a[n], b_[n]) for n in a)


def test_squat_reuse_takes_step_grad_from_next_first_pass():
    bs = batches(2, seed=5)
    m = calibrated("squat")
    st = strategy_for(m, "squat", RHO, optimizer="adam", step_size_grad="reuse")
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

    m = calibrated("joint")
    before = params_of(m)
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
    assert all(torch.equal(before[n], q) for n, q in params_of(m).items())
    assert all(layer.eps is None for _, layer in quant_layers(m))


def test_nonfinite_loss_is_reported():
    from squat_cli.errors import DivergenceError

    m = calibrated("lsq")
    with torch.no_grad():
        m.classifier.weight.fill_(float("nan"))
    with pytest.raises(DivergenceError, match="non-finite loss .* at step 1"):
        strategy_for(m, "lsq", 0.0).step(batches(1)[0])


@pytest.mark.parametrize("step_size_grad", ["fresh", "reuse"])
def test_aux_precision_runs_only_the_steering_passes_in_bf16(step_size_grad):
    """train.aux_precision=bf16: SAM's ascent and SQuAT's step-size pass in bf16, the weight pass as the run."""
    model, _ = quantized(abits=8)
    calibrate(model, batches(1, seed=5))
    strategy = strategy_for(model, "squat", RHO, step_size_grad=step_size_grad)
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
