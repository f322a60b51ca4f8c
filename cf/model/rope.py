"""3D rotary positions over (time, height, width), Wan-style: the head width is split in three.

Positions are floats, so world coordinates that fall between patches rotate exactly. Angles are
computed in float32 (float64 for float64 models) whatever the compute dtype, then the rotated
tensor is cast back: bf16 angles would alias positions beyond a few hundred.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(time, height, width) widths of a head: each even, time takes the remainder."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


class Rope3D(nn.Module):
    """Holds no tensors: frequencies are rebuilt per call in the angle dtype, so converting the
    model to bf16 cannot round them."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.dims, self.theta = axis_dims(head_dim), theta

    def forward(self, t: Tensor, y: Tensor, x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """t [F] time positions; y, x [B', F, N] spatial positions (B' = 1 or B).

        Returns cos, sin [B', F, N, 1, head_dim / 2] (the 1 broadcasts over heads).
        """
        ad = angle_dtype(dtype)
        f_t, f_h, f_w = (self.theta ** (-torch.arange(0, d, 2, device=y.device, dtype=ad) / d)
                         for d in self.dims)
        t = t.to(device=y.device, dtype=ad)[None, :, None, None].expand(*y.shape, 1)
        ang = torch.cat([t * f_t, y.to(ad)[..., None] * f_h, x.to(ad)[..., None] * f_w], dim=-1)
        ang = ang.unsqueeze(-2)
        return ang.cos(), ang.sin()


def angle_dtype(dtype: torch.dtype) -> torch.dtype:
    """Positions and angles: float64 for float64 models, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs of the last dim. x [B, F, N, H, Dh]; cos, sin [B', F, N, 1, Dh/2].

    As one complex product (a + ib)(cos + i sin): the same two products and sum per component as the
    real form, in one kernel instead of six plus a stack (about half the time, forward and backward)."""
    pairs = x.to(cos.dtype).unflatten(-1, (-1, 2))
    try:
        z = torch.view_as_complex(pairs)
    except RuntimeError:  # strides of a view the complex dtype cannot alias
        z = torch.view_as_complex(pairs.contiguous())
    return torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
