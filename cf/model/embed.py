"""Patchify / unpatchify and sinusoidal embeddings (timestep, world position, camera)."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor


def patchify(x: Tensor, p: int) -> Tensor:
    """[B, F, C, H, W] -> tokens [B, F, N, C*p*p], N = (H/p)*(W/p), row-major."""
    return rearrange(x, "b f c (h p) (w q) -> b f (h w) (c p q)", p=p, q=p)


def unpatchify(tokens: Tensor, p: int, channels: int, height: int, width: int) -> Tensor:
    """tokens [B, F, N, C*p*p] -> [B, F, C, H, W]."""
    return rearrange(tokens, "b f (h w) (c p q) -> b f c (h p) (w q)", h=height // p, w=width // p,
                     c=channels, p=p, q=p)


def sinusoid(pos: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """pos [...] (float) -> [..., dim]: cos and sin at geometric frequencies (dim even)."""
    half = dim // 2
    dtype = torch.float64 if pos.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(base) * torch.arange(half, device=pos.device, dtype=dtype) / half)
    ang = pos.to(dtype)[..., None] * freqs
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def sinusoid_2d(y: Tensor, x: Tensor, dim: int) -> Tensor:
    """(y, x) [...] -> [..., dim]: half the channels for x, the rest for y (both even)."""
    dx = 2 * (dim // 4)
    return torch.cat([sinusoid(x, dx), sinusoid(y, dim - dx)], dim=-1)
