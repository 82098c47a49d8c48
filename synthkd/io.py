"""Atomic file writes and content hashes shared by every stage that writes to disk."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from .errors import SynthkdError, one_line

# Held in every directory a command writes, with the writer's process id in it.
LOCK_NAME = ".synthkd.lock"
_HELD: dict[Path, int] = {}


@contextmanager
def exclusive_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Be the one writer of ``directory`` (created if missing) while inside: a second process is
    refused at once, naming the first. Under ``accelerate launch`` rank 0 holds the lock for all
    ranks of its command (``RANK``). Nested use in one process is allowed; a directory this call
    created and nothing was written to is removed again."""
    directory = Path(directory)
    key = directory.resolve()
    if key in _HELD or int(os.environ.get("RANK", "0")) != 0:
        _HELD[key] = _HELD.get(key, 0) + 1
        try:
            yield directory
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock_path = directory / LOCK_NAME
    if lock_path.is_dir():
        raise SynthkdError(f"{lock_path} is a directory where synthkd keeps its lock file; remove it (nothing of "
                           "synthkd's is in it) and run again")
    lock = FileLock(lock_path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        holder = lock_path.read_text().strip() if lock_path.is_file() else ""
        raise SynthkdError(f"{directory} is being written by process {holder or '(unknown)'}; wait for it to finish "
                           "or write somewhere else") from None
    _HELD[key] = 1
    try:
        lock_path.write_text(f"{os.getpid()}\n")
        yield directory
    finally:
        del _HELD[key]
        if created and [p.name for p in directory.iterdir()] == [LOCK_NAME]:
            lock_path.unlink()
            directory.rmdir()
        lock.release()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a file written in place would follow the umask
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def temp_target(path: str | os.PathLike) -> Path | None:
    """The file a temp file of :func:`atomic_write` (``.NAME.XXXXXXXX.tmp``) was to become, or
    None for any other name."""
    path = Path(path)
    match = re.fullmatch(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp", path.name)
    return path.with_name(match.group(1)) if match else None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, _write)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` (dotted keys, JSON values, ``absent`` for a missing key) for every leaf
    whose value or type differs: what to tell a user whose settings changed."""
    before, after = flatten(old), flatten(new)

    def show(flat: dict[str, Any], key: str) -> str:
        return json.dumps(flat[key], default=str) if key in flat else "absent"

    return [f"{key}: {show(before, key)} -> {show(after, key)}" for key in sorted(set(before) | set(after))
            if key not in before or key not in after or before[key] != after[key]
            or type(before[key]) is not type(after[key])]


def changed_settings(recorded: Any, now: dict[str, Any]) -> list[str]:
    """:func:`differences` of a record read back from disk (anything but a mapping differs whole)."""
    return differences(recorded if isinstance(recorded, dict) else {"(record)": recorded}, now)


def refuse_changed_settings(what: str, recorded: Any, now: dict[str, Any]) -> None:
    """Refuse to resume work whose recorded settings and input fingerprints differ from this run's,
    naming every changed key (``what``: e.g. "runs/x holds a synthetic set")."""
    changed = changed_settings(recorded, now)
    if changed:
        raise SynthkdError(f"{what} with other settings (existing run -> now: {'; '.join(changed)}); "
                           "use a new --out directory or delete it (nothing was overwritten)")


def read_safetensors(path: str | os.PathLike, fix: str = "write it again") -> dict[str, Any]:
    """The tensors of a safetensors file, or one line saying it is missing or damaged (truncated,
    not safetensors) and how to ``fix`` it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SynthkdError(f"{path} does not exist; {fix}")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError
        raise SynthkdError(f"{path} is not a readable safetensors file ({one_line(error)}); {fix}") from error


def inside(directory: str | os.PathLike, relative: str, what: str = "a manifest") -> Path:
    """``directory / relative`` for a path read from ``what`` (a manifest, a config), refused where
    it leaves the directory (``..``, an absolute path, a link out of it) or is not a plain name."""
    directory = Path(directory)
    if not isinstance(relative, str) or not relative or any(c in relative for c in "\n\r\0"):
        raise SynthkdError(f"{what} in {directory} names an invalid path {relative!r}")
    path = directory / relative
    root = directory.resolve()
    if Path(relative).is_absolute() or not (path.resolve() == root or root in path.resolve().parents):
        raise SynthkdError(f"{what} in {directory} names {relative!r}, outside {directory}; "
                           "a directory's files stay inside it: remake it with synthkd")
    return path
