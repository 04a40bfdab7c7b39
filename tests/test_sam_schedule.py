"""Cheaper SAM steps: ascent every k steps (reusing eps), random SAM/plain switching, ascent on part of the batch.
Each is exactly today's step at its default and makes exactly the update it defines otherwise."""

import contextlib

import pytest
import torch

from squat_cli.recipe import QuantConfig, TrainConfig
from squat_cli.train.loop import build_optimizers
from squat_cli.train.sam_schedule import ASCENT, PLAIN, REUSE, SamSchedule
from squat_cli.train.strategies import StepContext, make_strategy
from tests.quant_helpers import batches, tiny_bert
from tests.step_reference import LR, LR_S, RHO, calibrated, params_of, reference_step


def strategy_for(model, method, rho=RHO, schedule=SamSchedule(), optimizer="sgd", step_size_grad="fresh"):
    train = TrainConfig(optimizer=optimizer, lr=LR, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0,
                        max_grad_norm=None)
    w_opt, _, s_opt, _ = build_optimizers(model, train, QuantConfig(method=method, step_lr=LR_S), 10)
    ctx = StepContext(model=model, core=model, w_opt=w_opt, s_opt=s_opt, backward=lambda loss: loss.backward(),
                      autocast=contextlib.nullcontext, no_sync=contextlib.nullcontext, rho=rho, schedule=schedule)
    return make_strategy(method, ctx, step_size_grad)


def _run(method, schedule, steps=4, rho=RHO):
    m = calibrated(method)
    st = strategy_for(m, method, rho, schedule, optimizer="adam")
    losses = [st.step(b) for b in batches(steps, seed=5)]
    return params_of(m), losses


def test_modes():
    assert [SamSchedule(every=3).mode(t, True) for t in range(6)] == [ASCENT, REUSE, REUSE, ASCENT, REUSE, REUSE]
    assert SamSchedule(every=3).mode(1, False) == ASCENT  # nothing stored yet
    rst = SamSchedule(probability=0.5, seed=3)
    modes = [rst.mode(t, True) for t in range(400)]
    assert modes == [rst.mode(t, True) for t in range(400)]  # a function of seed and step alone
    assert 150 < modes.count(PLAIN) < 250 and set(modes) == {PLAIN, ASCENT}
    b = batches(1, size=7)[0]
    assert len(SamSchedule(fraction=0.3).ascent_batch(b)["labels"]) == 3  # ceil(0.3 * 7)
    assert SamSchedule().ascent_batch(b) is b


@pytest.mark.parametrize("method", ["joint", "squat"])
def test_defaults_are_todays_step_bit_for_bit(method):
    a, la = _run(method, SamSchedule())
    b, lb = _run(method, SamSchedule(every=1, probability=1.0, fraction=1.0, seed=99))
    assert la == lb and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method", ["joint", "squat", "fp-sam"])
def test_every_k_reuses_the_stored_eps_exactly(method):
    """Step 1 (of k=2) makes one weight pass at Q(w_1, s) + eps_0: the same eps, bitwise, and the same update as
    that pass computed by hand on a copy."""
    import copy

    from squat_cli.quant.qlinear import quant_layers

    m = calibrated(method) if method != "fp-sam" else tiny_bert()
    st = strategy_for(m, method, schedule=SamSchedule(every=2))
    b0, b1 = batches(2, seed=5)
    st.step(b0)
    stored = [e.clone() for e in st.perturb.stored]
    twin = copy.deepcopy(m)
    twin_st = strategy_for(twin, method)  # same optimizer state: SGD with momentum, first step already taken
    twin_st.ctx.w_opt.load_state_dict(copy.deepcopy(st.ctx.w_opt.state_dict()))  # own momentum buffers
    if st.ctx.s_opt is not None:
        twin_st.ctx.s_opt.load_state_dict(copy.deepcopy(st.ctx.s_opt.state_dict()))
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda mod, i: seen.append(mod.eps.clone() if mod.eps is not None
                                                                           else None))
             for _, layer in quant_layers(m)]
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    st.step(b1)
    h.remove()
    for x in hooks:
        x.remove()
    n_q = len(quant_layers(m))
    assert len(calls) == (1 if method != "squat" else 2)  # no ascent pass (squat: weight pass + step-size pass)
    if n_q:
        assert all(torch.equal(seen[i], stored[i]) for i in range(n_q))
    # by hand on the twin: perturb by eps_0, one backward, restore, the method's updates
    twin_st.perturb.stored = stored
    twin_st.perturb.apply_stored()
    if method == "squat":
        twin_st._set_grad(twin_st.s_params, False)
    twin(**b1).loss.backward()
    twin_st.perturb.restore()
    twin_st._set_grad(twin_st.s_params, True)
    twin_st._step_w()
    if method == "squat":
        twin_st._set_grad(twin_st.w_params, False)
        twin(**b1).loss.backward()
        twin_st._set_grad(twin_st.w_params, True)
    twin_st._step_s()
    got, want = params_of(m), params_of(twin)
    assert all(torch.equal(got[n], want[n]) for n in got)


