"""A job's console: copied into ``run.log`` beside its results; a refused job's empty output folder removed.

Used by :func:`rift_bn.run.main` around each job. Only the job's first process does either: DDP worker
processes (``LOCAL_RANK`` > 0 ...) re-run the entry point in the same output folder and must neither
interleave their lines into rank 0's ``run.log`` nor remove anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

LOG_NAME = "run.log"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
# What Hydra and this module put into an output folder before a job does any work.
SCAFFOLDING = (".hydra", LOG_NAME)


def first_process() -> bool:
    """Whether this process is rank 0 of its job (always true without DDP)."""
    return all(os.environ.get(v, "0") in ("", "0") for v in RANK_VARIABLES)


class _Tee:
    """A text stream that writes to the console stream and to the log file (line-buffered)."""

    def __init__(self, stream: IO[str], log: IO[str]) -> None:
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        with contextlib.suppress(Exception):  # a full disk must not stop the job
            self._log.write(text)
        return n

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()
        with contextlib.suppress(Exception):
            self._log.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...: the console stream's
        return getattr(self._stream, name)


@contextlib.contextmanager
def console_log(output_dir: Path) -> Iterator[None]:
    """Copy what this job writes to stdout and stderr (its summary, warnings, errors and the log records
    that go to the console) into ``output_dir/run.log``, appending; a traceback that ends the job goes there
    too. Does nothing in a DDP worker process."""
    if not first_process():
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    log = open(output_dir / LOG_NAME, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(saved[0], log), _Tee(saved[1], log)  # type: ignore[assignment]
    # Hydra's console handler holds the stream it was configured with: point it at the copy too
    handlers = [
        h
        for h in logging.getLogger().handlers
        if type(h) is logging.StreamHandler and h.stream in saved  # type: ignore[comparison-overlap]
    ]
    streams = [h.stream for h in handlers]
    for h in handlers:
        h.setStream(sys.stdout if h.stream is saved[0] else sys.stderr)
    try:
        yield
    except Exception:  # Hydra prints it on the console after the job; the log keeps it too
        with contextlib.suppress(Exception):
            traceback.print_exc(file=log)
        raise
    finally:
        for h, stream in zip(handlers, streams, strict=True):
            h.setStream(stream)
        sys.stdout, sys.stderr = saved
        log.close()


def _only_scaffolding(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but Hydra's ``.hydra/``, ``run.log`` and empty folders."""
    for entry in folder.iterdir():
        if entry.name in SCAFFOLDING:
            continue
        if not entry.is_dir() or entry.is_symlink() or any(p.is_file() for p in entry.rglob("*")):
            return False
    return True


def remove_unused_output(output_dir: Path, single_launcher: bool = True) -> bool:
    """Remove the output folder of a job refused before any work, so that no folder without results is
    left behind (``python -m rift_bn.report`` would list it as ``missing:``).

    Only a folder holding nothing but Hydra's ``.hydra/``, this job's ``run.log`` and empty folders is
    removed; one with a ``results.json``, a checkpoint or any other file is kept. Then its parent goes too
    when that is left empty (``outputs/<date>/``; never the working folder or one above it), or, with
    ``single_launcher`` (jobs run one after another in this process), when it is a sweep folder left with
    nothing but Hydra's ``multirun.yaml``.
    Returns whether the folder was removed.
    """
    if not first_process() or not output_dir.is_dir() or not _only_scaffolding(output_dir):
        return False
    shutil.rmtree(output_dir, ignore_errors=True)
    parent = output_dir.parent
    if Path.cwd().resolve().is_relative_to(parent.resolve()):  # never the user's working folder
        return not output_dir.exists()
    with contextlib.suppress(OSError):
        left = sorted(p.name for p in parent.iterdir())
        if not left:
            parent.rmdir()
        elif single_launcher and left == ["multirun.yaml"]:
            (parent / "multirun.yaml").unlink()
            parent.rmdir()
    return not output_dir.exists()
