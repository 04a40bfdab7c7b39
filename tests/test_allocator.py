"""The CPU allocator setting: glibc keeps freed memory, so a second round of the same allocations faults no pages."""

import json
import subprocess
import sys
import textwrap

import pytest

from squat_cli import allocator
from squat_cli.errors import SquatError

# 500 blocks of 60 KiB (30 MiB, each under the mmap threshold, so from the heap), written, freed, then again:
# with glibc's defaults the freed top of the heap goes back to the OS and the second round faults ~7,500 pages.
ROUNDS = textwrap.dedent("""
    import ctypes, json, resource, sys
    from squat_cli.allocator import tune_allocator
    state = tune_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    def one_round():
        blocks = [libc.malloc(60 << 10) for _ in range(500)]
        for b in blocks:
            libc.memset(b, 1, 60 << 10)
        for b in reversed(blocks):
            libc.free(b)
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    one_round()
    print(json.dumps({"state": state, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")


def _rounds(value):
    env = {"SQUAT_CPU_ALLOCATOR": value, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", ROUNDS], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_keeps_freed_pages():
    system, tuned = _rounds("system"), _rounds("tuned")
    assert system["state"] == "system" and tuned["state"] == "tuned"
    assert system["faults"] > 5000  # 30 MiB handed back and faulted in again (7,680 pages)
    assert tuned["faults"] < 100


def test_bad_value_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("SQUAT_CPU_ALLOCATOR", "jemalloc")
    with pytest.raises(SquatError, match="SQUAT_CPU_ALLOCATOR='jemalloc': expected 'tuned' or 'system'"):
        allocator.requested()
    monkeypatch.setenv("SQUAT_CPU_ALLOCATOR", "System ")
    assert allocator.requested() == "system"
    monkeypatch.delenv("SQUAT_CPU_ALLOCATOR")
    assert allocator.requested() == "tuned"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_same_run_with_either_allocator(tmp_path, glue_dir, tiny_bert):
    """Memory reuse changes no arithmetic: a short QAT-free run gives the same metrics bit for bit either way,
    and environment.json says which allocator ran."""
    import os

    squat = os.path.join(os.path.dirname(sys.executable), "squat")
    fast = ["--set", "data.train_subset=64", "--set", "data.eval_subset=32", "--set", "train.batch_size=16",
            "--set", "train.max_steps=6", "--set", "train.eval_strategy=end"]
    found = {}
    for value in ("system", "tuned"):
        out = tmp_path / value
        env = {**os.environ, "SQUAT_CPU_ALLOCATOR": value, "HF_HUB_OFFLINE": "1"}
        subprocess.run([squat, "finetune", "--task", "rte", "--model", str(tiny_bert), "--data-dir", str(glue_dir),
                        "--out", str(out), *fast], env=env, capture_output=True, text=True, check=True)
        run = out / "rte" / "fp" / "seed42"
        found[value] = json.loads((run / "metrics.json").read_text())
        assert json.loads((run / "environment.json").read_text())["cpu_allocator"] == value
    for key in ("accuracy", "eval_loss", "train_loss"):
        assert found["system"][key] == found["tuned"][key]
