"""Distribution shift through the real entry point: corruption evaluation (eval.corruptions) on written
CIFAR-10-C / CIFAR-100-C folders, Tiny-ImageNet and CIFAR-100 end to end on written layouts, the refusal of a
missing corruption folder; and, in process, the corruption settings, cache keys, summary and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from rift_bn import cache
from rift_bn.attacks import PGD
from rift_bn.config import CORRUPTION_KEYS, NON_RESULT_KEYS, ConfigError, corruption_names, validate
from rift_bn.data import (
    ALL_CORRUPTIONS,
    DATASETS,
    RIFT_CORRUPTIONS,
    SEVERITIES,
    CIFARDataModule,
    evaluate_corruptions,
    load_cifar,
)
from rift_bn.models import build_for
from rift_bn.models.checkpoint import load_into, read_state_dict
from rift_bn.pipeline.keys import CacheKeys, _without, job_key
from rift_bn.results import Accuracy, Experiment, Results, load
from rift_bn.seeds import SeedStream, seeded
from tests.conftest import (
    CLI,
    REPO,
    composed,
    results_paths,
    write_fake_cifar10_c,
    write_fake_cifar100,
    write_fake_tiny_imagenet,
)

SMALL = ["model.width=2", "data.train_subset=300", "data.val_size=50", "data.test_subset=50"]
N_C = 10  # images per corruption and severity in the written CIFAR-10-C folder


def write_cifar_c(root: Path, folder: str, x: torch.Tensor, y: torch.Tensor, names: tuple[str, ...]) -> Path:
    """``root/folder`` (``CIFAR-10-C``, ``CIFAR-100-C``) in the official format, from the test images ``x``
    (uint8 NCHW) and labels ``y``: ``<name>.npy`` uint8 ``(5n, 32, 32, 3)``, severity-major, severity ``s``
    being ``x`` plus seeded Gaussian noise of std ``8 s`` (another draw per corruption); ``labels.npy``."""
    out = root / folder
    out.mkdir(parents=True)
    images = x.permute(0, 2, 3, 1).numpy().astype(np.float64)
    for c, name in enumerate(names):
        rng = np.random.default_rng(c)
        noisy = [images + rng.normal(0, 8 * s, images.shape) for s in SEVERITIES]
        np.save(out / f"{name}.npy", np.clip(np.concatenate(noisy), 0, 255).round().astype(np.uint8))
    np.save(out / "labels.npy", np.tile(y.numpy().astype(np.uint8), len(SEVERITIES)))
    return out


def _runs(proc: subprocess.CompletedProcess) -> list[Results]:
    return [load(p) for p in results_paths(proc)]


def _exact(value: float, images: int) -> bool:
    """``value`` is ``correct * 100 / images`` for a whole number ``correct``, exactly."""
    return value == round(value * images / 100) * 100 / images


def _as_record(acc: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    """A :meth:`CorruptionAccuracy.table` as ``results.json`` keys it (severities as strings)."""
    return {name: {str(s): v for s, v in by.items()} for name, by in acc.items()}


def _numbers(acc: Accuracy) -> dict[str, object]:
    return {k: v for k, v in acc.items() if k != "checkpoint"}


def _base_model(r: Results) -> torch.nn.Module:
    cfg = r.config
    model = build_for(DATASETS[cfg["data"]["name"]], cfg["model"]["name"], cfg["model"]["width"])
    load_into(model, read_state_dict(r.base["checkpoint"]))
    return model.eval()


# ------------------------------------------------------------------------------ settings, keys, summary


def test_corruption_settings() -> None:
    assert corruption_names(False) == () and corruption_names(True) == RIFT_CORRUPTIONS
    assert corruption_names(OmegaConf.create({"c": ["fog", "saturate"]}).c) == ("fog", "saturate")
    for bad, fragment in (
        (["fog", "rain"], "rain is unknown"),
        (["fog", "fog"], "fog is listed twice"),
        ([], "not a list"),
        ("fog", "not a list"),
        (1, "not a list"),
    ):
        with pytest.raises(ConfigError) as e:
            corruption_names(bad)
        assert str(e.value).startswith("eval.corruptions=") and fragment in str(e.value)
        assert "\n" not in str(e.value) and "glass_blur" in str(e.value)  # lists the valid names
    cfg = composed("eval.corruptions_subset=0")
    with pytest.raises(ConfigError, match=r"^eval.corruptions_subset=0: must be a whole number >= 1"):
        validate(cfg)


def test_corruption_keys() -> None:
    """Off, the corruption settings are part of no key and no experiment (those of before stay); on, they
    key the job, the report's experiment and the corruption entry, which no other setting of the eval
    section but the batch size and AutoAttack leaves alone."""
    cfg, fp = composed("scale=cpu"), "f" * 16
    keys = CacheKeys(cfg, fp, Path("cache"))
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for key in CORRUPTION_KEYS:  # the config as it was before these settings existed, keyed as then
        del plain["eval"][key.split(".")[1]]  # type: ignore[index]
    assert job_key(cfg, fp) == cache.digest(_without(plain, NON_RESULT_KEYS) | {"data_fingerprint": fp}, 24)  # type: ignore[arg-type]
    group = Experiment.of_run(plain, None).group  # type: ignore[arg-type]
    for corruptions, same in (("false", True), ("true", False), ("[fog]", False)):
        config = OmegaConf.to_container(
            composed("scale=cpu", f"eval.corruptions={corruptions}"), resolve=True, enum_to_str=True
        )
        assert (Experiment.of_run(config, None).group == group) == same, corruptions  # type: ignore[arg-type]
    for key, value in (
        ("eval.corruptions", True),
        ("eval.corruptions_subset", 9),
        ("eval.corruptions_attack", True),
    ):
        other = composed("scale=cpu", f"{key}={str(value).lower()}")
        assert CacheKeys(other, fp, Path("cache")).base_path() == keys.base_path(), key
        for split in ("val", "test"):
            assert CacheKeys(other, fp, Path("cache")).eval_path("0" * 64, split) == keys.eval_path(
                "0" * 64, split
            )
    on = composed("scale=cpu", "eval.corruptions=true")
    assert job_key(on, fp) != job_key(cfg, fp)
    path = CacheKeys(on, fp, Path("cache")).corruption_path("0" * 64, "files")
    assert path.parent == Path("cache/eval") and "-corruptions-" in path.name
    same = ("eval.batch_size=7", "eval.autoattack=true")
    other = (
        "eval.corruptions_subset=9",
        "eval.corruptions_attack=true",
        "eval.precision=bf16-mixed",
        "seed=1",
    )
    for override, changes in [(o, False) for o in same] + [(o, True) for o in other]:
        moved = CacheKeys(composed("scale=cpu", "eval.corruptions=true", override), fp, Path("cache"))
        assert (moved.corruption_path("0" * 64, "files") != path) == changes, override
    assert CacheKeys(on, fp, Path("cache")).corruption_path("0" * 64, "other files") != path
    assert CacheKeys(on, "e" * 16, Path("cache")).corruption_path("0" * 64, "files") != path


def test_summary_has_the_corruption_means() -> None:
    from rift_bn.loggers import summary_scalars

    config = OmegaConf.to_container(composed("scale=cpu"), resolve=True, enum_to_str=True)
    mean = {"base": {"clean_acc": 40.0}, "final": {"clean_acc": 42.5}, "delta": {"clean_acc": 2.5}}
    table = {"fog": {"1": 40.0}}
    r = Results(
        experiment=Experiment.of_run(config, None),  # type: ignore[arg-type]
        base={"clean_acc": 50.0, "robust_acc": 30.0, "checkpoint": "b.pt"},
        final={"clean_acc": 51.0, "robust_acc": 31.0, "checkpoint": "f.pt"},
        corruptions={"images": 4, "base": {"clean_acc": table}, "final": {"clean_acc": table}, "mean": mean},
    )
    s = summary_scalars(r)
    assert (s["corruptions/base/clean_acc"], s["corruptions/final/clean_acc"]) == (40.0, 42.5)
    assert s["corruptions/delta/clean_acc"] == 2.5
    assert not [k for k in summary_scalars(Results(r.experiment, r.base, r.final)) if "corruptions" in k]


def test_fitting_crops_with_the_data_sets_padding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Training batches are cropped after the data set's reflect padding: 8 for Tiny-ImageNet (RiFT's
    RandomCrop(64, padding=8)), 4 for CIFAR."""
    import rift_bn.modules.common as common
    from rift_bn.modules import FineTuning
    from rift_bn.modules.common import quiet_trainer

    pads: list[tuple[int, int]] = []
    augment = common.augment

    def recording(x: torch.Tensor, pad: int) -> torch.Tensor:
        pads.append((x.shape[-1], pad))
        return augment(x, pad=pad)

    monkeypatch.setattr(common, "augment", recording)
    write_fake_tiny_imagenet(tmp_path, 3, 4, 3, seed=0)
    for name, root in (
        ("tiny_imagenet", tmp_path),
        ("cifar100", write_fake_cifar100(tmp_path, 20, 4, seed=0)),
    ):
        dm = CIFARDataModule(name, root, val_size=2, batch_size=4, download=False)
        module = FineTuning(build_for(dm.spec, "resnet18", 2), PGD(steps=1), dm.num_classes)
        quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, datamodule=dm)
    assert pads == [(64, 8), (32, 4)]


