"""Flow matching: noising, prediction targets, sigma schedules and timestep sampling.

Convention (rectified flow, as Wan): ``x_t = (1 - s) * x0 + s * eps`` with noise level
``s = sigma`` in [0, 1]; the velocity is ``v = eps - x0``. Sigma broadcasts per frame:
``sigma [B, F]`` against a video ``[B, F, C, H, W]``. Everything here is a pure function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cf.errors import CfError

PREDICTIONS = ("x0", "velocity")


def _per_frame(sigma: Tensor, like: Tensor) -> Tensor:
    """sigma [B, F] (or anything broadcastable) -> [B, F, 1, 1, 1] in `like`'s dtype."""
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    while sigma.dim() < like.dim():
        sigma = sigma.unsqueeze(-1)
    return sigma


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_t = (1 - s) x0 + s eps; x0, noise [B, F, C, H, W], sigma [B, F]."""
    s = _per_frame(sigma, x0)
    return (1 - s) * x0 + s * noise


def target(x0: Tensor, noise: Tensor, prediction: str) -> Tensor:
    """What a model with this `prediction` type is trained to output."""
    _check(prediction)
    return x0 if prediction == "x0" else noise - x0


def to_x0(pred: Tensor, x_t: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """The clean-sample estimate implied by a model output (the one conversion every sampler uses)."""
    _check(prediction)
    if prediction == "x0":
        return pred
    return x_t - _per_frame(sigma, x_t) * pred


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """Shifted schedule ``shift * s / (1 + (shift - 1) * s)``: spends more steps at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def teacher_sigmas(steps: int, shift: float) -> list[float]:
    """Euler schedule: `steps` intervals from sigma 1 to 0, shifted. Length steps + 1, last 0."""
    if steps < 1:
        raise CfError(f"diffusion.teacher_steps={steps} must be >= 1")
    return [float(shift_sigma(1 - i / steps, shift)) for i in range(steps + 1)]


def student_sigmas(timesteps: list[int], num_timesteps: int, shift: float) -> list[float]:
    """The student's few-step timesteps (e.g. [1000, 750, 500, 250] of 1000) warped by `shift`,
    with the final 0 appended (the last step's x0 prediction is the output)."""
    if not timesteps or any(not 0 < t <= num_timesteps for t in timesteps):
        raise CfError(
            f"diffusion.student_timesteps={list(timesteps)} must be non-empty values in "
            f"(0, {num_timesteps}] (diffusion.num_timesteps)"
        )
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise CfError(f"diffusion.student_timesteps={list(timesteps)} must be strictly decreasing")
    return [float(shift_sigma(t / num_timesteps, shift)) for t in timesteps] + [0.0]


def sample_sigma(
    shape: tuple[int, ...],
    shift: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tensor:
    """Training noise levels: u ~ U[0, 1], shifted, clamped to [lo, hi] (e.g. DMD's [20, 980] / 1000).

    The draw happens on the generator's device (CPU by default) so DDP ranks seeded alike agree.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64)
    return shift_sigma(u, shift).clamp(lo, hi).to(device=device, dtype=torch.float32)


def edm_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor]:
    """(c_in, c_skip, c_out) of EDM preconditioning for ``x_t = (1 - s) x0 + s eps``.

    With a = 1 - s and v = a^2 sd^2 + s^2 (the variance of x_t for data of RMS sd): c_in = 1/sqrt(v)
    gives the network unit-variance input; x0 = c_skip x_t + c_out F with c_skip = a sd^2 / v and
    c_out = s sd / sqrt(v) makes the network's target F unit-variance, with c_out as small as it can
    be: at s = 0 the output is the input (c_skip 1, c_out 0), at s = 1 it is sd * F.
    """
    a = 1 - sigma
    var = a * a * sigma_data**2 + sigma * sigma
    return var.rsqrt(), a * sigma_data**2 / var, sigma * sigma_data * var.rsqrt()


def loss_weight(sigma: Tensor, model_cfg) -> Tensor:
    """Per-sample weight that turns an x0-space MSE into the loss of the network's own output:
    1 for plain x0-prediction; 1 / c_out^2 for EDM preconditioning (the MSE of F, unit scale at every
    noise level; sigma is floored at 1e-3 there); 1 / sigma^2 for velocity (v = (x_t - x0) / sigma)."""
    _check(model_cfg.prediction)
    if model_cfg.prediction == "velocity":
        return sigma.pow(-2)
    if model_cfg.precondition == "edm":
        return edm_coefficients(sigma.clamp_min(1e-3), model_cfg.sigma_data)[2].pow(-2)
    return torch.ones_like(sigma)


def _check(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise CfError(f"model.prediction={prediction!r} is not one of {', '.join(PREDICTIONS)}")
