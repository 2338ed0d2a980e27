"""Bad input, interruption, untrusted checkpoints, numerical faults, determinism.

Refusals are checked in process: precheck's line for a mistake on the command line, run_job's UserError
for one found by the job. ``python -m rift_bn.run`` prints either as one ``error: ...`` line and exits
with 2, leaving no output folder: test_validation.py and test_console.py run each of the two paths once.
Interruption and run-to-run determinism go through the real entry point (slow).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rift_bn.errors import UserError
from rift_bn.models import build_model
from rift_bn.models.checkpoint import save_state_dict
from rift_bn.mrc import MRCProtocol, compute_mrc
from rift_bn.pipeline import run_job
from tests.conftest import CLI, TINY, load_results, refused, write_fake_cifar10


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["data=imagenet"], ["data=imagenet", "cifar10, cifar100"]),
        (["model=vgg"], ["model=vgg", "resnet18"]),
        (["method=lora"], ["method=lora", "rift_bn"]),
        (["k=0"], ["k=0"]),
        (["attack.eps=16"], ["attack.eps=16", "[0, 1]"]),
        (["attack.alpha=0"], ["attack.alpha=0"]),
        (["finetune.epochs=-2"], ["finetune.epochs=-2"]),
        (["at.epochs=0"], ["at.epochs=0"]),
        (["mrc.lr=inf"], ["mrc.lr=inf"]),
        (["finetune.lrr=0.1"], ["finetune.lrr=0.1", "did you mean finetune.lr?"]),
        (["finetune.bn_stats=some"], ["finetune.bn_stats=some", "selected"]),
        (["mrc.estimator=taylor"], ["mrc.estimator=taylor", "linear"]),
        (["mrc.linear_step=maybe"], ["mrc.linear_step=maybe", "true or false"]),
        (["trainer.deterministic=always"], ["trainer.deterministic=always", "warn"]),
        (["base.checkpoint=/no/such/file.pt"], ["base.checkpoint=/no/such/file.pt", "not found"]),
        (["+experiment=topk", "k=1,2", "method=foo", "-m"], ["method=foo"]),
    ],
)
def test_bad_settings_are_refused_before_any_work(argv: list[str], needles: list[str]) -> None:
    line = refused(*TINY, *argv)
    for needle in needles:
        assert needle in line, line


# A job on a fake CIFAR-10 of 120 training images, small enough to train in seconds where it must.
JOB = (
    "scale=smoke", "model.width=8", "data.val_size=20", "data.train_subset=100", "data.test_subset=40",
    "at.epochs=1", "at.milestones=[1]", "at.batch_size=50", "at.attack.steps=1", "attack.steps=1",
    "finetune.epochs=1", "finetune.milestones=[1]", "finetune.batch_size=50", "mrc.epochs=1",
    "mrc.batch_size=10", "eval.batch_size=20", "logger=none",
)  # fmt: skip


@pytest.fixture()
def job(tmp_path: Path, hydra_job: Callable[..., DictConfig]) -> Callable[..., DictConfig]:
    """Composes a JOB config with ``overrides`` (data and cache in ``tmp_path``), Hydra's job context set."""
    root = write_fake_cifar10(tmp_path / "data", n_train=120, n_test=40)
    return functools.partial(hydra_job, *JOB, f"data.root={root}", f"cache_dir={tmp_path / 'cache'}")


def job_refused(cfg: DictConfig, *needles: str) -> str:
    """run_job's UserError for ``cfg``: one line naming each of ``needles``, no results written."""
    with pytest.raises(UserError) as info:
        run_job(cfg)
    line = str(info.value)
    assert line and "\n" not in line, line
    for needle in needles:
        assert needle in line, line
    for folder in (Path(HydraConfig.get().runtime.output_dir), Path(cfg.cache_dir)):
        assert not list(folder.rglob("results.json")), folder
    return line


