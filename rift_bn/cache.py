"""On-disk caches shared by the jobs of a sweep: atomic writes, one computation under a file lock."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

T = TypeVar("T")
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process's umask, which files written here honour


def digest(obj: Any, n: int = 16) -> str:
    """Stable short hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; a shared cache must be readable by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_tensors(path: str | Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def locked(path: str | Path, enabled: bool = True) -> Iterator[None]:
    """An inter-process lock beside ``path`` (``path.lock``); waits for whoever holds it."""
    if not enabled:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def cached(
    path: str | Path,
    compute: Callable[[], T],
    save: Callable[[Path, T], None],
    load: Callable[[Path], T],
    lock: bool = True,
) -> tuple[T, str]:
    """Load ``path`` if present, else compute and save it, once across processes. Returns (value, source)."""
    path = Path(path)
    if path.exists():
        return load(path), "cache"
    with locked(path, lock):
        if path.exists():
            return load(path), "cache"
        value = compute()
        save(path, value)
        return value, "computed"
