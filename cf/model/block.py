"""One DiT block, Wan-style: per-frame adaLN-modulated self-attention and MLP, plus cross-attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cf.model.attention import CrossAttention, SelfAttention


def _kept(keep_from: int, *ts: Tensor) -> tuple[Tensor, ...]:
    """Frames keep_from.. of each per-frame tensor [B, F, ...]: what the block runs after its attention."""
    return ts if not keep_from else tuple(t[:, keep_from:] for t in ts)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, qk_norm: bool, across_heads: bool = False,
                 fp32_modulation: bool = False):
        super().__init__()
        self.fp32 = fp32_modulation  # modulation, norms and gated residuals in fp32 (Wan), see forward
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(dim, heads, qk_norm, across_heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross = CrossAttention(dim, heads, qk_norm, across_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(ffn_dim, dim))
        # learned offsets of the six modulation vectors (shift, scale, gate for attention and MLP)
        self.modulation = nn.Parameter(torch.randn(6, dim) * dim**-0.5)

    def forward(
        self,
        x: Tensor,
        e: Tensor,
        cos: Tensor,
        sin: Tensor,
        ctx: Tensor,
        ctx_mask: Tensor,
        read_kv: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
        keep_from: int = 0,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x [B, F, N, D]; e [B, F, 6, D] per-frame modulation from the timestep (and camera).

        keep_from: return only frames keep_from.. (all F frames still give their keys and values, and
        are read by the kept ones); everything after the attention runs on the kept frames only."""
        if self.fp32:
            return self._forward_fp32(x, e, cos, sin, ctx, ctx_mask, read_kv, mask, keep_from)
        mod = (self.modulation + e).unsqueeze(2)  # [B, F, 1, 6, D]: one per frame, shared by its tokens
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(3)
        a, kv = self.attn(self.norm1(x) * (1 + scale1) + shift1, cos, sin, read_kv, mask, keep_from)
        x, gate1, scale2, shift2, gate2 = _kept(keep_from, x, gate1, scale2, shift2, gate2)
        x = x + gate1 * a
        x = x + self.cross(self.norm_cross(x), ctx, ctx_mask)
        x = x + gate2 * self.ffn(self.norm2(x) * (1 + scale2) + shift2)
        return x, kv

    def _forward_fp32(self, x, e, cos, sin, ctx, ctx_mask, read_kv, mask, keep_from=0):
        """The same block with Wan's precision: modulation, the norms and the gated residual adds in
        fp32 (fp64 for a float64 model), the attention and MLP in the compute dtype of x."""
        hp = torch.promote_types(x.dtype, torch.float32)
        dt = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            mod = (self.modulation.to(hp) + e.to(hp)).unsqueeze(2)
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(3)
            h = (self.norm1(x.to(hp)) * (1 + scale1) + shift1).to(dt)
        a, kv = self.attn(h, cos, sin, read_kv, mask, keep_from)
        x, gate1, scale2, shift2, gate2 = _kept(keep_from, x, gate1, scale2, shift2, gate2)
        with torch.autocast(x.device.type, enabled=False):
            x = (x.to(hp) + gate1 * a.to(hp)).to(dt)
            h = self.norm_cross(x.to(hp)).to(dt)
        x = x + self.cross(h, ctx, ctx_mask).to(dt)
        with torch.autocast(x.device.type, enabled=False):
            h = (self.norm2(x.to(hp)) * (1 + scale2) + shift2).to(dt)
        y = self.ffn(h)
        with torch.autocast(x.device.type, enabled=False):
            x = (x.to(hp) + gate2 * y.to(hp)).to(dt)
        return x, kv
