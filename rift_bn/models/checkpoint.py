"""Safe import/export of network weights in the published (prefix-free) naming.

Checkpoints are only ever read with ``torch.load(..., weights_only=True)``: a file that pickles code or
arbitrary objects is refused, never executed.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from rift_bn.errors import UserError

__all__ = ["CheckpointError", "file_sha256", "load_into", "read_state_dict", "save_state_dict"]

WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "net", "model_state_dict")
STRIP_PREFIXES: tuple[str, ...] = ("module.", "model.", "net.", "_orig_mod.")
NORMALIZATION_KEYS: frozenset[str] = frozenset({"normalize.mean", "normalize.std", "mu", "sigma"})
MISMATCH_FIX = "check model=, model.width= and data= (number of classes)"


# What a checkpoint must be, said whenever a file is not one.
CHECKPOINT_FORMS = (
    "a checkpoint is a file written by torch.save: a state_dict (a dict of tensors, possibly under "
    "'state_dict', 'model' or 'net') or a Lightning .ckpt"
)


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model (one-line message)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _unpickler_reason(exc: BaseException) -> str:
    """The unpickler's own reason, without torch's advice paragraphs around it."""
    for block in str(exc).split("\n\n"):
        block = block.strip()
        if block and not block.startswith(("Weights only load failed", "Check the documentation")):
            return " ".join(block.split())[:160]
    return type(exc).__name__


_GLOBAL_RE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_OBJECT_MARKERS = ("Trying to call reduce", "Can only create new object", "Can only build")


def _refusal_detail(message: str) -> str | None:
    """A short reason when torch's weights-only unpickler refused code/objects, else ``None``."""
    match = _GLOBAL_RE.search(message)
    if match:
        return f"global {match.group(1)}"
    for marker in _OBJECT_MARKERS:
        if marker in message:
            return next(ln.strip() for ln in message.splitlines() if marker in ln)[:120]
    return None


def _strip_known_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def _unwrap(obj: object) -> object:
    """Descend through ``{'state_dict': ...}``-style wrappers (possibly nested)."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state_dict in published naming from a raw, wrapped, DataParallel or Lightning checkpoint.

    Always uses ``torch.load(path, map_location="cpu", weights_only=True)``. Wrappers under
    ``state_dict``/``model``/``net``/``model_state_dict`` are unwrapped, non-tensor entries and input
    normalisation buffers dropped, and the prefixes ``module.``, ``model.``, ``net.``, ``_orig_mod.``
    stripped while every key shares one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"base.checkpoint={path}: file not found; pass an existing checkpoint or base.checkpoint=null "
            "to train one"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _refusal_detail(str(exc))
        if detail is None:  # not an object/code refusal: a damaged or non-torch pickle stream
            raise CheckpointError(
                f"base.checkpoint={path}: unreadable or corrupt checkpoint ({_unpickler_reason(exc)}); "
                f"{CHECKPOINT_FORMS}"
            ) from exc
        raise CheckpointError(
            f"base.checkpoint={path}: refused: the file contains pickled code/objects ({detail}), and only "
            "plain tensor checkpoints are loaded (weights_only=True)"
        ) from exc
    except Exception as exc:  # corrupt, truncated or not a torch file at all
        raise CheckpointError(
            f"base.checkpoint={path}: unreadable or corrupt checkpoint, or not a torch file "
            f"({type(exc).__name__}: {_first_line(exc)}); {CHECKPOINT_FORMS}"
        ) from exc

    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"base.checkpoint={path}: holds a {type(obj).__name__}, not a state_dict; {CHECKPOINT_FORMS}"
        )
    state = {
        str(k): v
        for k, v in obj.items()
        if isinstance(v, Tensor) and _strip_known_prefixes(str(k)) not in NORMALIZATION_KEYS
    }
    if not state:
        raise CheckpointError(
            f"base.checkpoint={path}: contains no tensors (keys: {_preview(list(obj))}); {CHECKPOINT_FORMS}"
        )

    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _preview(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(str(k) for k in keys[:n])
    return f"{shown}, ... (+{len(keys) - n} more)" if len(keys) > n else shown


def _net(model: nn.Module) -> nn.Module:
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """``model.net.load_state_dict(state_dict, strict=True)``, mismatches as one-line ``CheckpointError``."""
    net = _net(model)
    arch = type(net).__name__
    expected = net.state_dict()
    unused = tuple(getattr(net, "unused_checkpoint_prefixes", ()))  # e.g. TRADES WRN's sub_block1
    state_dict = {k: v for k, v in state_dict.items() if not (unused and k.startswith(unused))}
    # BatchNorm fills a missing ``num_batches_tracked`` itself (very old checkpoints lack it).
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) [{_preview(missing)}]")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) [{_preview(unexpected)}]")
        raise CheckpointError(f"checkpoint does not fit {arch}: {'; '.join(parts)}; {MISMATCH_FIX}")
    for key, value in state_dict.items():
        want = tuple(expected[key].shape)
        got = tuple(value.shape)
        if want != got:
            raise CheckpointError(
                f"checkpoint does not fit {arch}: {key} has shape {got} in the checkpoint but {want} in the "
                f"model; {MISMATCH_FIX}"
            )
    try:
        net.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint does not fit {arch}: {_first_line(exc)}; {MISMATCH_FIX}") from exc


def save_state_dict(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Atomically write ``model.net.state_dict()`` (published naming, CPU tensors) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _net(model).state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
