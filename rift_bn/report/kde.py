"""Figure 3 data: outputs of BN layers on adversarial examples, for the base model and the fine-tuned ones,
from what the runs saved (``bn_outputs.npz``, :mod:`rift_bn.report.bn_outputs`); the report never attacks.

Which models. The base ("init", the adversarially trained model), and for RiFT and RiFT with BN of one
(k, seed): the final model theta(alpha*) (what Table 1 reports) and the fine-tuned model itself, alpha = 1.
Both are shown because alpha* = 0 makes theta(alpha*) the base model by construction: its curve is then the
init curve, and only the alpha = 1 curve shows what fine-tuning did to the layer. When alpha* = 1 the two
are one model and it is drawn once.

Which inputs. The adversarial examples each run saved its outputs on: PGD with the run's own evaluation
attack (``config.attack``), made once on the base model from images of the run's selection split
(``data.selection_source``), never the reported test split: the first examples of its MRC adversarial set.
The RiFT and RiFT-with-BN runs of one base model and seed share that set (the files' digests must agree),
so the curves differ only by the models' weights and BN statistics. Attacking each model itself (the old
``--kde-per-model-attack``) would need attacks the runs do not make, so it is gone.

Which BN layers. The paper shows "the BN layer identified as important", which can be read either as the
most robustness-critical BN layer (highest MRC) or as the BN layer that MRC identified for fine-tuning. We
read it as the latter: the BN layers that RiFT with BN selected, i.e. its lowest-MRC (least
robustness-critical) candidates, lowest MRC first, at most four; those are the layers whose weights and
running statistics fine-tuning changed. If the RiFT-with-BN run selected no BN layer (its k lowest-MRC
modules are all Conv/Linear), the BN layer with the lowest MRC is shown and its panel says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import wasserstein_distance

from rift_bn.report.bn_outputs import BNOutputs
from rift_bn.report.collect import Run, attack_text, bn_stats_order, check_one_experiment

__all__ = ["FINETUNED", "KDEPlan", "bn_shift", "bn_stats_text", "kde_samples", "plan_kde"]

MAX_LAYERS = 4
# samples[layer] keys of the fine-tuned models themselves (alpha = 1), by the theta(alpha*) key they belong to
FINETUNED: dict[str, str] = {"RiFT": "RiFT (fine-tuned)", "RiFT with BN": "RiFT with BN (fine-tuned)"}


@dataclass
class KDEPlan:
    """Which runs and BN layers Figure 3 uses for one experiment; :func:`kde_samples` fills the rest."""

    rift: Run
    rift_bn: Run
    layers: list[str]
    notes: dict[str, str] = field(default_factory=dict)  # per layer, for its panel title
    images: int = 0  # set by kde_samples: adversarial examples the outputs were taken on

    @property
    def k(self) -> int:
        return int(self.rift_bn.k or 0)

    @property
    def attack(self) -> str:
        """The attack that made the examples, e.g. ``PGD-10 (eps 8/255, step 2/255, random start)``."""
        return attack_text(self.rift_bn)

    @property
    def layer_reason(self) -> str:
        """Which BN layers are shown and why, for the figure's caption."""
        if self.notes:
            return (
                f"RiFT with BN (top-{self.k}) selected no BN layer, so the BN layer with the lowest MRC "
                "(the least robustness-critical one) is shown"
            )
        chosen = [s for s in self.rift_bn.results.selected if s["type"] == "bn"]
        more = f" (the first {MAX_LAYERS} of {len(chosen)})" if len(chosen) > MAX_LAYERS else ""
        return (
            f"the BN layers RiFT with BN selected for fine-tuning{more}, i.e. its lowest-MRC (least "
            "robustness-critical) BN layers"
        )


def _pick(runs: list[Run], method: str) -> Run:
    """The run of ``method`` with its default BN-statistics mode if present, else the first mode in order."""
    return min(runs, key=lambda r: bn_stats_order(method, r.bn_stats))


def _pairs(runs: list[Run]) -> dict[tuple[int, int, str], tuple[Run, Run]]:
    """``{(k, seed, estimator): (RiFT run, RiFT-with-BN run)}`` for every such pair, each method's default
    ``finetune.bn_stats`` first (:func:`_pick`)."""
    by_key: dict[tuple[int, int, str], dict[str, list[Run]]] = {}
    for r in runs:
        if r.method in ("rift", "rift_bn") and r.k is not None:
            by_key.setdefault((r.k, r.seed, r.estimator), {}).setdefault(r.method, []).append(r)
    return {
        key: (_pick(p["rift"], "rift"), _pick(p["rift_bn"], "rift_bn"))
        for key, p in by_key.items()
        if len(p) == 2
    }


def plan_kde(runs: list[Run]) -> tuple[KDEPlan | None, str]:
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
    pairs = _pairs(runs)
    if not pairs:
        return None, "no RiFT and RiFT-with-BN runs with the same k and seed"
    key = max(pairs, key=lambda t: (t[0], -t[1], t[2] == "exact"))
    rift, rift_bn = pairs[key]
    layers, notes = _shown_layers(rift_bn)
    if not layers:
        return (
            None,
            f"the RiFT-with-BN run (k={key[0]}) selected no BN layer and has no BN rows in its MRC table",
        )
    return KDEPlan(rift, rift_bn, layers[:MAX_LAYERS], notes), ""


