"""How much an MRC protocol change moves the ranking and the k lowest modules, on one cached base model.

    python -m benchmarks.mrc_sensitivity scale=cpu data=cifar10                 # RiFT's 20 steps vs one pass
    python -m benchmarks.mrc_sensitivity scale=cpu --other "mrc.steps_per_epoch=5" --json out.json

Both MRC tables go through the pipeline's own cache (the sweep's jobs reuse them, and a table already
computed is read, not recomputed). The base model must be in the cache already (run the sweep or
``+experiment=at`` first). Prints Spearman / Kendall and the k lowest for ``rift`` (Conv/Linear) and
``rift_bn`` (Conv/Linear/BN) as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from benchmarks.common import job_config
from benchmarks.mrc_agreement import agreement
from rift_bn.data import CIFARDataModule
from rift_bn.errors import UserError
from rift_bn.models.checkpoint import file_sha256
from rift_bn.mrc import KINDS
from rift_bn.pipeline.base import MissingBaseModel, checkpoint_path, load_base
from rift_bn.pipeline.keys import CacheKeys
from rift_bn.pipeline.mrc_table import job_mrc_table
from rift_bn.pipeline.training import Timings


def mrc_rows(cfg: DictConfig) -> tuple[list[dict], str, float]:
    """The MRC table of every rift_bn candidate for ``cfg``'s base (``base.checkpoint`` or the cached one of
    a CPU job), as a job of ``cfg`` makes it, in its cache: (rows, source, seconds)."""
    cpu = torch.device("cpu")
    dm = CIFARDataModule.from_config(cfg)
    dm.setup()
    keys = CacheKeys(cfg, dm.fingerprint, Path(cfg.cache_dir).expanduser().resolve())
    path = checkpoint_path(cfg.base, keys.base_path())
    if not path.exists():
        raise MissingBaseModel(
            f"base.checkpoint={cfg.base.checkpoint or 'null'}: no base model at {path}; run the sweep or "
            "+experiment=at with the same overrides first"
        )
    base = load_base(path, cfg.model, dm.spec, cpu).model
    t0 = time.perf_counter()
    selection = (dm.val_x, dm.val_y)
    rows, source = job_mrc_table(
        cfg, KINDS["rift_bn"], base, file_sha256(path), selection, keys, cpu, Timings()
    )
    return rows, source, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.mrc_sensitivity", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides of both tables (e.g. scale=cpu)")
    p.add_argument("--other", default="mrc.steps_per_epoch=null mrc.shuffle=false",
                   help="overrides of the second table (default: one in-order pass per epoch)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write both tables and the agreement here")
    a = p.parse_args(argv)
    fixed = ["data.download=false"]
    first, second = job_config([*a.overrides, *fixed]), job_config([*a.overrides, *a.other.split(), *fixed])
    (rows_a, src_a, sec_a), (rows_b, src_b, sec_b) = mrc_rows(first), mrc_rows(second)
    out: dict = {"overrides": a.overrides, "other": a.other, "tables": {"default": rows_a, "other": rows_b}}
    print(f"default: {src_a} ({sec_a:.0f} s); other ({a.other}): {src_b} ({sec_b:.0f} s)")
    print("| candidates | n | Spearman | Kendall | k lowest equal, k=1..5 (overlap) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for method, kinds in KINDS.items():
        pick_a = [r for r in rows_a if r["type"] in kinds]
        pick_b = [r for r in rows_b if r["type"] in kinds]
        agree = agreement(pick_a, pick_b)
        out[method] = agree
        topk = " ".join(f"{'Y' if t['same_set'] else 'n'}({t['overlap']})" for t in agree["topk"])
        print(f"| {method} | {agree['n']} | {agree['spearman']:.3f} | {agree['kendall']:.3f} | {topk} |")
        for t in agree["topk"]:
            print(f"    k={t['k']}: default {t['exact']}  other {t['linear']}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:  # one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
