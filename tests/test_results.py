"""The run's record: version 2 round trip, version-1 files converted, other files refused in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from rift_bn.errors import UserError
from rift_bn.results import SCHEMA_VERSION, Experiment, Results, ResultsError, load
from tests.conftest import composed


def _config(*overrides: str) -> dict[str, Any]:
    return OmegaConf.to_container(composed("scale=cpu", *overrides), resolve=True, enum_to_str=True)  # type: ignore[return-value]


def _record(*overrides: str) -> Results:
    config = _config(*overrides)
    return Results(
        experiment=Experiment.of_run(config, "topk"),
        base={"clean_acc": 50.0, "robust_acc": 30.0, "checkpoint": "/x/base.pt"},
        final={"clean_acc": 52.5, "robust_acc": 29.0, "checkpoint": "/x/final.pt"},
        delta={"clean_acc": 2.5, "robust_acc": -1.0},
        selected=[{"name": "bn1", "type": "bn", "mrc": 0.1}],
        alpha=0.5,
        timings={"finetune": 3.0},
        config=config,
        job_key="abc",
    )


def test_a_record_round_trips_through_its_file(tmp_path: Path) -> None:
    r = _record("k=3")
    r.write(tmp_path / "results.json")
    assert load(tmp_path / "results.json") == r
    d = json.loads((tmp_path / "results.json").read_text())
    assert d["schema_version"] == SCHEMA_VERSION == 2
    assert d["experiment"] == dataclasses.asdict(r.experiment) and d["experiment"]["name"] == "topk"
    assert (d["stage"], d["method"], d["k"], d["bn_stats"], d["seed"]) == (
        "finetune",
        "rift_bn",
        3,
        "selected",
        0,
    )


def test_the_experiment_groups_runs_pooled_into_one_table() -> None:
    """Seed, k, method (and its BN statistics) are rows of one table; another setting is another
    experiment. The group is the report's experiment key."""
    from rift_bn.results import experiment_key

    group = _record().experiment.group
    assert all(_record(o).experiment.group == group for o in ("seed=3", "k=2", "method=rift"))
    assert _record("finetune.lr=0.01").experiment.group != group
    assert _record("data.root=/elsewhere", "logger=csv").experiment.group == group  # changes no number
    r = _record().to_dict()
    assert experiment_key(r) == group
    layer = Experiment.of_run(_config("method=full"), None)
    assert (layer.method, layer.k, layer.bn_stats) == ("full", None, "selected")
    base = Experiment.of_run(_config("stage=at", "k=4"), "at")
    assert (base.stage, base.method, base.k, base.bn_stats) == ("at", None, None, None)


def test_a_version_1_file_loads_as_version_2(tmp_path: Path) -> None:
    """Files written before the version field: the same keys, the identity at the top level only."""
    r = _record()
    old = {k: v for k, v in r.to_dict().items() if k not in ("schema_version", "experiment")}
    (tmp_path / "results.json").write_text(json.dumps(old))
    converted = load(tmp_path / "results.json")
    assert converted == dataclasses.replace(r, experiment=dataclasses.replace(r.experiment, name=None))
    minimal = {k: old[k] for k in ("stage", "dataset", "model", "seed", "base", "final")}  # the oldest
    assert Results.from_dict(minimal).selected == [] and Results.from_dict(minimal).experiment.k is None


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"schema_version": 3}, "schema_version=3: written by another rift_bn"),
        ({"outcome": 1}, "unknown field(s) outcome"),
        ({"final": {"clean_acc": 1.0}}, "final has no clean_acc/robust_acc"),
        ({"experiment": {"group": "g"}}, "experiment is incomplete"),
    ],
)
def test_other_files_are_refused_in_one_line(tmp_path: Path, change: dict, needle: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_record().to_dict() | change))
    with pytest.raises(ResultsError) as e:
        load(path)
    assert (
        isinstance(e.value, UserError) and str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    )
    assert needle in str(e.value)
    for text, why in (("{", "unreadable"), ("[]", "not a JSON object"), ('{"stage": "at"}', "no dataset")):
        path.write_text(text)
        with pytest.raises(ResultsError, match=why):
            load(path)
