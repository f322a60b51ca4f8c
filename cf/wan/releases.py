"""The attention windows of the released Wan-based causal models, read from their code, and cf's memory
settings that read exactly the same frames at the same positions.

Both releases cache each layer's keys already rotated at the absolute frame index they were written at, in a
buffer of `local_attn_size` latent frames (x 1560 tokens at 480 x 832) whose first `sink_size` frames never
roll out; a chunk attends to the frames in that buffer, its own included. cf caches keys unrotated and lets
the policy say which frames a chunk reads and at which positions, so the equivalent is a policy and
`memory.bounded_positions=false` (absolute positions). Where each number comes from (file:line at the
commit named) is in `Release.source`; `tests/test_release_windows.py` pins them and replays both buffers.

    RELEASES["longlive"].overrides()   # ['memory.policy=sink', 'memory.sink_frames=3', ...] for cf generate
"""

from __future__ import annotations

from dataclasses import dataclass

from cf.errors import CfError


@dataclass(frozen=True)
class Release:
    name: str
    repository: str
    commit: str
    frames_per_chunk: int  # num_frame_per_block
    tokens_per_frame: int  # frame_seq_length
    local_attn_size: int  # latent frames in the KV buffer, current chunk included; -1 = the global default
    sink_size: int  # first frames kept when the buffer rolls
    kv_cache_tokens: int  # the buffer's length in tokens
    source: tuple[str, ...]  # file:line of each number above, at `commit`

    @property
    def kv_cache_frames(self) -> int:
        return self.kv_cache_tokens // self.tokens_per_frame

    @property
    def window_frames(self) -> int:
        """cf's window: the frames after the sink a chunk reads, its own chunk included (cf counts alike)."""
        return self.kv_cache_frames - self.sink_size

    def memory(self) -> dict[str, object]:
        """cf's `memory.*` settings that read what this release's buffer reads (absolute positions)."""
        if self.sink_size:
            return {"policy": "sink", "sink_frames": self.sink_size, "window_frames": self.window_frames,
                    "bounded_positions": False}
        return {"policy": "sliding", "window_frames": self.window_frames, "bounded_positions": False}

    def overrides(self) -> list[str]:
        return [f"memory.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in self.memory().items()]


SELF_FORCING = Release(
    name="self_forcing",
    repository="github.com/guandeh17/Self-Forcing",
    commit="33593df3e81fa3ec10239271dd2c100facac6de1",
    frames_per_chunk=3,
    tokens_per_frame=1560,
    # no local_attn_size in configs/self_forcing_dmd.yaml's model_kwargs, so the wrapper's default -1: global
    local_attn_size=-1,
    sink_size=0,
    # -1 gives the fixed 32760-token buffer = 21 latent frames, the length of its own videos (inference.py's
    # --num_output_frames 21). It never rolls (rolling needs local_attn_size != -1), so longer rollouts need
    # local_attn_size=21, which rolls a 21-frame window: cf's sliding window of 21
    kv_cache_tokens=32760,
    source=(
        "configs/self_forcing_dmd.yaml:48 num_frame_per_block: 3",
        "configs/self_forcing_dmd.yaml:50-51 model_kwargs holds timestep_shift only (no local_attn_size)",
        "utils/wan_wrapper.py:121 local_attn_size=-1 (default)",
        "pipeline/causal_inference.py:34 self.frame_seq_length = 1560",
        "pipeline/causal_inference.py:288 kv_cache_size = 32760 (local_attn_size == -1)",
        "wan/modules/causal_model.py:76 max_attention_size = 32760 if local_attn_size == -1",
        "wan/modules/causal_model.py:231 attention reads the last max_attention_size tokens",
        "inference.py:28 --num_output_frames default 21",
    ),
)

LONGLIVE = Release(
    name="longlive",
    repository="github.com/NVlabs/LongLive",
    # the last commit of the Wan2.1-T2V-1.3B release; commit 57f39c1 replaced it with LongLive 2.0 (Wan2.2-5B)
    commit="2462895575c579617af5089c9a05c7b500dc0036",
    frames_per_chunk=3,
    tokens_per_frame=1560,
    local_attn_size=12,
    sink_size=3,
    kv_cache_tokens=12 * 1560,
    source=(
        "configs/longlive_inference.yaml:7 num_frame_per_block: 3",
        "configs/longlive_inference.yaml:10 local_attn_size: 12",
        "configs/longlive_inference.yaml:12 sink_size: 3",
        "pipeline/causal_inference.py:41 self.frame_seq_length = 1560",
        "pipeline/causal_inference.py:114 kv_cache_size = local_attn_cfg * self.frame_seq_length",
        "wan/modules/causal_model.py:88 max_attention_size = max_local * 1560",
        "wan/modules/causal_model.py:214 sink_tokens = self.sink_size * frame_seqlen",
        "wan/modules/causal_model.py:323 local_budget = self.max_attention_size - sink_tokens",
        "wan/modules/causal_model.py:329 local window = the last local_budget tokens after the sink",
    ),
)

RELEASES = {r.name: r for r in (SELF_FORCING, LONGLIVE)}


def release(name: str) -> Release:
    if name not in RELEASES:
        raise CfError(f"unknown release {name!r}; known: {', '.join(sorted(RELEASES))}")
    return RELEASES[name]
