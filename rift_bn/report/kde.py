"""Figure 3 data: outputs of BN layers on adversarial examples, for the base model and the fine-tuned ones.

Which models. The base ("init", the adversarially trained model), and for RiFT and RiFT with BN of one
(k, seed): the final model theta(alpha*) (``final.checkpoint``, what Table 1 reports) and the fine-tuned
model itself, alpha = 1 (``finetuned_checkpoint``, written beside ``results.json`` as ``finetuned.pt``).
Both are shown because alpha* = 0 makes theta(alpha*) the base model by construction: its curve is then
the init curve, and only the alpha = 1 curve shows what fine-tuning did to the layer. Runs written before
``finetuned_checkpoint`` existed show theta(alpha*) alone (the figure says so). When alpha* = 1 the two are
one model and it is drawn once.

Which inputs. Adversarial examples are made **once, on the base model**, with the run's own evaluation
attack (``config.attack``: PGD with its eps, step, steps, random start and restarts; seeded), from images of
the run's selection split (``data.selection_source``: held out of training, or the selection half of the
test set), never the reported test split. The same examples are fed to every model, so the curves differ
only by the models' weights and BN statistics. ``per_model_attack=True`` (``python -m rift_bn.report
--kde-per-model-attack``) instead attacks each model itself (white-box, same seed), as an earlier version
did.

Which BN layers. The paper shows "the BN layer identified as important", which can be read either as the
most robustness-critical BN layer (highest MRC) or as the BN layer that MRC identified for fine-tuning. We
read it as the latter: the BN layers that RiFT with BN selected, i.e. its lowest-MRC (least
robustness-critical) candidates, lowest MRC first, at most four; those are the layers whose weights and
running statistics fine-tuning changed. If the RiFT-with-BN run selected no BN layer (its k lowest-MRC
modules are all Conv/Linear), the BN layer with the lowest MRC is shown and its panel says so.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rift_bn.attacks import PGD
from rift_bn.report.collect import bn_stats, bn_stats_order, check_one_experiment, estimator

__all__ = [
    "FINETUNED",
    "KDEPlan",
    "attack_settings",
    "attack_text",
    "bn_outputs",
    "bn_stats_text",
    "kde_samples",
    "make_attack",
    "plan_kde",
]

MAX_LAYERS = 4
# samples[layer] keys of the fine-tuned models themselves (alpha = 1), by the theta(alpha*) key they belong to
FINETUNED: dict[str, str] = {"RiFT": "RiFT (fine-tuned)", "RiFT with BN": "RiFT with BN (fine-tuned)"}
DEFAULT_ATTACK: dict[str, Any] = {
    "name": "pgd",
    "eps": "8/255",
    "alpha": "2/255",
    "steps": 10,
    "random_start": True,
    "restarts": 1,
}


@dataclass
class KDEPlan:
    """Which runs and BN layers Figure 3 uses for one experiment; :func:`kde_samples` fills the rest."""

    rift: dict
    rift_bn: dict
    layers: list[str]
    notes: dict[str, str] = field(default_factory=dict)  # per layer, for its panel title
    images: int = 0  # set by kde_samples: selection-split images actually used
    attack: str = ""  # set by kde_samples: the attack, e.g. "PGD-10 (eps 8/255, step 2/255, random start)"
    per_model_attack: bool = False  # set by kde_samples
    omitted: list[str] = field(default_factory=list)  # set by kde_samples: models not drawn, and why
    data_note: str = ""  # set by kde_samples: when the data found differs from the run's

    @property
    def k(self) -> int:
        return int(self.rift_bn["k"])

    @property
    def layer_reason(self) -> str:
        """Which BN layers are shown and why, for the figure's caption."""
        if self.notes:
            return (
                f"RiFT with BN (top-{self.k}) selected no BN layer, so the BN layer with the lowest MRC "
                "(the least robustness-critical one) is shown"
            )
        chosen = [s for s in self.rift_bn.get("selected") or [] if s.get("type") == "bn"]
        more = f" (the first {MAX_LAYERS} of {len(chosen)})" if len(chosen) > MAX_LAYERS else ""
        return (
            f"the BN layers RiFT with BN selected for fine-tuning{more}, i.e. its lowest-MRC (least "
            "robustness-critical) BN layers"
        )


def _pick(runs: list[dict], method: str) -> dict | None:
    """The run of ``method`` with its default BN-statistics mode if present, else the first mode in order."""
    return min(runs, key=lambda r: bn_stats_order(method, bn_stats(r)), default=None)


