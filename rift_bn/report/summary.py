"""The console summary printed at the end of every run."""

from __future__ import annotations


def format_summary(r: dict) -> str:
    """A few readable lines: what ran, base vs final test accuracy, deltas, selection, alpha*, timings."""
    head = f"{r['stage']} | {r['dataset']} {r['model']} (width {r.get('width')}) | seed {r['seed']}"
    if r.get("method"):
        head += f" | method {r['method']}" + (f" k={r['k']}" if r.get("k") else "")
    lines = [head, f"  {'':8s}{'clean':>9s}{'robust':>9s}"]
    for name in ("base", "final"):
        lines.append(f"  {name:8s}{r[name]['clean_acc']:8.2f}%{r[name]['robust_acc']:8.2f}%")
    if r.get("stage") == "finetune":
        d = r["delta"]
        lines.append(f"  {'delta':8s}{d['clean_acc']:+8.2f} {d['robust_acc']:+8.2f}")
        chosen = ", ".join(
            f"{s['name']} ({s['type']}" + (f", mrc {s['mrc']:.4f})" if s.get("mrc") is not None else ")")
            for s in r["selected"]
        )
        lines.append(f"  selected: {chosen}")
        lines.append(f"  alpha*: {r['alpha']}   mrc: {r.get('mrc_source')}")
    lines.append("  timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.get("timings", {}).items()))
    return "\n".join(lines)
