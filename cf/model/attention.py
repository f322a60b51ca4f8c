"""Self-attention over [history read ; frames of this call] and cross-attention to the prompt.

Both use `scaled_dot_product_attention`, so the kernel (flash, memory-efficient, math) is the
best the device offers; the caller may pin one with `torch.nn.attention.sdpa_kernel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cf.model.rope import apply_rope


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        norm = (lambda: nn.RMSNorm(self.head_dim, eps=1e-6)) if qk_norm else nn.Identity
        self.norm_q, self.norm_k = norm(), norm()

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        read_kv: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, F, N, D]; read_kv: rotated history (k, v) [B, M, N, H, Dh]; mask [F*N, (M+F)*N] bool.

        Returns the output [B, F, N, D] and this call's un-rotated (k, v) [B, F, N, H, Dh].
        """
        b, f, n, d = x.shape
        q, k, v = self.qkv(x).view(b, f, n, 3, self.heads, self.head_dim).unbind(3)
        # autocast runs the norms in fp32; back to v's dtype so the cache stores bf16 keys, not fp32
        q, k = self.norm_q(q).to(v.dtype), self.norm_k(k).to(v.dtype)
        qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, vals = kr.flatten(1, 2), v.flatten(1, 2)  # [B, F*N, H, Dh]
        if read_kv is not None:
            keys = torch.cat([read_kv[0].flatten(1, 2), keys], dim=1)
            vals = torch.cat([read_kv[1].flatten(1, 2), vals], dim=1)
        out = F.scaled_dot_product_attention(
            qr.flatten(1, 2).transpose(1, 2), keys.transpose(1, 2), vals.transpose(1, 2), attn_mask=mask
        )  # [B, H, F*N, Dh]
        out = out.transpose(1, 2).reshape(b, f, n, d)
        return self.proj(out), (k, v)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        norm = (lambda: nn.RMSNorm(self.head_dim, eps=1e-6)) if qk_norm else nn.Identity
        self.norm_q, self.norm_k = norm(), norm()

    def forward(self, x: Tensor, ctx: Tensor, ctx_mask: Tensor) -> Tensor:
        """x [B, F, N, D]; ctx [B, L, D]; ctx_mask [B, L] bool (at least one True per row)."""
        b, f, n, d = x.shape
        q = self.norm_q(self.q(x).view(b, f * n, self.heads, self.head_dim))
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, self.head_dim).unbind(2)
        q, k = q.to(v.dtype), self.norm_k(k).to(v.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx_mask[:, None, None, :]
        )
        return self.proj(out.transpose(1, 2).reshape(b, f, n, d))
