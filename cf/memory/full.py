"""`full`: keep every frame; each keeps its absolute time index (bounded or not, they coincide)."""

from __future__ import annotations

from cf.memory.base import MemoryPolicy, MemoryState


class FullPolicy(MemoryPolicy):
    name = "full"

    def __init__(self, memory_cfg, frames_per_chunk: int):
        super().__init__(frames_per_chunk=frames_per_chunk, sink=0, slow=0, window=frames_per_chunk,
                         bounded=memory_cfg.bounded_positions)

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
