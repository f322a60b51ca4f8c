"""Recovering a stage after a kill or a fault: the checkpoint to resume from, and what to change
after a non-finite loss. `cf.train.base.fit` and `make_trainer` use both."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from cf.errors import CfError

# The learning rates each stage trains with (the others read trainer.lr).
STAGE_LRS = {"student": ("student.lr",), "cdmd1": ("cdmd.generator_lr", "cdmd.critic_lr"),
             "cdmd2": ("cdmd.generator_lr", "cdmd.critic_lr")}


def nonfinite_hint(cfg: DictConfig, stage: str) -> str:
    """What to change after a non-finite loss in `stage`: its own learning rates, with their values."""
    keys = STAGE_LRS.get(stage, ("trainer.lr",))
    rates = " and ".join(f"{k} (now {OmegaConf.select(cfg, k):g})" for k in keys)
    return f"Lower {rates}, set trainer.grad_clip, or check the data"


def _ckpt_step(path: Path) -> int:
    """The checkpoint's global_step; -1 if it cannot be read."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a candidate
        return -1


def recover_checkpoint(last: Path, stage: str) -> Path:
    """Make `last` the best resumable checkpoint a killed save left, and refuse a damaged one.

    A kill between writing a checkpoint's temporary file and renaming it leaves a complete checkpoint
    under a temporary name: it is promoted when it is newer than `last` (or `last` is missing), so the
    stage resumes from it instead of from an older step or step 0. Every other temporary file of an
    interrupted save is removed. A damaged `last` (truncated, failed CRC) is a CfError naming it.
    """
    from cf.filecheck import damage
    from cf.utils import partial_target

    temps = sorted(p for p in last.parent.glob(f".{last.name}.*") if partial_target(p.name) == last.name)
    best, best_step = (last, _ckpt_step(last)) if last.is_file() and damage(last) is None else (None, -1)
    for tmp in temps:
        if damage(tmp) is None and (step := _ckpt_step(tmp)) > best_step:
            best, best_step = tmp, step
    if best is not None and best != last:
        os.replace(best, last)
        print(f"[{stage}] resuming from {last}: recovered from the complete save a kill left at {best.name} "
              f"(step {best_step})", file=sys.stderr, flush=True)
    for tmp in temps:
        tmp.unlink(missing_ok=True)
    if last.is_file() and (problem := damage(last)) is not None:
        raise CfError(
            f"cannot resume stage {stage} from {str(last)!r}: {problem}. Move it aside to restart the stage "
            f"from step 0 (mv {last} {last}.damaged) or put back a good copy"
        )
    return last
