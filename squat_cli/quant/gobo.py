"""GOBO (Zadeh et al., MICRO 2020): post-training, per-matrix Gaussian outliers plus a 2^b-entry codebook.

Per weight matrix:

1. Fit a Gaussian N(mu, sigma) to its values. A weight whose log-density
   ``log N(w; mu, sigma)`` is at or below ``threshold`` (default -4, as in the
   public re-implementation: |w - mu| beyond about 3.5-3.7 sigma for BERT's
   sigma of 0.02-0.05) is an outlier and stays FP32, bit-exact.
2. The other weights get the nearest of 2^b centroids. Initialisation: sort
   them, split into 2^b equal-population bins, centroid = bin mean.
3. Refine: centroid = mean of its members (an empty cluster keeps its value),
   reassign every weight to its nearest centroid, and keep going while the L1
   error ``sum |w - c(w)|`` decreases; the first iteration that does not
   decrease it is discarded and the loop stops (at most ``max_iter``).

``GoboQuantizer`` holds the codebook and the Gaussian (mu, sigma); given the
(unchanged) FP weight these reproduce the indices and the outliers exactly, so
the run folder stores the FP weights plus ``codebook``/``mu``/``sigma``, and the
b-bit indices and the outlier (position, value) list are derived from them
(``gobo_codes``). Activations stay FP32 (A32): GOBO quantizes weights only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

DEFAULT_THRESHOLD = -4.0
MAX_ITER = 100


@dataclass
class GoboFit:
    codebook: torch.Tensor
    """(2^b,) float32, ascending."""
    mu: float
    sigma: float
    outliers: torch.Tensor
    """Boolean mask, the weight's shape."""
    indices: torch.Tensor
    """Codebook index of every weight (uint8; outliers' entries are 0 and unused)."""
    l1_history: list[float] = field(default_factory=list)
    """L1 error of the initial codebook, then of each accepted iteration (non-increasing)."""
    iterations: int = 0

    @property
    def outlier_share(self) -> float:
        return float(self.outliers.float().mean())


def log_density(w: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """log N(w; mu, sigma), elementwise, in float64."""
    z = (w.double() - mu) / sigma
    return -0.5 * z * z - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def outlier_mask(w: torch.Tensor, mu: float, sigma: float, threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    if sigma <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    return log_density(w, mu, sigma) <= threshold


def nearest(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (ascending ``codebook``; a tie goes to the lower centroid)."""
    mid = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values, mid, right=False)


def _l1(values: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> float:
    return float((values.double() - codebook.double()[idx]).abs().sum())


def fit_gobo(w: torch.Tensor, bits: int, threshold: float = DEFAULT_THRESHOLD, max_iter: int = MAX_ITER) -> GoboFit:
    """Outliers, codebook and indices of one weight tensor (see the module docstring)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"GOBO bits must be in 1..8, got {bits}")
    flat = w.detach().float().reshape(-1)
    mu = float(flat.double().mean())
    sigma = float(flat.double().std(unbiased=False))
    out = outlier_mask(flat, mu, sigma, threshold)
    values = flat[~out]
    k = 2**bits
    if values.numel() == 0:
        codebook = torch.zeros(k)
        idx_all = torch.zeros_like(flat, dtype=torch.uint8)
        return GoboFit(codebook, mu, sigma, out.view(w.shape), idx_all.view(w.shape))
    bins = torch.tensor_split(torch.sort(values).values, k)
    codebook = torch.stack([b.mean() if b.numel() else torch.tensor(float("nan")) for b in bins])
    codebook = _fill_empty(codebook, values)
    idx = nearest(values, codebook)
    err = _l1(values, codebook, idx)
    history = [err]
    iterations = 0
    for _ in range(max_iter):
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values.double())
        counts = torch.bincount(idx, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), codebook.double()).float()
        new, _ = torch.sort(new)
        new_idx = nearest(values, new)
        new_err = _l1(values, new, new_idx)
        if not new_err < err:
            break
        codebook, idx, err = new, new_idx, new_err
        history.append(err)
        iterations += 1
    idx_all = torch.zeros_like(flat, dtype=torch.uint8)
    idx_all[~out] = idx.to(torch.uint8)
    return GoboFit(codebook, mu, sigma, out.view(w.shape), idx_all.view(w.shape), history, iterations)


def _fill_empty(codebook: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Bins left empty (fewer values than centroids) take the largest value: the codebook stays finite."""
    if torch.isnan(codebook).any():
        codebook = torch.where(torch.isnan(codebook), values.max(), codebook)
    return torch.sort(codebook).values


def reconstruct(w: torch.Tensor, codebook: torch.Tensor, mu: float, sigma: float,
                threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """The GOBO weight: codebook values, outliers exactly as in ``w``."""
    flat = w.detach().reshape(-1)
    out = outlier_mask(flat, mu, sigma, threshold)
    deq = codebook.to(flat.dtype)[nearest(flat.float(), codebook.float())]
    return torch.where(out, flat, deq).view(w.shape)


class GoboQuantizer(nn.Module):
    """A weight quantizer holding one matrix's GOBO codebook and Gaussian.

    ``fit`` runs GOBO on the weight; ``forward`` returns the reconstruction,
    cached while the weight tensor is unchanged (GOBO runs no training steps).
    """

    def __init__(self, bits: int, threshold: float = DEFAULT_THRESHOLD):
        super().__init__()
        self.bits = bits
        self.threshold = threshold
        self.register_buffer("codebook", torch.zeros(2**bits))
        self.register_buffer("mu", torch.zeros(()))
        self.register_buffer("sigma", torch.zeros(()))
        self.register_buffer("initialized", torch.tensor(False))
        self._cache: tuple | None = None
        self.last_fit: GoboFit | None = None

    @torch.no_grad()
    def fit(self, w: torch.Tensor) -> GoboFit:
        res = fit_gobo(w, self.bits, self.threshold)
        self.codebook.copy_(res.codebook)
        self.mu.fill_(res.mu)
        self.sigma.fill_(res.sigma)
        self.initialized.fill_(True)
        self._cache = None
        self.last_fit = res
        return res

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            return w
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                rec = reconstruct(w, self.codebook, float(self.mu), float(self.sigma), self.threshold)
            self._cache = (key, rec)
        return self._cache[1]

    def extra_repr(self) -> str:
        return f"bits={self.bits}, threshold={self.threshold}"


def gobo_codes(w: torch.Tensor, q: GoboQuantizer) -> dict[str, torch.Tensor]:
    """What a GOBO matrix stores: b-bit indices (uint8, one per weight), the codebook, and the outliers
    as flat positions (int64) with their FP32 values."""
    flat = w.detach().reshape(-1).float()
    out = outlier_mask(flat, float(q.mu), float(q.sigma), q.threshold)
    idx = nearest(flat, q.codebook.float()).to(torch.uint8)
    pos = torch.nonzero(out).reshape(-1)
    return {"indices": torch.where(out, torch.zeros_like(idx), idx).view(w.shape), "codebook": q.codebook.clone(),
            "outlier_positions": pos, "outlier_values": flat[pos].clone()}


def gobo_outlier_shares(model: nn.Module) -> dict[str, float]:
    """Share of FP32 outliers per GOBO-quantized module (by module name)."""
    out = {}
    for name, mod in model.named_modules():
        wq = getattr(mod, "wq", None)
        if isinstance(wq, GoboQuantizer) and bool(wq.initialized):
            mask = outlier_mask(mod.weight.detach().reshape(-1), float(wq.mu), float(wq.sigma), wq.threshold)
            out[name] = round(float(mask.float().mean()), 7)
    return out
