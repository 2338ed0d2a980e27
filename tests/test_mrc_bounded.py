"""Bounded exact MRC (``mrc.exact_lowest``): the n lowest modules exactly, every other one a proven bound.

On the bench's random ResNet-18 (width 4, 32 random images; the ``critical`` fixture of conftest.py) with
a shuffled protocol whose epochs cross pass boundaries, so a resumed ascent must find the batch stream
where it stopped. Everything is compared bit for bit (CPU) with ``compute_mrc``'s full table.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rift_bn.mrc import (
    EXACT,
    KINDS,
    LOWER_BOUND,
    ModuleState,
    MRCProtocol,
    bounded_mrc,
    compute_mrc,
    lowest_proven,
    select_lowest,
)
from rift_bn.pipeline import mrc_table as stage
from rift_bn.pipeline.keys import CacheKeys
from rift_bn.pipeline.training import Timings
from tests.conftest import composed

# 4 epochs of 5 steps over 32 examples in batches of 12 (3 a pass): epochs start inside a pass
PROTO = MRCProtocol(epochs=4, batch_size=12, eval_batch_size=24, steps_per_epoch=5, shuffle=True, seed=1)


@pytest.fixture(scope="module")
def full(critical: tuple[nn.Module, Tensor, Tensor]) -> dict[str, dict]:
    """compute_mrc's full table per candidate set."""
    model, x, y = critical
    return {method: compute_mrc(model, x, y, kinds, PROTO) for method, kinds in KINDS.items()}


def _lowest(rows: list[dict], n: int) -> list[int]:
    """Indices of the n lowest rows as select_lowest orders them (MRC, ties in network order)."""
    return sorted(range(len(rows)), key=lambda i: (rows[i]["mrc"], i))[:n]


