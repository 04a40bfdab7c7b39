"""Q-BERT's mixed precision: which encoder layers get the higher bit width, from Hessian sensitivity.

For every encoder block (all its quantized linear layers together), the top
eigenvalue of the loss Hessian restricted to the block's weights is computed
on ``quant.hessian_subsets`` random subsets of ``quant.hessian_examples``
training examples each (seeded by the run's seed), on the FP model before
conversion; Omega = |mean| + std ranks the blocks and the top
``quant.mixed_share`` of them get the higher bit width.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from squat_cli.batching import eval_loader
from squat_cli.data import Encoded
from squat_cli.quant.convert import encoder_blocks, select_linear
from squat_cli.quant.hessian import layer_sensitivity, mixed_bits
from squat_cli.recipe import QuantConfig


def hessian_subsets(train: Encoded, cfg: QuantConfig, seed: int, pad_id: int, batch_size: int = 32) -> list[list[dict]]:
    """``cfg.hessian_subsets`` random subsets (without replacement within a subset) as lists of batches."""
    rng = np.random.default_rng(seed)
    n = min(cfg.hessian_examples, len(train))
    out = []
    for _ in range(cfg.hessian_subsets):
        idx = np.sort(rng.choice(len(train), size=n, replace=False))
        loader, _ = eval_loader(train.select(idx), batch_size, pad_id)
        out.append(list(loader))
    return out


def assign_mixed_bits(model: nn.Module, cfg: QuantConfig, train: Encoded, seed: int,
                      pad_id: int) -> tuple[dict[str, int], dict]:
    """Weight bits per quantized module, and what decided them (per block: bits, Omega, eigenvalues)."""
    low, high = cfg.mixed_bits()
    names = select_linear(model, cfg.include, cfg.exclude)
    blocks = encoder_blocks(names)
    params = {b: [model.get_submodule(n).weight for n in mods] for b, mods in blocks.items()}
    sens = layer_sensitivity(model, params, hessian_subsets(train, cfg, seed, pad_id), cfg.hessian_iters, seed)
    block_bits = mixed_bits(sens, low, high, cfg.mixed_share)
    bits = {n: block_bits[b] for b, mods in blocks.items() for n in mods}
    info = {"mixed": cfg.mixed, "layer_bits": {s.layer: {"bits": block_bits[s.layer], "omega": s.omega,
                                                        "eigenvalues": s.eigenvalues} for s in sens}}
    return bits, info
