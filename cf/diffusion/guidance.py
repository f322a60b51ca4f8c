"""Classifier-free guidance: the scale each role samples with, decided here once, and the doubled batch
that evaluates it.

Roles and the config key each reads:

    teacher       the teacher sampling as itself, wherever it is shown or scored as "the teacher" (its
                  continuation evaluation, `cf generate --sampler teacher`, the generator evaluation's
                  teacher row): diffusion.cfg_scale
    ode_targets   the teacher sampling the student's ODE regression targets: student.guidance
    student       the few-step student (distillation bakes the guidance in): 1
    real_score_1  the teacher as CDMD's real score, stage 1: cdmd.cfg_stage1
    real_score_2  the same in stage 2: cdmd.cfg_stage2

A model with nothing to guide (no text encoder and no camera conditioning) gets 1 in every role: its
null condition equals its condition, and a doubled batch would only cost time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cf.diffusion.samplers import guide

TEACHER, ODE_TARGETS, STUDENT, REAL_SCORE_1, REAL_SCORE_2 = (
    "teacher", "ode_targets", "student", "real_score_1", "real_score_2")
ROLES = {
    TEACHER: lambda cfg: cfg.diffusion.cfg_scale,
    ODE_TARGETS: lambda cfg: cfg.student.guidance,
    STUDENT: lambda cfg: 1.0,
    REAL_SCORE_1: lambda cfg: cfg.cdmd.cfg_stage1,
    REAL_SCORE_2: lambda cfg: cfg.cdmd.cfg_stage2,
}


def is_conditioned(model_cfg) -> bool:
    """Whether the model has a condition to guide by: a text encoder or the camera."""
    return model_cfg.text_encoder != "none" or bool(model_cfg.camera)


def guidance_scale(cfg, role: str) -> float:
    """The classifier-free guidance scale of `role` (see the module doc) under `cfg`."""
    if role not in ROLES:
        raise ValueError(f"guidance role {role!r} is not one of {', '.join(ROLES)}")
    return float(ROLES[role](cfg)) if is_conditioned(cfg.model) else 1.0


@dataclass(frozen=True)
class Guided:
    """One model call under guidance `scale`: when it is not 1, [cond ; null] run as one doubled batch and
    their x0 estimates combine by `guide`; at 1 everything passes through unchanged."""

    scale: float

    @property
    def doubled(self) -> bool:
        return self.scale != 1

    def cond(self, cond, batch_size: int):
        """The conditioning of the call: [cond ; null cond] along the batch when doubled."""
        return cond.with_null(batch_size) if self.doubled else cond

    def twice(self, t: Tensor) -> Tensor:
        """A tensor [B, ...] for both halves of the doubled batch ([2B, ...]); itself when not doubled."""
        return torch.cat([t, t]) if self.doubled else t

    def combine(self, x0: Tensor) -> Tensor:
        """x0 estimates of the call ([2B, ...] when doubled) -> the guided estimate [B, ...]."""
        return guide(*x0.chunk(2), self.scale) if self.doubled else x0
