"""The linear MRC estimator (``rift_bn.mrc_linear``) against the exact protocol (``rift_bn.mrc.compute_mrc``).

``python -m benchmarks.mrc_agreement compare --checkpoint BASE.pt --data-root data ...`` measures both on
one example set of a base model's selection split (rank correlations, agreement of the k lowest, time);
``... agree A.json B.json`` compares ``compare`` runs on disjoint sets (how reproducible each estimator
is); see ``docs/performance.md``. The adversarial set is the pipeline's (``rift_bn.mrc.adversarial_examples``
with the ``attack`` and ``eval.batch_size`` of ``conf/``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import clock, job_config, trained_base
from rift_bn.attacks import PGD
from rift_bn.data import DataError
from rift_bn.errors import UserError
from rift_bn.models.checkpoint import CheckpointError
from rift_bn.mrc import KINDS, MRCProtocol, adversarial_examples, compute_mrc
from rift_bn.mrc_linear import linear_mrc


def _lowest(rows: Sequence[dict], k: int) -> list[str]:
    return [r["name"] for r in sorted(rows, key=lambda r: r["mrc"])[:k]]  # stable: ties keep network order


def agreement(exact: Sequence[dict], linear: Sequence[dict], ks: Sequence[int] = (1, 2, 3, 4, 5)) -> dict:
    """Spearman and Kendall rank correlation of the two MRC columns, and the agreement of the k lowest."""
    from scipy.stats import kendalltau, spearmanr

    if [r["name"] for r in exact] != [r["name"] for r in linear]:
        raise ValueError("agreement: the two tables must list the same candidates in the same order")
    a, b = [r["mrc"] for r in exact], [r["mrc"] for r in linear]
    two = len(a) >= 2  # rank correlation needs two candidates
    out: dict = {
        "n": len(a),
        "spearman": float(spearmanr(a, b).statistic) if two else math.nan,
        "kendall": float(kendalltau(a, b).statistic) if two else math.nan,
        "topk": [],
    }
    for k in ks:
        if k > len(a):
            break
        e, lin = _lowest(exact, k), _lowest(linear, k)
        out["topk"].append(
            {
                "k": k,
                "same_set": set(e) == set(lin),
                "overlap": len(set(e) & set(lin)),
                "exact": e,
                "linear": lin,
            }
        )
    return out


def _scores(exact: Sequence[dict], linear: Sequence[dict], key: str) -> dict | None:
    """``agreement`` of ``linear[key]`` with the exact MRC (None where a value is missing or not finite)."""
    values = [r[key] for r in linear]
    if not all(v is not None and math.isfinite(v) for v in values):
        return None
    return agreement(exact, [{**r, "mrc": v} for r, v in zip(linear, values, strict=True)])


def _stamp(stamps: list, device: torch.device, name: str, done: int, total: int, verbose: bool) -> None:
    stamps.append((name, *clock(device)))
    if verbose:
        wall, cpu = (stamps[-1][i] - stamps[-2][i] for i in (1, 2))
        print(
            f"  exact mrc {done}/{total}: {name} ({wall:.1f} s, cpu {cpu:.1f} s)", file=sys.stderr, flush=True
        )


def _timed(
    fn: Callable[[], dict], device: torch.device, repeats: int = 1
) -> tuple[dict, tuple[float, float]]:
    """``fn()`` and its (wall, cpu) seconds, each the median of ``repeats`` runs."""
    times = []
    for _ in range(repeats):
        t0 = clock(device)
        out = fn()
        t1 = clock(device)
        times.append((t1[0] - t0[0], t1[1] - t0[1]))
    mid = len(times) // 2
    return out, (sorted(t[0] for t in times)[mid], sorted(t[1] for t in times)[mid])


def compare(
    checkpoint: str | Path,
    data_root: str | Path,
    dataset: str = "cifar10",
    model_name: str = "resnet18",
    width: int | None = 16,
    val_size: int = 500,
    seed: int = 0,
    num_examples: int | None = None,
    first: int = 0,
    epochs: int = 10,
    batch_size: int = 512,
    kinds: str = "both",
    json_out: str | Path | None = None,
    device: str = "cpu",
    verbose: bool = False,
    model: nn.Module | None = None,
    data: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """Exact (``compute_mrc``) vs linear MRC on the adversarial set of a base model's selection split.

    The adversarial set is made, as the pipeline makes it, from examples ``first`` to ``first +
    num_examples`` of the selection split (default: all of it), so disjoint sets of one split can be
    compared (``agree``). ``model``/``data`` (images, labels) bypass the checkpoint and the dataset (tests).
    Exact MRC runs once over the largest candidate set; a set's exact time is the base evaluation plus
    its modules' times (each module's ascent is independent of the set). The linear estimator runs per
    set, with and without the measured step (``robust_acc_drop``); its times are medians of 3 runs.
    """
    sets = {"both": ("rift", "rift_bn"), "rift": ("rift",), "rift_bn": ("rift_bn",)}[kinds]
    dev = torch.device(device)
    values: dict = {
        "data.root": str(data_root),
        "data.val_size": val_size,
        "seed": seed,
        "data.download": False,
    }
    if width is not None:
        values["model.width"] = width
    job = job_config([f"data={dataset}", f"model={model_name}"], values)
    if model is None:
        model, dm = trained_base(checkpoint, job, dev)
        x, y = dm.val_x, dm.val_y
    else:
        assert data is not None, "compare: pass data with model"
        x, y = data
        model = model.to(dev).eval()
    n = num_examples or len(y) - first
    if first < 0 or n < 1 or first + n > len(y):
        raise UserError(
            f"--first={first} --num-examples={n}: examples {first}..{first + n} do not fit the {len(y)} of "
            "the split; lower them or raise --val-size"
        )
    attack = PGD.from_config(job.attack)
    x, y = x[first : first + n], y[first : first + n]
    x_adv = adversarial_examples(model, x, y, attack, job.eval.batch_size, dev, seed).to(dev)
    y = y.to(dev)
    # one in-order pass per epoch: the protocol of the measurements in docs/performance.md
    proto = MRCProtocol(epochs=epochs, batch_size=batch_size, seed=seed, shuffle=False, steps_per_epoch=None)

    union = tuple(sorted({k for s in sets for k in KINDS[s]}))
    stamps: list[tuple[str, float, float]] = [("", *clock(dev))]
    exact, exact_total = _timed(
        lambda: compute_mrc(
            model,
            x_adv,
            y,
            union,
            proto,
            progress=lambda name, done, total: _stamp(stamps, dev, name, done, total, verbose),
        ),
        dev,
    )
    # Per-module (wall, cpu) time between progress calls: the first module also carries the base evaluation,
    # a module that opens a stage carries that stage's input computation; the short tail goes to every set.
    module_time = {
        name: (wall - stamps[i][1], cpu - stamps[i][2]) for i, (name, wall, cpu) in enumerate(stamps[1:])
    }
    tail = tuple(exact_total[c] - (stamps[-1][c + 1] - stamps[0][c + 1]) for c in (0, 1))
    # CPU time on a CPU (other jobs share the machine; the runs are single-process), else wall time
    c = 1 if dev.type == "cpu" else 0
    result: dict = {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "settings": {
            "dataset": dataset,
            "model": model_name,
            "width": width,
            "val_size": val_size,
            "seed": seed,
            "num_examples": n,
            "first": first,
            "attack": repr(attack),
            "protocol": proto.key(),
            "device": device,
            "torch_threads": torch.get_num_threads(),
        },
        "base_loss": exact["base_loss"],
        "base_robust_acc": exact["base_robust_acc"],
        "clock": "process CPU seconds" if c else "wall seconds",
        "exact_seconds_total": exact_total[c],
        "exact_wall_seconds_total": exact_total[0],
        "sets": {},
    }
    for s in sets:
        wanted = set(KINDS[s])
        ex_rows = [r for r in exact["rows"] if r["type"] in wanted]
        lin, t_lin = _timed(lambda s=s: linear_mrc(model, x_adv, y, KINDS[s], proto), dev, repeats=3)
        _, t_bound = _timed(
            lambda s=s: linear_mrc(model, x_adv, y, KINDS[s], proto, measure_step=False), dev, 3
        )
        t_exact = [tail[i] + sum(module_time[r["name"]][i] for r in ex_rows) for i in (0, 1)]
        entry = agreement(ex_rows, lin["rows"])
        entry |= {
            "seconds": {"exact": t_exact[c], "linear": t_lin[c], "linear_bound_only": t_bound[c]},
            "wall_seconds": {"exact": t_exact[0], "linear": t_lin[0], "linear_bound_only": t_bound[0]},
            "speedup": t_exact[c] / t_lin[c],
            "speedup_bound_only": t_exact[c] / t_bound[c],
        }
        # other columns of the same pass, scored the same way: the plain ball bound and the measured step
        entry["variants"] = {
            key: _scores(ex_rows, lin["rows"], key) for key in ("mrc_ball", "step_loss_increase")
        }
        if s == "rift_bn":
            bn = [i for i, r in enumerate(ex_rows) if r["type"] == "bn"]
            entry["bn_only"] = {
                key: _scores([ex_rows[i] for i in bn], [lin["rows"][i] for i in bn], key)
                for key in ("mrc", "mrc_ball", "step_loss_increase")
            }
        entry["rows"] = [
            {
                "name": e["name"],
                "type": e["type"],
                "exact": e["mrc"],
                "linear": r["mrc"],
                "linear_ball": r["mrc_ball"],
                "norms": r["norms"],
                "exact_acc_drop": e["robust_acc_drop"],
                "linear_acc_drop": r["robust_acc_drop"],
                "step_loss_increase": r["step_loss_increase"],
                "exact_seconds": module_time[e["name"]][c],
            }
            for e, r in zip(ex_rows, lin["rows"], strict=True)
        ]
        result["sets"][s] = entry
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def agree(paths: Sequence[str | Path]) -> str:
    """Rank agreement between ``compare`` results on different example sets of the same base: exact vs
    exact, linear vs linear, and each set's exact vs linear (per candidate set, Spearman / Kendall)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    for path, res in zip(paths, results, strict=True):
        if not isinstance(res, dict) or not isinstance(res.get("sets"), dict):
            raise UserError(f"agree {path}: not the --json output of compare; pass compare's --json files")
    if any(set(res["sets"]) != set(results[0]["sets"]) for res in results):
        raise UserError("agree: the results cover different candidate sets; run compare with one --kinds")
    lines = []
    for s in results[0]["sets"]:
        tables = [{r["name"]: r for r in res["sets"][s]["rows"]} for res in results]
        names = list(tables[0])
        if any(list(t) != names for t in tables):
            raise UserError(f"agree: the results list different {s} candidates; compare runs of one base")
        lines.append(f"{s} ({len(names)} candidates, {len(tables)} example sets): spearman / kendall")
        pairs = [
            (i, j, c, c)
            for c in ("exact", "linear")
            for i in range(len(tables))
            for j in range(i + 1, len(tables))
        ]
        pairs += [(i, i, "exact", "linear") for i in range(len(tables))]
        for i, j, a, b in pairs:
            sc = agreement(
                [{"name": n, "mrc": tables[i][n][a]} for n in names],
                [{"name": n, "mrc": tables[j][n][b]} for n in names],
            )
            lines.append(f"  {a} {paths[i]} vs {b} {paths[j]}: {sc['spearman']:.3f} / {sc['kendall']:.3f}")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The comparison as a plain-text table."""
    lines = [
        f"base loss {result['base_loss']:.4f}, base robust acc {result['base_robust_acc']:.2f}% "
        f"({result['settings']['num_examples']} adversarial examples); times: {result['clock']}",
        "",
    ]
    head = (
        f"{'set':<8} {'n':>3} {'spearman':>8} {'kendall':>8}  {'top-k same (overlap) k=1..5':<30}"
        f" {'exact s':>8} {'linear s':>8} {'ratio':>7} {'bound s':>8} {'ratio':>7}"
    )
    lines += [head, "-" * len(head)]
    for s, e in result["sets"].items():
        topk = " ".join(f"{'Y' if t['same_set'] else 'n'}({t['overlap']})" for t in e["topk"])
        sec = e["seconds"]
        lines.append(
            f"{s:<8} {e['n']:>3} {e['spearman']:>8.3f} {e['kendall']:>8.3f}  {topk:<30}"
            f" {sec['exact']:>8.1f} {sec['linear']:>8.2f} {e['speedup']:>6.0f}x"
            f" {sec['linear_bound_only']:>8.2f} {e['speedup_bound_only']:>6.0f}x"
        )
    lines += ["", "other first-order columns (spearman / kendall / top-k overlap k=1..5):"]
    for s, e in result["sets"].items():
        groups = [("", {"mrc": e, **e["variants"]})] + (
            [(" BN only", e["bn_only"])] if "bn_only" in e else []
        )
        for label, scores in groups:
            for key, sc in scores.items():
                if sc is not None:
                    overlap = " ".join(str(t["overlap"]) for t in sc["topk"])
                    lines.append(
                        f"  {s + label:<16} {key:<20} {sc['spearman']:>7.3f} {sc['kendall']:>7.3f}  {overlap}"
                    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mrc_agreement", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="linear vs exact MRC on a base checkpoint")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--data-root", required=True)
    c.add_argument("--dataset", default="cifar10")
    c.add_argument("--model", default="resnet18")
    c.add_argument("--width", type=int, default=16)
    c.add_argument("--val-size", type=int, default=500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--num-examples", type=int, default=None, help="default: the whole split from --first")
    c.add_argument("--first", type=int, default=0, help="first example of the selection split to use")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--batch-size", type=int, default=512, help="MRC ascent batch size (protocol: 512)")
    c.add_argument("--kinds", choices=("rift", "rift_bn", "both"), default="both")
    c.add_argument("--device", default="cpu")
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    c.add_argument("--json", dest="json_out", default=None)
    a = sub.add_parser("agree", help="rank agreement between compare results on different example sets")
    a.add_argument("results", nargs="+", help="--json files of compare runs on the same base")
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except (
        UserError,
        ValueError,
        OSError,
        DataError,
        CheckpointError,
    ) as e:  # one line, exit 2, nothing written
        print(f"error: {e}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "agree":
        print(agree(args.results))
        return 0
    if not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint={args.checkpoint}: no such file; pass a base model's .pt")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare(
        args.checkpoint,
        args.data_root,
        dataset=args.dataset,
        model_name=args.model,
        width=args.width,
        val_size=args.val_size,
        seed=args.seed,
        num_examples=args.num_examples,
        first=args.first,
        epochs=args.epochs,
        batch_size=args.batch_size,
        kinds=args.kinds,
        json_out=args.json_out,
        device=args.device,
        verbose=True,
    )
    print(format_report(result))
    if args.json_out:
        print(f"json: {Path(args.json_out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