def test_settings_the_job_refuses_at_its_start(job, tmp_path: Path) -> None:
    """Refused once the data is read, before any work: nothing is cached."""
    nowhere, data = tmp_path / "nowhere", tmp_path / "data"
    for overrides, needles in (
        (["method=rift", "k=22"], ["k=22", "21"]),
        (["k=100"], ["k=100", "41"]),
        ([f"data.root={nowhere}", "data.download=false"], [f"data.root={nowhere}", "cifar-10-batches-py"]),
        (["data=cifar100", "data.download=false"], [f"data.root={data}", "cifar-100-python"]),
    ):
        cfg = job(*overrides)
        job_refused(cfg, *needles)
        assert not Path(cfg.cache_dir).exists(), overrides


def test_no_gpu_is_refused(job) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    job_refused(job("trainer=gpu"), "trainer.accelerator=gpu", "no CUDA GPU")


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_untrusted_and_mismatched_checkpoints(job, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload(marker)}, evil)
    line = job_refused(job("+experiment=at", f"base.checkpoint={evil}"), "refused")
    assert not marker.exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    job_refused(job("+experiment=at", f"base.checkpoint={garbage}"), str(garbage))
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes\n1. first\n")
    job_refused(job("+experiment=at", f"base.checkpoint={notes}"), f"base.checkpoint={notes}")
    wide = tmp_path / "wide.pt"
    save_state_dict(build_model("resnet18", 10, 16), wide)  # JOB uses width 8
    job_refused(job("+experiment=at", f"base.checkpoint={wide}"), "model.width")
    classes = tmp_path / "c100.pt"
    save_state_dict(build_model("resnet18", 100, 8), classes)
    job_refused(job("+experiment=at", f"base.checkpoint={classes}"), "linear")
    assert "refused" in line and not (tmp_path / "cache" / "base").exists()


def test_nan_stops_the_run_naming_stage_and_module(job) -> None:
    line = job_refused(job("method=full", "finetune.lr=1e30"), "fine-tuning", "finetune.lr")
    assert "nan" in line or "inf" in line


def test_nan_in_mrc_names_the_module() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 4).eval()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    with pytest.raises(
        FloatingPointError, match=r"^mrc: loss is nan for module conv1 at epoch 1; lower mrc\.lr"
    ):
        compute_mrc(model, x, y, ("conv",), MRCProtocol(lr=float("inf"), epochs=1, batch_size=8))


def _kill_when(
    cmd: list[str], env: dict, cwd: Path, path_glob: str, root: Path, timeout: float = 400
) -> None:
    """Start ``cmd`` and kill -9 it as soon as a file matching ``path_glob`` exists under ``root``."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    t0 = time.time()
    try:
        while not list(root.glob(path_glob)):
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.time() - t0 < timeout
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


AT = ("+experiment=at", "at.epochs=3", "at.milestones=[3]")
FT = ("method=rift_bn", "k=1", "finetune.epochs=3", "finetune.milestones=[2]")


def _same_numbers(a: dict, b: dict) -> None:
    """Two runs' results agree bit for bit: accuracies, history, best epoch, MRC, selection, alpha*."""
    for key in ("base", "final", "delta", "history", "mrc", "selected", "alpha", "interpolation"):
        if key in ("base", "final"):
            assert {k: v for k, v in a[key].items() if k != "checkpoint"} == {
                k: v for k, v in b[key].items() if k != "checkpoint"
            }, key
        else:
            assert a[key] == b[key], key
    trained = ("best_epoch", "best_val_robust_acc", "history")
    assert {k: a["base_training"].get(k) for k in trained} == {k: b["base_training"].get(k) for k in trained}


