"""How much an MRC protocol change moves the ranking and the k lowest modules, on one cached base model.

    python scripts/mrc_sensitivity.py scale=cpu data=cifar10                    # RiFT's 20 steps vs one pass
    python scripts/mrc_sensitivity.py scale=cpu --other "mrc.steps_per_epoch=5" --json out.json

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
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from rift_bn.config import validate
from rift_bn.data import CIFARDataModule
from rift_bn.models.checkpoint import file_sha256
from rift_bn.mrc import KINDS
from rift_bn.mrc_linear import agreement
from rift_bn.pipeline import Run

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "base.train_if_missing=false"])
    validate(cfg)
    return cfg


def mrc_rows(cfg: DictConfig) -> tuple[list[dict], str, float]:
    """The MRC table of every rift_bn candidate for ``cfg``'s cached base: (rows, source, seconds)."""
    d = cfg.data
    dm = CIFARDataModule(
        d.name, d.root, d.val_size, d.train_subset, d.test_subset, seed=cfg.seed, download=False,
        selection_source=d.selection_source,
    )  # fmt: skip
    dm.setup()
    run = Run(cfg, Path("."), torch.device("cpu"), dm, Path(cfg.cache_dir).expanduser().resolve())
    base, path, _ = run.base_model()
    t0 = time.perf_counter()
    rows, source = run.mrc_table(base, file_sha256(path), KINDS["rift_bn"])
    return rows, source, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides of both tables (e.g. scale=cpu)")
    p.add_argument("--other", default="mrc.steps_per_epoch=null mrc.shuffle=false",
                   help="overrides of the second table (default: one in-order pass per epoch)")  # fmt: skip
    p.add_argument("--json", type=Path, help="also write both tables and the agreement here")
    a = p.parse_args(argv)
    first, second = _compose(a.overrides), _compose([*a.overrides, *a.other.split()])
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
    sys.exit(main())