def test_report_corruptions_measures_both_models_and_caches_the_base(tmp_path: Path) -> None:
    """The stage in process, with models whose predictions vary: base and final measured as
    evaluate_corruptions measures them (PGD on the CORRUPTION_EVAL stream), the base cached by its
    checkpoint hash, the base itself as the final model of stage=at, nothing with eval.corruptions=false."""
    from rift_bn.pipeline.corruption_eval import report_corruptions
    from rift_bn.pipeline.training import Timings

    write_fake_cifar10_c(tmp_path, ("fog", "snow"), 12, seed=0)
    settings = ["eval.corruptions=[fog,snow]", "eval.corruptions_subset=6", "eval.corruptions_attack=true"]
    cfg = composed(f"data.root={tmp_path}", "attack.steps=2", *settings)
    keys, cpu = CacheKeys(cfg, "f" * 16, tmp_path / "cache"), torch.device("cpu")
    torch.manual_seed(0)
    base, final, other = (nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)) for _ in range(3))
    timings = Timings()
    c = report_corruptions(cfg, keys, base, "0" * 64, final, cpu, timings)["corruptions"]
    attack = PGD.from_config(cfg.attack)
    for name, model in (("base", base), ("final", final)):
        with seeded(cfg.seed, SeedStream.CORRUPTION_EVAL):
            direct = evaluate_corruptions(
                model, tmp_path, "cifar10", ("fog", "snow"), SEVERITIES, 6, attack=attack
            )
        for metric in ("clean_acc", "robust_acc"):
            assert c[name][metric] == _as_record(direct.table(metric))
            assert c["mean"][name][metric] == direct.mean(metric)
        assert len({v for by in direct.table().values() for v in by.values()}) > 1  # the numbers vary
    assert c["mean"]["delta"] == {m: c["mean"]["final"][m] - c["mean"]["base"][m] for m in c["mean"]["base"]}
    assert c["images"] == 6 and "corruption_eval" in timings
    (entry,) = (tmp_path / "cache" / "eval").glob("*-corruptions-*.json")
    again = report_corruptions(cfg, keys, other, "0" * 64, other, cpu, Timings())["corruptions"]
    assert again["base"] == again["final"] == c["base"]  # the base of this checkpoint hash: from the cache
    assert again["mean"]["delta"] == {"clean_acc": 0.0, "robust_acc": 0.0}
    assert report_corruptions(composed(), keys, base, "0" * 64, final, cpu, Timings()) == {}


