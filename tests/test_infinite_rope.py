"""Infinite-RoPE: Self-Forcing's generator read through a global sink with block-relative positions."""

from __future__ import annotations

import pytest

from cf.bench.entries import at_inference
from cf.config import load_config
from cf.errors import CfError
from cf.memory import build_policy
from cf.stages import bench_config, cdmd_config, student_config, teacher_config


def _positions_over(policy, n_frames: int) -> int:
    """The largest RoPE time position any read of an `n_frames`-long rollout uses."""
    state, top = policy.init_state(), 0
    while state.n < n_frames:
        _, pos, qpos = policy.layout(state)
        top = max(top, *pos, *qpos) if pos else max(top, *qpos)
        policy.admit(state, policy.chunk)
    return top


def test_positions_stay_in_the_trained_range_however_long_the_video():
    cfg = at_inference(load_config("tiny", "infinite_rope"))
    assert cfg.memory.policy == "sink" and cfg.memory.bounded_positions
    policy = build_policy(cfg.memory, cfg.model.frames_per_chunk)
    # the 4-frame teacher (and the student made from it) saw positions 0 .. context + one target chunk
    trained = cfg.teacher.context_frames + cfg.model.frames_per_chunk * cfg.teacher.target_chunks
    for n in (8, 480, 20_000):  # 1 s, the benchmark's 60 s, ~40 min at tiny's 8 fps
        assert _positions_over(policy, n) == trained - 1
    # the same read with absolute positions grows with the video: the bound is the policy's doing
    cfg.memory.bounded_positions = False
    assert _positions_over(build_policy(cfg.memory, cfg.model.frames_per_chunk), 480) == 479


def test_the_sink_is_the_first_chunk_and_the_window_the_last_frames():
    cfg = at_inference(load_config("tiny", "infinite_rope"))
    policy = build_policy(cfg.memory, cfg.model.frames_per_chunk)
    plan = policy.plan(100)
    assert plan.indices.tolist() == [0, 1, 98, 99]
    assert plan.positions.tolist() == [0, 1, 2, 3] and plan.query_positions.tolist() == [4, 5]


def test_trains_exactly_as_self_forcing_and_differs_only_at_inference():
    ir, sf = load_config("tiny", "infinite_rope"), load_config("tiny", "self_forcing")
    for stage_config in (teacher_config, student_config, cdmd_config(1)):
        assert stage_config(ir) == stage_config(sf)  # the stage cache reuses Self-Forcing's training
    assert bench_config(ir)["memory"]["policy"] == "sink"
    assert bench_config(sf)["memory"]["policy"] == "sliding"


def test_bench_memory_refuses_keys_that_are_not_memory_keys():
    cfg = load_config("tiny", "infinite_rope", ["bench.memory.windw_frames=3"])
    with pytest.raises(CfError, match="windw_frames"):
        at_inference(cfg)


def test_without_bench_memory_the_config_is_read_as_trained():
    cfg = load_config("tiny", "context_forcing")
    assert at_inference(cfg) is cfg