def _interrupted(cli, args: tuple[str, ...], name: str, path_glob: str) -> None:
    cmd = [sys.executable, "-m", "rift_bn.run", *TINY, *args, f"hydra.run.dir={cli.tmp / name}"]
    _kill_when(cmd, cli.env, cli.tmp, path_glob, cli.cache)


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(cli, tmp_path, cifar_root) -> None:
    """A run killed with SIGKILL and started again gives exactly the numbers of a run never interrupted:
    every random stream (augmentation, attack starts, data order) goes on where it stood."""
    (tmp_path / "whole").mkdir()
    whole = CLI(tmp_path / "whole", cifar_root)  # the uninterrupted runs, in a cache of their own
    ref_at, ref_ft = load_results(whole(*AT))[0], load_results(whole(*FT))[0]

    _interrupted(cli, AT, "killed", "base/*.work/last.ckpt")
    assert not list((cli.tmp / "killed").rglob("results.json")) and not list(
        (cli.cache / "base").glob("*.pt")
    )
    proc = cli(*AT)
    # resumed, not retrained: the first epoch (finished before the kill) does not run again
    assert "resuming from" in proc.stdout and "AdversarialTraining epoch 3/3:" in proc.stdout
    assert "AdversarialTraining epoch 1/3:" not in proc.stdout
    (r,) = load_results(proc)
    assert (
        r["base_training"]["resumed"]["after_epoch"] in (1, 2) and ref_at["base_training"]["resumed"] is None
    )
    _same_numbers(r, ref_at)
    history = r["base_training"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # the base model is the epoch with the best validation robust accuracy (the first of equals)
    best = max(history, key=lambda h: h["robust_acc"])
    assert r["base_training"]["best_epoch"] == best["epoch"]
    assert r["base_training"]["best_val_robust_acc"] == best["robust_acc"]

    # fine-tuning: killed mid-way, resumed, the same as uninterrupted (MRC, selection, alpha*, accuracies)
    _interrupted(cli, FT, "killed2", "runs/*/last.ckpt")
    proc = cli(*FT)
    assert "resuming from" in proc.stdout and "FineTuning epoch 3/3:" in proc.stdout
    assert "FineTuning epoch 1/3:" not in proc.stdout
    (r,) = load_results(proc)
    assert r["resumed"]["finetune"]["after_epoch"] in (1, 2) and ref_ft["resumed"]["finetune"] is None
    assert [h["epoch"] for h in r["history"]] == [0, 1, 2, 3]
    _same_numbers(r, ref_ft)
    (state,) = (cli.cache / "runs").glob(f"{r['job_key']}")
    # a finished job keeps no training state: its record and the files beside it, nothing else
    assert sorted(p.name for p in state.iterdir()) == ["bn_outputs.npz", "outcomes.npz", "results.json"]

    # a finished job is skipped when rerun; force=true recomputes it, and a forced run that is killed
    # resumes its own attempt when run again (forcing discards the finished result, not its progress)
    again = cli(*FT)
    assert "complete already" in again.stdout
    assert json.loads(Path(again.stdout.split("results: ")[-1].strip()).read_text())["final"] == r["final"]
    _interrupted(cli, (*FT, "force=true"), "killed3", "runs/*/last.ckpt")
    forced = cli(*FT, "force=true")
    assert "complete already" not in forced.stdout and "resuming from" in forced.stdout
    _same_numbers(load_results(forced)[0], ref_ft)
    # a forced rerun that fails (here: its data moved away) keeps the finished result it would replace
    (done,) = (cli.cache / "runs").glob(f"{load_results(forced)[0]['job_key']}/results.json")
    finished = done.read_text()
    failed = cli(*FT, "force=true", f"data.root={cli.tmp / 'moved'}", "data.download=false", check=False)
    assert failed.returncode == 2 and done.read_text() == finished
    assert "complete already" in cli(*FT).stdout


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path, cifar_root) -> None:
    runs = []
    for name in ("a", "b"):  # cold caches: base training, MRC, fine-tuning all recomputed
        (tmp_path / name).mkdir()
        runs.append(load_results(CLI(tmp_path / name, cifar_root)("method=rift_bn", "k=2"))[0])
    a, b = runs
    for key in ("mrc", "selected", "base", "final", "delta", "alpha", "interpolation", "history"):
        if key in ("base", "final"):
            a[key].pop("checkpoint"), b[key].pop("checkpoint")
        assert a[key] == b[key], key


def test_deterministic_mode_covers_the_whole_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.deterministic is set for the process (MRC and evaluation run outside the Trainer)."""
    from rift_bn.pipeline.training import deterministic_mode

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    benchmark = torch.backends.cudnn.benchmark
    try:
        deterministic_mode(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        deterministic_mode("warn")
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        deterministic_mode(True)
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = benchmark
