"""What every training stage shares: optimizer, schedule, EMA and resumable randomness (from `cf.train.ema`),
the Trainer, the stage skeleton (`run_stage`).

A stage module stays thin; it gets the rest from here:

    class TeacherModule(LightningModule):
        def __init__(self, cfg):
            ...
            self.ema = EMA(self.net, cfg.trainer.ema)
        def configure_optimizers(self):
            return adamw_with_schedule(self.net.parameters(), self.cfg.trainer)
        def training_step(self, batch, batch_idx):
            g = step_generator(self.cfg.seed, self.global_step, self.global_rank, self.device)
            t = torch.rand(len(batch), generator=g, device=self.device)  # resumable noise
            ...
        def on_train_batch_end(self, *args):
            self.ema.update(self.net)
        def on_save_checkpoint(self, ckpt):
            ckpt["ema"] = self.ema.state_dict()
        def on_load_checkpoint(self, ckpt):
            self.ema.load_state_dict(ckpt["ema"])

    trainer = make_trainer(cfg, out, "teacher", logger=run.lightning_logger())
    fit(trainer, module, datamodule, out, "teacher")     # resumes from <out>/teacher/last.ckpt

Checkpoints hold tensors and plain values only (the config travels as a YAML string in
`cf_config`), so `load_checkpoint` / `load_module_weights` read them with weights_only=True.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from omegaconf import DictConfig, OmegaConf

from cf import tracking
from cf.config.load import ConfigError, to_yaml
from cf.errors import CfError
from cf.train.callbacks import (
    AtomicCheckpoint,
    AtomicCheckpointIO,
    NonFiniteStop,
    StepProgressBar,
    StreamPosition,
    WallClockStop,
)
from cf.train.checkpoints import export_safetensors, load_checkpoint, load_module_weights  # noqa: F401
from cf.train.ema import EMA, EMACheckpoint, step_generator  # noqa: F401
from cf.train.recovery import nonfinite_hint, recover_checkpoint
from cf.utils import set_threads

# --- optimisation -------------------------------------------------------------------------------


def build_optimizer(
    params: Iterable, trainer_cfg: DictConfig, lr: float | None = None, betas: list[float] | None = None
) -> torch.optim.AdamW:
    """AdamW from `trainer.*`; `lr`/`betas` override it (CDMD's critic and generator have their own).

    Given plain tensors, weight decay goes to matrices only (ndim >= 2): decaying norm gains and
    biases towards zero only hurts. Given param-group dicts, they are used as they are.
    """
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        params = [g for g in params if g["params"]]
    b = trainer_cfg.betas if betas is None else betas
    return torch.optim.AdamW(
        params,
        lr=trainer_cfg.lr if lr is None else lr,
        betas=(float(b[0]), float(b[1])),
        weight_decay=trainer_cfg.weight_decay,
        # one fused kernel over all parameters (CPU and CUDA): on tiny's CPU the default per-tensor loop
        # cost ~8 ms of a ~100 ms teacher step; fused costs ~1 ms, equal to 6e-8 after 20 steps
        fused=True,
    )


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base lr for optimizer step `step` (0-based).

    Linear warm-up reaches 1 at step `warmup - 1`; then `constant` stays at 1 and `cosine` falls
    from 1 at step `warmup` to 0 at step `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"trainer.schedule={schedule!r} is not one of cosine, constant")


def lr_lambda(trainer_cfg: DictConfig, total_steps: int | None = None) -> Callable[[int], float]:
    """`lr_factor` bound to the config; `total_steps` defaults to trainer.max_steps."""
    total = trainer_cfg.max_steps if total_steps is None else total_steps
    warmup, schedule = trainer_cfg.warmup_steps, trainer_cfg.schedule
    return lambda step: lr_factor(step, warmup, total, schedule)


def build_scheduler(
    optimizer: torch.optim.Optimizer, trainer_cfg: DictConfig, total_steps: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Step-wise schedule; under manual optimisation call `.step()` after each `optimizer.step()`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(trainer_cfg, total_steps))


def adamw_with_schedule(
    params: Iterable,
    trainer_cfg: DictConfig,
    lr: float | None = None,
    betas: list[float] | None = None,
    total_steps: int | None = None,
) -> dict[str, Any]:
    """What `configure_optimizers` returns: AdamW plus its per-step warm-up/cosine schedule."""
    opt = build_optimizer(params, trainer_cfg, lr, betas)
    return {
        "optimizer": opt,
        "lr_scheduler": {"scheduler": build_scheduler(opt, trainer_cfg, total_steps), "interval": "step"},
    }


# --- the Trainer --------------------------------------------------------------------------------


def resolve_accelerator(cfg: DictConfig) -> str:
    """'cpu' or 'gpu': trainer.accelerator, or when 'auto' the top-level `device` (auto: CUDA if present)."""
    acc = cfg.trainer.accelerator
    if acc != "auto":
        if acc not in ("cpu", "gpu"):
            raise ConfigError(f"trainer.accelerator={acc!r} is not one of auto, cpu, gpu")
        return acc
    if cfg.device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu" if cfg.device == "cpu" else "gpu"


def resolve_precision(cfg: DictConfig) -> str:
    """Lightning's precision: trainer.precision, or for 'auto' what model.dtype asks for
    ('auto': bf16-mixed on CUDA, 32-true on CPU; fp64: 64-true)."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    by_dtype = {"fp32": "32-true", "fp64": "64-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
    if cfg.model.dtype != "auto":
        return by_dtype[cfg.model.dtype]
    return "bf16-mixed" if resolve_accelerator(cfg) == "gpu" else "32-true"


def _strategy(name: str, accelerator: str, find_unused_parameters: bool) -> Any:
    if name == "auto":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = "gloo" if accelerator == "cpu" else "nccl"
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=find_unused_parameters)
    if name == "fsdp":
        if accelerator == "cpu":
            raise ConfigError("trainer.strategy=fsdp needs GPUs; use trainer.strategy=ddp on CPU")
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy()
    raise ConfigError(f"trainer.strategy={name!r} is not one of auto, ddp, fsdp")


