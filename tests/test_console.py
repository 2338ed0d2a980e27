"""What the console says: sweeps need -m, each job's summary (skipped ones too), a sweep's table, run.log,
no noise (W&B, Lightning), the --help page, nearest-key hints, checkpoint errors, no folder left by a
refused job. Messages are checked in process; the entry point runs once per exit path (--help, a job's
UserError, a finished sweep; precheck's refusal in test_validation.py)."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from rift_bn.console import console_log, remove_unused_output
from rift_bn.loggers import make_logger, wandb_mode
from rift_bn.models.checkpoint import CheckpointError, read_state_dict
from rift_bn.precheck import CONF_DIR, precheck, suggest
from rift_bn.report.summary import SweepSummary, format_summary, format_sweep
from rift_bn.results import Results
from tests.conftest import CLI, composed, load_results

# ------------------------------------------------------------------------------- 3. sweeps need -m


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (
            ["+experiment=topk", "k=1"],
            ["+experiment=topk", "method=rift,rift_bn", "data=cifar10,cifar100", "add -m"],
        ),
        (["+experiment=topk", "data=cifar10", "k=1"], ["method=rift,rift_bn", "add -m"]),
        (["+experiment=layer_types"], ["method=full,bn_only,conv_linear_only", "add -m"]),
        (["k=1,2"], ["k=1,2", "add -m"]),
        (["+experiment=topk", "data=cifar10", "seed=0,1"], ["seed=0,1", "add -m"]),
    ],
)
def test_a_sweep_without_multirun_is_refused_in_one_line(argv: list[str], needles: list[str]) -> None:
    msg = precheck(argv)
    assert msg and "\n" not in msg and all(n in msg for n in needles), msg


@pytest.mark.parametrize(
    "argv",
    [
        ["+experiment=topk", "method=rift", "data=cifar10", "k=1"],  # every swept key fixed: one job
        ["+experiment=at"],
        ["-m", "+experiment=topk", "k=1"],
        ["--multirun", "k=1,2"],
    ],
)
def test_one_job_or_a_multirun_passes(argv: list[str]) -> None:
    assert precheck(argv) is None


# --------------------------------------------------------------------------- 6. nearest key, help


@pytest.mark.parametrize(
    ("argv", "near"),
    [
        (["mrc.epoch=3"], "mrc.epochs"),
        (["at.epoch=3"], "at.epochs"),
        (["trainer.devics=2"], "trainer.devices"),
        (["methd=rift"], "method"),
        (["-m", "finetune.lrr=0.1,0.2"], "finetune.lr"),
    ],
)
def test_misspelt_key_names_the_nearest_valid_one(argv: list[str], near: str) -> None:
    msg = precheck(argv)
    assert msg and "\n" not in msg and f"did you mean {near}?" in msg, msg


def test_no_suggestion_when_nothing_is_close() -> None:
    assert suggest("zzz.qqq", ["mrc.epochs", "k"]) is None
    msg = precheck(["frobnicate=1"])
    assert msg and "did you mean" not in msg and "spelling" in msg


def test_help_is_a_rift_bn_page(tmp_path: Path) -> None:
    proc = CLI(tmp_path, None)("--help", tiny=False)
    text = proc.stdout
    for needle in (
        "rift_bn: RiFT with BN",
        "+experiment",
        "topk",
        "layer_types",
        "Examples:",
        "scale=",
        "-m",
    ):
        assert needle in text, needle
    assert "powered by Hydra" not in text and "== Config ==" not in text and "mrc:\n" not in text
    assert len(text.splitlines()) < 60


# -------------------------------------------------------------------------- 6. checkpoint errors


@pytest.mark.parametrize("content", ["some notes\n1. first\n2. second\n", "hello world\n"])
def test_a_text_file_as_checkpoint_says_what_a_checkpoint_is(tmp_path: Path, content: str) -> None:
    path = tmp_path / "notes.txt"
    path.write_text(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert "\n" not in msg and "torch.save" in msg and "state_dict" in msg and "Lightning" in msg, msg


# --------------------------------------------------------------------------- 4/5. console summary


def _result(method: str | None, k: int | None, selected: list[dict], **extra: object) -> dict:
    selection = "all" if method in ("full", "bn_only", "conv_linear_only") else "mrc"
    return {
        "stage": "finetune" if method else "at",
        "dataset": "cifar10",
        "model": "resnet18",
        "width": 8,
        "method": method,
        "k": k,
        "bn_stats": "selected" if method else None,
        "seed": 0,
        "base": {"clean_acc": 50.0, "robust_acc": 30.0, "checkpoint": "/x/base.pt"},
        "final": {"clean_acc": 52.5, "robust_acc": 29.0, "checkpoint": "/x/final.pt"},
        "delta": {"clean_acc": 2.5, "robust_acc": -1.0},
        "selected": selected,
        "mrc_source": "computed" if selection == "mrc" and method else None,
        "alpha": 0.7 if method else None,
        "test_size": 100,
        "timings": {"finetune": 3.0},
        "config": {"method": {"selection": selection}},
        **extra,
    }


def test_layer_type_summary_counts_modules_and_has_no_mrc_line() -> None:
    selected = [{"name": f"m{i}", "type": t} for i, t in enumerate(["conv"] * 20 + ["bn"] * 20 + ["linear"])]
    text = format_summary(Results.from_dict(_result("full", None, selected)))
    assert "selected: all 41 modules (20 conv, 1 linear, 20 bn)" in text
    assert "mrc:" not in text and "None" not in text and "m17" not in text

    bn1 = [{"name": "layer1.0.bn1", "type": "bn", "mrc": 0.25}]
    rift = format_summary(Results.from_dict(_result("rift_bn", 1, bn1)))
    assert "selected: layer1.0.bn1 (bn, mrc 0.2500)" in rift and "mrc: computed" in rift


def _sweep(root: Path) -> Path:
    jobs = [
        _result("rift", 1, [{"name": "conv1", "type": "conv", "mrc": 0.1}]),
        _result("rift_bn", 2, [{"name": "bn1", "type": "bn", "mrc": 0.05}], bn_stats="all"),
        _result("bn_only", None, [{"name": "bn1", "type": "bn"}]),
        _result(None, None, []),
    ]
    for i, r in enumerate(jobs):
        (root / str(i) / ".hydra").mkdir(parents=True)
        (root / str(i) / "results.json").write_text(json.dumps(r))
    (root / "10" / ".hydra").mkdir(parents=True)  # a failed job, numbered after 9 (not after 1)
    (root / ".submitit").mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_sweep_table_lists_every_job_and_the_report_command(tmp_path: Path) -> None:
    text = format_sweep(_sweep(tmp_path / "sweep"))
    lines = text.splitlines()
    assert lines[0].endswith("4 job(s) with results, 1 without")
    header = lines[1].split()
    assert header[:6] == ["job", "data", "method", "k", "bn_stats", "seed"] and "alpha*" in header
    rows = [line.split() for line in lines[2:6]]
    assert rows[0] == [
        "0",
        "cifar10",
        "rift",
        "1",
        "selected",
        "0",
        "52.50",
        "29.00",
        "+2.50",
        "-1.00",
        "0.7",
        "100",
    ]
    assert rows[1][2:5] == ["rift_bn", "2", "all"]
    assert rows[2][2:4] == ["bn_only", "all"]
    assert rows[3][2:4] == ["base", "(at)"] and rows[3][-2:] == ["-", "100"]
    assert "no results.json: " in lines[6] and lines[6].split()[2].endswith("/10")
    assert lines[-1] == f"full report (Table 1, figures): python -m rift_bn.report {tmp_path / 'sweep'}"


def test_sweep_callback_is_registered_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.sweep.dir={tmp_path / 'sweep'}"], return_hydra_config=True)
    callback = instantiate(cfg.hydra.callbacks.sweep_summary)
    assert isinstance(callback, SweepSummary)
    _sweep(tmp_path / "sweep")
    callback.on_multirun_end(config=cfg)
    out = capsys.readouterr().out
    assert "4 job(s) with results" in out and "python -m rift_bn.report" in out
    callback.on_run_end(config=cfg)  # a single run prints nothing more
    assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------------- 5. run.log


def test_console_log_copies_the_console_into_run_log(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stdout)  # as Hydra's job logging configures it
    root.addHandler(handler)
    try:
        with console_log(tmp_path):
            print("summary line")
            print("error: something", file=sys.stderr)
            root.warning("a log record")
    finally:
        root.removeHandler(handler)
    log = (tmp_path / "run.log").read_text()
    assert "summary line\n" in log and "error: something\n" in log and "a log record" in log
    out = capfd.readouterr()
    assert "summary line" in out.out and "error: something" in out.err  # the console still gets it all

    with pytest.raises(RuntimeError), console_log(tmp_path / "crash"):
        raise RuntimeError("boom")
    assert "RuntimeError: boom" in (tmp_path / "crash" / "run.log").read_text()

    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP worker writes no run.log of its own
    with console_log(tmp_path / "worker"):
        print("worker line")
    assert not (tmp_path / "worker").exists()


def test_only_an_unused_output_folder_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)

    def job(path: Path, *files: str) -> Path:
        (path / ".hydra").mkdir(parents=True)
        (path / ".hydra" / "config.yaml").write_text("k: 1\n")
        (path / "run.log").write_text("error: k=100: ...\n")
        for f in files:
            (path / f).parent.mkdir(parents=True, exist_ok=True)
            (path / f).write_text("x")
        return path

    single = job(tmp_path / "outputs" / "2026-01-01" / "12-00-00")
    (single / "wandb").mkdir()  # an empty folder is nothing
    assert remove_unused_output(single) and not (tmp_path / "outputs" / "2026-01-01").exists()
    for kept in (
        job(tmp_path / "a", "results.json"),
        job(tmp_path / "b", "final.pt"),
        job(tmp_path / "c", "csv-at/version_0/metrics.csv"),
    ):
        assert not remove_unused_output(kept) and (kept / ".hydra").is_dir()

    sweep = tmp_path / "sweep"
    done = job(sweep / "0", "results.json")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    assert remove_unused_output(job(sweep / "1")) and not (sweep / "1").exists()
    assert done.is_dir() and (sweep / "multirun.yaml").is_file()  # a sweep with a finished job stays
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "multirun.yaml").write_text("hydra: {}\n")
    assert remove_unused_output(job(lone / "0")) and not lone.exists()  # jobs run one after another
    parallel = tmp_path / "parallel"
    parallel.mkdir()
    (parallel / "multirun.yaml").write_text("hydra: {}\n")
    assert remove_unused_output(job(parallel / "0"), single_launcher=False)
    assert (parallel / "multirun.yaml").exists()  # other jobs may be starting: the sweep folder stays

    monkeypatch.setenv("LOCAL_RANK", "1")
    worker = job(tmp_path / "w")
    assert not remove_unused_output(worker) and worker.is_dir()  # never a DDP worker


# --------------------------------------------------------------------------------- 5. W&B, Lightning


def test_wandb_logger_passes_no_anonymous_and_leaves_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    seen: dict = {}

    def fake_init(**kwargs: object) -> object:
        seen.update(kwargs)
        return object()

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setattr(wandb, "run", None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = composed("logger=wandb")
    logger = make_logger(cfg, Path("/tmp/rift_bn_test_wandb"), "finetune")
    logger.experiment  # noqa: B018 - creates the run
    assert "anonymous" not in seen and seen["mode"] == "offline"
    assert seen["config"]["logger"]["mode"] == "offline"
    assert "WANDB_MODE" not in os.environ  # Lightning's offline=True would set it to dryrun
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(cfg) == "online"


def test_resume_checkpoint_folder_warning_is_silenced() -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_warn

    from rift_bn.run import quiet

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet()
        rank_zero_warn("Checkpoint directory /x/checkpoints exists and is not empty.")
        rank_zero_warn("something else")
    assert [str(w.message) for w in seen] == ["something else"]


# ------------------------------------------------------------------------------ end to end (slow)


@pytest.mark.slow
def test_a_job_refused_at_its_start_exits_2_and_leaves_no_folder(cli) -> None:
    """The exit path of a UserError inside the job (the messages: test_reliability.py, in process): one
    ``error: ...`` line last on stderr, exit status 2, no output folder; as the only job of a sweep, no
    sweep folder either."""
    proc = cli("k=100", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: k=100: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not proc.out_dir.exists(), sorted(p.name for p in proc.out_dir.rglob("*"))
    assert cli.tmp.is_dir()  # the output folder's parent is the working folder here: it stays, even empty
    sweep = cli("k=100", check=False, multirun=True)
    assert sweep.returncode == 2 and not sweep.out_dir.exists()


@pytest.mark.slow
def test_a_sweep_prints_each_job_and_a_table_also_when_run_again(cli) -> None:
    args = ("method=rift,full", "k=1", "logger=wandb")
    first = cli(*args, multirun=True)
    runs = load_results(first)
    assert len(runs) == 2
    for r in runs:
        assert format_summary(Results.from_dict(r)) in first.stdout
        job = Path(r["final"]["checkpoint"]).parent
        log = (job / "run.log").read_text()
        assert format_summary(Results.from_dict(r)) in log and f"results: {job / 'results.json'}" in log
        assert r["config"]["logger"]["mode"] == "offline"
    assert (
        "selected: all 41 modules (20 conv, 1 linear, 20 bn)" in first.stdout
        and "mrc: None" not in first.stdout
    )
    for noise in ("anonymous setting", "exists and is not empty", "dryrun"):
        assert noise not in first.stdout + first.stderr, noise
    assert not list(first.out_dir.rglob("*.log")) or all(
        p.stat().st_size for p in first.out_dir.rglob("*.log")
    )
    table = first.stdout[first.stdout.index(f"sweep {first.out_dir}: 2 job(s) with results") :]
    assert " rift " in table and " full " in table and f"python -m rift_bn.report {first.out_dir}" in table

    again = cli(*args, multirun=True)
    assert again.stdout.count("complete already") == 2
    for r in load_results(again):
        assert format_summary(Results.from_dict(r)) in again.stdout
    assert f"sweep {again.out_dir}: 2 job(s) with results" in again.stdout
