"""Memory policies: what the cache keeps after a chunk, and what (with which positions) a query reads.

A policy is a small object built from its own typed config (the `memory.*` knobs it reads, declared
once: `Policy.Config`) plus a state it never owns: the cache holds the state, the policy answers two
questions about it (`admit`: given new frames, which frames to forget; `layout`: which held frames a
query reads, at which RoPE time positions). Frames are named by their absolute index in the video.
Because the answers depend only on the sequence of frames (not on how writes were grouped), `plan`
can replay them without a cache: what the teacher needs.

The windowed policies share one state machine, this module's: a sink of the first `sink` frames and
a fast FIFO; `slowfast.py` adds the slow memory that frames leaving the FIFO may be promoted to.
Window sizes count the frames a query chunk can attend to INCLUDING its own chunk, so the FIFO holds
`window - frames_per_chunk` history frames.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from cf.errors import CfError


@dataclass(frozen=True)
class PolicyConfig:
    """The `memory.*` knobs one policy reads: its subclasses' fields, nothing else.

    The pipeline hashes exactly these (`knobs`) into the cache identity of every stage whose rollouts
    go through the policy, so a knob is declared once, here, and cannot drift from what the policy reads.
    """

    @classmethod
    def from_memory(cls, memory_cfg: Any, **override: Any) -> PolicyConfig:
        """Pick this config's fields from a `memory` section (any object with those attributes);
        `override` replaces some of them (a role's own window, say) without touching the section."""
        config = cls(**{f.name: getattr(memory_cfg, f.name) for f in dataclasses.fields(cls)})
        return dataclasses.replace(config, **override)

    def knobs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    slow: list[int] = field(default_factory=list)  # promoted frames (slowfast; empty otherwise)
    fast: deque = field(default_factory=deque)
    candidate_keys: dict[int, Tensor] = field(default_factory=dict)  # mean keys [B, Dk] of fast candidates
    last_key: Tensor | None = None  # mean key of the last promoted frame [B, Dk]
    promoted: list[int] = field(default_factory=list)  # every promoted frame, in order (evicted too)


class MemoryPolicy:
    """Base: the windowed state machine (a sink and a fast FIFO). Subclasses configure it and may
    extend what happens to a frame entering (`_entered`) or leaving (`_leave`) the FIFO."""

    name = ""
    Config: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig, frames_per_chunk: int, *, sink: int, window: int, bounded: bool,
                 slow: int = 0, window_key: str = "memory.window_frames"):
        if window < frames_per_chunk:
            raise CfError(
                f"{window_key}={window} is smaller than model.frames_per_chunk={frames_per_chunk}: the "
                f"window counts the frames a chunk attends to including itself; "
                f"set {window_key} >= {frames_per_chunk}"
            )
        self.config = config
        self.chunk, self.sink, self.slow, self.window = frames_per_chunk, sink, slow, window
        self.fast = window - frames_per_chunk  # history frames the FIFO keeps for the next chunk
        self.bounded = bounded

    @property
    def needs_keys(self) -> bool:
        """True when `admit` needs the frames' mean keys (similarity promotion)."""
        return False

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
            self._entered(state, f, None if mean_keys is None else mean_keys[:, j])
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

    # ------------------------------------------------------------------ hooks
    def _entered(self, state: MemoryState, f: int, mean_key: Tensor | None) -> None:
        """Frame f entered the fast FIFO (mean_key [B, Dk] when the caller had it)."""

    def _leave(self, state: MemoryState, f: int) -> list[int]:
        """Frame f leaves the fast FIFO; return the frames forgotten (here: f)."""
        return [f]
