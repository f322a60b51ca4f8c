"""The GPU script benchmarks/wan_rollout.py runs on the CPU at tiny shapes and writes its JSON."""

from __future__ import annotations

import json

import pytest


def test_wan_rollout_benchmark_runs_tiny_on_cpu(tmp_path):
    pytest.importorskip("diffusers", reason="the wan extra is not installed (pip install -e .[wan])")
    from benchmarks.wan_rollout import main

    out = tmp_path / "wan_rollout_tiny.json"
    assert main(["--tiny", "--seconds", "3", "--warmup", "1", "--vae-chunks", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["tiny"] and r["finite"] and r["chunks"] == 4 and r["video_frames"] == 1 + 4 * (4 * 3 - 1)
    assert len(r["chunk_latency_s"]) == 4 and r["video_fps"] > 0 and r["goal_video_fps"] == 30.0
    assert r["vae"]["chunks"] == 2 and r["vae"]["decode_fps"] > 0 and r["policy"] == "slowfast"
