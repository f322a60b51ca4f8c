"""`sliding`: the last `window_frames` frames, the current chunk included (Self-Forcing's inference).

Bounded positions shift a contiguous window by a constant, which rotary attention cannot see up to
rounding; the knob is still declared, since the policy reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cf.memory.base import MemoryPolicy, PolicyConfig


@dataclass(frozen=True)
class SlidingConfig(PolicyConfig):
    window_frames: int
    bounded_positions: bool


class SlidingPolicy(MemoryPolicy):
    name = "sliding"
    Config = SlidingConfig

    def __init__(self, config: SlidingConfig, frames_per_chunk: int):
        super().__init__(config, frames_per_chunk, window=config.window_frames, sink=0,
                         bounded=config.bounded_positions)
