"""A first-order MRC estimator: one forward and backward pass over the adversarial set for all modules.

Let ``g = grad_W L`` be the gradient of the mean cross-entropy over the adversarial set. Within the ball
||dW|| <= epsilon ||W|| (Frobenius, per tensor, as the exact protocol projects) the largest loss increase
is, to first order, ``epsilon ||W|| ||g||`` (``mrc_ball``). The exact protocol, however, reaches the ball
only if its plain ascent gets there: S = epochs * ceil(N / batch_size) steps of lr * g move W by about
``S lr ||g||``. Its first-order gain is therefore ``||g|| * min(S lr ||g||, epsilon ||W||)``, which is
``mrc``: equal to the ball bound wherever the ball is reached (every Conv/Linear weight and BN bias of
the bases in docs/performance.md), and much closer to the exact value where it is not (BN weights). A
module's value is the sum over the tensors the exact protocol perturbs (``weight`` for Conv/Linear,
``weight`` and ``bias`` for BatchNorm), each with its own ball.

``robust_acc_drop`` (and ``step_loss_increase``) are measured, not estimated: every tensor of the module
is moved to that first-order end point, ``W + min(S lr ||g||, epsilon ||W||) g / ||g||``, one module at a
time, and the set is evaluated once from the module's network stage on (like the exact fast path).

``python -m rift_bn.mrc_linear compare ...`` measures the estimator against the exact protocol (rank
correlations, agreement of the k lowest, time) on one example set; ``... agree A.json B.json`` compares
runs on disjoint sets (how reproducible each estimator is); see ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from rift_bn.data import DataError
from rift_bn.models import NormalizedModel, candidate_modules, frozen
from rift_bn.models.checkpoint import CheckpointError
from rift_bn.mrc import KINDS, MRCProtocol, _ce_sum, _compose, _loss_and_acc, compute_mrc, perturbed_params

ESTIMATOR = "linear"


def _stages(model: nn.Module) -> list[nn.Module]:
    """``model.stages()`` where the network has them, else the whole model as one stage."""
    net = model.net if isinstance(model, NormalizedModel) else model
    return list(model.stages()) if hasattr(net, "stages") and hasattr(model, "stages") else [model]


def set_gradients(
    model: nn.Module, x: Tensor, y: Tensor, params: Sequence[nn.Parameter], batch_size: int
) -> tuple[list[Tensor], float, float]:
    """Gradient of the MEAN cross-entropy over the whole set w.r.t. ``params`` (float64), plus the mean
    loss and accuracy (percent). Runs in batches: per batch the gradient of ``sum CE / N`` is added,
    i.e. each batch's mean-loss gradient weighted by its size / N. The caller sets the modes and flags."""
    n = len(y)
    grads = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    total, correct = torch.zeros((), dtype=torch.float64, device=y.device), 0
    for i in range(0, n, batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with torch.enable_grad():
            logits = model(xb)
            loss = _ce_sum(logits, yb)
            batch_grads = torch.autograd.grad(loss / n, list(params))
        for acc, g in zip(grads, batch_grads, strict=True):
            acc += g.double()
        total += loss.detach().double()
        correct += int((logits.detach().argmax(1) == yb).sum())
    return grads, total.item() / n, 100.0 * correct / n


def ascent_reach(proto: MRCProtocol, n: int) -> float:
    """Path length of the protocol's plain ascent per unit gradient norm: epochs * steps per epoch * lr."""
    return proto.epochs * proto.steps(n) * proto.lr


def linear_mrc(
    model: nn.Module,
    x_adv: Tensor,
    y: Tensor,
    kinds: Sequence[str],
    proto: MRCProtocol,
    measure_step: bool = True,
) -> dict:
    """First-order MRC of every candidate of ``kinds`` from one batched pass; same shape as ``compute_mrc``.

    Rows (in ``candidate_modules`` order): ``name``, ``type``, ``mrc`` (first-order gain of the protocol's
    ascent, see the module docstring), ``mrc_ball`` (the ball bound ``epsilon ||W|| ||g||``),
    ``robust_acc_drop`` and ``step_loss_increase`` measured at the first-order end point (None with
    ``measure_step=False``), ``norms`` (``[||W||, ||g||]`` per perturbed tensor), ``estimator: "linear"``.
    The model runs in eval mode; modes, ``requires_grad`` flags and parameter values are restored.
    """
    candidates = candidate_modules(model, set(kinds))
    per_module = [perturbed_params(module, kind) for _, module, kind in candidates]
    flat = [p for params in per_module for p in params]
    eps, reach = proto.epsilon, ascent_reach(proto, len(y))
    with frozen(model):
        for p in flat:
            p.requires_grad_(True)
        flat_grads, base_loss, base_acc = set_gradients(model, x_adv, y, flat, proto.eval_batch_size)
        for p in flat:
            p.requires_grad_(False)
        grad_of = {id(p): g for p, g in zip(flat, flat_grads, strict=True)}
        steps: dict[int, Tensor] = {}  # first-order end point of the ascent, as a change of each tensor
        rows: list[dict] = []
        for (name, _, kind), params in zip(candidates, per_module, strict=True):
            norms = []
            for p in params:
                g = grad_of[id(p)]
                w_norm, g_norm = p.detach().double().norm().item(), g.norm().item()
                norms.append([w_norm, g_norm])
                length = min(reach * g_norm, eps * w_norm)
                steps[id(p)] = g * (length / g_norm) if g_norm > 0 else torch.zeros_like(g)
            rows.append(
                {
                    "name": name,
                    "type": kind,
                    "mrc": sum(g * min(reach * g, eps * w) for w, g in norms),
                    "mrc_ball": sum(eps * w * g for w, g in norms),
                    "robust_acc_drop": None,
                    "step_loss_increase": None,
                    "norms": norms,
                    "estimator": ESTIMATOR,
                }
            )
        if measure_step:
            _measure_steps(model, x_adv, y, candidates, per_module, steps, proto, base_loss, base_acc, rows)
    return {"rows": rows, "base_loss": base_loss, "base_robust_acc": base_acc}


@torch.no_grad()
def _measure_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    candidates: list[tuple[str, nn.Module, str]],
    per_module: list[list[nn.Parameter]],
    steps: dict[int, Tensor],
    proto: MRCProtocol,
    base_loss: float,
    base_acc: float,
    rows: list[dict],
) -> None:
    """Fill ``robust_acc_drop`` / ``step_loss_increase`` at W + step, one module at a time, evaluating
    from the module's stage on (the stage inputs are computed once, in forward order)."""
    stages = _stages(model)
    stage_of: dict[int, int] = {}
    for i, stage in enumerate(stages):
        for m in stage.modules():
            stage_of.setdefault(id(m), i)
    order = sorted(range(len(candidates)), key=lambda j: stage_of[id(candidates[j][1])])
    h, at, bs = x, 0, proto.eval_batch_size  # h: input of stage `at` for the whole set
    for j in order:
        i = stage_of[id(candidates[j][1])]
        while at < i:
            h = torch.cat([stages[at](h[s : s + bs]) for s in range(0, len(h), bs)])
            at += 1
        params = per_module[j]
        originals = [p.detach().clone() for p in params]
        try:
            for p in params:
                p.add_(steps[id(p)].to(p.dtype))
            loss, acc = _loss_and_acc(_compose(stages[i:]), h, y, bs)
        finally:
            for p, p0 in zip(params, originals, strict=True):
                p.copy_(p0)
        rows[j]["step_loss_increase"] = loss - base_loss if math.isfinite(loss) else None
        rows[j]["robust_acc_drop"] = base_acc - acc


