"""GOBO on hand-made tensors: outliers kept bit-exact, centroids = member means, the L1 stopping rule, round trip."""

import torch

from squat_cli.quant.gobo import GoboQuantizer, fit_gobo, gobo_codes, log_density, nearest, outlier_mask


def test_one_bit_by_hand():
    """[1..8]: mean 4.5, sigma 2.29, no value below log-density -4; equal-population bins {1..4}, {5..8}
    give centroids 2.5 and 6.5, L1 = 2 * (1.5 + 0.5 + 0.5 + 1.5) = 8; the update changes nothing, so it stops."""
    w = torch.arange(1.0, 9.0)
    res = fit_gobo(w, bits=1)
    assert not res.outliers.any()
    assert res.codebook.tolist() == [2.5, 6.5]
    assert res.indices.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert res.l1_history == [8.0] and res.iterations == 0


def test_planted_outliers_are_kept_bit_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g) * 0.03
    planted = {(3, 5): 0.41, (10, 0): -0.37, (63, 31): 0.2833}
    for (i, j), v in planted.items():
        w[i, j] = v
    res = fit_gobo(w, bits=3)
    for i, j in planted:
        assert res.outliers[i, j]
    mu, sigma = res.mu, res.sigma
    # the rule itself: log N(w; mu, sigma) <= -4, nothing else
    assert torch.equal(res.outliers, log_density(w, mu, sigma) <= -4.0)
    assert 0 < res.outlier_share < 0.01
    q = GoboQuantizer(3)
    q.fit(w)
    rec = q(w)
    assert torch.equal(rec[res.outliers], w[res.outliers])  # bit-exact FP32
    inliers = rec[~res.outliers]
    assert set(inliers.unique().tolist()) <= set(res.codebook.tolist())
    assert len(res.codebook.unique()) == 8


def test_centroids_are_member_means_and_l1_stops_decreasing():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4000, generator=g) * 0.05
    res = fit_gobo(w, bits=2)
    vals = w[~res.outliers]
    idx = res.indices[~res.outliers].long()
    hist = res.l1_history
    assert res.iterations >= 1 and len(hist) == res.iterations + 1
    assert all(b < a for a, b in zip(hist, hist[1:]))  # every accepted iteration lowered the L1 error
    assert abs(hist[-1] - float((vals.double() - res.codebook.double()[idx]).abs().sum())) < 1e-6
    # the stopping rule: one more update (means, then nearest) would not lower the L1 error
    means = torch.stack([vals[idx == k].double().mean() for k in range(4)]).float()
    nxt = nearest(vals, torch.sort(means).values)
    assert float((vals.double() - torch.sort(means).values.double()[nxt]).abs().sum()) >= hist[-1] - 1e-9
    # clusters well apart: at convergence each centroid is exactly the mean of its members
    c = torch.tensor([-0.3, -0.1, 0.1, 0.3]).repeat_interleave(250) + torch.randn(1000, generator=g) * 0.01
    r2 = fit_gobo(c, bits=2)
    for k in range(4):
        members = c[r2.indices.long() == k]
        assert abs(float(members.double().mean()) - float(r2.codebook[k])) < 1e-6


def test_indices_codebook_round_trip():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 40, generator=g) * 0.04
    w[7, 7] = 0.9
    q = GoboQuantizer(2)
    q.fit(w)
    codes = gobo_codes(w, q)
    assert codes["indices"].dtype == torch.uint8 and int(codes["indices"].max()) <= 3
    assert codes["outlier_positions"].tolist() == torch.nonzero(outlier_mask(w.reshape(-1), float(q.mu),
                                                                             float(q.sigma))).reshape(-1).tolist()
    rebuilt = codes["codebook"][codes["indices"].long()].reshape(-1)
    rebuilt[codes["outlier_positions"]] = codes["outlier_values"]
    assert torch.equal(rebuilt.view(w.shape), q(w))
    assert 7 * 40 + 7 in codes["outlier_positions"].tolist()
