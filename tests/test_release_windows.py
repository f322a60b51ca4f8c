"""The released models' attention windows, pinned as read from their code, and cf's memory settings for them
replaying the same reads (which frames a chunk attends to, at which RoPE time positions).

Sources (file:line at the commit named):
  LongLive, github.com/NVlabs/LongLive @ 2462895575c579617af5089c9a05c7b500dc0036 (the last Wan2.1-T2V-1.3B
  commit; 57f39c1 replaced it with LongLive 2.0 on Wan2.2-TI2V-5B, local_attn_size 32, sink 8, 8-frame chunks)
  Self-Forcing, github.com/guandeh17/Self-Forcing @ 33593df3e81fa3ec10239271dd2c100facac6de1
"""

from __future__ import annotations

import pytest

from cf.config import load_config
from cf.memory import build_policy
from cf.wan.releases import LONGLIVE, RELEASES, SELF_FORCING, release


def test_longlive_constants():
    # configs/longlive_inference.yaml:7    num_frame_per_block: 3
    assert LONGLIVE.frames_per_chunk == 3
    # configs/longlive_inference.yaml:10   local_attn_size: 12   (also longlive_train_init.yaml:57,
    #                                                             longlive_train_long.yaml:59)
    assert LONGLIVE.local_attn_size == 12
    # configs/longlive_inference.yaml:12   sink_size: 3          (train_init.yaml:58, train_long.yaml:60)
    assert LONGLIVE.sink_size == 3
    # pipeline/causal_inference.py:41      self.frame_seq_length = 1560
    # pipeline/causal_inference.py:114     kv_cache_size = local_attn_cfg * self.frame_seq_length
    assert LONGLIVE.tokens_per_frame == 1560 and LONGLIVE.kv_cache_tokens == 12 * 1560 == 18720
    # wan/modules/causal_model.py:88/214/323/329: the read is the sink plus the last
    # max_attention_size - sink_tokens = (12 - 3) * 1560 tokens of the buffer, this chunk's included
    assert LONGLIVE.window_frames == LONGLIVE.local_attn_size - LONGLIVE.sink_size == 9
    # so docs/wan.md's earlier guess, window = local_attn_size - 3, is right for sink_size 3
    assert LONGLIVE.memory() == {"policy": "sink", "sink_frames": 3, "window_frames": 9,
                                 "bounded_positions": False}


def test_self_forcing_constants():
    # configs/self_forcing_dmd.yaml:48     num_frame_per_block: 3
    assert SELF_FORCING.frames_per_chunk == 3
    # configs/self_forcing_dmd.yaml:50-51  model_kwargs: {timestep_shift: 5.0}, no local_attn_size, so
    # utils/wan_wrapper.py:121             local_attn_size=-1 (global)
    assert SELF_FORCING.local_attn_size == -1 and SELF_FORCING.sink_size == 0
    # pipeline/causal_inference.py:34      self.frame_seq_length = 1560
    # pipeline/causal_inference.py:288     kv_cache_size = 32760 when local_attn_size == -1
    # wan/modules/causal_model.py:76       max_attention_size = 32760 if local_attn_size == -1
    assert SELF_FORCING.kv_cache_tokens == 32760 and SELF_FORCING.kv_cache_frames == 21
    # inference.py:28                      --num_output_frames default 21: the buffer is the video
    assert SELF_FORCING.memory() == {"policy": "sliding", "window_frames": 21, "bounded_positions": False}


def buffer_reads(r, n_frames: int, local_attn_size: int | None = None):
    """Replay a release's KV buffer, chunk by chunk, from the index arithmetic of its causal attention
    (LongLive wan/modules/causal_model.py:231-266 and 321-331; Self-Forcing 206-232): append the chunk,
    rolling out the oldest frames after the sink once the buffer is full, then read the sink plus the last
    (buffer - sink) frames. Keys were rotated at their absolute frame index when written
    (causal_rope_apply(start_frame=current_start_frame)), so a frame's position is its index.
    -> per chunk start s: the frames read, this chunk's included."""
    size = (local_attn_size or r.kv_cache_frames)
    sink, budget = r.sink_size, size - r.sink_size
    buf: list[int] = []
    reads = {}
    for s in range(0, n_frames, r.frames_per_chunk):
        new = list(range(s, s + r.frames_per_chunk))
        if len(buf) + len(new) > size:
            evict = len(buf) + len(new) - size
            buf = buf[:sink] + buf[sink + evict:]
        buf += new
        reads[s] = buf[:sink] + buf[max(sink, len(buf) - budget):]
    return reads


@pytest.mark.parametrize("name", sorted(RELEASES))
def test_cf_memory_reads_what_the_release_buffer_reads(name):
    """Over 90 latent frames (22 s) the cf policy built from `Release.overrides()` reads, for every chunk, the
    frames the release's buffer holds, at their absolute indices. (Self-Forcing's own -1 buffer stops at 21
    frames; past that the rolling window of local_attn_size=21 is what it would read.)"""
    r = release(name)
    cfg = load_config("wan", None, r.overrides())
    policy = build_policy(cfg.memory, cfg.model.frames_per_chunk)
    assert cfg.model.frames_per_chunk == r.frames_per_chunk
    for s, want in buffer_reads(r, 90).items():
        plan = policy.plan(s)
        chunk = list(range(s, s + r.frames_per_chunk))
        got = plan.indices.tolist() + chunk
        assert sorted(got) == sorted(want), (s, got, want)
        assert plan.positions.tolist() == plan.indices.tolist()  # absolute positions
        assert plan.query_positions.tolist() == chunk
    # LongLive reads the sink plus 9 frames from frame 9 on; Self-Forcing 21 frames from frame 18 on
    assert len(buffer_reads(r, 90)[87]) == r.kv_cache_frames


def test_the_old_mapping_of_a_window_without_the_sink_would_read_three_frames_more():
    """local_attn_size counts the sink: taken as the window (12), 15 frames would be read, not 12."""
    cfg = load_config("wan", None, ["memory.policy=sink", "memory.sink_frames=3",
                                    "memory.window_frames=12", "memory.bounded_positions=false"])
    plan = build_policy(cfg.memory, 3).plan(60)
    assert len(plan.indices) + 3 == 15 != len(buffer_reads(LONGLIVE, 63)[60]) == 12
