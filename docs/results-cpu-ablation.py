"""docs/results-cpu.md's paired ablation table: RiFT with BN's default (``finetune.bn_stats=selected``:
statistics and affine parameters) minus each ablation (``bn_stats=none``: affine only; ``lr=0``: statistics
only), the final models of the same k and seed on the same test images, pooled over seeds (images x seeds),
with the report's paired statistics (rift_bn.stats) and formatting.

Usage: python docs/results-cpu-ablation.py STUDY_FOLDER"""

import sys

import numpy as np

from rift_bn.report.collect import Run, load_runs
from rift_bn.report.table import PAIRED, fmt_paired
from rift_bn.stats import paired_stats, pooled

cells: dict[tuple[str, int], dict[int, Run]] = {}  # (variant, k) -> seed -> run
for r in load_runs([sys.argv[1]], log=lambda _: None):
    if r.method == "rift_bn" and r.experiment.name == "topk":
        variant = r.bn_stats + ("" if r.results.config["finetune"]["lr"] else ", lr=0")
        cells.setdefault((variant, r.k), {})[r.seed] = r

for other in ("none", "selected, lr=0"):
    for k in sorted(k for v, k in cells if v == other):
        pairs = [(cells[(other, k)][s], cells[("selected", k)].get(s)) for s in sorted(cells[(other, k)])]
        if any(b is None or not np.array_equal(a.test_index, b.test_index) for a, b in pairs):
            raise SystemExit(f"k={k}: a seed without the default run, or scored on other test images")
        row = {}
        for m in PAIRED:
            st = paired_stats(
                pooled([a.correct("final", m) for a, _ in pairs]),
                pooled([b.correct("final", m) for _, b in pairs]),
            )
            row |= {f"paired_{m}_{f}": st[f] for f in ("delta", "ci_low", "ci_high", "p_value")}
        stats = " | ".join(fmt_paired(row, m) for m in PAIRED)
        print(f"| {k} | selected − {other} | {len(pairs)} | {stats} |")