@pytest.mark.parametrize("method", ["rift", "rift_bn"])
def test_the_n_lowest_are_the_full_tables_bit_for_bit(
    critical: tuple[nn.Module, Tensor, Tensor], full: dict[str, dict], method: str
) -> None:
    model, x, y = critical
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = full[method]["rows"]
    assert all(r["status"] == EXACT and r["epochs_run"] == PROTO.epochs for r in ref)
    epochs = []
    for n in range(1, 6):
        out = bounded_mrc(model, x, y, KINDS[method], PROTO, n)
        rows = out["rows"]
        assert [r["name"] for r in rows] == [r["name"] for r in ref]
        assert out["base_loss"] == full[method]["base_loss"]
        assert out["base_robust_acc"] == full[method]["base_robust_acc"]
        low = _lowest(rows, n)
        assert low == _lowest(ref, n), n  # the same modules in the same order
        for i in low:
            assert rows[i] == ref[i]  # mrc, robust_acc_drop, epoch, status: equal floats, not close ones
        for r, f in zip(rows, ref, strict=True):
            if r["status"] == EXACT:
                assert r == f
            else:
                assert r["status"] == LOWER_BOUND and 1 <= r["epochs_run"] < PROTO.epochs
                assert r["mrc"] <= f["mrc"], r["name"]  # a bound, never above the module's MRC
        assert lowest_proven(rows, n)
        chosen = select_lowest(rows, KINDS[method], n)
        assert [r["name"] for r in chosen] == [r["name"] for r in select_lowest(ref, KINDS[method], n)]
        assert all(r["status"] == EXACT for r in chosen)
        assert set(out["states"]) == {r["name"] for r in rows if r["status"] == LOWER_BOUND}
        assert out["stats"]["epochs"] == out["stats"]["epochs_total"] == sum(r["epochs_run"] for r in rows)
        epochs.append(out["stats"]["epochs"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base is restored
    # the test means something: bounds stopped early, and less work than the full table
    assert epochs == sorted(epochs) and epochs[-1] < len(ref) * PROTO.epochs
    assert sum(r["status"] == LOWER_BOUND for r in rows) >= len(rows) // 2


def test_extending_a_partial_table_equals_computing_it_directly(
    critical: tuple[nn.Module, Tensor, Tensor], full: dict[str, dict]
) -> None:
    model, x, y = critical
    kinds = KINDS["rift_bn"]
    direct = bounded_mrc(model, x, y, kinds, PROTO, 5)
    two = bounded_mrc(model, x, y, kinds, PROTO, 2)
    exact = {r["name"]: r for r in two["rows"] if r["status"] == EXACT}
    five = bounded_mrc(model, x, y, kinds, PROTO, 5, known=exact, states=two["states"])
    assert five["rows"] == direct["rows"]
    assert two["stats"]["epochs"] + five["stats"]["epochs"] == direct["stats"]["epochs"]  # continued
    for name, s in five["states"].items():
        d = direct["states"][name]
        assert s.epochs_run == d.epochs_run and all(
            torch.equal(a, b) for a, b in zip(s.params, d.params, strict=True)
        )
    # and on to every module exact (exact_lowest=None): compute_mrc's table, with no epoch run twice
    rest = bounded_mrc(
        model,
        x,
        y,
        kinds,
        PROTO,
        None,
        {r["name"]: r for r in five["rows"] if r["status"] == EXACT},
        five["states"],
    )
    assert rest["rows"] == full["rift_bn"]["rows"] and not rest["states"]
    assert five["stats"]["epochs_total"] + rest["stats"]["epochs"] == len(rest["rows"]) * PROTO.epochs
    # the other candidate set continues the same states (its lowest differ: BN modules are not candidates)
    conv = {n: s for n, s in five["states"].items() if n in {r["name"] for r in full["rift"]["rows"]}}
    known = {r["name"]: r for r in five["rows"] if r["status"] == EXACT and r["type"] != "bn"}
    rift = bounded_mrc(model, x, y, KINDS["rift"], PROTO, 5, known, conv)
    assert rift["rows"] == bounded_mrc(model, x, y, KINDS["rift"], PROTO, 5)["rows"]


def test_a_state_survives_the_disk(critical: tuple[nn.Module, Tensor, Tensor], tmp_path: Path) -> None:
    model, x, y = critical
    names = ["layer1.0.conv1", "layer2.0.bn2", "layer3.1.conv2", "linear"]
    one = bounded_mrc(model, x, y, KINDS["rift_bn"], PROTO, 1, names=names)
    torch.save({n: s.to_dict() for n, s in one["states"].items()}, tmp_path / "s.pt")
    loaded = {
        n: ModuleState.from_dict(d) for n, d in torch.load(tmp_path / "s.pt", weights_only=True).items()
    }
    known = {r["name"]: r for r in one["rows"] if r["status"] == EXACT}
    again = bounded_mrc(model, x, y, KINDS["rift_bn"], PROTO, None, known, loaded, names=names)
    assert again["rows"] == compute_mrc(model, x, y, KINDS["rift_bn"], PROTO, names=names)["rows"]


def test_select_lowest_never_picks_a_lower_bound() -> None:
    def row(name: str, mrc: float, status: str | None = EXACT) -> dict:
        return {"name": name, "type": "conv", "mrc": mrc} | ({"status": status} if status else {})

    rows = [
        row("a", 0.5),
        row("b", 0.1, LOWER_BOUND),
        row("c", 0.3),
        row("d", 0.2, None),
        row("e", 0.9, LOWER_BOUND),
    ]
    with pytest.raises(ValueError, match=r"^k=1: b has only a lower bound"):
        select_lowest(rows, ("conv",), 1)  # b's MRC could be below 0.2: no honest answer
    rows[1] = row("b", 0.3, LOWER_BOUND)  # tie with c, but b comes first in network order: could rank first
    with pytest.raises(ValueError, match=r"^k=2: b has only a lower bound"):
        select_lowest(rows, ("conv",), 2)
    rows[1] = row("b", 0.35, LOWER_BOUND)
    assert [r["name"] for r in select_lowest(rows, ("conv",), 2)] == ["d", "c"]  # rows without status: exact
    assert [r["name"] for r in select_lowest(rows, ("conv",), 1)] == ["d"]
    with pytest.raises(ValueError, match=r"^k=3: b has only a lower bound"):
        select_lowest(rows, ("conv",), 3)  # a = 0.5 > b's bound 0.35
    with pytest.raises(ValueError, match=r"^k=4: only 3 of the 5 candidates have an exact MRC"):
        select_lowest(rows, ("conv",), 4)
    with pytest.raises(ValueError, match="status"):
        select_lowest([row("a", 0.1, "maybe")], ("conv",), 1)
    assert lowest_proven(rows, 2) and not lowest_proven(rows, 3) and not lowest_proven(rows, None)


def _run(cache: Path, *overrides: str) -> CacheKeys:
    return CacheKeys(composed("scale=cpu", *overrides), "f" * 16, cache)


def test_the_pipeline_cache_continues_a_partial_table(
    critical: tuple[nn.Module, Tensor, Tensor],
    full: dict[str, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stage.mrc_table: a table for n=2 is extended by a job with k=5, by the other candidate set, then
    completed by exact_lowest=null; each step runs only the epochs the earlier ones had not."""
    model, x, y = critical
    model, xy = copy.deepcopy(model), (x, y)  # the adversarial set: the fixture's examples
    epochs: list[str] = []
    monkeypatch.setattr(stage, "progress", lambda name, done, total: epochs.append(name))
    h = "0123456789abcdef" * 4

    def table(*overrides: str, kinds: str = "rift_bn", cache: Path = tmp_path) -> tuple[list[dict], str, int]:
        epochs.clear()
        keys = _run(cache, *overrides)
        m, where = keys.cfg.mrc, keys.mrc_path(h)
        lowest = stage.exact_lowest(m, keys.cfg.k)  # PROTO: the fixtures' protocol
        rows, source = stage.mrc_table(model, KINDS[kinds], m, PROTO, lowest, where, lambda: xy, Timings())
        return rows, source, len(epochs)  # progress: once per epoch (bounded), per module (compute_mrc)

    path = _run(tmp_path).mrc_path(h)
    state = stage.state_path(path)
    assert _run(tmp_path, "mrc.exact_lowest=2").mrc_path(h) == path  # one table, however many are exact
    two, source, ran2 = table("mrc.exact_lowest=2")
    assert source == "computed" and state.exists() and path.exists()
    assert two == bounded_mrc(model, x, y, KINDS["rift_bn"], PROTO, 2)["rows"]
    assert table("mrc.exact_lowest=2")[1:] == ("cache", 0)
    assert table("mrc.exact_lowest=1", "k=2")[1:] == ("cache", 0)  # k=2 <= the two exact rows
    five, source, ran5 = table("mrc.exact_lowest=2", "k=5")  # k above the cached exact rows: extended
    direct = bounded_mrc(model, x, y, KINDS["rift_bn"], PROTO, 5)
    assert source == "computed" and five == direct["rows"] and ran2 + ran5 == direct["stats"]["epochs"]
    rift, source, _ = table("mrc.exact_lowest=5", kinds="rift")  # the Conv/Linear set continues its rows
    assert source == "computed" and lowest_proven(rift, 5)
    assert _lowest(rift, 5) == _lowest(full["rift"]["rows"], 5)
    assert all(r == f for r, f in zip(rift, full["rift"]["rows"], strict=True) if r["status"] == EXACT)
    every, source, ran = table()  # exact_lowest=null: every module exact, from where the others stopped
    assert source == "computed" and every == full["rift_bn"]["rows"] and not state.exists()
    assert 0 < ran < len(every) * PROTO.epochs
    assert table()[1:] == ("cache", 0)
    # a lost state file costs time, never correctness: those modules start again
    other = tmp_path / "other"
    table("mrc.exact_lowest=2", cache=other)
    stage.state_path(_run(other).mrc_path(h)).unlink()
    again, source, _ = table("mrc.exact_lowest=4", cache=other)
    assert source == "computed" and again == bounded_mrc(model, x, y, KINDS["rift_bn"], PROTO, 4)["rows"]


def test_the_mrc_chart_draws_bounds_as_bounds() -> None:
    from rift_bn.report.figures import plot_mrc

    rows = [
        {
            "name": "conv1",
            "type": "conv",
            "mrc": 2.0,
            "robust_acc_drop": 1.0,
            "status": LOWER_BOUND,
            "epochs_run": 1,
        },
        {"name": "bn1", "type": "bn", "mrc": 0.1, "robust_acc_drop": 0.5, "status": EXACT, "epochs_run": 4},
        {"name": "linear", "type": "linear", "mrc": 3.0, "robust_acc_drop": 2.0},  # an older table: exact
    ]
    fig = plot_mrc({"exact": rows}, ["bn1"])
    ax_mrc, ax_drop = fig.axes[:2]
    heights = [p.get_height() for p in ax_mrc.patches]
    assert np.isnan(heights[0]) and heights[1:] == [0.1, 3.0]  # no bar for the bound
    assert np.isnan(ax_drop.patches[0].get_height())  # nor a robust-accuracy drop
    (marks,) = ax_mrc.collections  # one open triangle, at the bound
    assert marks.get_offsets().tolist() == [[0.0, 2.0]]
    assert marks.get_facecolors().size == 0 or (marks.get_facecolors()[:, 3] == 0).all()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(label.startswith("lower bound") for label in labels)
    plain = plot_mrc({"exact": rows[1:]}, ["bn1"])
    assert not plain.axes[0].collections and not any(
        t.get_text().startswith("lower bound") for t in plain.legends[0].get_texts()
    )


def test_the_report_takes_each_modules_most_complete_row() -> None:
    """Jobs of one sweep record the shared table as it stood: the chart shows a module's exact row from any
    job over a bound from the job with the largest k."""
    from rift_bn.report.build import figure_mrc

    bound = {"name": "conv1", "type": "conv", "mrc": 2.0, "robust_acc_drop": 1.0, "status": LOWER_BOUND}
    exact = {"name": "bn1", "type": "bn", "mrc": 0.1, "robust_acc_drop": 0.5, "status": EXACT}

    from rift_bn.report.collect import Run
    from rift_bn.results import Results

    acc = {"clean_acc": 50.0, "robust_acc": 25.0, "checkpoint": "base.pt"}

    def run(k: int, rows: list[dict]) -> Run:
        record = {"method": "rift_bn", "k": k, "seed": 0, "mrc": rows, "selected": [{"name": "bn1"}]} | {
            "stage": "finetune",
            "dataset": "cifar10",
            "model": "resnet18",
            "config": {"k": k},
        }
        return Run(Results.from_dict(record | {"base": acc, "final": acc}), Path(f"k{k}/results.json"))

    later = [dict(bound, mrc=2.5, status=EXACT), exact]
    fig = figure_mrc([run(2, [dict(bound, epochs_run=1), exact]), run(1, later)], "rift_bn")
    assert [p.get_height() for p in fig.axes[0].patches] == [2.5, 0.1] and not fig.axes[0].collections
    more = [dict(bound, mrc=2.2, epochs_run=2), exact]
    fig = figure_mrc([run(2, [dict(bound, epochs_run=1), exact]), run(1, more)], "rift_bn")
    assert fig.axes[0].collections[0].get_offsets().tolist() == [[0.0, 2.2]]  # the bound after more epochs
    assert np.isnan(fig.axes[0].patches[0].get_height())
