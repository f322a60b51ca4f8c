"""What the memory hands the model for one query: cached keys/values with their positions."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass
class CacheRead:
    """The history a query attends to, in any order (attention does not care; positions say where).

    k, v:            per layer [B, M, N, H, Dh]; k un-rotated unless `rotated`
    positions:       [M] long, the RoPE time index of each read frame
    times:           [M] long, each frame's absolute index in the video (for inspection)
    cameras:         [B, M, 2] panorama (x, y) of each frame, or None (frame positions)
    query_positions: [Fq] long, the time indices the query frames should use
    rotated:         k already carries its rotary positions (`CausalVideoDiT.rotate_read`), so
                     the sampler's steps over one chunk rotate the history once, not per step
    """

    k: list[Tensor]
    v: list[Tensor]
    positions: Tensor
    times: Tensor
    cameras: Tensor | None
    query_positions: Tensor
    rotated: bool = False

    @property
    def n_frames(self) -> int:
        return int(self.positions.shape[0])

    @classmethod
    def from_kv(
        cls,
        kv: list[tuple[Tensor, Tensor]],
        indices: Tensor,
        positions: Tensor,
        query_positions: Tensor,
        cameras: Tensor | None = None,
    ) -> CacheRead:
        """Select frames `indices` [K] of a forward's un-rotated kv (per layer [B, F, N, H, Dh]).

        This is how a caller without a cache (the teacher in training) reads history per a
        `ReadPlan`: run the history, then hand the chosen frames to the target's forward.
        `cameras` [B, F, 2] are the cameras of all F frames (selected here too).
        """
        idx = indices.to(kv[0][0].device)
        return cls(
            k=[k.index_select(1, idx) for k, _ in kv],
            v=[v.index_select(1, idx) for _, v in kv],
            positions=positions.to(idx.device),
            times=indices.clone(),
            cameras=None if cameras is None else cameras.index_select(1, idx.to(cameras.device)),
            query_positions=query_positions.to(idx.device),
        )

    def detach(self) -> CacheRead:
        """The same read without gradient (history read from a forward that had one)."""
        return replace(self, k=[k.detach() for k in self.k], v=[v.detach() for v in self.v])
