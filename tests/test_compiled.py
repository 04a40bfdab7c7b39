"""Fused kernels: compiled when possible, the plain function otherwise, same results."""

import torch

from squat_cli.compiled import fused


def _scale_and_clip(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x / s).clamp(-1, 1)


def _not_compilable(x: torch.Tensor) -> torch.Tensor:
    if float(x.sum()) > 0:  # data-dependent Python control flow: no single graph
        return x * 2
    return x - 1


def test_compiled_kernel_matches_and_handles_new_shapes():
    k = fused(_scale_and_clip)
    s = torch.tensor([0.5])
    for shape in [(7,), (3, 11), (2, 5, 4)]:
        x = torch.randn(shape)
        assert torch.equal(k(x, s), _scale_and_clip(x, s))
    assert not k.failed


def test_falls_back_to_the_plain_function(monkeypatch, caplog):
    k = fused(_not_compilable)
    x = torch.ones(4)
    assert torch.equal(k(x), x * 2)
    assert k.failed and "unavailable" in caplog.text
    assert torch.equal(k(-x), -x - 1)  # keeps working, unfused


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("SQUAT_FUSED", "0")
    k = fused(_scale_and_clip)
    x = torch.randn(5)
    assert torch.equal(k(x, torch.tensor([2.0])), _scale_and_clip(x, torch.tensor([2.0])))
    assert k._compiled is None