def ckpt_path(out_dir: str | Path, stage: str) -> Path:
    """`<out_dir>/<stage>/last.ckpt`: the one checkpoint of a stage, and its hand-off to the next."""
    return Path(out_dir) / stage / "last.ckpt"


def make_trainer(
    cfg: DictConfig,
    out_dir: str | Path,
    stage: str,
    callbacks: Iterable = (),
    logger: Any = None,
    *,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    find_unused_parameters: bool = False,
    progress_bar: bool = True,
    **trainer_kwargs: Any,
) -> Trainer:
    """A Lightning Trainer from `cfg.trainer`, with the shared callbacks (see cf.train.callbacks).

    max_steps: this stage's optimizer steps (default trainer.max_steps; ERFT/CDMD pass their own).
    grad_clip: norm clipping by Lightning (default trainer.grad_clip; 0 = off). Lightning can only
        clip under automatic optimisation: a manual-optimisation module (CDMD) must pass
        grad_clip=0 and clip itself with `self.clip_gradients(opt, gradient_clip_val=...)`.
    logger: a Lightning logger (e.g. `run.lightning_logger()` from cf.tracking), or None for none.
    find_unused_parameters: DDP's flag, for modules whose steps leave some parameters unused.
    progress_bar: the step bar (`StepProgressBar`) on rank 0.
    trainer_kwargs: passed to lightning.Trainer as they are (e.g. val_check_interval).
    """
    t = cfg.trainer
    steps = t.max_steps if max_steps is None else max_steps
    if steps < 1:
        raise ConfigError(f"{stage}: max_steps={steps} must be >= 1")
    if t.ckpt_every < 0:
        raise ConfigError(f"trainer.ckpt_every={t.ckpt_every} must be >= 0 (0: only at the end)")
    if t.max_minutes is not None and t.max_minutes <= 0:
        raise ConfigError(f"trainer.max_minutes={t.max_minutes} must be positive, or null for no limit")
    set_threads(t.threads)
    accelerator = resolve_accelerator(cfg)
    devices: Any = t.devices
    if accelerator == "gpu" and cfg.device.startswith("cuda:") and t.devices == 1:
        devices = [int(cfg.device.split(":")[1])]
    clip = t.grad_clip if grad_clip is None else grad_clip
    hint = nonfinite_hint(cfg, stage)
    bar = [StepProgressBar(stage)] if progress_bar else []
    cbs = [NonFiniteStop(hint=hint), StreamPosition(), *bar, *callbacks]
    if t.max_minutes is not None:
        cbs.append(WallClockStop(t.max_minutes))
    cbs.append(AtomicCheckpoint(ckpt_path(out_dir, stage), t.ckpt_every, to_yaml(cfg), stage, hint=hint))
    _quiet_lightning()
    return Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(t.strategy, accelerator, find_unused_parameters),
        precision=resolve_precision(cfg),
        max_steps=steps,
        max_epochs=-1,
        log_every_n_steps=t.log_every,
        gradient_clip_val=clip if clip > 0 else None,
        gradient_clip_algorithm="norm",
        callbacks=cbs,
        logger=False if logger is None else logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(Path(out_dir) / stage),
        enable_checkpointing=True,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_progress_bar=progress_bar,
        **trainer_kwargs,
    )


