"""First-order MRC estimator: analytic value, candidate table, cache separation, agreement with exact MRC
(the harness ``benchmarks.mrc_agreement``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from benchmarks.mrc_agreement import agreement, compare, main
from rift_bn.errors import UserError
from rift_bn.models import NormalizedModel, build_model, candidate_modules
from rift_bn.mrc import KINDS, MRCProtocol, compute_mrc
from rift_bn.mrc_linear import linear_mrc
from tests.conftest import StagedConvBN, TinyConvBN


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine more threads oversubscribe and run far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyLinear(nn.Module):
    """A single Linear layer on flattened 3x2x2 images, with ``stages()`` like the real networks."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(x))

    def stages(self) -> list[nn.Module]:
        return [self.flatten, self.fc]


def _tiny_linear(seed: int = 0) -> tuple[NormalizedModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = NormalizedModel(TinyLinear()).double()
    with torch.no_grad():
        model.net.fc.weight.normal_(0, 1.0)
        model.net.fc.bias.normal_(0, 0.5)
    x = torch.rand(10, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, x, y


def test_linear_layer_matches_hand_computed_bound_and_step() -> None:
    model, x, y = _tiny_linear()
    # 10 examples, evaluated in batches 4, 4, 2; lr so large that the ascent reaches the ball
    proto = MRCProtocol(epsilon=0.2, lr=100.0, eval_batch_size=4)
    out = linear_mrc(model, x, y, KINDS["rift"], proto)

    # by hand: z = normalised, flattened input; d mean-CE / dW = (softmax - onehot)^T z / N
    z = ((x - model.normalize.mean) / model.normalize.std).flatten(1)
    w, b = model.net.fc.weight.detach(), model.net.fc.bias.detach()
    p = torch.softmax(z @ w.T + b, dim=1)
    onehot = F.one_hot(y, 3).double()
    grad = (p - onehot).T @ z / len(y)
    ball = 0.2 * w.norm() * grad.norm()
    base_loss = -(onehot * p.log()).sum(1).mean()
    base_acc = 100.0 * ((z @ w.T + b).argmax(1) == y).double().mean()

    (row,) = out["rows"]
    assert row["name"] == "fc" and row["type"] == "linear" and row["estimator"] == "linear"
    assert 10 * 100.0 * grad.norm() > 0.2 * w.norm()  # the protocol's ascent reaches the ball
    assert row["mrc_ball"] == pytest.approx(ball.item(), abs=1e-6, rel=1e-9)
    assert row["mrc"] == pytest.approx(ball.item(), abs=1e-6, rel=1e-9)
    assert row["norms"] == [pytest.approx([w.norm().item(), grad.norm().item()], rel=1e-9)]
    assert out["base_loss"] == pytest.approx(base_loss.item(), abs=1e-9)
    assert out["base_robust_acc"] == pytest.approx(base_acc.item())

    w_step = w + 0.2 * w.norm() * grad / grad.norm()
    logits = z @ w_step.T + b
    step_acc = 100.0 * (logits.argmax(1) == y).double().mean()
    assert row["robust_acc_drop"] == pytest.approx((base_acc - step_acc).item())
    assert row["step_loss_increase"] == pytest.approx(
        (F.cross_entropy(logits, y) - base_loss).item(), abs=1e-6
    )
    assert torch.equal(model.net.fc.weight, w)  # restored

    # a short ascent (2 epochs of 2 batches, lr 0.01) stops inside the ball: gain ||g|| * 4 * 0.01 * ||g||
    short = MRCProtocol(epsilon=0.2, lr=0.01, epochs=2, batch_size=5, eval_batch_size=3, steps_per_epoch=None)
    (row,) = linear_mrc(model, x, y, KINDS["rift"], short, measure_step=False)["rows"]
    assert 4 * 0.01 * grad.norm() < 0.2 * w.norm()
    assert row["mrc"] == pytest.approx((4 * 0.01 * grad.norm() ** 2).item(), abs=1e-9)
    assert row["mrc_ball"] == pytest.approx(ball.item(), abs=1e-6, rel=1e-9)
    assert row["robust_acc_drop"] is None and row["step_loss_increase"] is None


def test_bn_sums_weight_and_bias_balls_and_restores_state() -> None:
    torch.manual_seed(1)
    model = NormalizedModel(TinyConvBN()).double()
    with torch.no_grad():
        model.net.bn.weight.uniform_(0.5, 1.5)
        model.net.bn.bias.normal_(0, 0.3)
        model.net.bn.running_mean.normal_(0, 0.2)
    x, y = torch.rand(12, 3, 4, 4, dtype=torch.float64), torch.randint(0, 5, (12,))
    model.train()
    model.net.fc.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}

    proto = MRCProtocol(epsilon=0.1, lr=0.5, eval_batch_size=5)
    out = linear_mrc(model, x, y, KINDS["rift_bn"], proto)

    assert [r["name"] for r in out["rows"]] == ["conv", "bn", "fc"]
    ref = NormalizedModel(TinyConvBN()).double().eval()
    ref.load_state_dict(before)
    params = {n: p for n, p in ref.net.named_parameters()}
    loss = F.cross_entropy(ref(x), y)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))

    def ball(*names: str) -> float:
        return sum(0.1 * params[n].norm().item() * grads[n].norm().item() for n in names)

    def gain(*names: str) -> float:  # 10 epochs x 1 batch x lr 0.5 = reach 5
        return sum(
            grads[n].norm().item() * min(5 * grads[n].norm().item(), 0.1 * params[n].norm().item())
            for n in names
        )

    rows = {r["name"]: r for r in out["rows"]}
    for name, tensors in {
        "bn": ("bn.weight", "bn.bias"),
        "conv": ("conv.weight",),
        "fc": ("fc.weight",),
    }.items():
        assert rows[name]["mrc_ball"] == pytest.approx(ball(*tensors), abs=1e-9)  # fc: weight only, as exact
        assert rows[name]["mrc"] == pytest.approx(gain(*tensors), abs=1e-9)
    assert model.training and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def tiny_resnet() -> dict:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4).eval()
    x, y = torch.rand(24, 3, 32, 32), torch.randint(0, 10, (24,))
    proto = MRCProtocol(epochs=2, batch_size=16)
    return {
        "model": model,
        "x": x,
        "y": y,
        "proto": proto,
        "exact": compute_mrc(model, x, y, KINDS["rift_bn"], proto),
    }


