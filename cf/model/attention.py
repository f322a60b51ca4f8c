"""Self-attention over [history read ; frames of this call] and cross-attention to the prompt.

Both use `scaled_dot_product_attention`, so the kernel (flash, memory-efficient, math) is the
best the device offers; the caller may pin one with `torch.nn.attention.sdpa_kernel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cf.model.rope import apply_rope


def _qk_norms(dim: int, head_dim: int, qk_norm: bool, across_heads: bool) -> tuple[nn.Module, nn.Module]:
    """RMSNorm of q and k: per head (weight [head_dim], native) or over all heads (weight [dim], Wan)."""
    if not qk_norm:
        return nn.Identity(), nn.Identity()
    width = dim if across_heads else head_dim
    return nn.RMSNorm(width, eps=1e-6), nn.RMSNorm(width, eps=1e-6)


def _norm_heads(norm: nn.Module, x: Tensor, across_heads: bool) -> Tensor:
    """Apply a q/k norm to x [..., H, Dh]: over Dh, or over H * Dh at once."""
    return norm(x.flatten(-2)).unflatten(-1, x.shape[-2:]) if across_heads else norm(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, across_heads: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.across_heads = qk_norm and across_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = _qk_norms(dim, self.head_dim, qk_norm, across_heads)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        read_kv: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        q_from: int = 0,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, F, N, D]; read_kv: rotated history (k, v) [B, M, N, H, Dh]; mask [F*N, (M+F)*N] bool.

        Returns the output [B, F - q_from, N, D] of the queries of frames q_from.. (every frame is a key)
        and this call's un-rotated (k, v) [B, F, N, H, Dh].
        """
        b, f, n, d = x.shape
        q, k, v = self.qkv(x).view(b, f, n, 3, self.heads, self.head_dim).unbind(3)
        if q_from:  # only these frames ask; every frame still answers (keys and values)
            q, cos_q, sin_q = q[:, q_from:], cos[:, q_from:], sin[:, q_from:]
            mask = None if mask is None else mask[q_from * n:]
        else:
            cos_q, sin_q = cos, sin
        # autocast runs the norms in fp32; back to v's dtype so the cache stores bf16 keys, not fp32
        q = _norm_heads(self.norm_q, q, self.across_heads).to(v.dtype)
        k = _norm_heads(self.norm_k, k, self.across_heads).to(v.dtype)
        qr, kr = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
        keys, vals = kr.flatten(1, 2), v.flatten(1, 2)  # [B, F*N, H, Dh]
        if read_kv is not None:
            keys = torch.cat([read_kv[0].flatten(1, 2), keys], dim=1)
            vals = torch.cat([read_kv[1].flatten(1, 2), vals], dim=1)
        out = F.scaled_dot_product_attention(
            qr.flatten(1, 2).transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask
        )  # [B, H, F*N, Dh]
        out = out.transpose(1, 2).reshape(b, f - q_from, n, d)
        return self.proj(out), (k, v)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool, across_heads: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.across_heads = qk_norm and across_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = _qk_norms(dim, self.head_dim, qk_norm, across_heads)

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        """x [B, F, N, D]; ctx [B, L, D]; ctx_mask [B, L] bool (at least one True per row) or None (all)."""
        b, f, n, d = x.shape
        q = _norm_heads(self.norm_q, self.q(x).view(b, f * n, self.heads, self.head_dim), self.across_heads)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, self.head_dim).unbind(2)
        q, k = q.to(v.dtype), _norm_heads(self.norm_k, k, self.across_heads).to(v.dtype)
        # ctx_mask None: every context token is attended (Wan's padded text)
        attn_mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )
        return self.proj(out.transpose(1, 2).reshape(b, f, n, d))
