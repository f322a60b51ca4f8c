"""`cf generate` and `cf bench rollout` end to end at the smoke preset."""

from __future__ import annotations

import json

import pytest

from cf.cli import main
from cf.video import read_video


def _generate(tmp_path, seconds, *extra):
    out = tmp_path / "gen"
    rc = main(["generate", "--preset", "smoke", "--memory", "slowfast", "--seconds", str(seconds),
               "--out", str(out), *extra])
    assert rc == 0
    return out / "smoke_slowfast_seed0"


def _check_video(stem, frames, fps, context=0):
    mp4, mp4_fps = read_video(stem.with_suffix(".mp4"))
    gif, _ = read_video(stem.with_suffix(".gif"))
    assert mp4.shape == (frames, 256, 256, 3) and mp4_fps == fps  # 16x16 scaled up to be watchable
    assert gif.shape == (frames, 16, 16, 3)  # native size, every frame
    assert mp4.std() > 1  # not a blank video
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["frames"] == frames and len(meta["camera"]) == frames and meta["policy"] == "slowfast"
    assert meta["prompt"].startswith("A camera")
    assert len(meta["chunk_latency_s"]) == -(-(frames - context) // 2)
    return meta


def test_generate_writes_a_playable_video(tmp_path, capsys):
    stem = _generate(tmp_path, 4)
    meta = _check_video(stem, 32, 8)
    xs = [c[0] for c in meta["camera"]]
    assert all(abs(b - a) <= 2 for a, b in zip(xs, xs[1:])) and len(set(xs)) > 8  # the world's pan
    # the slow memory's record: chunk-first frames past promote_after (smoke: 2), reported on stdout too
    promoted = meta["promoted"]
    assert promoted and all(f % 2 == 0 and f >= 2 for f in promoted) and promoted == sorted(set(promoted))
    assert f"slow memory: {len(promoted)} frames promoted" in capsys.readouterr().out


def test_generate_continues_from_world_context(tmp_path):
    stem = _generate(tmp_path, 2, "--context", "4", "--sampler", "teacher", "--guidance", "2")
    meta = _check_video(stem, 4 + 16, 8, context=4)
    assert meta["context_frames"] == 4 and meta["sampler"] == "teacher" and meta["guidance"] == 2.0


@pytest.mark.parametrize("sampler, overrides, want", [
    ("teacher", ["diffusion.cfg_scale=2.5"], 2.5),  # the teacher role: diffusion.cfg_scale
    ("student", ["diffusion.cfg_scale=2.5"], 1.0),  # the student role: guidance distilled in
    ("teacher", ["diffusion.cfg_scale=2.5", "model.text_encoder=none", "model.camera=false"], 1.0),  # nothing
])
def test_generate_takes_its_default_guidance_from_the_role(sampler, overrides, want):
    from cf.config import load_config
    from cf.generation import generate
    from cf.model import build_model

    cfg = load_config("smoke", overrides=overrides)
    _, meta = generate(cfg, build_model(cfg).eval(), 1, sampler=sampler)
    assert meta["guidance"] == want


@pytest.mark.slow
def test_generate_a_minute(tmp_path):
    _check_video(_generate(tmp_path, 60), 480, 8)


def test_generate_rejects_bad_context(tmp_path, capsys):
    argv = ["generate", "--preset", "smoke", "--seconds", "1", "--context", "3", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "multiple of model.frames_per_chunk=2" in capsys.readouterr().err


def test_bench_rollout_json(capsys):
    flops = {}
    for policy in ("full", "sink"):
        rc = main(["bench", "rollout", "--preset", "smoke", "--policy", policy, "--chunks", "6", "--json",
                   "--repeats", "2", "memory.sink_frames=1", "memory.window_frames=4"])
        assert rc == 0
        r = json.loads(capsys.readouterr().out)
        assert r["policy"] == policy and r["preset"] == "smoke" and r["chunks"] == 6
        assert len(r["chunk_latency_s"]) == len(r["kv_bytes"]) == 6
        assert r["latent_fps"] > 0 and r["video_fps"] == r["latent_fps"]  # smoke: 1 video frame per latent
        assert set(r["probe_latency_s"]) == {"6"} and len(r["probe_samples_s"]["6"]) == 2
        flops[policy] = r["flops_per_chunk"]["6"]
        assert 0 < r["mfu"]["6"] and r["peak_matmul_flops"] > 0
        kv = r["kv_bytes"]
        if policy == "full":
            assert r["kv_frames"] == [2, 4, 6, 8, 10, 12]
            assert all(b == kv[0] * (i + 1) for i, b in enumerate(kv))
        else:  # sink 1 + 2 history frames of the window: full after the second chunk, constant after
            assert r["kv_frames"] == [2, 3, 3, 3, 3, 3] and len(set(kv[1:])) == 1
    assert flops["full"] > flops["sink"]  # chunk 6 attends to 10 cached frames under full, 3 under sink


def test_bench_rollout_unknown_policy(capsys):
    assert main(["bench", "rollout", "--preset", "smoke", "--policy", "slowfsat", "--chunks", "2"]) == 2
    assert "valid memory policy names: full, sink, sliding, slowfast" in capsys.readouterr().err
