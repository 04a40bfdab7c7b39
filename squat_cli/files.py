"""Files written safely: atomic writes, a set of files replaced as one, temporaries of dead processes swept,
user paths checked before anything loads, and a failed write as one line naming the file.

Every file squat writes goes through ``atomic_path`` / ``atomic_dir`` / ``staged`` (or ``write_text`` /
``write_json`` / ``save_tensors`` on top of them): an interruption leaves the old file or the new one, never a
half-written one, and a ``.NAME.tmp-PID`` left by a process that died is removed by the next writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from squat_cli.errors import RunError


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


def file_in_the_way(folder: Path | str) -> Path | None:
    """The file (not a folder) at ``folder`` or at one of the folders above it, which keeps it from being made;
    None if there is none."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        try:
            if p.exists() and not p.is_dir():
                return p
        except OSError:  # a name too long to look up: not a file in the way
            continue
    return None


def check_output_file(path: Path | str, option: str) -> None:
    """Refuse, before any work, an output file (``option`` names it in the error) that cannot be written: a
    folder, a missing folder, a file above it."""
    path = Path(path)
    if path.is_dir():
        raise RunError(f"{option} {path}: is a folder; name a file")
    if not path.parent.is_dir():
        blocker = file_in_the_way(path.parent)
        raise RunError(f"{option} {path}: " + (f"{blocker} is a file, not a folder" if blocker
                                               else f"its folder {path.parent} does not exist"))


def check_not_a_file_of(path: Path | str, option: str, model_folder: Path | str, replaceable: str = "") -> None:
    """Refuse an output that is an existing file of ``model_folder`` (what the command reads: a run or an export),
    other than one named ``replaceable`` (the command's own earlier output)."""
    path = Path(path)
    if path.exists():
        real = path.resolve()
        if real.name != replaceable and real.is_relative_to(Path(model_folder).resolve()):
            raise RunError(f"{option} {path}: is one of the files of {model_folder}; write to another file")


@contextmanager
def staged(folder: Path | str, name: str = "report") -> Iterator[Path]:
    """Write a set of files as one: the block writes into ``folder/.NAME.tmp-PID``; on success every file moves
    into ``folder`` with SIGINT and SIGTERM held back until the last is in place, so an interruption leaves the
    old set or the new one, never a mix. Other files in ``folder`` are left alone."""
    import signal

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # a file where the folder (or a folder above it) should be
        raise RunError(f"cannot write to {folder}: {file_in_the_way(folder) or folder} is a file, not a folder") \
            from None
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