def _shown_layers(rift_bn: Run) -> tuple[list[str], dict[str, str]]:
    """The BN layers a RiFT-with-BN run selected (lowest MRC first); if none, its lowest-MRC exact BN row,
    noted; ``([], {})`` when it has neither."""
    layers = [s["name"] for s in rift_bn.results.selected if s["type"] == "bn"]
    if layers:
        return layers, {}
    exact_bn = [r for r in rift_bn.results.mrc if r["type"] == "bn" and r.get("status", "exact") == "exact"]
    if not exact_bn:  # only bounds, or no BN row
        return [], {}
    lowest = min(exact_bn, key=lambda r: r["mrc"])["name"]
    return [lowest], {lowest: "not selected; lowest-MRC BN layer"}


def _saved(r: Run, label: str) -> BNOutputs:
    """The run's ``bn_outputs.npz``; ``FileNotFoundError`` saying why when it has none."""
    if r.results.bn_outputs is None:
        raise FileNotFoundError(
            f"the {label} run {r.path} saved no BN outputs (written before runs saved Figure 3's data; "
            "run it again)"
        )
    path = r.beside(r.results.bn_outputs)
    if not path.is_file():
        raise FileNotFoundError(f"the {label} run's BN outputs are missing: {path}")
    return BNOutputs.read(path)


def kde_samples(plan: KDEPlan) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {model: values}}`` from the two runs' saved BN outputs; sets ``plan.images``.

    ``model`` is ``init``, ``RiFT`` and ``RiFT with BN`` (theta(alpha*), the final models), and
    ``RiFT (fine-tuned)``, ``RiFT with BN (fine-tuned)`` (alpha = 1, unless alpha* = 1: then it is the final
    model, drawn once). Every model's values are at the same positions of the same examples.

    Raises ``FileNotFoundError`` (a run without the file) or ``ValueError`` (files that do not match).
    """
    rift, bn = _saved(plan.rift, "RiFT"), _saved(plan.rift_bn, "RiFT-with-BN")
    if rift.examples != bn.examples:
        raise ValueError(
            "the RiFT and RiFT-with-BN runs saved BN outputs on different adversarial examples "
            f"({rift.examples} vs {bn.examples}: another base model, seed or attack)"
        )
    missing = [n for n in plan.layers if n not in rift.layers or n not in bn.layers]
    if missing:
        raise ValueError(f"the runs saved no outputs of BN layer(s) {missing}")
    plan.images = bn.images
    out: dict[str, dict[str, np.ndarray]] = {}
    for layer in plan.layers:
        out[layer] = {"init": bn.of("base", layer), "RiFT": rift.of("final", layer)}
        out[layer]["RiFT with BN"] = bn.of("final", layer)
        for label, r, saved in (("RiFT", plan.rift, rift), ("RiFT with BN", plan.rift_bn, bn)):
            if r.results.alpha != 1.0:  # alpha* = 1: theta(alpha*) is the fine-tuned model, drawn once
                out[layer][FINETUNED[label]] = saved.of("finetuned", layer)
    return out


def bn_stats_text(plan: KDEPlan) -> str:
    """``finetune.bn_stats: RiFT all, RiFT with BN selected`` (the runs' finetune.bn_stats)."""
    modes = [(label, r.bn_stats) for label, r in (("RiFT", plan.rift), ("RiFT with BN", plan.rift_bn))]
    return "finetune.bn_stats: " + ", ".join(f"{label} {mode}" for label, mode in modes)


def bn_shift(runs: list[Run]) -> pd.DataFrame:
    """Figure 3 in numbers, for every (k, seed) with a RiFT and a RiFT-with-BN run of one experiment: how far
    each model's outputs at the BN layers Figure 3 shows (all of them, not only the first four) moved from
    the base model's on the same adversarial examples. ``shift`` is the 1-D Wasserstein distance between the
    two samples of values in units of the base's standard deviation, averaged over those layers; rows per
    (k, seed, model) for the models of :func:`kde_samples`, the fine-tuned ones always present (alpha* = 1:
    the final model). Pairs without saved outputs are left out; empty when there are none."""
    check_one_experiment(runs, "bn_shift")
    rows = []
    for (k, seed, _), (rift, rift_bn) in sorted(_pairs(runs).items()):
        layers = _shown_layers(rift_bn)[0]
        try:
            samples = kde_samples(KDEPlan(rift, rift_bn, layers))
        except (OSError, ValueError):  # no saved outputs, or not on the same examples: nothing to measure
            continue
        if not samples:  # no BN layer to show
            continue
        for label, fine_tuned in FINETUNED.items():
            for model in (label, fine_tuned):
                shifts = []
                for values in samples.values():
                    init = values["init"].astype(np.float64)
                    moved = values.get(model, values[label]).astype(np.float64)
                    shifts.append(wasserstein_distance(init, moved) / init.std())
                rows.append(
                    {"k": k, "seed": seed, "model": model, "layers": len(layers), "shift": np.mean(shifts)}
                )
    return pd.DataFrame(rows, columns=["k", "seed", "model", "layers", "shift"])