def test_probability_zero_is_the_method_without_sam():
    joint, lj = _run("joint", SamSchedule(probability=1e-9))
    lsq, ll = _run("lsq", SamSchedule())
    assert lj == ll and all(torch.equal(joint[n], lsq[n]) for n in joint)
    squat_plain, _ = _run("squat", SamSchedule(probability=1e-9))
    squat_rho0, _ = _run("squat", SamSchedule(), rho=0.0)  # no dropout in these models: same draws
    assert all(torch.equal(squat_plain[n], squat_rho0[n]) for n in squat_plain)


@pytest.mark.parametrize("method", ["joint", "squat"])
def test_ascent_fraction_takes_eps_from_the_first_part_of_the_batch(method):
    """fraction 0.5 of a 4-example batch: eps from examples 0-1, the descent on all 4 (hand-written reference)."""
    from tests.step_reference import quantized

    batch = batches(1)[0]
    half = {k: v[:2] for k, v in batch.items()}
    W1, S1 = reference_step(method, 0, batch, 2, eps_batch=half)
    model, names = quantized(method)
    strategy_for(model, method, schedule=SamSchedule(fraction=0.5)).step(batch)
    got = dict(model.named_parameters())
    for n, ref in W1.items():
        assert torch.allclose(got[n], ref, atol=1e-6, rtol=1e-5), n
    for n, ref in S1.items():
        assert torch.allclose(got[f"{n}.wq.step"], ref, atol=1e-8, rtol=1e-5), n
    full, _ = reference_step(method, 0, batch, 2)
    assert any(not torch.allclose(full[n], W1[n], atol=1e-7) for n in W1)  # the fraction did change eps


def test_recipe_options_validated():
    from squat_cli.errors import RecipeError
    from squat_cli.recipe import load_recipe

    r = load_recipe(sets=["sam.every=4", "sam.probability=0.5", "sam.ascent_fraction=0.25"])
    assert (r.sam.every, r.sam.probability, r.sam.ascent_fraction) == (4, 0.5, 0.25)
    for bad, msg in (("sam.every=0", "sam.every: 0 must be > 0"), ("sam.probability=0", "sam.probability: 0.0 must"),
                     ("sam.ascent_fraction=1.5", "sam.ascent_fraction: 1.5 must be in (0, 1]")):
        with pytest.raises(RecipeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            load_recipe(sets=[bad])
    r = load_recipe(base={"quant.method": "squat"}, sets=["quant.step_size_grad=reuse", "sam.every=2"])
    assert (r.quant.step_size_grad, r.sam.every) == ("reuse", 2)


@pytest.mark.parametrize("schedule,mode", [(SamSchedule(every=2), REUSE), (SamSchedule(probability=1e-9), PLAIN)])
def test_reuse_takes_the_step_size_gradient_from_the_weight_pass_when_there_is_no_ascent(schedule, mode):
    """squat with step_size_grad=reuse: a step without an ascent (reused eps, or a plain RST step) makes one pass,
    at Q(w_1, s_1) (+ eps_0), whose gradient gives both the weight step and the pending step-size step (hand
    computation on a copy). At step 0 no step-size update is pending: the steps stay as initialised."""
    import copy

    m = calibrated("squat")
    st = strategy_for(m, "squat", schedule=schedule, step_size_grad="reuse")
    b0, b1 = batches(2, seed=5)
    s_init = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".step")}
    st.step(b0)
    s_after0 = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith(".step")}
    if mode == PLAIN:  # step 0 had no ascent either: its weight pass gave no step-size update
        assert all(torch.equal(s_init[n], s_after0[n]) for n in s_init)
    stored = [e.clone() for e in st.perturb.stored] if st.perturb.stored is not None else None
    twin = copy.deepcopy(m)
    twin_st = strategy_for(twin, "squat", step_size_grad="reuse")
    twin_st.ctx.w_opt.load_state_dict(copy.deepcopy(st.ctx.w_opt.state_dict()))
    twin_st.ctx.s_opt.load_state_dict(copy.deepcopy(st.ctx.s_opt.state_dict()))
    twin_st.step_count = 1
    calls = []
    h = m.register_forward_pre_hook(lambda *a: calls.append(1))
    assert st.ctx.schedule.mode(1, stored is not None) == mode
    st.step(b1)
    h.remove()
    assert len(calls) == 1  # one pass in all
    if mode == REUSE:
        twin_st.perturb.stored = stored
        twin_st.perturb.apply_stored()
    twin(**b1).loss.backward()  # w and s both get gradients
    twin_st.perturb.restore()
    twin_st._step_w()
    twin_st._step_s()
    got, want = params_of(m), params_of(twin)
    assert all(torch.equal(got[n], want[n]) for n in got)
    assert any(not torch.equal(got[n], s_after0[n]) for n in s_after0)  # the step sizes moved at step 1
