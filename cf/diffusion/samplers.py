"""Samplers: the teacher's multi-step Euler ODE and the student's few-step re-noising sampler.

A sampler is a schedule plus one update rule; the rollout owns the loop and asks it for
``sigmas[i]`` and ``step(x_t, x0, i)``, and calls the network through `denoise` with the sampler's
``num_timesteps`` (the scale of the network's timestep input). Both rules take the model's x0 estimate (see
`schedule.to_x0`), so they do not care what the model predicts. The last sigma is 0, so the
final step's output equals that step's x0 prediction for both samplers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cf.diffusion.schedule import student_sigmas, teacher_sigmas


@dataclass(frozen=True)
class Sampler:
    sigmas: tuple[float, ...]  # [n_steps + 1], decreasing, last 0
    renoise: bool  # True: few-step (predict x0, re-noise with fresh noise); False: Euler ODE
    num_timesteps: int  # diffusion.num_timesteps: the network's timestep input is sigma * this

    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1

    def step(self, x_t: Tensor, x0: Tensor, i: int, generator: torch.Generator | None = None) -> Tensor:
        """Move x_t (at sigmas[i]) to sigmas[i + 1] given the x0 estimate."""
        s, s_next = self.sigmas[i], self.sigmas[i + 1]
        if s_next == 0:
            return x0
        if self.renoise:
            eps = randn_like(x0, generator)
            return (1 - s_next) * x0 + s_next * eps
        # Euler on dx/ds = v = (x_t - x0) / s, written so sigma 1 -> noise exactly
        return x0 + (s_next / s) * (x_t - x0)


def euler(steps: int, shift: float, num_timesteps: int) -> Sampler:
    """The teacher's Euler ODE; num_timesteps is `diffusion.num_timesteps` (the network's timestep scale)."""
    return Sampler(tuple(teacher_sigmas(steps, shift)), renoise=False, num_timesteps=num_timesteps)


def few_step(timesteps: list[int], num_timesteps: int, shift: float) -> Sampler:
    return Sampler(tuple(student_sigmas(list(timesteps), num_timesteps, shift)), renoise=True,
                   num_timesteps=num_timesteps)


def build_sampler(diffusion_cfg, kind: str) -> Sampler:
    """kind: 'teacher' (Euler, teacher_steps, sample_shift) | 'student' (student_timesteps, student_shift)."""
    d = diffusion_cfg
    if kind == "teacher":
        return euler(d.teacher_steps, d.sample_shift, d.num_timesteps)
    if kind == "student":
        return few_step(list(d.student_timesteps), d.num_timesteps, d.student_shift)
    raise ValueError(f"sampler kind {kind!r} is not one of teacher, student")


def guide(x0_cond: Tensor, x0_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance. In x0 space it equals guidance on velocity at a fixed x_t."""
    return x0_uncond + scale * (x0_cond - x0_uncond)


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian noise shaped like x, drawn from `generator` on its own device, then moved to x's.

    Drawing on the generator's device keeps a CPU generator usable for a CUDA rollout (and
    the same numbers on every device).
    """
    gen_device = generator.device if generator is not None else x.device
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=dtype)
    return eps.to(x.device, x.dtype, non_blocking=True)  # no stream sync for a CPU generator
