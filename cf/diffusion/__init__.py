"""Diffusion math: flow-matching noising, schedules, timestep warping, samplers. No nn.Module state."""

from cf.diffusion.samplers import Sampler, build_sampler, euler, few_step, guide, randn_like
from cf.diffusion.schedule import (
    add_noise,
    edm_coefficients,
    loss_weight,
    sample_sigma,
    shift_sigma,
    student_sigmas,
    target,
    teacher_sigmas,
    to_x0,
)

__all__ = [
    "Sampler", "add_noise", "build_sampler", "edm_coefficients", "euler", "few_step", "guide", "loss_weight",
    "randn_like", "sample_sigma", "shift_sigma", "student_sigmas", "target", "teacher_sigmas", "to_x0",
]
