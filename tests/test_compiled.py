"""Fused kernels: compiled when possible, the plain function otherwise, same results."""

import gc

import torch

from squat_cli.compiled import fused, kernel_state


def _scale_and_clip(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x / s).clamp(-1, 1)


def _shift_and_clip(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x - s).clamp(-1, 1)


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


def test_more_kinds_of_input_than_dynamos_default_limit_stay_compiled():
    """Nine kinds of input (3 dtypes x 3 ranks), one graph each: past dynamo's default of 8 graphs per function,
    which would make the kernel fall back to eager for the rest of the process (a sweep runs every job in one)."""
    from torch._dynamo.utils import counters

    k = fused(_shift_and_clip)  # a function of its own: dynamo counts graphs per function
    s = torch.tensor([0.5])
    before = counters["stats"]["unique_graphs"]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for shape in [(7,), (3, 11), (2, 5, 4)]:
            x = torch.randn(shape).to(dtype)
            assert torch.equal(k(x, s.to(dtype)), _shift_and_clip(x, s.to(dtype)))
    assert counters["stats"]["unique_graphs"] - before == 9
    assert not k.failed, k.reason


def test_falls_back_to_the_plain_function(monkeypatch, caplog):
    k = fused(_not_compilable)
    x = torch.ones(4)
    assert torch.equal(k(x), x * 2)
    assert k.failed and "unavailable" in caplog.text and k.reason and k.reason in caplog.text
    assert torch.equal(k(-x), -x - 1)  # keeps working, unfused


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("SQUAT_FUSED", "0")
    k = fused(_scale_and_clip)
    x = torch.randn(5)
    assert torch.equal(k(x, torch.tensor([2.0])), _scale_and_clip(x, torch.tensor([2.0])))
    assert k._compiled is None


def test_kernel_state_names_the_kernels_that_fell_back(monkeypatch):
    """A run's metrics say whether its steps ran compiled: "on", "off", or which kernel fell back and why."""
    k = fused(_not_compilable)
    k(torch.ones(3))
    state = kernel_state()
    assert state.startswith("fell back: ") and f"_not_compilable ({k.reason})" in state
    monkeypatch.setenv("SQUAT_FUSED", "0")
    assert kernel_state() == "off"
    monkeypatch.delenv("SQUAT_FUSED")
    del k
    gc.collect()
    assert "_not_compilable" not in kernel_state()  # a kernel that is gone no longer counts
