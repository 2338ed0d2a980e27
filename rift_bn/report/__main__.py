"""``python -m rift_bn.report DIR [DIR ...] [--out OUT]``: Table 1 and figures from run/sweep folders."""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rift_bn.report",
        description="Gather every results.json below the given run/sweep folders and write Table 1 "
        "(Markdown + CSV, with paired statistics where the runs saved per-image outcomes), the paired "
        "RiFT-with-BN-vs-RiFT table, Figures 1-3, MRC charts and interpolation curves into a report folder. "
        "Runs are averaged over seeds only within one experiment (the experiment each run stored); several "
        "experiments get separate table sections and figures. Duplicate jobs count once (the newest); job "
        "folders without results.json are listed as missing.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run or sweep folders (searched recursively)")
    p.add_argument("--out", default=None, help="report folder (default: <first DIR>/report)")
    p.add_argument(
        "--no-kde", action="store_true", help="skip Figure 3 (drawn from the runs' bn_outputs.npz)"
    )
    p.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    a = p.parse_args(argv)

    from rift_bn.report.build import make_report

    try:
        report = make_report(a.dirs, a.out, kde=not a.no_kde, wandb=not a.no_wandb)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((report.out / "table1.md").read_text())
    for stem, why in report.skipped.items():
        print(f"skipped {stem}: {why}")
    print(f"wrote {len(report.files)} file(s), {len(report.figures)} figure(s)")
    print(f"report: {report.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