def _quiet_lightning() -> None:
    """Lightning's start-up banner ("GPU available: ...", tips) is noise in every stage's output."""
    import logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fit(
    trainer: Trainer,
    module: LightningModule,
    datamodule: LightningDataModule | Any,
    out_dir: str | Path,
    stage: str,
) -> Path:
    """Train, resuming from `<out_dir>/<stage>/last.ckpt` if it exists; returns that path.

    A finished stage returns at once. Pass a LightningDataModule so the stream can be positioned
    (cf.train.callbacks.StreamPosition); a bare DataLoader works for runs that are never resumed.
    """
    if not module.automatic_optimization and trainer.gradient_clip_val:
        raise CfError(
            f"{type(module).__name__} uses manual optimisation, which Lightning cannot clip; build its "
            "trainer with make_trainer(..., grad_clip=0) and clip in training_step with "
            "self.clip_gradients(opt, gradient_clip_val=..., gradient_clip_algorithm='norm')"
        )
    if trainer.precision == "64-true":
        # Lightning casts to float64 only after restoring a checkpoint, which would round the
        # restored weights through float32 first.
        module.double()
    last = recover_checkpoint(ckpt_path(out_dir, stage), stage)
    data = (
        {"datamodule": datamodule}
        if isinstance(datamodule, LightningDataModule)
        else {"train_dataloaders": datamodule}
    )
    with warnings.catch_warnings():
        # StreamPosition resumes the stream itself; Lightning cannot know that.
        warnings.filterwarnings(
            "ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*"
        )
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*`val_dataloader` but have no `validation_step`.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        trainer.fit(module, ckpt_path=last if last.is_file() else None, weights_only=True, **data)
    return last


# --- the stage skeleton -------------------------------------------------------------------------


def wall_clock(cfg: DictConfig, key: str) -> list:
    """A wall-clock stop for a stage from config key `key` (e.g. student.max_minutes), if set."""
    missing = object()
    minutes = OmegaConf.select(cfg, key, default=missing)
    if minutes is missing:  # a misspelt key must not read as "no limit"
        raise CfError(f"no config key {key!r} for a stage's wall-clock limit (a typo in the stage runner?)")
    if minutes is not None and minutes <= 0:
        raise CfError(f"{key}={minutes} must be positive, or null for no limit")
    return [] if minutes is None else [WallClockStop(minutes)]


def run_stage(
    cfg: DictConfig,
    out_dir: str | Path,
    stage: str,
    module: LightningModule,
    data: Callable[[], LightningDataModule | Any],
    *,
    max_steps: int,
    parent_run_id: str | None = None,
    callbacks: Iterable = (),
    clock: str | None = None,
    evaluate: Callable[[int, float], Any] | None = None,
    **trainer_kw: Any,
) -> Path:
    """What every training stage does once its module is built (seeded, weights loaded): open its MLflow
    run, build its data (`data()`, inside the run so what it logs lands there), a Trainer (stopped by the
    wall clock of config key `clock` too), fit (resuming from `<out_dir>/<stage>/last.ckpt`), then on
    rank zero `evaluate(global_step, train_seconds)`. Returns the checkpoint path."""
    with tracking.start_run(cfg, stage, parent_run_id=parent_run_id) as run:
        datamodule = data()
        stops = wall_clock(cfg, clock) if clock else []
        trainer = make_trainer(cfg, out_dir, stage, callbacks=[*stops, *callbacks],
                               logger=run.lightning_logger(), max_steps=max_steps, **trainer_kw)
        t0 = time.monotonic()
        last = fit(trainer, module, datamodule, out_dir, stage)
        # budgets are in steps; a wall-clock cap is a safety stop, and a run it ended early says so
        # (`cf tables` marks its seed), never silently
        run.log_metrics({f"{stage}/steps": float(trainer.global_step),
                         f"{stage}/planned_steps": float(max_steps),
                         f"{stage}/cut_short": float(trainer.global_step < max_steps)})
        if evaluate is not None and trainer.is_global_zero:
            evaluate(trainer.global_step, time.monotonic() - t0)
    return last
