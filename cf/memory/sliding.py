"""`sliding`: the last `window_frames` frames, the current chunk included (Self-Forcing's inference)."""

from __future__ import annotations

from cf.memory.base import MemoryPolicy


class SlidingPolicy(MemoryPolicy):
    name = "sliding"

    def __init__(self, memory_cfg, frames_per_chunk: int):
        super().__init__(frames_per_chunk=frames_per_chunk, sink=0, slow=0, window=memory_cfg.window_frames,
                         bounded=memory_cfg.bounded_positions)
