"""`sink`: the first `sink_frames` frames plus the last `window_frames` (LongLive's frame sink)."""

from __future__ import annotations

from cf.memory.base import MemoryPolicy


class SinkPolicy(MemoryPolicy):
    name = "sink"

    def __init__(self, memory_cfg, frames_per_chunk: int):
        super().__init__(frames_per_chunk=frames_per_chunk, sink=memory_cfg.sink_frames, slow=0,
                         window=memory_cfg.window_frames, bounded=memory_cfg.bounded_positions)
