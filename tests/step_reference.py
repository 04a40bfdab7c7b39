"""Reference implementations and small builders shared by the strategy, schedule, convention and sharpness tests:
one SAM / SQuAT step written from the paper with autograd, and quantized tiny models with their strategies."""

import contextlib
import math

import torch
from torch.func import functional_call

from squat_cli.quant.convert import calibrate, quantize_model
from squat_cli.recipe import QuantConfig, TrainConfig
from squat_cli.train.loop import build_optimizers
from squat_cli.train.strategies import StepContext, make_strategy
from tests.quant_helpers import batches, tiny_bert

LR, LR_S, RHO = 0.05, 10.0, 0.3


def strategy_for(model, method, rho, optimizer="sgd", step_size_grad="fresh", abits=32, weight_ste="masked",
              dropout_replay=False):
    train = TrainConfig(optimizer=optimizer, lr=LR, weight_decay=0.0, scheduler="constant", warmup_ratio=0.0,
                        max_grad_norm=None)
    quant = QuantConfig(method=method, step_lr=LR_S, abits=abits, step_size_grad=step_size_grad)
    w_opt, _, s_opt, _ = build_optimizers(model, train, quant, 10)
    ctx = StepContext(model=model, core=model, w_opt=w_opt, s_opt=s_opt, backward=lambda loss: loss.backward(),
                      autocast=contextlib.nullcontext, no_sync=contextlib.nullcontext, max_grad_norm=None, rho=rho,
                      weight_ste=weight_ste, dropout_replay=dropout_replay)
    return make_strategy(method, ctx, step_size_grad)


def quantized(method="squat", wbits=2, abits=32, seed=0, embedding_bits=None):
    model = tiny_bert(seed)
    names = quantize_model(model, QuantConfig(method=method, wbits=wbits, abits=abits, embedding_bits=embedding_bits))
    return model, names


# ------------------------------------------------------------------ reference (written from the paper)


def lsq_ref(w, s, bits, identity=False):
    """LSQ written with autograd; ``identity``: dQ/dw = 1 for every element (Eq. 7 as written)."""
    if identity:
        return lsq_ref(w.detach(), s, bits) + (w - w.detach())
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = 1.0 / math.sqrt(w.numel() // s.numel() * qp)  # elements per step (a (C, 1) step: one per row)
    s = (s - s * g).detach() + s * g
    v = torch.clamp(w / s, qn, qp)
    v = (v.round() - v).detach() + v
    return v * s


def _bits(bits, layer):
    """``bits``: one width for every layer, or a dict of widths by layer name."""
    return bits[layer] if isinstance(bits, dict) else bits


def ref_loss(fp, W, S, eps, batch, bits, identity=False):
    params = {}
    for n, p in W.items():
        layer = n[: -len(".weight")]
        params[n] = (lsq_ref(p, S[layer], _bits(bits, layer), identity) if layer in S else p) + eps.get(n, 0.0)
    return functional_call(fp, params, args=(), kwargs=batch).loss


def ref_eps(fp, W, S, batch, bits, rho):
    """eps = rho * g / ||g|| with g the gradient w.r.t. Q(w) (quantized layers) and w (the rest)."""
    leaves = {}
    for n, p in W.items():
        layer = n[: -len(".weight")]
        leaves[n] = (lsq_ref(p, S[layer], _bits(bits, layer)) if layer in S else p).detach().requires_grad_()
    loss = functional_call(fp, leaves, args=(), kwargs=batch).loss
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    return {n: rho * g / (norm + 1e-12) for n, g in grads.items()}


def reference_step(method, seed, batch, bits=2, weight_ste="masked", eps_batch=None, embedding_bits=None):
    fp = tiny_bert(seed)
    q, names = quantized(seed=seed, wbits=bits, embedding_bits=embedding_bits)
    bits = {n: q.get_submodule(n).wq.bits for n in names}
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


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def calibrated(method, seed=0):
    m, _ = quantized(method, abits=8, seed=seed)
    calibrate(m, batches(2, seed=9))
    return m
