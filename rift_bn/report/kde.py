"""Figure 3 data: outputs of the selected BN layer(s) on PGD-10 adversarial examples, per model.

The models are the base ("init") and the final RiFT and RiFT-with-BN models of one (dataset, seed, k),
loaded from the checkpoints recorded in results.json. Adversarial examples are made against each model
(white-box PGD-10) from images of the run's selection split, never the test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rift_bn.report.collect import check_one_experiment, estimator

__all__ = ["KDEPlan", "bn_outputs", "kde_samples", "plan_kde"]


@dataclass
class KDEPlan:
    """Which runs and BN layers Figure 3 uses for one experiment."""

    rift: dict
    rift_bn: dict
    layers: list[str]
    notes: dict[str, str] = field(default_factory=dict)
    images: int = 0  # set by kde_samples: selection-split images actually used

    @property
    def k(self) -> int:
        return int(self.rift_bn["k"])


def plan_kde(runs: list[dict]) -> tuple[KDEPlan | None, str]:
    """Pick the RiFT / RiFT-with-BN pair (largest k with both, then lowest seed, exact MRC first) and layers.

    Layers: the BN layers the RiFT-with-BN run selected (lowest MRC first, at most 4); if it selected none,
    the BN layer with the lowest MRC in its table (noted). ``runs`` must be one experiment. Returns
    ``(None, reason)`` when impossible.
    """
    try:
        check_one_experiment(runs, "Figure 3")
    except ValueError as exc:
        return None, str(exc)
    pairs: dict[tuple, dict[str, dict]] = {}
    for r in runs:
        if r.get("stage") == "finetune" and r.get("method") in ("rift", "rift_bn") and r.get("k") is not None:
            key = (r["k"], r.get("seed"), estimator(r))
            pairs.setdefault(key, {})[r["method"]] = r
    both = [key for key, p in pairs.items() if len(p) == 2]
    if not both:
        return None, "no RiFT and RiFT-with-BN runs with the same k and seed"
    key = max(both, key=lambda t: (t[0], -(t[1] or 0), t[2] == "exact"))
    pair = pairs[key]
    rift_bn = pair["rift_bn"]
    layers = [s["name"] for s in rift_bn.get("selected") or [] if s.get("type") == "bn"][:4]
    notes: dict[str, str] = {}
    if not layers:
        bn_rows = sorted(
            (row for row in rift_bn.get("mrc") or [] if row.get("type") == "bn"), key=lambda r: r["mrc"]
        )
        if not bn_rows:
            return (
                None,
                f"the RiFT-with-BN run (k={key[0]}) selected no BN layer and has no BN rows in its MRC table",
            )
        layers = [bn_rows[0]["name"]]
        notes[layers[0]] = "not selected; lowest-MRC BN layer"
    return KDEPlan(pair["rift"], rift_bn, layers, notes), ""


def _load(r: dict, ckpt: str) -> torch.nn.Module:
    from rift_bn.models import build_model
    from rift_bn.models.checkpoint import load_into, read_state_dict

    cfg = r.get("config") or {}
    width = r.get("width", (cfg.get("model") or {}).get("width"))
    num_classes = int(
        (cfg.get("data") or {}).get("num_classes") or {"cifar10": 10, "cifar100": 100}[r["dataset"]]
    )
    model = build_model(r["model"], num_classes, width)
    load_into(model, read_state_dict(ckpt))
    return model.eval()


def _selection_images(r: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images of the run's selection split (float in [0, 1]) and their labels."""
    from rift_bn.data import CIFARDataModule, to_float

    d = (r.get("config") or {}).get("data") or {}
    root = Path(d.get("root", "data"))
    if not root.is_absolute() and not root.exists():  # relative to where the run started: look upwards
        here = Path(r.get("_path", ".")).resolve()
        root = next((p / root for p in here.parents if (p / root).is_dir()), root)
    dm = CIFARDataModule(
        d.get("name", r["dataset"]),
        root,
        int(d.get("val_size", 1000)),
        d.get("train_subset"),
        d.get("test_subset"),
        seed=int(r.get("seed") or 0),
        download=False,
    )
    dm.setup()
    return to_float(dm.val_x[:n]), dm.val_y[:n]


@torch.no_grad()
def bn_outputs(
    model: torch.nn.Module, x: torch.Tensor, layers: list[str], batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Flattened outputs of ``model.net.<layer>`` for inputs ``x`` (eval mode), via forward hooks."""
    modules = dict(model.net.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        raise KeyError(f"no module(s) {missing} in {type(model.net).__name__}")
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, out, n=n: got[n].append(out.detach().flatten().cpu()))
        for n in layers
    ]
    try:
        model.eval()
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def kde_samples(
    plan: KDEPlan, n_images: int = 256, max_values: int = 20000, device: str | None = None, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {"init" | "RiFT" | "RiFT with BN": values}}`` on PGD-10 examples made against each model.

    Raises ``FileNotFoundError`` (checkpoint) or ``rift_bn.data.DataError`` (data) with the reason.
    """
    from rift_bn.attacks import PGD

    ckpts = {
        "init": (plan.rift_bn, plan.rift_bn["base"]["checkpoint"]),
        "RiFT": (plan.rift, plan.rift["final"]["checkpoint"]),
        "RiFT with BN": (plan.rift_bn, plan.rift_bn["final"]["checkpoint"]),
    }
    for label, (_, path) in ckpts.items():
        if not path or not Path(path).is_file():
            raise FileNotFoundError(f"{label} checkpoint missing: {path}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x, y = _selection_images(plan.rift_bn, n_images)
    plan.images = len(x)
    x, y = x.to(dev), y.to(dev)
    attack = PGD(eps=8 / 255, alpha=2 / 255, steps=10)
    rng = np.random.default_rng(seed)
    keep: dict[str, np.ndarray] = {}  # the same positions for every model, so equal models give equal curves
    out: dict[str, dict[str, np.ndarray]] = {n: {} for n in plan.layers}
    for label, (r, path) in ckpts.items():
        model = _load(r, path).to(dev)
        torch.manual_seed(seed)
        adv = torch.cat([attack(model, x[i : i + 128], y[i : i + 128]) for i in range(0, len(x), 128)])
        for layer, values in bn_outputs(model, adv, plan.layers).items():
            v = values.numpy().astype(np.float64)
            if len(v) > max_values:
                if layer not in keep:
                    keep[layer] = np.sort(rng.choice(len(v), size=max_values, replace=False))
                v = v[keep[layer]]
            out[layer][label] = v
    return out
