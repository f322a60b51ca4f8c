"""Diffusion math: flow-matching noising, schedules, timestep warping, samplers, the network's
preconditioning (`denoise`). No nn.Module state: the network is an argument, never a member."""

from cf.diffusion.guidance import (
    ODE_TARGETS,
    REAL_SCORE_1,
    REAL_SCORE_2,
    ROLES,
    STUDENT,
    TEACHER,
    Guided,
    guidance_scale,
    is_conditioned,
)
from cf.diffusion.precond import denoise, encode_clean, noise_levels, timestep_input
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
    "ODE_TARGETS", "REAL_SCORE_1", "REAL_SCORE_2", "ROLES", "STUDENT", "TEACHER", "Guided", "Sampler",
    "add_noise", "build_sampler", "denoise", "edm_coefficients", "encode_clean", "euler", "few_step",
    "guidance_scale", "guide", "is_conditioned", "loss_weight", "noise_levels", "randn_like", "sample_sigma",
    "shift_sigma", "student_sigmas", "target", "teacher_sigmas", "timestep_input", "to_x0",
]
