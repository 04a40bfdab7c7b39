"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, nothing pickled.

    checkpoint/
      model.safetensors       every parameter and buffer (weights, step sizes, quantizer state)
      optim.safetensors       optimizer state tensors (Adam moments, steps, momentum buffers)
      rng.safetensors         torch (and CUDA) generator states, numpy's key array
      state.json              optimizer structure, schedulers, python/numpy RNG, loop counters, history
      manifest.json           sha256 of each file above

The folder is written next to the old one and renamed over it only once
complete (the previous checkpoint stays until then). Loading checks every hash,
so a truncated or tampered checkpoint is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file

from squat_cli.errors import RunError
from squat_cli.files import atomic_dir, save_tensors, sha256_file

FILES = ("model.safetensors", "optim.safetensors", "rng.safetensors", "state.json")


def _flatten_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    sd = opt.state_dict()
    state_meta: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        meta = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{idx}.{key}"] = value.detach().cpu().contiguous()
                meta[key] = "tensor"
            else:
                meta[key] = value
        state_meta[str(idx)] = meta
    return {"param_groups": sd["param_groups"], "state": state_meta}


def _unflatten_optimizer(name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = {}
    for idx, entry in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"{name}.{idx}.{k}"] if v == "tensor" else v) for k, v in entry.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


STRATEGY = "strategy."
"""Prefix of the strategy's own tensors in ``optim.safetensors``."""


def save_checkpoint(
    folder: Path, model: torch.nn.Module, optimizers: dict[str, Optional[torch.optim.Optimizer]],
    schedulers: dict[str, Any], loop_state: dict[str, Any], strategy_state: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Write a complete checkpoint to ``folder`` atomically; ``strategy_state`` (e.g. a stored SAM perturbation)
    travels with the optimizer tensors under ``strategy.*``."""
    model_t = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    optim_t: dict[str, torch.Tensor] = {}
    optim_meta = {n: _flatten_optimizer(n, o, optim_t) for n, o in optimizers.items() if o is not None}
    for k, v in (strategy_state or {}).items():
        optim_t[f"{STRATEGY}{k}"] = v.detach().cpu().clone().contiguous()
    np_state = np.random.get_state()
    rng_t = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng_t[f"cuda{i}"] = s
    py_state = random.getstate()
    state = {
        "loop": loop_state,
        "optimizers": optim_meta,
        "schedulers": {n: s.state_dict() for n, s in schedulers.items() if s is not None},
        "rng": {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                "python": [py_state[0], list(py_state[1]), py_state[2]]},
    }
    with atomic_dir(folder) as tmp:
        save_tensors(model_t, tmp / "model.safetensors")
        save_tensors(optim_t or {"_empty": torch.zeros(0)}, tmp / "optim.safetensors")
        save_tensors(rng_t, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
        manifest = {f: sha256_file(tmp / f) for f in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def read_checkpoint(folder: Path) -> tuple[dict, dict, dict, dict]:
    """Verify and read a checkpoint: (model tensors, optimizer tensors, rng tensors, state)."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise RunError(f"checkpoint {folder} is incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunError(f"checkpoint {folder}: manifest.json is damaged") from None
    for name in FILES:
        path = folder / name
        if not path.is_file():
            raise RunError(f"checkpoint {folder} is incomplete ({name} missing)")
        if sha256_file(path) != manifest.get(name):
            raise RunError(f"checkpoint {folder}: {name} does not match its recorded hash (truncated or modified)")
    try:
        model_t = load_file(str(folder / "model.safetensors"))
        optim_t = load_file(str(folder / "optim.safetensors"))
        rng_t = load_file(str(folder / "rng.safetensors"))
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except Exception as exc:  # safetensors raises its own error types
        raise RunError(f"checkpoint {folder} cannot be read ({type(exc).__name__})") from None
    return model_t, optim_t, rng_t, state


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizers: dict[str, Optional[torch.optim.Optimizer]],
    schedulers: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore everything saved by ``save_checkpoint``; return the loop state and the strategy's tensors."""
    model_t, optim_t, rng_t, state = read_checkpoint(folder)
    own = model.state_dict()
    if set(own) != set(model_t):
        raise RunError(f"checkpoint {folder} does not fit this model (different tensors)")
    with torch.no_grad():
        for k, v in model_t.items():
            own[k].copy_(v)
    for name, opt in optimizers.items():
        if opt is not None:
            if name not in state["optimizers"]:
                raise RunError(f"checkpoint {folder} has no state for optimizer {name}")
            opt.load_state_dict(_unflatten_optimizer(name, state["optimizers"][name], optim_t))
    for name, sched in schedulers.items():
        if sched is not None:
            sched.load_state_dict(state["schedulers"][name])
    torch.set_rng_state(rng_t["torch"])
    if torch.cuda.is_available():
        cuda = [rng_t[k] for k in sorted(rng_t) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((kind, rng_t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    strategy_state = {k[len(STRATEGY):]: v for k, v in optim_t.items() if k.startswith(STRATEGY)}
    return state["loop"], strategy_state


def checkpoint_step(folder: Path) -> Optional[int]:
    """The step a valid-looking checkpoint was taken at, or None."""
    try:
        return int(json.loads((folder / "state.json").read_text(encoding="utf-8"))["loop"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _complete(folder: Path) -> bool:
    try:
        if not (folder / "manifest.json").is_file():
            return False
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        return all((folder / f).is_file() and sha256_file(folder / f) == manifest.get(f) for f in FILES)
    except (OSError, ValueError):
        return False


def recover_checkpoint(folder: Path) -> Optional[Path]:
    """After a crash during a checkpoint write: if ``folder`` is missing (killed between the two renames),
    the newest complete one of its siblings (the new copy first, then the old one) becomes ``folder``.
    Returns what was recovered, or None. Incomplete leftovers are left for ``RunDir.recover`` to remove."""
    if folder.exists():
        return None
    parent = folder.parent
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for cand in sorted(parent.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True):
            if _complete(cand):
                os.replace(cand, folder)
                return folder
    return None
