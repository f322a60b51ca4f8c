"""`sink`: the first `sink_frames` frames plus the last `window_frames` (LongLive's frame sink)."""

from __future__ import annotations

from dataclasses import dataclass

from cf.memory.base import MemoryPolicy, PolicyConfig


@dataclass(frozen=True)
class SinkConfig(PolicyConfig):
    sink_frames: int
    window_frames: int
    bounded_positions: bool


class SinkPolicy(MemoryPolicy):
    name = "sink"
    Config = SinkConfig

    def __init__(self, config: SinkConfig, frames_per_chunk: int):
        super().__init__(config, frames_per_chunk, sink=config.sink_frames, window=config.window_frames,
                         bounded=config.bounded_positions)
