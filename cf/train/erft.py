"""Error-Recycling Fine-Tuning (ERFT): a bank of the model's own errors, fed back into its inputs.

The context teacher is trained on clean history, but in CDMD stage 2 it reads the *student's*
history, which has drifted. ERFT closes that gap: it records residuals `x0_pred - x0_true` the
teacher itself makes, binned by timestep, and adds such residuals to the history (and, with their
own probabilities, to the noisy target and to the noise) while training, so the teacher learns to
give good guidance from imperfect context.

The bank is a pair of buffers, so it travels inside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cf.config.load import ConfigError


class ResidualBank(nn.Module):
    """`bins` timestep bins x `size` residual frames of `dim` values each.

    Replacement rule: while a bin has room, a residual is appended; once it is full, the new
    residual replaces the stored entry nearest to it in L2 (the paper's rule), so the bank keeps
    diverse errors instead of the most recent ones.
    Residuals are stored in half precision: they are perturbations, and at the paper's
    50 x 500 bank the memory matters.
    """

    def __init__(self, bins: int, size: int, frame_shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float16):
        super().__init__()
        if bins < 1 or size < 1:
            raise ConfigError(f"residual bank needs bins >= 1 and size >= 1, got bins={bins}, size={size}")
        self.bins, self.size, self.frame_shape = bins, size, tuple(frame_shape)
        dim = int(torch.tensor(frame_shape).prod())
        self.register_buffer("residuals", torch.zeros(bins, size, dim, dtype=dtype))
        self.register_buffer("counts", torch.zeros(bins, dtype=torch.long))

    def bin_of(self, sigma: Tensor) -> Tensor:
        """sigma in [0, 1] -> bin index in [0, bins)."""
        return (sigma.float().clamp(0, 1) * self.bins).long().clamp_max(self.bins - 1)

    @torch.no_grad()
    def add(self, residual: Tensor, sigma: Tensor) -> None:
        """residual [N, *frame_shape] (one per frame), sigma [N]: file each under its bin."""
        flat = residual.detach().reshape(residual.shape[0], -1).to(self.residuals.dtype)
        for r, b in zip(flat, self.bin_of(sigma).tolist()):
            n = int(self.counts[b])
            if n < self.size:
                self.residuals[b, n] = r
                self.counts[b] += 1
            else:
                d = (self.residuals[b].float() - r.float()).pow(2).sum(-1)
                self.residuals[b, int(d.argmin())] = r

    def sample(self, sigma: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One stored residual per entry of `sigma` [N] -> [N, *frame_shape] (zeros where a bin is empty).

        An empty bin borrows from the nearest non-empty bin, so early in collection every
        timestep still gets a realistic error.
        """
        bins = self.bin_of(sigma)
        filled = (self.counts > 0).nonzero().flatten()
        out = torch.zeros(len(bins), self.residuals.shape[-1], device=self.residuals.device)
        if filled.numel() == 0:
            return out.reshape(len(bins), *self.frame_shape)
        nearest = filled[(bins[:, None] - filled[None, :].to(bins.device)).abs().argmin(1)]
        u = torch.rand(len(bins), generator=generator, device=generator.device if generator else "cpu")
        idx = (u.to(self.counts.device) * self.counts[nearest]).long().clamp_max(self.counts[nearest] - 1)
        out = self.residuals[nearest.to(self.residuals.device), idx.to(self.residuals.device)].float()
        return out.reshape(len(bins), *self.frame_shape)

    def filled(self) -> int:
        return int(self.counts.sum())


@dataclass
class Injection:
    """Which parts of each sample get a residual (boolean per sample [B])."""

    history: Tensor
    target: Tensor
    noise: Tensor

    @property
    def clean(self) -> Tensor:
        return ~(self.history | self.target | self.noise)


def draw_injection(
    batch: int, p_clean: float, p_history: float, p_target: float, p_noise: float, generator: torch.Generator
) -> Injection:
    """A fraction `p_clean` of samples stays untouched; each other sample gets history, target and
    noise residuals independently with their own probabilities (paper: 0.5 / 0.9 / 0.9 / 0.01)."""
    u = torch.rand(4, batch, generator=generator, device=generator.device)
    perturbed = u[0] >= p_clean
    return Injection(history=perturbed & (u[1] < p_history),
                     target=perturbed & (u[2] < p_target),
                     noise=perturbed & (u[3] < p_noise))
