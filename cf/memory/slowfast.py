"""`slowfast`: Context Forcing's Slow-Fast Memory.

Sink N_s (`sink_frames`) + slow memory of up to N_c (`slow_frames`) consolidated frames + fast FIFO
of N_l (`window_frames`, the current chunk included). Every `promote_every` chunks, the first frame
of the chunk leaving the fast window is a candidate; `similarity` promotes it when the cosine of
its mean key to the last promoted frame's is below `tau` (always when nothing was promoted yet),
`uniform` always promotes it. Nothing before frame `promote_after`; a full slow memory evicts its
oldest frame. With bounded positions, RoPE time indices stay in [0, N_s + N_c + N_l).
"""

from __future__ import annotations

from cf.memory.base import MemoryPolicy


class SlowFastPolicy(MemoryPolicy):
    name = "slowfast"

    def __init__(self, memory_cfg, frames_per_chunk: int):
        m = memory_cfg
        super().__init__(frames_per_chunk=frames_per_chunk, sink=m.sink_frames, slow=m.slow_frames,
                         window=m.window_frames, bounded=m.bounded_positions, promotion=m.promotion,
                         tau=m.tau, promote_every=m.promote_every, promote_after=m.promote_after)