def plan_kde(runs: list[dict]) -> tuple[KDEPlan | None, str]:
    """Pick the RiFT / RiFT-with-BN pair (largest k with both, then lowest seed, exact MRC first) and layers.

    Within a (k, seed), each method's default ``finetune.bn_stats`` (RiFT: ``all``, RiFT with BN:
    ``selected``) is preferred when a sweep ran several. Layers: the BN layers the RiFT-with-BN run selected
    (lowest MRC first, at most 4); if it selected none, the BN layer with the lowest MRC in its table (noted).
    ``runs`` must be one experiment. Returns ``(None, reason)`` when impossible.
    """
    try:
        check_one_experiment(runs, "Figure 3")
    except ValueError as exc:
        return None, str(exc)
    pairs: dict[tuple, dict[str, list[dict]]] = {}
    for r in runs:
        if r.get("stage") == "finetune" and r.get("method") in ("rift", "rift_bn") and r.get("k") is not None:
            key = (r["k"], r.get("seed"), estimator(r))
            pairs.setdefault(key, {}).setdefault(r["method"], []).append(r)
    both = [key for key, p in pairs.items() if len(p) == 2]
    if not both:
        return None, "no RiFT and RiFT-with-BN runs with the same k and seed"
    key = max(both, key=lambda t: (t[0], -(t[1] or 0), t[2] == "exact"))
    rift, rift_bn = (_pick(pairs[key][m], m) for m in ("rift", "rift_bn"))
    assert rift is not None and rift_bn is not None
    layers = [s["name"] for s in rift_bn.get("selected") or [] if s.get("type") == "bn"][:MAX_LAYERS]
    notes: dict[str, str] = {}
    if not layers:
        bn_rows = sorted(
            (
                row
                for row in rift_bn.get("mrc") or []
                if row.get("type") == "bn" and row.get("status", "exact") == "exact"  # not a bound
            ),
            key=lambda r: r["mrc"],
        )
        if not bn_rows:
            return (
                None,
                f"the RiFT-with-BN run (k={key[0]}) selected no BN layer and has no BN rows in its MRC table",
            )
        layers = [bn_rows[0]["name"]]
        notes[layers[0]] = "not selected; lowest-MRC BN layer"
    return KDEPlan(rift, rift_bn, layers, notes), ""


# ------------------------------------------------------------------------------------------- attack


def attack_settings(r: dict) -> dict[str, Any]:
    """The run's evaluation attack (``config.attack``), missing keys filled with the paper's PGD-10."""
    given = (r.get("config") or {}).get("attack") or {}
    return {**DEFAULT_ATTACK, **{k: v for k, v in given.items() if v is not None}}


def make_attack(r: dict) -> PGD:
    """PGD with the run's own ``config.attack`` settings (``ValueError`` for an attack other than PGD)."""
    from rift_bn.config import pixels

    a = attack_settings(r)
    if str(a["name"]).lower() != "pgd":
        raise ValueError(f"attack.name={a['name']}: Figure 3 can rebuild PGD only")
    return PGD(
        eps=pixels(a["eps"], "attack.eps"),
        alpha=pixels(a["alpha"], "attack.alpha"),
        steps=int(a["steps"]),
        random_start=bool(a["random_start"]),
        restarts=int(a["restarts"]),
    )


def _px(v: Any) -> str:
    """A pixel-scale value as the config wrote it (``8/255``), a float as ``k/255`` when it is one."""
    if isinstance(v, str):
        return v
    v = float(v)
    return f"{round(v * 255):g}/255" if math.isclose(v * 255, round(v * 255), abs_tol=1e-6) else f"{v:g}"


def attack_text(r: dict) -> str:
    """``PGD-10 (eps 8/255, step 2/255, random start)``, with restarts when more than one."""
    a = attack_settings(r)
    extra = [f"eps {_px(a['eps'])}", f"step {_px(a['alpha'])}"]
    extra += ["random start"] if a["random_start"] else ["no random start"]
    extra += [f"worst of {a['restarts']} restarts"] if int(a["restarts"]) > 1 else []
    return f"PGD-{a['steps']} ({', '.join(extra)})"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """A local RNG stream (CPU and CUDA), so the attack's random start does not depend on what ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------------------- models, data


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


def _selection_images(r: dict, n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n`` images of the run's selection split (float in [0, 1]), their labels, and a note when
    the data found has another fingerprint than the run's (``""`` otherwise)."""
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
        selection_source=d.get("selection_source") or "train_holdout",  # old runs: the held-out split
    )
    dm.setup()
    note = ""
    found, recorded = dm.fingerprint, r.get("data_fingerprint")
    if found and recorded and found != recorded:
        note = f"the data below {root} differs from the run's (fingerprint {found[:12]} vs {recorded[:12]})"
    return to_float(dm.val_x[:n]), dm.val_y[:n], note


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