@pytest.mark.parametrize("method", ["rift", "rift_bn"])
def test_table_has_exactly_the_exact_candidates(tiny_resnet: dict, method: str) -> None:
    t = tiny_resnet
    lin = linear_mrc(t["model"], t["x"], t["y"], KINDS[method], t["proto"])
    exact_rows = [r for r in t["exact"]["rows"] if r["type"] in KINDS[method]]
    expected = [(n, k) for n, _, k in candidate_modules(t["model"], set(KINDS[method]))]
    assert (
        [(r["name"], r["type"]) for r in lin["rows"]]
        == [(r["name"], r["type"]) for r in exact_rows]
        == expected
    )
    assert lin["base_loss"] == pytest.approx(t["exact"]["base_loss"], abs=1e-5)
    assert lin["base_robust_acc"] == t["exact"]["base_robust_acc"]
    assert all(
        r["estimator"] == "linear" and r["mrc"] >= 0 and math.isfinite(r["robust_acc_drop"])
        for r in lin["rows"]
    )


def test_ranking_correlates_with_exact(tiny_resnet: dict) -> None:
    t = tiny_resnet
    lin = linear_mrc(t["model"], t["x"], t["y"], KINDS["rift_bn"], t["proto"], measure_step=False)
    assert all(r["robust_acc_drop"] is None for r in lin["rows"])
    both = agreement(t["exact"]["rows"], lin["rows"])
    conv = agreement(*[[r for r in rows if r["type"] != "bn"] for rows in (t["exact"]["rows"], lin["rows"])])
    assert both["spearman"] > 0.5 and conv["spearman"] > 0.5  # sanity, not the target
    assert [k["k"] for k in both["topk"]] == [1, 2, 3, 4, 5]


def _table(tmp_path: Path, estimator: str, x: torch.Tensor, y: torch.Tensor, linear_step: bool = True):
    """The pipeline's MRC table stage for ``estimator`` on the adversarial set ``(x, y)`` of base "ab"*32."""
    from rift_bn.pipeline.keys import CacheKeys
    from rift_bn.pipeline.mrc_table import mrc_table, protocol
    from rift_bn.pipeline.training import Timings

    cfg = OmegaConf.create(
        {
            "seed": 0,
            "data": {"name": "cifar10", "val_size": 10, "selection_source": "train_holdout"},
            "attack": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10, "random_start": True},
            "mrc": {
                "estimator": estimator,
                "linear_step": linear_step,
                "epsilon": 0.1,
                "epochs": 2,
                "lr": 1.0,
                "batch_size": 8,
                "num_examples": None,
                "shuffle": False,
                "steps_per_epoch": None,
                "exact_lowest": None,
            },
        }
    )
    model = _tiny_linear()[0].float()
    path = CacheKeys(cfg, "f" * 16, tmp_path / "cache").mrc_path("ab" * 32)
    m = cfg.mrc
    return mrc_table(
        model, ("conv", "linear"), m, protocol(m, cfg.seed), None, path, lambda: (x, y), Timings()
    )


