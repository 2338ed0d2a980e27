"""The stages of one run: base model, MRC, selective fine-tuning, interpolation, test report."""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, ListConfig, OmegaConf

from rift_bn import cache
from rift_bn.attacks import PGD
from rift_bn.callbacks import ModuleSelection
from rift_bn.config import pixels
from rift_bn.data import CIFARDataModule
from rift_bn.evaluate import evaluate
from rift_bn.interpolate import choose_alpha, interpolate_state
from rift_bn.loggers import finish, log_summary, make_logger
from rift_bn.models import build_model
from rift_bn.models.checkpoint import CheckpointError, load_into, read_state_dict, save_state_dict
from rift_bn.modules import AdversarialTraining, FineTuning
from rift_bn.mrc import MRCProtocol, compute_mrc
from rift_bn.sync_bn import BatchNormSync


def finetune_milestones(epochs: int, milestones: list[int] | None) -> tuple[int, ...]:
    """Fine-tuning's lr decay epochs: as given, or half-way (RiFT: ``[epochs // 2]``) for null."""
    return tuple(milestones) if milestones is not None else (max(1, epochs // 2),)


def make_attack(acfg: DictConfig, prefix: str = "attack", train_mode: bool = False) -> PGD:
    return PGD(
        eps=pixels(acfg.eps, f"{prefix}.eps"),
        alpha=pixels(acfg.alpha, f"{prefix}.alpha"),
        steps=int(acfg.steps),
        random_start=bool(acfg.random_start),
        restarts=int(acfg.get("restarts", 1)),
        train_mode=train_mode,
    )


@contextmanager
def seeded(seed: int):
    """A stage-local RNG stream, so a stage's numbers do not depend on what ran before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def deterministic_mode(setting: bool | str) -> None:
    """``trainer.deterministic`` for the whole job, not only inside Lightning's Trainer: the adversarial
    sets, MRC and evaluation run outside it (on GPU, cuDNN's default kernels make MRC differ run to run).
    ``true`` raises on an op without a deterministic kernel, ``"warn"`` warns."""
    if setting in (False, None):
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first use
    torch.use_deterministic_algorithms(True, warn_only=setting == "warn")
    torch.backends.cudnn.benchmark = False


@contextmanager
def ddp_relaunch(trainer: L.Trainer, output_dir: Path):
    """Let Lightning's DDP launcher re-run exactly this job in its worker processes, then tidy up.

    Lightning starts ranks > 0 as ``python -m rift_bn.run <sys.argv[1:]> hydra.run.dir=<run dir>``. Inside a
    multirun that would be the whole sweep (``-m k=1,2``) in the wrong folder, so the command line becomes
    this job's own overrides and the run dir this job's folder. Afterwards rank 0 forgets the DDP
    environment, so a later fit in the same process (the next stage, the next sweep job) launches afresh.
    """
    launching = trainer.world_size > 1 and rank_zero_only.rank == 0 and "LOCAL_RANK" not in os.environ
    if not launching:
        yield
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    argv, env = list(sys.argv), {k: os.environ.get(k) for k in DDP_ENV}
    hc = HydraConfig.get()
    run_dir = hc.run.dir
    sys.argv = [argv[0], *hc.overrides.task]
    with read_write(hc), open_dict(hc):
        hc.run.dir = str(output_dir)
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hc), open_dict(hc):
            hc.run.dir = run_dir
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Run:
    """Everything a stage needs; built once per job."""

    cfg: DictConfig
    output_dir: Path
    device: torch.device
    dm: CIFARDataModule
    cache_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    gpu: int | None = None  # the GPU this job is pinned to (hydra/launcher=parallel)
    loggers: dict[str, Any] = field(default_factory=dict)  # open experiment loggers by stage
    resumed: dict[str, dict | None] = field(default_factory=dict)  # stage -> None or where it resumed

    @property
    def rank(self) -> int:
        return int(rank_zero_only.rank)

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    def plain(self, *keys: str) -> Any:
        """Resolved plain-Python view of config sections (for cache keys and results)."""
        return {
            k: OmegaConf.to_container(self.cfg[k], resolve=True)
            if isinstance(self.cfg[k], DictConfig)
            else self.cfg[k]
            for k in keys
        }

    def split_key(self) -> dict:
        """What decides the data a stage sees: the dataset, the split and the loaded images themselves."""
        d = self.cfg.data
        return {
            "data": d.name,
            "val_size": d.val_size,
            "seed": self.cfg.seed,
            "selection_source": d.selection_source,
            "data_fingerprint": self.dm.fingerprint,
        }

    def processes(self) -> int:
        """Training processes (DDP world size) of the trainer config; 1 without DDP."""
        t = self.cfg.trainer
        if self.gpu is not None:
            return 1
        devices = t.devices
        if isinstance(devices, ListConfig):
            count = len(devices)
        elif isinstance(devices, str) and devices != "auto":
            count = len([d for d in devices.split(",") if d.strip()])
        elif isinstance(devices, int) and devices == -1:
            count = torch.cuda.device_count()
        else:
            count = devices if isinstance(devices, int) else 1
        return max(1, count) * int(t.num_nodes)

    def new_model(self) -> torch.nn.Module:
        m = self.cfg.model
        model = build_model(m.name, self.dm.num_classes, m.width)
        return model.to(memory_format=torch.channels_last) if m.channels_last else model

    def trainer(self, max_epochs: int, work_dir: Path, logger: Any, callbacks: list) -> L.Trainer:
        t = self.cfg.trainer
        ckpt = ModelCheckpoint(
            dirpath=str(work_dir),
            filename="last",
            save_last=False,
            save_top_k=1,
            every_n_epochs=1,
            enable_version_counter=False,
        )
        return L.Trainer(
            accelerator=t.accelerator,
            devices=[self.gpu] if self.gpu is not None else t.devices,
            strategy=t.strategy,
            num_nodes=t.num_nodes,
            precision=t.precision,
            max_epochs=max_epochs,
            logger=logger if logger is not None else False,
            callbacks=[*callbacks, ckpt],
            enable_progress_bar=t.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            inference_mode=False,
            deterministic=t.deterministic,
            log_every_n_steps=t.log_every_n_steps,
            default_root_dir=str(self.output_dir),
            plugins=[BatchNormSync()],  # DDP: BN statistics of the whole step (sync_batchnorm, CPU too)
        )

    def fit(self, stage: str, trainer: L.Trainer, module: L.LightningModule, work_dir: Path) -> None:
        """Fit, resuming from ``work_dir/last.ckpt`` after an interruption (recorded in ``resumed``);
        DDP ranks > 0 end here."""
        last = work_dir / "last.ckpt"
        self.resumed[stage] = None
        if last.exists():
            done = len(torch.load(last, map_location="cpu", weights_only=True).get("history", []))
            self.resumed[stage] = {"after_epoch": done, "checkpoint": str(last)}
            if self.rank == 0:
                print(f"resuming from {last} (after epoch {done})", flush=True)
        with ddp_relaunch(trainer, self.output_dir):
            trainer.fit(
                module, datamodule=self.dm, ckpt_path=str(last) if last.exists() else None, weights_only=True
            )
        if trainer.world_size > 1:
            if not trainer.is_global_zero:
                sys.exit(0)  # rank 0 alone goes on to the single-process stages
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        module.to(self.device)

    def evaluate(
        self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int, autoattack: bool = False
    ) -> dict[str, float]:
        with seeded(seed):
            return evaluate(
                model.to(self.device),
                x,
                y,
                make_attack(self.cfg.attack),
                self.dm.num_classes,
                self.cfg.eval.batch_size,
                self.device,
                self.cfg.eval.precision,
                autoattack_eps=pixels(self.cfg.attack.eps, "attack.eps") if autoattack else None,
            )

    # ---- stage: base model -------------------------------------------------------------------------
    def base_checkpoint(self) -> tuple[Path, bool]:
        """(path, exists) of the base model: the user's checkpoint or the cached one for these settings."""
        if self.cfg.base.checkpoint is not None:
            return Path(str(self.cfg.base.checkpoint)).expanduser().resolve(), True
        c = self.cfg
        key = cache.digest(
            {
                **self.plain("at", "attack"),
                **self.split_key(),
                "train_subset": c.data.train_subset,
                "model": self.plain("model")["model"] | {"compile": None, "channels_last": None},
                "trainer.precision": c.trainer.precision,
                "eval.precision": c.eval.precision,  # the validation that picks the best epoch
                "processes": self.processes(),  # DDP: synchronised BN statistics, another float order
                "device": self.device.type,
            }
        )
        path = (
            self.cache_dir / "base" / f"{c.data.name}-{c.model.name}-w{c.model.width}-seed{c.seed}-{key}.pt"
        )
        return path, path.exists()

    def base_model(self) -> tuple[torch.nn.Module, Path, dict]:
        path, exists = self.base_checkpoint()
        if not exists:
            if not self.cfg.base.train_if_missing:
                raise FileNotFoundError(
                    f"base.checkpoint=null: no cached base model at {path} and "
                    "base.train_if_missing=false; train one with +experiment=at"
                )
            with cache.locked(path, enabled=self.rank == 0):  # DDP ranks > 0 join rank 0's fit instead
                if not path.exists():
                    self.train_base(path)
        model = self.new_model()
        try:
            load_into(model, read_state_dict(path))
        except CheckpointError as e:
            msg = str(e)
            raise CheckpointError(
                msg if msg.startswith("base.checkpoint=") else f"base.checkpoint={path}: {msg}"
            ) from None
        info_path = path.with_suffix(".json")
        info = cache.read_json(info_path) if info_path.exists() else {}
        return model.to(self.device), path, info

    def train_base(self, path: Path) -> None:
        cfg = self.cfg
        work = path.with_suffix(".work")
        logger = self.loggers["at"] = make_logger(cfg, self.output_dir, "at")
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        module = AdversarialTraining(
            self.new_model(),
            make_attack(cfg.at.attack, "at.attack", train_mode=cfg.at.attack_bn_mode == "train"),
            make_attack(cfg.attack),
            self.dm.num_classes,
            lr=cfg.at.lr,
            momentum=cfg.at.momentum,
            weight_decay=cfg.at.weight_decay,
            milestones=tuple(cfg.at.milestones),
            gamma=cfg.at.gamma,
            channels_last=cfg.model.channels_last,
            eval_precision=cfg.eval.precision,
        )
        if cfg.model.compile:
            module.model.net.compile()
        self.dm.batch_size = cfg.at.batch_size
        with self.timed("adversarial_training"):
            trainer = self.trainer(cfg.at.epochs, work, logger, [])
            self.fit("at", trainer, module, work)
        best = module.best_state or {k: v.cpu() for k, v in module.model.net.state_dict().items()}
        model = self.new_model()
        model.net.load_state_dict(best)
        info = {
            "best_epoch": module.best_epoch,
            "best_val_robust_acc": module.best_robust_acc,
            "history": module.history,
            "resumed": self.resumed.get("at"),
            "seconds": self.timings["adversarial_training"],
            "config": self.plain("at", "data", "model"),
        }
        cache.write_json(path.with_suffix(".json"), info)
        save_state_dict(model, path)  # last: its existence marks the base model as complete
        shutil.rmtree(work, ignore_errors=True)

    # ---- stage: MRC ---------------------------------------------------------------------------------
    def adversarial_set_path(self, ckpt_hash: str, n: int) -> Path:
        """Cache file of the first ``n`` selection-split examples attacked on the base ``ckpt_hash``."""
        key = cache.digest(
            {"ckpt": ckpt_hash, **self.split_key(), "attack": self.plain("attack")["attack"], "n": n}
        )
        return self.cache_dir / "adv" / f"{ckpt_hash[:16]}-{key}.pt"

    def mrc_protocol(self) -> MRCProtocol:
        m = self.cfg.mrc
        return MRCProtocol(
            epsilon=m.epsilon,
            epochs=m.epochs,
            lr=m.lr,
            batch_size=m.batch_size,
            shuffle=m.shuffle,
            seed=self.cfg.seed,
            steps_per_epoch=m.steps_per_epoch,
        )

    def mrc_path(self, ckpt_hash: str) -> Path:
        """Cache file of base ``ckpt_hash``'s MRC table: one per estimator, protocol, split and attack."""
        m = self.cfg.mrc
        # the linear estimator's table with the measured step differs from the one without it
        step = {"linear_step": bool(m.get("linear_step", False))} if m.estimator == "linear" else {}
        key = cache.digest(
            {
                "ckpt": ckpt_hash,
                **self.split_key(),
                "n": m.num_examples,
                "estimator": m.estimator,
                **step,
                "protocol": self.mrc_protocol().key(),
                "attack": self.plain("attack")["attack"],
            }
        )
        return self.cache_dir / "mrc" / f"{ckpt_hash[:16]}-{m.estimator}-{key}.json"

    def adversarial_set(self, model: torch.nn.Module, ckpt_hash: str) -> tuple[torch.Tensor, torch.Tensor]:
        """PGD examples of the selection split on the base model (eval mode), made once per base and split."""
        n = self.cfg.mrc.num_examples or len(self.dm.val_y)
        path = self.adversarial_set_path(ckpt_hash, n)

        def compute() -> dict:
            x, y = self.dm.val_x[:n], self.dm.val_y[:n]
            from rift_bn.data import to_float

            attack, bs = make_attack(self.cfg.attack), self.cfg.eval.batch_size
            with seeded(self.cfg.seed + 1):
                adv = torch.cat(
                    [
                        attack(
                            model, to_float(x[i : i + bs].to(self.device)), y[i : i + bs].to(self.device)
                        ).cpu()
                        for i in range(0, n, bs)
                    ]
                )
            return {"x": adv, "y": y.clone()}

        with self.timed("adversarial_set"):
            data, _ = cache.cached(path, compute, cache.save_tensors, cache.load_tensors, lock=self.rank == 0)
        return data["x"].to(self.device), data["y"].to(self.device)

    def mrc_exact_lowest(self) -> int | None:
        """How many lowest MRCs the exact estimator must give exactly: ``mrc.exact_lowest`` raised to this
        job's ``k`` (a job whose k exceeds the cached exact rows extends them); None = every module."""
        m = self.cfg.mrc
        n = m.get("exact_lowest")
        return None if n is None else max(int(n), int(self.cfg.k))

    @staticmethod
    def mrc_state_path(path: Path) -> Path:
        """The paused ascents of a table's ``lower_bound`` rows, beside its JSON."""
        return path.with_suffix(".state.pt")

    def mrc_table(
        self, model: torch.nn.Module, ckpt_hash: str, kinds: tuple[str, ...]
    ) -> tuple[list[dict], str]:
        """MRC rows for every candidate of ``kinds``; each module computed once per base and protocol.

        With ``mrc.exact_lowest`` (exact estimator), the rows of modules that cannot be among the lowest
        are lower bounds (``status``), and their paused ascents are kept beside the table: a later job
        that needs more (a larger n or k, null, the other candidate set) continues them."""
        m, proto, path = self.cfg.mrc, self.mrc_protocol(), self.mrc_path(ckpt_hash)
        from rift_bn.models import candidate_modules
        from rift_bn.mrc import lowest_proven

        wanted = [n for n, _, _ in candidate_modules(model, set(kinds))]
        lowest = self.mrc_exact_lowest() if m.estimator == "exact" else None

        def known() -> dict:
            return cache.read_json(path) if path.exists() else {"rows": {}}

        def enough(table: dict) -> bool:
            rows = table["rows"]
            return all(n in rows for n in wanted) and lowest_proven([rows[n] for n in wanted], lowest)

        table = known()
        source = "cache"
        if not enough(table):
            with cache.locked(path, enabled=self.rank == 0):
                table = known()
                if not enough(table):
                    x, y = self.adversarial_set(model, ckpt_hash)
                    with self.timed("mrc"):
                        if m.estimator == "linear":
                            from rift_bn.mrc_linear import linear_mrc

                            missing = tuple(
                                k
                                for k in kinds
                                if any(n not in table["rows"] for n, _, _ in candidate_modules(model, {k}))
                            )
                            new = linear_mrc(
                                model, x, y, missing, proto, measure_step=bool(m.get("linear_step", False))
                            )
                        else:
                            new = self._exact_mrc(model, x, y, kinds, wanted, table["rows"], lowest, path)
                    table["rows"].update({r["name"]: r for r in new["rows"]})
                    table |= {
                        "base_loss": new["base_loss"],
                        "base_robust_acc": new["base_robust_acc"],
                        "estimator": m.estimator,
                        "protocol": proto.key(),
                    }
                    cache.write_json(path, table)
                    source = "computed"
        return [table["rows"][n] for n in wanted], source

    def _exact_mrc(
        self,
        model: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        kinds: tuple[str, ...],
        wanted: list[str],
        rows: dict[str, dict],
        lowest: int | None,
        path: Path,
    ) -> dict:
        """The exact rows ``mrc_table`` lacks: ``compute_mrc`` for the missing modules when every module is
        wanted exact and none is paused; else ``bounded_mrc``, continuing the paused ascents saved beside
        the table (``mrc_state_path``; a state that does not match its row restarts that module) and
        saving the new ones there, before the caller writes the table."""
        from rift_bn.mrc import LOWER_BOUND, ModuleState, bounded_mrc, row_status

        proto, state_path = self.mrc_protocol(), self.mrc_state_path(path)
        partial = [n for n in wanted if n in rows and row_status(rows[n]) == LOWER_BOUND]
        if lowest is None and not partial:
            missing = [n for n in wanted if n not in rows]
            return compute_mrc(model, x, y, kinds, proto, progress=self.progress, names=missing)
        saved = cache.load_tensors(state_path)["modules"] if state_path.exists() else {}
        states = {
            n: ModuleState.from_dict(saved[n])
            for n in partial
            if n in saved and saved[n]["epochs_run"] == rows[n]["epochs_run"]
        }
        exact = {n: rows[n] for n in wanted if n in rows and n not in partial}
        new = bounded_mrc(model, x, y, kinds, proto, lowest, exact, states, progress=self.progress)
        saved = {n: s for n, s in saved.items() if n not in wanted}
        saved |= {n: s.to_dict() for n, s in new["states"].items()}
        if saved:  # the states first, then (the caller) the table whose rows point to them
            cache.save_tensors(state_path, {"protocol": proto.key(), "modules": saved})
        else:
            state_path.unlink(missing_ok=True)
        return new

    @staticmethod
    def progress(name: str, done: int, total: int) -> None:
        print(f"  mrc {done}/{total}: {name}", flush=True)

    # ---- stage: fine-tuning -------------------------------------------------------------------------
    def finetune(
        self, base: torch.nn.Module, rows: list[dict] | None, work: Path
    ) -> tuple[FineTuning, list[dict]]:
        cfg, f = self.cfg, self.cfg.finetune
        logger = self.loggers["finetune"] = make_logger(cfg, self.output_dir, "finetune")
        selection = ModuleSelection(
            tuple(cfg.method.kinds), cfg.k if rows is not None else None, rows, f.bn_stats
        )
        milestones = finetune_milestones(f.epochs, f.milestones)
        module = FineTuning(
            copy.deepcopy(base),
            make_attack(cfg.attack),
            self.dm.num_classes,
            lr=f.lr,
            momentum=f.momentum,
            weight_decay=f.weight_decay,
            milestones=milestones,
            gamma=f.gamma,
            channels_last=cfg.model.channels_last,
            eval_precision=cfg.eval.precision,
        )
        if cfg.model.compile:
            module.model.net.compile()
        self.dm.batch_size = f.batch_size
        with self.timed("finetune"):
            L.seed_everything(cfg.seed, workers=True, verbose=False)
            self.fit("finetune", self.trainer(f.epochs, work, logger, [selection]), module, work)
        return module, selection.selected

    def close_logger(self, stage: str, results: dict | None = None) -> None:
        """Write the run's summary (if given) into the stage's logger, opening one if needed, and close it."""
        logger = self.loggers.pop(stage, None)
        if results is not None:
            logger = logger or make_logger(self.cfg, self.output_dir, stage)
            log_summary(logger, results)
        finish(logger)

    # ---- stage: interpolation and report ----------------------------------------------------------
    def interpolate(
        self, base: torch.nn.Module, tuned: torch.nn.Module, base_val: dict
    ) -> tuple[list[dict], dict]:
        """Selection-split accuracy along theta(a), every point evaluated alike (same seeded random
        starts, float32); alpha* by the tolerance rule (DESIGN step 7)."""
        base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
        probe = copy.deepcopy(base)
        curve = []
        with self.timed("interpolation"):
            for a in sorted(float(a) for a in self.cfg.interpolation.alphas):
                if a == 0.0:
                    point = base_val  # theta(0) is the base model exactly, evaluated the same way
                else:
                    probe.load_state_dict(interpolate_state(base_sd, tuned_sd, a))
                    point = self.evaluate(probe, self.dm.val_x, self.dm.val_y, self.cfg.seed + 3)
                curve.append({"alpha": a, "clean_acc": point["clean_acc"], "robust_acc": point["robust_acc"]})
        best = choose_alpha(curve, base_val["robust_acc"], self.cfg.interpolation.tolerance)
        return curve, best

    def eval_path(self, ckpt_hash: str, split: str) -> Path:
        """Cache file of base ``ckpt_hash``'s evaluation on ``split``: "val" (selection) or "test"."""
        c = self.cfg
        # evaluation runs under eval.precision's autocast, so the precision is part of the numbers
        key: dict = {
            "ckpt": ckpt_hash,
            "attack": self.plain("attack")["attack"],
            "precision": c.eval.precision,
        }
        if split == "val":
            key |= self.split_key()
        else:
            key |= {
                "data": c.data.name,
                "test_subset": c.data.test_subset,
                "selection_source": c.data.selection_source,
                "data_fingerprint": self.dm.fingerprint,
                "aa": c.eval.autoattack,
                "seed": c.seed,
            }
        return self.cache_dir / "eval" / f"{ckpt_hash[:16]}-{split}-{cache.digest(key)}.json"

    def base_val(self, model: torch.nn.Module, ckpt_hash: str) -> dict:
        path = self.eval_path(ckpt_hash, "val")
        with self.timed("base_eval"):
            out, _ = cache.cached(
                path,
                lambda: self.evaluate(model, self.dm.val_x, self.dm.val_y, self.cfg.seed + 3),
                cache.write_json,
                cache.read_json,
            )
        return out

    def base_test(self, model: torch.nn.Module, ckpt_hash: str) -> dict:
        path = self.eval_path(ckpt_hash, "test")
        x, y = self.dm.test_tensors()
        with self.timed("base_eval"):
            out, _ = cache.cached(
                path,
                lambda: self.evaluate(model, x, y, self.cfg.seed + 4, self.cfg.eval.autoattack),
                cache.write_json,
                cache.read_json,
            )
        return out