def _finetuned(r: dict, label: str) -> tuple[str | None, str]:
    """The fine-tuned (alpha = 1) checkpoint of ``r`` to draw, or ``None`` and why it is not drawn."""
    path = r.get("finetuned_checkpoint")
    if r.get("alpha") is not None and float(r["alpha"]) == 1.0:
        return None, ""  # theta(alpha*) is the fine-tuned model itself: drawn once
    if not path:
        return None, (
            f"{label} fine-tuned model (alpha = 1) not available: its results.json has no "
            "finetuned_checkpoint (a run written before it was saved)"
        )
    if not Path(path).is_file():
        return None, f"{label} fine-tuned model (alpha = 1) not available: {path} is missing"
    return str(path), ""


def kde_samples(
    plan: KDEPlan,
    n_images: int = 256,
    max_values: int = 20000,
    device: str | None = None,
    seed: int = 0,
    per_model_attack: bool = False,
    batch_size: int = 128,
) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {model: values}}`` on adversarial examples of ``n_images`` selection-split images.

    ``model`` is ``init``, ``RiFT`` and ``RiFT with BN`` (theta(alpha*), the final models), and
    ``RiFT (fine-tuned)``, ``RiFT with BN (fine-tuned)`` (alpha = 1, when the runs saved it and alpha* < 1;
    otherwise ``plan.omitted`` says why). The examples are made once on ``init`` with the run's own attack
    (:func:`make_attack`, seeded with ``seed``) and fed to every model; with ``per_model_attack`` each model
    is attacked itself (same seed). At most ``max_values`` values per layer and model, at the same positions
    for every model, so equal models give equal curves.

    Raises ``FileNotFoundError`` (a required checkpoint) or ``rift_bn.data.DataError`` (data) with the reason.
    """
    ckpts: dict[str, tuple[dict, str]] = {
        "init": (plan.rift_bn, plan.rift_bn["base"]["checkpoint"]),
        "RiFT": (plan.rift, plan.rift["final"]["checkpoint"]),
        "RiFT with BN": (plan.rift_bn, plan.rift_bn["final"]["checkpoint"]),
    }
    for label, (_, path) in ckpts.items():
        if not path or not Path(path).is_file():
            raise FileNotFoundError(f"{label} checkpoint missing: {path}")
    plan.omitted = []
    for label, r in (("RiFT", plan.rift), ("RiFT with BN", plan.rift_bn)):
        path, why = _finetuned(r, label)
        if path:
            ckpts[FINETUNED[label]] = (r, path)
        elif why:
            plan.omitted.append(why)
    attack = make_attack(plan.rift_bn)
    plan.attack, plan.per_model_attack = attack_text(plan.rift_bn), per_model_attack
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x, y, plan.data_note = _selection_images(plan.rift_bn, n_images)
    plan.images = len(x)
    x, y = x.to(dev), y.to(dev)

    def adversarial(model: torch.nn.Module) -> torch.Tensor:
        with _seeded(seed):
            return torch.cat(
                [
                    attack(model, x[i : i + batch_size], y[i : i + batch_size])
                    for i in range(0, len(x), batch_size)
                ]
            )

    init = _load(*ckpts["init"]).to(dev)
    adv = None if per_model_attack else adversarial(init)  # once, on the base model
    rng = np.random.default_rng(seed)
    keep: dict[str, np.ndarray] = {}  # the same positions for every model, so equal models give equal curves
    out: dict[str, dict[str, np.ndarray]] = {n: {} for n in plan.layers}
    for label, (r, path) in ckpts.items():
        model = init if label == "init" else _load(r, path).to(dev)
        inputs = adversarial(model) if adv is None else adv
        for layer, values in bn_outputs(model, inputs, plan.layers).items():
            v = values.numpy().astype(np.float64)
            if len(v) > max_values:
                if layer not in keep:
                    keep[layer] = np.sort(rng.choice(len(v), size=max_values, replace=False))
                v = v[keep[layer]]
            out[layer][label] = v
    return out


def bn_stats_text(plan: KDEPlan) -> str:
    """``BN statistics while fine-tuning: RiFT all, RiFT with BN selected`` (the runs' finetune.bn_stats)."""
    modes = [(label, bn_stats(r)) for label, r in (("RiFT", plan.rift), ("RiFT with BN", plan.rift_bn))]
    return "finetune.bn_stats: " + ", ".join(f"{label} {mode}" for label, mode in modes)
