"""`slowfast`: Context Forcing's Slow-Fast Memory.

Sink N_s (`sink_frames`) + slow memory of up to N_c (`slow_frames`) consolidated frames + fast FIFO
of N_l (`window_frames`, the current chunk included). Every `promote_every` chunks, the first frame
of the chunk leaving the fast window is a candidate; `similarity` promotes it when the cosine of
its mean key to the last promoted frame's is below `tau` (always when nothing was promoted yet),
`uniform` always promotes it. Nothing before frame `promote_after`; a full slow memory evicts its
oldest frame. With bounded positions, RoPE time indices stay in [0, N_s + N_c + N_l).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cf.memory.base import MemoryPolicy, MemoryState, PolicyConfig


@dataclass(frozen=True)
class SlowFastConfig(PolicyConfig):
    sink_frames: int
    slow_frames: int
    window_frames: int
    tau: float
    promotion: str
    promote_every: int
    promote_after: int
    bounded_positions: bool


class SlowFastPolicy(MemoryPolicy):
    name = "slowfast"
    Config = SlowFastConfig

    def __init__(self, config: SlowFastConfig, frames_per_chunk: int):
        super().__init__(config, frames_per_chunk, sink=config.sink_frames, slow=config.slow_frames,
                         window=config.window_frames, bounded=config.bounded_positions)
        self.promotion, self.tau = config.promotion, config.tau
        self.promote_every, self.promote_after = config.promote_every, config.promote_after

    @property
    def needs_keys(self) -> bool:
        return self.slow > 0 and self.promotion == "similarity"

    def _is_candidate(self, f: int) -> bool:
        """The first frame of every `promote_every`-th chunk, from `promote_after` on, outside the sink."""
        return (self.slow > 0 and f % self.chunk == 0 and (f // self.chunk) % self.promote_every == 0
                and f >= max(self.promote_after, self.sink))

    def _entered(self, state: MemoryState, f: int, mean_key: Tensor | None) -> None:
        if self.needs_keys and self._is_candidate(f):
            state.candidate_keys[f] = mean_key.detach()

    def _leave(self, state: MemoryState, f: int) -> list[int]:
        """Frame f leaves the fast window: promote it to the slow memory or forget it."""
        key = state.candidate_keys.pop(f, None)
        if not (self._is_candidate(f) and self._promote(state, key)):
            return [f]
        state.slow.append(f)
        state.promoted.append(f)
        if self.needs_keys:
            state.last_key = key
        return [state.slow.pop(0)] if len(state.slow) > self.slow else []

    def _promote(self, state: MemoryState, key: Tensor | None) -> bool:
        if self.promotion == "uniform" or state.last_key is None:
            return True
        # one decision for the batch (and all layers): the batch-mean cosine, exactly the
        # paper's rule at batch 1. One host sync per check, i.e. every promote_every chunks.
        cos = torch.nn.functional.cosine_similarity(key.float(), state.last_key.float(), dim=-1).mean()
        return bool(cos < self.tau)