def test_pipeline_cache_keeps_estimators_apart(tmp_path: Path) -> None:
    _, x, y = _tiny_linear()
    x = x.float()
    tables = {}
    for estimator in ("exact", "linear", "linear"):
        rows, source = _table(tmp_path, estimator, x, y)
        tables.setdefault(estimator, []).append((rows, source))
    files = sorted(p.name for p in (tmp_path / "cache" / "mrc").glob("*.json"))
    assert len(files) == 2 and "-exact-" in files[0] and "-linear-" in files[1]
    ((exact_rows, exact_source),) = tables["exact"]
    (lin_rows, lin_source), (lin_again, again_source) = tables["linear"]
    assert (exact_source, lin_source, again_source) == ("computed", "computed", "cache")
    assert "estimator" not in exact_rows[0] and lin_rows[0]["estimator"] == "linear"
    assert lin_again == lin_rows and exact_rows[0]["mrc"] != lin_rows[0]["mrc"]
    assert all(math.isfinite(r["robust_acc_drop"]) for r in lin_rows)

    # mrc.linear_step=false: the same estimate without the measured step, in a table of its own
    bound_rows, bound_source = _table(tmp_path, "linear", x, y, linear_step=False)
    assert bound_source == "computed" and len(list((tmp_path / "cache" / "mrc").glob("*.json"))) == 3
    assert [r["mrc"] for r in bound_rows] == [r["mrc"] for r in lin_rows]
    assert all(r["robust_acc_drop"] is None and r["step_loss_increase"] is None for r in bound_rows)


def test_compare_reports_both_sets(tmp_path: Path) -> None:
    model, x, y = _tiny_linear()
    out = compare(
        None,
        "",
        model=model.float(),
        data=(x.float(), y),
        epochs=1,
        kinds="both",
        json_out=tmp_path / "cmp.json",
    )
    assert set(out["sets"]) == {"rift", "rift_bn"} and (tmp_path / "cmp.json").exists()
    entry = out["sets"]["rift"]
    assert entry["n"] == 1 and entry["topk"][0]["same_set"] and entry["speedup"] > 0


def test_compare_on_disjoint_example_sets_and_agree(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = NormalizedModel(StagedConvBN()).eval()
    x, y = torch.rand(12, 3, 4, 4), torch.randint(0, 5, (12,))
    runs = {}
    for name, first in (("a", 0), ("b", 6), ("a_again", 0)):
        path = tmp_path / f"{name}.json"
        runs[name] = compare(
            None,
            "",
            model=model,
            data=(x, y),
            first=first,
            num_examples=6,
            epochs=2,
            kinds="rift_bn",
            json_out=path,
        )
        assert runs[name]["settings"]["first"] == first and runs[name]["settings"]["num_examples"] == 6
    exact = {k: [r["exact"] for r in v["sets"]["rift_bn"]["rows"]] for k, v in runs.items()}
    assert exact["a"] == exact["a_again"] and exact["a"] != exact["b"]  # the offset picks other examples
    assert main(["agree", *(str(tmp_path / f"{k}.json") for k in ("a", "a_again"))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "rift_bn (3 candidates, 2 example sets): spearman / kendall"
    assert lines[1].startswith("  exact ") and lines[1].endswith(": 1.000 / 1.000")
    assert lines[2].startswith("  linear ") and lines[2].endswith(": 1.000 / 1.000")
    with pytest.raises(UserError, match="do not fit"):
        compare(None, "", model=model, data=(x, y), first=10, num_examples=6, kinds="rift")


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [{"name": n, "exact": 1.0, "linear": 2.0} for n in ("a", "b")]
    for name, kinds in (("rift", "rift"), ("both", "rift_bn")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"sets": {kinds: {"rows": rows}}}))
    (tmp_path / "other.json").write_text(json.dumps({"stage": "finetune"}))  # e.g. a results.json
    cases = [
        (["agree", str(tmp_path / "rift.json"), str(tmp_path / "both.json")], "different candidate sets"),
        (["agree", str(tmp_path / "rift.json"), str(tmp_path / "missing.json")], "missing.json"),
        (["agree", str(tmp_path / "rift.json"), str(tmp_path / "other.json")], "not the --json output"),
        (["compare", "--checkpoint", str(tmp_path / "no.pt"), "--data-root", str(tmp_path)], "--checkpoint"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err
    assert not (tmp_path / "cmp.json").exists()