# ---- comparison with the exact protocol ------------------------------------------------------------------


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


def _now(device: torch.device) -> tuple[float, float]:
    """(wall, cpu) seconds; cpu is this process's CPU time, robust to other jobs on a shared machine."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def _stamp(stamps: list, device: torch.device, name: str, done: int, total: int, verbose: bool) -> None:
    stamps.append((name, *_now(device)))
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
        t0 = _now(device)
        out = fn()
        t1 = _now(device)
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
    """Exact (``compute_mrc``) vs linear MRC on the selection split's PGD-10 examples of a base model.

    The adversarial set is made from examples ``first`` to ``first + num_examples`` of the selection split
    (default: all of it), so disjoint sets of one split can be compared (``agree``).
    ``model``/``data`` (float images in [0, 1], labels) bypass the checkpoint and the dataset (tests).
    Exact MRC runs once over the largest candidate set; a set's exact time is the base evaluation plus
    its modules' times (each module's ascent is independent of the set). The linear estimator runs per
    set, with and without the measured step (``robust_acc_drop``); its times are medians of 3 runs.
    """
    from rift_bn.attacks import PGD

    sets = {"both": ("rift", "rift_bn"), "rift": ("rift",), "rift_bn": ("rift_bn",)}[kinds]
    dev = torch.device(device)
    if model is None:
        from rift_bn.data import CIFARDataModule, to_float
        from rift_bn.models import build_model
        from rift_bn.models.checkpoint import load_into, read_state_dict

        dm = CIFARDataModule(dataset, data_root, val_size=val_size, seed=seed, download=False)
        dm.setup()
        model = build_model(model_name, dm.num_classes, width)
        load_into(model, read_state_dict(checkpoint))
        x, y = to_float(dm.val_x), dm.val_y.clone()
    else:
        assert data is not None, "compare: pass data with model"
        x, y = data
    n = num_examples or len(y) - first
    if first < 0 or n < 1 or first + n > len(y):
        raise ValueError(f"compare: examples {first}..{first + n} do not fit the {len(y)} of the split")
    x, y = x[first : first + n], y[first : first + n]
    model = model.to(dev).eval()
    x, y = x.to(dev), y.to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # as the pipeline's adversarial set
        x_adv = PGD(8 / 255, 2 / 255, 10)(model, x, y)
    # one in-order pass per epoch: the protocol of the measurements in docs/performance.md
    proto = MRCProtocol(epochs=epochs, batch_size=batch_size, seed=seed, shuffle=False, steps_per_epoch=None)

    union = tuple(sorted({k for s in sets for k in KINDS[s]}))
    stamps: list[tuple[str, float, float]] = [("", *_now(dev))]
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
            "attack": "PGD-10 eps 8/255 step 2/255",
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
            raise ValueError(f"agree: {path} is not the --json output of mrc_linear compare")
    if any(set(res["sets"]) != set(results[0]["sets"]) for res in results):
        raise ValueError("agree: the results cover different candidate sets; run compare with one --kinds")
    lines = []
    for s in results[0]["sets"]:
        tables = [{r["name"]: r for r in res["sets"][s]["rows"]} for res in results]
        names = list(tables[0])
        if any(list(t) != names for t in tables):
            raise ValueError(f"agree: the results list different {s} candidates")
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
        f"({result['settings']['num_examples']} PGD-10 examples); times: {result['clock']}",
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
    parser = argparse.ArgumentParser(prog="python -m rift_bn.mrc_linear", description=__doc__.splitlines()[0])
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
    except (ValueError, OSError, DataError, CheckpointError) as e:  # one line, exit 2, nothing written
        print(f"error: {e}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace) -> int:
    if args.command == "agree":
        print(agree(args.results))
        return 0
    if not Path(args.checkpoint).is_file():
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file; pass a base model's .pt")
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
