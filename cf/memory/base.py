"""Memory policies: what the cache keeps after a chunk, and what (with which positions) a query reads.

A policy is a small object built from `MemoryConfig` plus a state it never owns: the cache holds
the state, the policy answers two questions about it (`admit`: given new frames, which frames to
forget; `layout`: which held frames a query reads, at which RoPE time positions). Frames are named
by their absolute index in the video. Because the answers depend only on the sequence of frames
(not on how writes were grouped), `plan` can replay them without a cache: what the teacher needs.

Windowed policies share one state machine: a sink of the first `sink` frames, a slow memory of
up to `slow` promoted frames, and a fast FIFO. Window sizes count the frames a query chunk can
attend to INCLUDING its own chunk, so the FIFO holds `window - frames_per_chunk` history frames.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cf.errors import CfError


@dataclass
class ReadPlan:
    """What a chunk placed right after `n_history` frames reads, without a cache.

    indices:         [K] long, which of the history frames are read (sink, slow, fast order)
    positions:       [K] long, their RoPE time positions
    query_positions: [n_query] long, the time positions of the query frames
    """

    indices: Tensor
    positions: Tensor
    query_positions: Tensor


@dataclass
class MemoryState:
    n: int = 0  # frames admitted so far = absolute index of the next frame
    sink: list[int] = field(default_factory=list)
    slow: list[int] = field(default_factory=list)
    fast: deque = field(default_factory=deque)
    candidate_keys: dict[int, Tensor] = field(default_factory=dict)  # mean keys [B, Dk] of fast candidates
    last_key: Tensor | None = None  # mean key of the last promoted frame [B, Dk]
    promoted: list[int] = field(default_factory=list)  # every promoted frame, in order (evicted too)


class MemoryPolicy:
    """Base: the windowed state machine (sink + slow + fast). Subclasses configure it."""

    name = ""
    needs_keys = False  # True when admit needs the frames' mean keys (similarity promotion)

    def __init__(self, *, frames_per_chunk: int, sink: int, slow: int, window: int, bounded: bool,
                 promotion: str = "uniform", tau: float = 1.0, promote_every: int = 1,
                 promote_after: int = 0, window_key: str = "memory.window_frames"):
        if window < frames_per_chunk:
            raise CfError(
                f"{window_key}={window} is smaller than model.frames_per_chunk={frames_per_chunk}: the "
                f"window counts the frames a chunk attends to including itself; "
                f"set {window_key} >= {frames_per_chunk}"
            )
        self.chunk, self.sink, self.slow, self.window = frames_per_chunk, sink, slow, window
        self.fast = window - frames_per_chunk  # history frames the FIFO keeps for the next chunk
        self.bounded, self.promotion, self.tau = bounded, promotion, tau
        self.promote_every, self.promote_after = promote_every, promote_after
        self.needs_keys = slow > 0 and promotion == "similarity"

    # ------------------------------------------------------------------ sizes
    @property
    def capacity(self) -> int | None:
        """Most frames held between chunks (None: unbounded)."""
        return self.sink + self.slow + self.fast

    @property
    def position_bound(self) -> int | None:
        """Bounded positions stay in [0, bound) (None: they grow with the video)."""
        return self.sink + self.slow + self.window if self.bounded else None

    # ------------------------------------------------------------------ the two questions
    def init_state(self) -> MemoryState:
        return MemoryState()

    def admit(self, state: MemoryState, n_new: int, mean_keys: Tensor | None = None) -> list[int]:
        """Take frames state.n .. state.n + n_new - 1; return the frames to forget.

        mean_keys [B, n_new, Dk] (needed when `needs_keys`).
        """
        if self.needs_keys and mean_keys is None:
            raise CfError(f"memory policy {self.name!r} with memory.promotion=similarity needs the frames' "
                          f"mean keys (ModelOutput.mean_key)")
        dropped: list[int] = []
        for j in range(n_new):
            f = state.n + j
            if f < self.sink:
                state.sink.append(f)
                continue
            state.fast.append(f)
            if self.needs_keys and self._is_candidate(f):
                state.candidate_keys[f] = mean_keys[:, j].detach()
            while len(state.fast) > self.fast:
                dropped.extend(self._leave(state, state.fast.popleft()))
        state.n += n_new
        return dropped

    def layout(self, state: MemoryState,
               n_query: int | None = None) -> tuple[list[int], list[int], list[int]]:
        """(frames read in sink, slow, fast order; their time positions; the query's positions)."""
        q = self.chunk if n_query is None else n_query
        frames = state.sink + state.slow + list(state.fast)
        if self.bounded:  # compact: sink first, then slow, then fast, the query last
            k = len(frames)
            return frames, list(range(k)), list(range(k, k + q))
        return frames, list(frames), list(range(state.n, state.n + q))

    def plan(self, n_history: int, mean_keys: Tensor | None = None, n_query: int | None = None) -> ReadPlan:
        """The read of a chunk placed right after `n_history` frames, replayed without a cache.

        mean_keys [n_history, Dk] or [B, n_history, Dk] (needed when `needs_keys`).
        """
        if mean_keys is not None and mean_keys.dim() == 2:
            mean_keys = mean_keys[None]
        state = self.init_state()
        self.admit(state, n_history, mean_keys)
        frames, pos, qpos = self.layout(state, n_query)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long)
        return ReadPlan(indices=as_long(frames), positions=as_long(pos), query_positions=as_long(qpos))

    # ------------------------------------------------------------------ promotion
    def _is_candidate(self, f: int) -> bool:
        """The first frame of every `promote_every`-th chunk, from `promote_after` on, outside the sink."""
        return (self.slow > 0 and f % self.chunk == 0 and (f // self.chunk) % self.promote_every == 0
                and f >= max(self.promote_after, self.sink))

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
