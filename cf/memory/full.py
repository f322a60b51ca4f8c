"""`full`: keep every frame, each at its absolute time index. It reads no knob: bounded positions
of the whole history from frame 0 are the absolute ones."""

from __future__ import annotations

from dataclasses import dataclass

from cf.memory.base import MemoryPolicy, MemoryState, PolicyConfig


@dataclass(frozen=True)
class FullConfig(PolicyConfig):
    pass


class FullPolicy(MemoryPolicy):
    name = "full"
    Config = FullConfig

    def __init__(self, config: FullConfig, frames_per_chunk: int):
        super().__init__(config, frames_per_chunk, sink=0, window=frames_per_chunk, bounded=False)

    @property
    def capacity(self) -> int | None:
        return None

    @property
    def position_bound(self) -> int | None:
        return None

    def admit(self, state: MemoryState, n_new: int, mean_keys=None) -> list[int]:
        state.fast.extend(range(state.n, state.n + n_new))
        state.n += n_new
        return []
