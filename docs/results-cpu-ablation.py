"""docs/results-cpu.md's paired ablation table: RiFT with BN's default (``finetune.bn_stats=selected``:
statistics and affine parameters) minus each ablation (``bn_stats=none``: affine only; ``lr=0``: statistics
only), the final models of the same k and seed on the same test images, pooled over seeds (images x seeds),
with rift_bn.stats' paired bootstrap CI and exact McNemar p.

Usage: python docs/results-cpu-ablation.py STUDY_FOLDER"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from rift_bn.stats import paired_stats, pooled

runs: dict[tuple[str, int], dict[int, Path]] = defaultdict(dict)  # (variant, k) -> seed -> job folder
for f in sorted(Path(sys.argv[1]).rglob("results.json")):
    r = json.loads(f.read_text())
    if r["method"] != "rift_bn" or r["k"] is None or r["experiment"]["name"] != "topk":
        continue
    variant = r["bn_stats"] + ("" if r["config"]["finetune"]["lr"] else ", lr=0")
    runs[(variant, r["k"])][r["seed"]] = f.parent


def final(folder: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The final model's per-image outcomes and their test indices, in test-index order."""
    with np.load(folder / "outcomes.npz") as o:
        order = np.argsort(o["test_index"])
        return o["test_index"][order], o[f"final_{metric}"][order]


def pair(a: Path, b: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    (ia, oa), (ib, ob) = final(a, metric), final(b, metric)
    if not np.array_equal(ia, ib):
        raise SystemExit(f"{a} and {b} were scored on different test images")
    return oa, ob


for other in ("none", "selected, lr=0"):
    for k in sorted({k for v, k in runs if v == other}):
        seeds = sorted(runs[(other, k)].keys() & runs[("selected", k)].keys())
        cells = []
        for metric in ("clean", "robust"):
            pairs = [pair(runs[(other, k)][s], runs[("selected", k)][s], metric) for s in seeds]
            st = paired_stats(pooled([b for b, _ in pairs]), pooled([a for _, a in pairs]))
            ci = f"[{st['ci_low']:+.2f}, {st['ci_high']:+.2f}]"
            cells.append(f"{st['delta']:+.2f} {ci} p={st['p_value']:.2g}")
        print(f"| {k} | selected − {other} | {len(seeds)} | {' | '.join(cells)} |")
