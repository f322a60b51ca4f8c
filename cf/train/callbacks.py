"""Lightning callbacks every training stage shares: safe checkpoints, exact resume, clean stops.

`cf.train.base.make_trainer` installs all of them; stage modules never build them by hand.

- `AtomicCheckpoint` (+ `AtomicCheckpointIO`): `<out>/<stage>/last.ckpt` every `trainer.ckpt_every`
  steps and at the end, written to a temporary file and renamed, so a crash mid-save leaves the
  previous checkpoint intact; it refuses to overwrite a good checkpoint with non-finite weights.
- `NonFiniteStop`: stops on a NaN/inf loss with a message naming the metric and the step.
- `WallClockStop`: `trainer.max_minutes` per invocation; stops after the current step (the
  checkpoint is then written by `AtomicCheckpoint.on_train_end`).
- `StreamPosition`: resumes the data stream exactly (protocol below).
- `StepProgressBar`: one tqdm bar in optimizer steps, with the progress-bar metrics (the loss).

Data stream protocol (the world dataset, and any endless training stream):
    the training DataLoader's dataset is an IterableDataset with an int attribute `start`; sample
    `i` is a pure function of (seed, i), and the dataset yields the samples `start, start+1, ...`
    (split across ranks and DataLoader workers as it sees fit, but so that the stream from `start`
    is exactly the continuation of the stream from 0 after `start` samples). If it also has
    `rank` and `world_size` attributes they are set to the trainer's.
On resume `StreamPosition` sets `start` to the samples consumed so far, `batches * batch_size *
world_size` (`global_step * batch_size * world_size` when each training step takes one optimizer
step), so the resumed run sees exactly the samples an uninterrupted run would have seen. It
counts batches itself, not `global_step`, because a manual-optimisation module may step several
optimizers per batch. A fresh run starts at 0 whatever `start` the dataset was built with.
Lightning fetches the first batch right after `datamodule.train_dataloader()` returns, with no
hook in between, so `StreamPosition` wraps that method for the duration of the fit.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from cf.errors import CfError
from cf.faults import failpoint
from cf.utils import atomic_path


class NonFiniteError(CfError):
    """Training produced NaN/inf; the message names the metric, the step and the checkpoint kept."""


# What to try after a non-finite loss; `cf.train.base.make_trainer` names the stage's own learning rates.
DEFAULT_HINT = "Lower trainer.lr, set trainer.grad_clip, or check the data"


# What torch.load(weights_only=True) accepts without extra allow-listing. Exact types: subclasses
# (numpy.float64 is a float, AttributeDict a dict, a namedtuple a tuple) are refused by it.
_SAFE_PLAIN = {str, bytes, bytearray, int, float, bool, complex, type(None)}
_SAFE_TORCH = (torch.Tensor, torch.Size, torch.dtype, torch.device)


def check_weights_only_safe(obj: Any, where: str = "checkpoint") -> None:
    """Raise if `obj` holds anything torch.load(weights_only=True) would refuse (e.g. a DictConfig)."""
    if type(obj) in _SAFE_PLAIN or isinstance(obj, _SAFE_TORCH):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise CfError(f"{where} has a key of type {type(k).__name__}; checkpoints use str/int keys")
            check_weights_only_safe(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple, set):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
    else:
        raise CfError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
            "torch.load(weights_only=True) refuses; keep checkpoints to tensors and plain Python values "
            "(store configs as YAML strings: the trainer already puts the resolved config in "
            "checkpoint['cf_config'], so do not pass config objects to save_hyperparameters)"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, then os.replace; loads are weights_only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        check_weights_only_safe(checkpoint)
        with atomic_path(path, fsync=True) as tmp:
            # through a Python file object: a full disk then raises OSError(ENOSPC), not torch's opaque
            # "[enforce fail at inline_container.cc] unexpected pos"
            with open(tmp, "wb") as f:
                failpoint("ckpt.write")
                torch.save(checkpoint, f)
            failpoint("ckpt.tmp_written")

    def load_checkpoint(
        self, path, map_location: Any = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _any_rank(trainer: Trainer, flag: bool) -> bool:
    """True on every rank if it is true on one, so all ranks take the same branch (no DDP hang)."""
    return trainer.strategy.reduce_boolean_decision(flag, all=False) if trainer.world_size > 1 else flag


class AtomicCheckpoint(Checkpoint):
    """Saves `path` (last.ckpt) every `every_n_steps` optimizer steps and when training ends
    (max_steps, or a stop asked for by `WallClockStop`).

    Each checkpoint also carries the resolved config as YAML (`cf_config`) and the stage name,
    never config objects, so it loads with weights_only=True.
    """

    def __init__(
        self, path: str | Path, every_n_steps: int, config_yaml: str, stage: str, hint: str = DEFAULT_HINT
    ):
        self.path, self.every, self.config_yaml, self.stage = Path(path), every_n_steps, config_yaml, stage
        self.hint = hint
        self.last_saved_step: int | None = None  # step of the checkpoint on disk, for messages
        self._anchor = 0  # step the save schedule counts from; identical on every rank
        self._saved_at: int | None = None  # step of this run's latest save

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Decisions to save depend on global_step only: every rank must call save_checkpoint together.
        # A resumed run starts from the checkpoint on disk, which is then already this step's: a stage
        # resumed at its last step ends without rewriting it (its bytes, and so its hash, stay the same).
        self._anchor = trainer.global_step
        self._saved_at = self.last_saved_step = trainer.global_step if self.path.is_file() else None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Saved here, before the next batch, rather than at the end of the previous one: the
        # module's own on_train_batch_end (EMA update, residual collection) runs after every
        # callback's, so a checkpoint taken in that hook would miss it.
        if self.every > 0 and trainer.global_step - self._anchor >= self.every:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._saved_at != trainer.global_step:
            self.save(trainer, pl_module)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["cf_config"] = self.config_yaml
        checkpoint["cf_stage"] = self.stage

    def save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        finite = torch.stack([torch.isfinite(p).all() for p in pl_module.parameters()]).all()
        if _any_rank(trainer, not bool(finite)):
            raise NonFiniteError(
                f"{self.stage}: the weights are not finite at step {trainer.global_step}; not overwriting "
                f"the last good checkpoint {self.path} (step {self.last_saved_step}). {self.hint}"
            )
        trainer.save_checkpoint(self.path, weights_only=False)  # False: the full training state
        self._anchor = self._saved_at = self.last_saved_step = trainer.global_step


class NonFiniteStop(Callback):
    """Stops training with `NonFiniteError` when the step's loss or a logged metric is NaN/inf.

    Watched: the loss `training_step` returned (if any) and every logged metric whose name
    contains one of `patterns` (so `cdmd/dmd_loss` under manual optimisation is caught too). It
    runs before the checkpoint callback in the same step, so the bad step is never saved.
    """

    def __init__(self, patterns: tuple[str, ...] = ("loss",), hint: str = DEFAULT_HINT):
        self.patterns = tuple(p.lower() for p in patterns)
        self.hint = hint

    def _watched(self, trainer: Trainer, outputs: Any) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            values["training_step loss"] = loss.detach()
        for name, v in trainer.callback_metrics.items():
            if isinstance(v, torch.Tensor) and any(p in name.lower() for p in self.patterns):
                values[name] = v.detach()
        return values

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any
    ) -> None:
        values = self._watched(trainer, outputs)
        finite = torch.stack([torch.isfinite(v).all().cpu() for v in values.values()]) if values else None
        bad = (
            {} if finite is None else {k: v for (k, v), ok in zip(values.items(), finite.tolist()) if not ok}
        )
        if not _any_rank(trainer, bool(bad)):
            return
        what = (
            ", ".join(f"{k}={v.float().mean().item()}" for k, v in bad.items()) or "a value on another rank"
        )
        ckpt = trainer.checkpoint_callback
        kept = "no checkpoint was written yet"
        if isinstance(ckpt, AtomicCheckpoint) and ckpt.last_saved_step is not None:
            kept = f"the last good checkpoint is kept: {ckpt.path} (step {ckpt.last_saved_step})"
        raise NonFiniteError(
            f"non-finite training value at step {trainer.global_step} "
            f"(batch {trainer.fit_loop.total_batch_idx}): "
            f"{what}; training stopped and {kept}. {self.hint}"
        )


class WallClockStop(Callback):
    """Asks the trainer to stop after the step during which `max_minutes` (per invocation) ran out."""

    def __init__(self, max_minutes: float):
        self.max_seconds = 60.0 * max_minutes
        self.stopped_at_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if _any_rank(trainer, time.monotonic() - self._t0 >= self.max_seconds):
            trainer.should_stop = True
            self.stopped_at_step = trainer.global_step


class StreamPosition(Callback):
    """Resumes the training stream exactly where the checkpoint left it (see the module docstring)."""

    def __init__(self) -> None:
        self.batches = 0  # training batches consumed on each rank
        self.samples = 0  # stream samples consumed by all ranks together: where the stream resumes
        self._per_batch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches, self.samples = int(state_dict["batches"]), int(state_dict["samples"])

    @staticmethod
    def _stream(loader: Any) -> Any:
        """The loader's dataset if it follows the stream protocol, else None."""
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "start"):
            return None
        if loader.batch_size is None:
            raise CfError(
                "the training DataLoader has batch_size=None; StreamPosition needs the batch "
                "size to count the samples consumed (let the DataLoader do the batching)"
            )
        return dataset

    def position(self, trainer: Trainer, loader: Any) -> None:
        """Point `loader`'s dataset at the first sample this run has not consumed yet."""
        dataset = self._stream(loader)
        if dataset is None:
            return
        dataset.start = self.samples
        if hasattr(dataset, "rank") and hasattr(dataset, "world_size"):
            dataset.rank, dataset.world_size = trainer.global_rank, trainer.world_size

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit" or dm is None:
            return
        original = dm.train_dataloader

        def positioned_train_dataloader():
            loader = original()
            self.position(trainer, loader)
            return loader

        dm.train_dataloader = positioned_train_dataloader  # an instance attribute; removed in teardown

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if dm is not None and "train_dataloader" in vars(dm):
            del dm.train_dataloader

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        dataset = self._stream(loader)
        if dataset is None:
            return  # e.g. a finite folder dataset: Lightning restarts its epoch, nothing exact to do
        self._per_batch = loader.batch_size * trainer.world_size
        if dataset.start != self.samples:  # a bare DataLoader handed to fit: it could not be positioned
            raise CfError(
                f"after {self.batches} batches the training stream should continue at sample {self.samples} "
                f"but starts at {dataset.start}; pass a LightningDataModule to cf.train.base.fit (its "
                "train_dataloader is positioned automatically) instead of a ready-made DataLoader"
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.batches += 1
        self.samples += self._per_batch


class StepProgressBar(ProgressBar):
    """One tqdm bar counting optimizer steps up to max_steps (resumed runs start where they were)."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage, self._enabled, self._bar = stage, True, None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled:
            return
        from tqdm.auto import tqdm

        total = trainer.max_steps if trainer.max_steps > 0 else None
        self._bar = tqdm(
            total=total,
            initial=trainer.global_step,
            desc=self.stage,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
            smoothing=0.1,
        )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._bar is None:
            return
        self._bar.update(trainer.global_step - self._bar.n)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        self._bar.set_postfix({k: _short(v) for k, v in metrics.items()}, refresh=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


def _short(v: Any) -> Any:
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.4g}")
    return v
