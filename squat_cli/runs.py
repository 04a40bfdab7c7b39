"""Run folders: layout, discovery, completeness, and atomic file writes.

    <runs>/<task>/<variant>/seed<k>/
      recipe.yaml            the resolved recipe, exactly what ran
      environment.json       versions, device, command line
      metrics.jsonl          one line per evaluation
      metrics.json           final metrics; its presence marks the run complete
      model/                 save_pretrained output (safetensors) + tokenizer
      quantizer.safetensors  step sizes and quantizer settings (quantized runs)
      sharpness.json         {key: score and settings} (after ``squat sharpness``)

``<variant>`` is ``fp`` or ``<method>-w<W>a<A>`` (``squat-w2a8``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from squat_cli.errors import RunError

RUN_RE = re.compile(r"^seed(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(path: Path) -> None:
    """Remove temporaries (``.NAME.tmp-PID``, ``.NAME.old-PID``) beside ``path`` left by processes that died
    mid-write (SIGKILL, power loss); a live process's are left alone."""
    parent = path.parent
    if not parent.is_dir():
        return
    for stale in [*parent.glob(f".{glob_escape(path.name)}.tmp-*"), *parent.glob(f".{glob_escape(path.name)}.old-*")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    sweep_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


@contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Like ``atomic_path`` for a folder: an existing one is replaced only once the new one is complete."""
    path = Path(path)
    sweep_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged(folder: Path | str, name: str = "report") -> Iterator[Path]:
    """Write a set of files as one: the block writes into ``folder/.NAME.tmp-PID``; on success every file moves
    into ``folder`` with SIGINT and SIGTERM held back until the last is in place, so an interruption leaves the
    old set or the new one, never a mix. Other files in ``folder`` are left alone."""
    import signal

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_stale(folder / name)
    stage = folder / f".{name}.tmp-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
        held = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        try:
            for f in sorted(stage.iterdir()):
                os.replace(f, folder / f.name)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def ensure_writable(root: Path | str) -> None:
    """Check, before any model or data loads and without creating anything, that ``root`` can hold runs:
    no part of it is a file, no name is too long, and its nearest existing folder is writable."""
    root = user_path(root, "--out").absolute()

    def fail(why: str) -> None:
        raise RunError(f"cannot write to {root}: {why}")

    def exists(p: Path) -> bool:
        try:
            return p.exists()
        except OSError:  # e.g. a name too long to look up
            return False

    existing = root
    while not exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        fail(f"{existing} is a file, not a folder")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if any(len(part.encode()) > name_max for part in root.relative_to(existing).parts):
        fail(f"a folder name is longer than {name_max} bytes")
    if existing == root:
        try:
            probe = root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            fail(exc.strerror or type(exc).__name__)
    elif not os.access(existing, os.W_OK | os.X_OK):
        fail(f"{existing} is not writable")


def user_path(path: Path | str, what: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; an unknown user is one ``RunError`` naming ``what``."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise RunError(f"{what} {str(path)!r}: {str(path).split('/')[0]} names no user on this machine") from None


TEMP_RE = re.compile(r"(^|/)\.([^/]+)\.(?:tmp|old)-\d+(?=/|$)")


def public_path(path: Path | str) -> str:
    """A path as the user knows it: a temporary ``.NAME.tmp-PID`` part of it shown as ``NAME``."""
    return TEMP_RE.sub(r"\1\2", str(path))


def write_failure(path: Path | str, exc: BaseException) -> RunError:
    """One line for a write that failed (disk full, file-size limit, permissions), naming the final path."""
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
    else:  # safetensors' SerializationError/SafetensorError wraps the OS error's text
        text = str(exc)
        m = re.search(r'message: \\?"([^"\\]+)', text) or re.search(r"I/O error: (.+?) \(os error \d+\)", text)
        reason = m.group(1) if m else (text.strip().splitlines() or [type(exc).__name__])[0]
    return RunError(f"{public_path(path)}: cannot write ({reason})")


def save_tensors(tensors: dict, path: Path | str, metadata: Optional[dict[str, str]] = None) -> None:
    """safetensors' ``save_file``, with a failed write as one ``RunError`` line naming the path."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:  # noqa: BLE001 - SafetensorError is not an OSError
        raise write_failure(path, exc) from None


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise write_failure(path, exc) from None


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None


def variant_name(method: Optional[str], wbits: int = 32, abits: int = 32) -> str:
    """``fp`` for plain fine-tuning, else ``<method>-w<W>a<A>``."""
    if method in (None, "fp"):
        return "fp"
    return f"{method}-w{wbits}a{abits}"


def parse_variant(variant: str) -> tuple[str, int, int]:
    """Inverse of ``variant_name``: ("fp", 32, 32) or (method, wbits, abits)."""
    if variant == "fp":
        return "fp", 32, 32
    m = re.match(r"^(.+)-w(\d+)a(\d+)$", variant)
    if not m:
        raise RunError(f"{variant!r} is not a run variant (fp or <method>-w<W>a<A>)")
    return m.group(1), int(m.group(2)), int(m.group(3))


@dataclass(frozen=True)
class RunDir:
    path: Path

    @classmethod
    def for_run(cls, root: Path | str, task: str, variant: str, seed: int) -> "RunDir":
        return cls(Path(root) / task / variant / f"seed{seed}")

    # identity -----------------------------------------------------------
    def identity(self) -> tuple[str, str, int]:
        """(task, variant, seed): from the path when it is laid out as ``<task>/<variant>/seed<k>`` (``.`` and
        relative paths resolved), else from the run's own recipe, so a run folder copied or renamed
        (``myruns/best-model``) is still the run it was."""
        here = self.path.absolute()
        m = RUN_RE.match(here.name)
        if m and here.parent.name and here.parent.parent.name:
            try:
                parse_variant(here.parent.name)
                return here.parent.parent.name, here.parent.name, int(m.group(1))
            except RunError:
                pass
        return self._identity_from_recipe()

    def _identity_from_recipe(self) -> tuple[str, str, int]:
        from squat_cli.errors import SquatError
        from squat_cli.recipe import recipe_from_dict
        from squat_cli.yaml_safe import read_yaml

        if not self.recipe_file.is_file():
            raise RunError(f"{self.path}: not a run folder (no recipe.yaml, and not laid out as "
                           ".../<task>/<variant>/seed<k>)")
        try:
            recipe = recipe_from_dict(read_yaml(self.recipe_file)).complete()
        except SquatError as exc:
            raise RunError(f"{self.recipe_file}: {exc}") from None
        from squat_cli.tasks import task_name

        variant = "fp" if recipe.quant is None else variant_name(*recipe.variant_parts())
        return task_name(recipe.data.task), variant, recipe.train.seed

    @property
    def task(self) -> str:
        return self.identity()[0]

    @property
    def variant(self) -> str:
        return self.identity()[1]

    @property
    def seed(self) -> int:
        return self.identity()[2]

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.json"

    @property
    def history_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def quantizer_file(self) -> Path:
        return self.path / "quantizer.safetensors"

    @property
    def sharpness_file(self) -> Path:
        return self.path / "sharpness.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def failed_file(self) -> Path:
        return self.path / "FAILED.json"

    # replacing a finished run (--force) ----------------------------------
    def _previous(self) -> list[Path]:
        return sorted(self.path.parent.glob(f".{self.path.name}.previous-*"))

    def set_aside(self) -> None:
        """Before a forced rerun: move a finished run out of the way (kept until the new one completes)."""
        if self.path.exists() and self.is_complete() and not self._previous():
            os.replace(self.path, self.path.with_name(f".{self.path.name}.previous-{os.getpid()}"))
        elif self.path.exists():
            shutil.rmtree(self.path)

    def restore_previous(self) -> bool:
        """The new run failed or was interrupted: put the finished run set aside back. True if there was one."""
        prev = self._previous()
        if not prev:
            return False
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(prev[-1], self.path)
        return True

    def drop_previous(self) -> None:
        """The new run completed: the one it replaces goes."""
        for p in self._previous():
            shutil.rmtree(p, ignore_errors=True)

    def recover(self) -> None:
        """Before a run starts again: a finished run left aside by a killed forced rerun comes back (unless the
        rerun can resume from a checkpoint), and stale temporary folders of killed writes are removed."""
        if self._previous() and not self.is_complete() and not (self.checkpoint_dir / "manifest.json").is_file():
            self.restore_previous()
        if self.path.is_dir():
            for stale in [*self.path.glob(".*.tmp-*"), *self.path.glob(".*.old-*")]:
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

    # state ----------------------------------------------------------------
    def is_complete(self) -> bool:
        return self.metrics_file.is_file()

    def is_failed(self) -> bool:
        return self.failed_file.is_file() and not self.is_complete()

    def metrics(self) -> dict[str, Any]:
        return read_json(self.metrics_file)

    def sharpness_scores(self) -> dict[str, Any]:
        """Stored sharpness scores by key (``ascent/rho=0.05``); empty if none or unreadable."""
        if not self.sharpness_file.is_file():
            return {}
        try:
            scores = read_json(self.sharpness_file)
        except RunError:
            return {}
        return scores if isinstance(scores, dict) else {}

    def append_history(self, record: dict[str, Any]) -> None:
        old = self.history_file.read_text(encoding="utf-8") if self.history_file.is_file() else ""
        write_text(self.history_file, old + json.dumps(record) + "\n")

    def write_history(self, records: list[dict[str, Any]]) -> None:
        write_text(self.history_file, "".join(json.dumps(r) + "\n" for r in records))

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        return [json.loads(line) for line in self.history_file.read_text(encoding="utf-8").splitlines() if line]


def discover(root: Path | str) -> list[RunDir]:
    """Every ``<task>/<variant>/seed<k>`` folder under ``root`` (complete or not), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [RunDir(p) for p in root.glob("*/*/seed*") if p.is_dir() and RUN_RE.match(p.name)]
    return sorted(found, key=lambda r: (r.task, r.variant, r.seed))


def environment(device: str, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Versions, device and command line, for ``environment.json``."""
    import importlib.metadata as md

    versions = {}
    for pkg in ("squat", "torch", "transformers", "accelerate", "datasets", "safetensors", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    import torch

    env = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "device": device,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        # bf16 CPU kernels are chosen by the CPU's features: the same seed and versions can train differently on
        # another CPU, so the run says which one it had
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": sys.argv,
    }
    env.update(extra or {})
    return env


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[str]:
    """The CPU's model name (Linux: /proc/cpuinfo's first ``model name``; elsewhere ``platform.processor()``)."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or None