# ------------------------------------------------------------------------------ through the entry point


@pytest.mark.slow
def test_corruption_evaluation_end_to_end(tmp_path: Path, cifar_root: Path) -> None:
    """eval.corruptions=true on a written CIFAR-10-C folder: every corruption and severity of base and final
    model as exact fractions, their means, the base equal to a direct evaluation of its checkpoint, the
    means in the logger's summary; and the same selection, alpha* and test numbers as without it."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-batches-py").symlink_to(cifar_root / "cifar-10-batches-py")
    _, _, test_x, test_y = load_cifar("cifar10", cifar_root, download=False)
    write_cifar_c(root, "CIFAR-10-C", test_x[:20], test_y[:20], ALL_CORRUPTIONS)
    cli = CLI(tmp_path, root)
    overrides = [*SMALL, f"eval.corruptions_subset={N_C}", "method=rift_bn", "eval.corruptions=true,false"]
    paths = {load(p).corruptions is not None: p for p in results_paths(cli(*overrides, multirun=True))}
    path, r, twin = paths[True], load(paths[True]), load(paths[False])  # with and without corruptions
    c = r.corruptions
    assert c is not None and twin.corruptions is None
    assert c["images"] == N_C and set(c) == {"images", "base", "final", "mean"}
    for model in ("base", "final"):
        assert list(c[model]) == ["clean_acc"]  # no PGD unless eval.corruptions_attack
        table = c[model]["clean_acc"]
        assert list(table) == list(RIFT_CORRUPTIONS) and "glass_blur" not in table
        assert all(list(by) == ["1", "2", "3", "4", "5"] for by in table.values())
        values = [v for by in table.values() for v in by.values()]
        assert len(values) == 18 * 5 and all(_exact(v, N_C) for v in values)
        assert c["mean"][model]["clean_acc"] == pytest.approx(sum(values) / len(values), abs=1e-12)
    assert c["mean"]["delta"]["clean_acc"] == c["mean"]["final"]["clean_acc"] - c["mean"]["base"]["clean_acc"]
    # nothing is chosen on the corrupted images: the job without them selected, interpolated and tested alike
    assert (r.selected, r.alpha, r.interpolation) == (twin.selected, twin.alpha, twin.interpolation)
    for which in ("base", "final"):  # (each job saves its own final.pt)
        assert _numbers(getattr(r, which)) == _numbers(getattr(twin, which))
    assert "corruption_eval" in r.timings and "corruption_eval" not in twin.timings
    assert len(list((cli.cache / "eval").glob("*-corruptions-*.json"))) == 1  # the base's, for later jobs
    # the tiny base predicts nearly one class, so its numbers barely vary (the in-process test above has a
    # model whose do); this checks the files, corruptions, severities and images the run measured
    direct = evaluate_corruptions(_base_model(r), root, "cifar10", RIFT_CORRUPTIONS, SEVERITIES, N_C)
    assert c["base"]["clean_acc"] == _as_record(direct.table())
    summary = pd.read_csv(path.parent / "csv-finetune" / "version_0" / "metrics.csv").iloc[-1]  # logger=csv
    assert summary["corruptions/final/clean_acc"] == pytest.approx(c["mean"]["final"]["clean_acc"])


@pytest.mark.slow
def test_missing_corruption_folder_is_a_one_line_error(tmp_path: Path, cifar_root: Path) -> None:
    cli = CLI(tmp_path, cifar_root)
    proc = cli("eval.corruptions=true", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    expected = cifar_root.resolve() / "CIFAR-10-C"
    assert lines[0].startswith("error: eval.corruptions=true: ") and str(expected) in lines[0]
    assert "https://zenodo.org/records/2535967" in lines[0]
    assert not (tmp_path / "out1").exists() and not cli.cache.exists()


@pytest.mark.slow
def test_tiny_imagenet_topk_end_to_end(tmp_path: Path) -> None:
    """+experiment=topk data=tiny_imagenet on a written layout: adversarial training, MRC, fine-tuning and
    the report, a 200-class head on 64x64 inputs."""
    write_fake_tiny_imagenet(tmp_path / "data", n_classes=10, per_class_train=10, n_val=20, seed=0)
    cli = CLI(tmp_path, tmp_path / "data")
    sizes = ["model.width=2", "data.val_size=20", "data.train_subset=null", "data.test_subset=null"]
    proc = cli("+experiment=topk", "data=tiny_imagenet", "k=1", *sizes, multirun=True)
    runs = _runs(proc)
    assert sorted(r.experiment.method for r in runs) == ["rift", "rift_bn"]  # type: ignore[type-var]
    for r in runs:
        assert (r.experiment.dataset, r.test_size, r.selection_size) == ("tiny_imagenet", 20, 20)
        assert len(r.selected) == 1 and r.mrc and r.interpolation and r.alpha is not None
        assert r.test_split_reads_before_report == 0
        for which in ("base", "final"):
            model = build_for(DATASETS["tiny_imagenet"], "resnet18", 2)
            load_into(
                model, read_state_dict(r.base["checkpoint"] if which == "base" else r.final["checkpoint"])
            )
            assert model(torch.rand(2, 3, 64, 64)).shape == (2, 200)
            assert model.net.linear.in_features == 8 * 2 * 4  # 64x64: a 2x2 map of 8 x width channels
    assert len({json.dumps(r.base) for r in runs}) == 1
    _report(proc.out_dir, "table1.md")


@pytest.mark.slow
def test_cifar100_end_to_end_with_corruptions(tmp_path: Path) -> None:
    """CIFAR-100 (written official layout, 100 classes, fine labels) through every stage, with PGD on two
    CIFAR-100-C corruptions; then the report with its corruption table and heatmap."""
    root = write_fake_cifar100(tmp_path / "data", 300, 60, seed=0)
    dm = CIFARDataModule("cifar100", root, val_size=50, test_subset=40, download=False)
    dm.setup()
    write_cifar_c(root, "CIFAR-100-C", *dm.test_tensors(), ("fog", "snow"))
    cli = CLI(tmp_path, root)
    c_settings = ["eval.corruptions=[fog,snow]", "eval.corruptions_subset=4", "eval.corruptions_attack=true"]
    proc = cli(
        *SMALL, "data.test_subset=40", "+experiment=topk", "data=cifar100", "method=rift_bn", *c_settings
    )
    (r,) = _runs(proc)
    assert (r.experiment.dataset, r.test_size, r.experiment.method) == ("cifar100", 40, "rift_bn")
    assert len(r.selected) == 1 and r.mrc_source == "computed" and r.interpolation
    model = _base_model(r)
    assert model.net.linear.out_features == 100
    c = r.corruptions
    assert c is not None and c["images"] == 4 and list(c["base"]["clean_acc"]) == ["fog", "snow"]
    assert set(c["base"]) == set(c["final"]) == {"clean_acc", "robust_acc"}
    attack = PGD.from_config(OmegaConf.create(r.config).attack)
    with seeded(r.config["seed"], SeedStream.CORRUPTION_EVAL):
        direct = evaluate_corruptions(model, root, "cifar100", ("fog", "snow"), SEVERITIES, 4, attack=attack)
    for metric in ("clean_acc", "robust_acc"):
        assert c["base"][metric] == _as_record(direct.table(metric))
        assert c["mean"]["base"][metric] == direct.mean(metric)
    report = _report(proc.out_dir, "corruptions.md")
    text = (report / "corruptions.md").read_text()
    assert "CIFAR-100" in text and "2 corruptions x 5 severities, 4 images each." in text
    assert (report / "fig_corruptions_cifar100.png").is_file()


def _report(folder: Path, expected: str) -> Path:
    """``python -m rift_bn.report folder`` (no Figure 3, no W&B); its report folder, holding ``expected``."""
    proc = subprocess.run(
        [sys.executable, "-m", "rift_bn.report", str(folder), "--no-kde", "--no-wandb"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (folder / "report" / expected).is_file(), proc.stdout
    return folder / "report"


# ------------------------------------------------------------------------------ the report


def _fake_run(folder: Path, method: str, seed: int, corruptions: bool = True) -> None:
    """A finished rift/rift_bn k=1 run's record in ``folder``: base corruption accuracy ``60 - 10 s + 5 i +
    seed`` at severity ``s`` of corruption ``i`` (fog, snow), final = base + ``shift`` (1 for RiFT, 2 for
    RiFT with BN) + seed; test accuracies alike."""
    overrides = [f"method={method}", f"seed={seed}", "eval.corruptions=[fog,snow]"]
    config = OmegaConf.to_container(composed("scale=cpu", *overrides), resolve=True, enum_to_str=True)
    shift = {"rift": 1.0, "rift_bn": 2.0}[method] + seed
    base = {
        n: {str(s): 60.0 - 10 * s + 5 * i + seed for s in SEVERITIES} for i, n in enumerate(("fog", "snow"))
    }
    final = {n: {s: v + shift for s, v in by.items()} for n, by in base.items()}
    mean = {"base": {"clean_acc": 32.5 + seed}, "final": {"clean_acc": 32.5 + seed + shift}}
    record = Results(
        experiment=Experiment.of_run(config, "topk"),  # type: ignore[arg-type]
        base={"clean_acc": 50.0 + seed, "robust_acc": 30.0, "checkpoint": f"/x/base{seed}.pt"},
        final={"clean_acc": 50.0 + seed + shift, "robust_acc": 30.0, "checkpoint": f"/x/{method}{seed}.pt"},
        delta={"clean_acc": shift, "robust_acc": 0.0},
        config=config,  # type: ignore[arg-type]
        corruptions={
            "images": 20,
            "base": {"clean_acc": base},
            "final": {"clean_acc": final},
            "mean": mean | {"delta": {"clean_acc": shift}},
        }
        if corruptions
        else None,
    )
    record.write(folder / "results.json")


def test_report_corruption_table_and_heatmap(tmp_path: Path) -> None:
    from matplotlib.axes import Axes

    from rift_bn.report.build import make_report
    from rift_bn.report.collect import load_runs
    from rift_bn.report.corruptions import corruption_table, figure_corruptions, to_markdown

    sweep = tmp_path / "sweep"
    for i, (method, seed) in enumerate((m, s) for m in ("rift", "rift_bn") for s in (0, 1)):
        _fake_run(sweep / str(i), method, seed)
    runs = load_runs([sweep], log=lambda _: None)
    t = corruption_table(runs)
    assert list(t["method"]) == ["base", "rift", "rift_bn"] and list(t["n"]) == [2, 2, 2]
    base, rift, rift_bn = (t.iloc[i] for i in range(3))
    assert base["clean_acc_mean"] == 33.0 and base["clean_acc_std"] == pytest.approx(np.sqrt(0.5))
    assert np.isnan(base["delta_clean_acc_mean"])
    assert (rift["clean_acc_mean"], rift["delta_clean_acc_mean"]) == (34.5, 1.5)  # seeds: +1, +2
    assert rift["delta_clean_acc_std"] == pytest.approx(np.sqrt(0.5)) and rift["k"] == 1
    assert (rift_bn["clean_acc_mean"], rift_bn["delta_clean_acc_mean"]) == (35.5, 2.5)
    assert "robust_acc_mean" not in t  # no eval.corruptions_attack
    text = to_markdown(t)
    assert "2 corruptions x 5 severities, 20 images each." in text
    assert "| Top 1 | RiFT | 34.50 ± 1.41 | +1.50 ± 0.71 | 2 |" in text
    assert "|  | Base (AT) | 33.00 ± 0.71 | – | 2 |" in text

    fig = figure_corruptions(runs, "title")
    assert fig is not None and fig._suptitle.get_text() == "title"
    panels = [ax for ax in fig.axes if isinstance(ax, Axes) and ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "Base (AT)\nn=2",
        "Δ RiFT\nk=1, n=2",
        "Δ RiFT with BN\nk=1, n=2",
    ]
    cells = [[float(txt.get_text()) for txt in ax.texts] for ax in panels]
    assert len(cells[0]) == 10  # 2 corruptions x 5 severities
    assert cells[0][:5] == [50.5, 40.5, 30.5, 20.5, 10.5]  # fog, severities 1-5: base mean over seeds
    assert cells[1] == [1.5] * 10 and cells[2] == [2.5] * 10  # deltas, mean over seeds
    assert [label.get_text() for label in panels[0].get_yticklabels()] == ["fog", "snow"]

    # through the report: corruptions.md/.csv and the heatmap beside Table 1; runs without corruption
    # results add nothing (another experiment: eval.corruptions differs)
    _fake_run(tmp_path / "other" / "0", "rift", 0, corruptions=False)
    report = make_report([sweep, tmp_path / "other"], kde=False, wandb=False, log=lambda _: None)
    assert {"corruptions.md", "corruptions.csv"} <= {f.name for f in report.files}
    stems = [s for s in report.figures if s.startswith("fig_corruptions")]
    assert len(stems) == 1 and (report.out / f"{stems[0]}.png").is_file()
    assert pd.read_csv(report.out / "corruptions.csv")["method"].tolist() == ["base", "rift", "rift_bn"]
    only_other = make_report([tmp_path / "other"], out=tmp_path / "r2", kde=False, wandb=False, log=print)
    assert not [f for f in only_other.files if "corruptions" in f.name]
    assert not [s for s in [*only_other.figures, *only_other.skipped] if "corruptions" in s]
