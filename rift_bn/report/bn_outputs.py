"""Figure 3's data, ``bn_outputs.npz`` beside ``results.json``: what the BN layers output on adversarial
examples, for the base model, theta(alpha*) and the fine-tuned model. Written by the job, drawn by the report
(:mod:`rift_bn.report.kde`), which never attacks.

Which inputs. The first :data:`IMAGES` examples of the job's MRC adversarial set: PGD with the run's own
attack (``config.attack``) on the base model in eval mode, from images of the selection split
(``data.selection_source``), never the test split; read from the cache when MRC made it. The jobs of one
base model and seed share that set, so RiFT and RiFT with BN are fed the same examples (``examples``, their
digest, says so).

Which values. Every BN layer of the network (the report chooses which to show), per model ``base``,
``final`` (theta(alpha*)) and ``finetuned`` (alpha = 1): :data:`VALUES` outputs at positions (image,
channel, pixel) drawn by a fixed generator from the layer's output size alone, so every model and run
samples the same positions and equal models give equal values. Stored as float16: about 250 KB for a
ResNet-18.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from rift_bn import cache
from rift_bn.models import candidate_modules

if TYPE_CHECKING:
    from rift_bn.pipeline.job import Job

__all__ = ["BN_OUTPUTS", "IMAGES", "MODELS", "VALUES", "BNOutputs", "layer_values", "save_bn_outputs"]

BN_OUTPUTS = "bn_outputs.npz"
IMAGES = 256  # adversarial examples fed to every model
VALUES = 2048  # output values kept per layer and model
MODELS = ("base", "final", "finetuned")


def _positions(size: int, n: int) -> np.ndarray:
    """``n`` distinct positions among ``size``, sorted, the same for every call with the same arguments."""
    return np.sort(np.random.default_rng(0).choice(size, size=min(n, size), replace=False))


@torch.no_grad()
def layer_values(
    model: nn.Module, x: Tensor, layers: Sequence[str], values: int = VALUES, batch_size: int = 256
) -> np.ndarray:
    """``(len(layers), values)`` outputs of the BN layers ``layers`` (names as in the MRC table) of ``model``
    in eval mode for inputs ``x``, at :func:`_positions` of each layer's outputs over all of ``x``."""
    modules = {name: m for name, m, _ in candidate_modules(model, {"bn"})}
    missing = [n for n in layers if n not in modules]
    if missing:
        raise KeyError(f"no BN layer(s) {missing} in {type(model).__name__}")
    where: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # per layer: image and offset of each position
    got: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    start = 0

    def keep(name: str, out: Tensor) -> None:
        flat = out.flatten(1)
        if name not in where:
            where[name] = np.divmod(_positions(len(x) * flat.shape[1], values), flat.shape[1])
        image, offset = where[name]
        here = (image >= start) & (image < start + len(flat))
        rows, cols = (torch.as_tensor(a[here], device=flat.device) for a in (image - start, offset))
        got[name].append(flat[rows, cols].float().cpu().numpy())

    hooks = [modules[n].register_forward_hook(lambda _m, _i, out, n=n: keep(n, out)) for n in layers]
    training = model.training
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            model(x[start : start + batch_size])
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return np.stack([np.concatenate(got[n]) for n in layers])


def save_bn_outputs(
    path: str | Path, models: Mapping[str, nn.Module], x: Tensor, batch_size: int = 256
) -> None:
    """Write ``bn_outputs.npz`` to ``path``: every BN layer's :func:`layer_values` per model of ``models``
    (keys :data:`MODELS`) on the inputs ``x``, the number of inputs and their digest."""
    layers = [name for name, _, _ in candidate_modules(models["base"], {"bn"})]
    arrays: dict[str, np.ndarray] = {
        "layers": np.array(layers),
        "images": np.array(len(x), dtype=np.int64),
        "examples": np.array(hashlib.sha256(x.float().cpu().numpy().tobytes()).hexdigest()[:16]),
    }
    for who in MODELS:
        arrays[who] = layer_values(models[who], x, layers, batch_size=batch_size).astype(np.float16)
    with cache.atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        np.savez_compressed(f, **arrays)


def save_job_bn_outputs(
    job: Job, base: nn.Module, final: nn.Module, ckpt_hash: str, finetuned_checkpoint: str
) -> dict[str, str]:
    """Figure 3's data of a fine-tuning job whose selection used MRC (``method.selection=mrc``), written
    beside its ``results.json`` and into its cache folder (``runs/<job key>/``, kept with the finished
    record); returns the record's field (``{}`` for the layer-type methods, no MRC).

    ``base`` is the base model (checkpoint hash ``ckpt_hash``), ``final`` theta(alpha*), and the fine-tuned
    model is read from ``finetuned_checkpoint``. The examples are the MRC adversarial set: read from the
    cache, made there (once, on its own seeded stream) only when the cache lost it."""
    from rift_bn.attacks import PGD
    from rift_bn.models.checkpoint import load_into, read_state_dict
    from rift_bn.pipeline.mrc_table import adversarial_set
    from rift_bn.pipeline.training import rank

    cfg = job.cfg
    if cfg.method.selection != "mrc":
        return {}
    with job.timings.timed("bn_outputs"):
        x, y = job.dm.val_x, job.dm.val_y
        n = cfg.mrc.num_examples or len(y)
        path = job.keys.adversarial_set_path(ckpt_hash, n)
        attack, batch_size, device = PGD.from_config(cfg.attack), cfg.eval.batch_size, job.training.device
        adv, _ = adversarial_set(base, x[:n], y[:n], attack, batch_size, device, cfg.seed, path, rank() == 0)
        tuned = copy.deepcopy(base)
        load_into(tuned, read_state_dict(finetuned_checkpoint))
        models = {"base": base, "final": final, "finetuned": tuned}
        save_bn_outputs(job.output_dir / BN_OUTPUTS, models, adv[:IMAGES], batch_size)
        shutil.copyfile(job.output_dir / BN_OUTPUTS, job.state_dir / BN_OUTPUTS)
    return {"bn_outputs": BN_OUTPUTS}


@dataclass(frozen=True)
class BNOutputs:
    """A ``bn_outputs.npz`` as read: ``values[model]`` is ``(len(layers), n)`` for each of :data:`MODELS`."""

    layers: list[str]
    values: dict[str, np.ndarray]
    images: int
    examples: str  # digest of the adversarial examples: equal for runs fed the same ones

    @classmethod
    def read(cls, path: str | Path) -> BNOutputs:
        """The file at ``path``; ``ValueError`` when it cannot be read as one."""
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
        missing = sorted({"layers", "images", "examples", *MODELS} - set(arrays))
        if missing:
            raise ValueError(f"{path}: no {', '.join(missing)}; not a bn_outputs file")
        return cls(
            [str(n) for n in arrays["layers"]],
            {who: arrays[who].astype(np.float64) for who in MODELS},
            int(arrays["images"]),
            str(arrays["examples"]),
        )

    def of(self, model: str, layer: str) -> np.ndarray:
        """The values of ``layer`` for ``model`` (one of :data:`MODELS`)."""
        return self.values[model][self.layers.index(layer)]
