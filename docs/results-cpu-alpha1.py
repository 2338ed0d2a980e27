"""docs/results-cpu.md's alpha = 1 table: the fine-tuned model itself (alpha = 1) minus the base (alpha = 0)
on the selection split, per method, BN-statistics mode and k, mean over seeds, from the interpolation curves
of every results.json below the folder given. Usage: python docs/results-cpu-alpha1.py STUDY_FOLDER"""

import json
import sys
from collections import defaultdict
from pathlib import Path
from statistics import mean

deltas: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
for f in sorted(Path(sys.argv[1]).rglob("results.json")):
    r = json.loads(f.read_text())
    curve = {p["alpha"]: p for p in r.get("interpolation") or []}
    if r["k"] is None or not {0.0, 1.0} <= curve.keys():
        continue
    mode = r["bn_stats"] + ("" if r["config"]["finetune"]["lr"] else ", lr=0")
    d = [curve[1.0][m] - curve[0.0][m] for m in ("clean_acc", "robust_acc")]
    deltas[(r["method"], mode, r["k"])].append((d[0], d[1]))
for (method, mode, k), v in sorted(deltas.items()):
    clean, robust = mean(c for c, _ in v), mean(rb for _, rb in v)
    print(f"| {method} ({mode}) | {k} | {clean:+.2f} | {robust:+.2f} | {len(v)} |")
