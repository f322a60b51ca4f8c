"""`score_video`, `VideoScorer` and `cf score` on videos written to disk with known revisits."""

import json

import numpy as np
import pytest

from cf.cli import main
from cf.errors import CfError
from cf.metrics.score import VideoScorer, read_sidecar, score_video
from cf.video import write_video

REQUIRED = ("consistency", "first_frame_consistency", "drift", "motion_smoothness", "dynamic_degree",
            "revisit", "effective_context_s")


def panorama(h=32, w=96, seed=0) -> np.ndarray:
    """A smooth uint8 colour panorama [h, w, 3]."""
    rng = np.random.default_rng(seed)
    x = rng.random((h // 4, w // 4, 3))
    x = np.kron(x, np.ones((4, 4, 1)))  # blocky, then a little blur: smooth but textured
    x = (x + np.roll(x, 1, 0) + np.roll(x, 1, 1) + np.roll(x, (1, 1), (0, 1))) / 4
    return (x * 255).round().astype(np.uint8)


def revisiting_video(size=32, step=4, reach=4, sweeps=4):
    """A camera sweeping back and forth over a panorama -> (uint8 [T, size, size, 3], pairs [P, 3]).
    Pairs are (most recent earlier frame with the same pose, this frame, lag), as `cf world` defines them."""
    pano = panorama(size, size + step * reach)
    xs = []
    for s in range(sweeps):
        leg = list(range(0, reach + 1)) if s % 2 == 0 else list(range(reach, -1, -1))
        xs += leg[1:] if xs else leg
    frames = np.stack([pano[:, x * step:x * step + size] for x in xs])
    last, pairs = {}, []
    for t, x in enumerate(xs):
        if x in last and t - last[x] >= 2:
            pairs.append([last[x], t, t - last[x]])
        last[x] = t
    return frames, np.array(pairs)


def write_clip(folder, name, frames, pairs, fps=8, masks=None):
    path = write_video(folder / f"{name}.gif", frames, fps)
    # the objects `cf world` writes
    rows = [{"t_first": int(a), "t_revisit": int(b), "lag": int(c)} for a, b, c in pairs]
    meta = {"fps": fps, "revisits": rows}
    (folder / f"{name}.json").write_text(json.dumps(meta))
    if masks is not None:
        np.savez_compressed(folder / f"{name}.revisit_masks.npz", masks=masks)
    return path


def run_score(capsys, *argv):
    rc = main(["score", *map(str, argv), "--preset", "smoke", "--json"])
    out, err = capsys.readouterr()
    return rc, (json.loads(out) if out.strip() else None), err


def test_score_video_on_exact_revisits(smoke_cfg):
    frames, pairs = revisiting_video()
    out = score_video(frames, 8.0, "pixels", revisits=pairs, cfg=smoke_cfg)
    for key in REQUIRED:
        assert key in out
    assert out["backbone"] == "pixels" and out["backbone_label"].startswith("pixels")
    assert out["frames"] == len(frames) and out["seconds"] == len(frames) / 8
    rv = out["revisit"]
    assert rv["pairs"] == len(pairs) and rv["mse"] == 0.0 and rv["psnr"] == 100.0
    assert sum(b["pairs"] for b in rv["by_lag"]) == len(pairs)
    assert all(b["lo_s"] <= b["lag_s"] <= b["lag_max_s"] < b["hi_s"] for b in rv["by_lag"])
    assert all(b["retention"] == 1.0 and b["chance_psnr"] < 40 for b in rv["by_lag"])
    assert out["effective_context_s"] == pairs[:, 2].max() / 8
    assert out["effective_context_is_lower_bound"] is True
    # one backbone computes both of VBench's consistencies: one measure, named after it
    (cons,) = out["consistency"]
    assert cons["column"] == "consistency_pixels" and cons["role"] == "both"
    assert 0 < cons["whole"] <= 1 and 0 < cons["clips"] <= 1
    assert cons["long_range"] is None  # 17 frames at 8 fps hold one 2 s clip: no cross-clip term
    segs = out["first_frame_consistency"]
    assert [s["start_s"] for s in segs] == [float(k) for k in range(len(segs))]  # smoke: 1 s segments
    assert segs[-1]["end_s"] == len(frames) / 8
    assert out["lpips"] is None and "bench.lpips=false" in out["lpips_note"]
    json.dumps(out, allow_nan=False)  # plain JSON: no NaN, no tensors


def test_a_forgotten_revisit_shortens_the_effective_context(smoke_cfg):
    frames, pairs = revisiting_video()
    lags = sorted(set(pairs[:, 2].tolist()))
    forgetful = frames.copy()
    for _, b, lag in pairs:
        if lag == lags[-1]:
            forgetful[b] = 255 - forgetful[b]  # the longest-lag revisits show something else
    out = score_video(forgetful, 8.0, "pixels", revisits=pairs, cfg=smoke_cfg)
    by_lag = out["revisit"]["by_lag"]
    assert by_lag[-1]["lag_max_s"] == lags[-1] / 8 and by_lag[-1]["retention"] < 0.5
    assert all(b["mse"] == 0.0 for b in by_lag[:-1])
    assert out["effective_context_s"] == lags[-2] / 8 and out["effective_context_is_lower_bound"] is False


def test_scorer_aggregates_over_videos(smoke_cfg):
    frames, pairs = revisiting_video()
    scorer = VideoScorer(smoke_cfg, backbone="random")
    a = scorer.score(frames, 8.0, pairs)
    b = scorer.score(frames[::-1].copy(), 8.0)
    with pytest.raises(CfError, match="revisit pair 0"):
        scorer.score(frames, 8.0, [[0, len(frames), len(frames)]])  # rejected before any metric moves
    agg = scorer.aggregate()
    assert agg["videos"] == 2
    for term in ("whole", "clips"):
        mean = (a["consistency"][0][term] + b["consistency"][0][term]) / 2
        assert agg["consistency"][0][term] == pytest.approx(mean)
    assert agg["consistency"][0]["long_range"] is None  # no video holds two clips
    assert agg["motion_smoothness"] == pytest.approx((a["motion_smoothness"] + b["motion_smoothness"]) / 2)
    first = [s["value"] * s["frames"] for s in a["first_frame_consistency"]]
    second = [s["value"] * s["frames"] for s in b["first_frame_consistency"]]
    frames_per_seg = [s["frames"] for s in a["first_frame_consistency"]]
    pooled = [(x + y) / (2 * n) for x, y, n in zip(first, second, frames_per_seg)]
    assert [s["value"] for s in agg["first_frame_consistency"]] == pytest.approx(pooled)
    assert agg["revisit"]["pairs"] == len(pairs)  # only the first video had revisits
    assert scorer.describe()["backbone_label"] == "random (test only)"
    scorer.reset()
    assert scorer.aggregate() is None


def test_cf_score_gif_with_sidecar_scores_exact_revisits_as_exact(tmp_path, capsys):
    frames, pairs = revisiting_video()
    masks = np.ones((len(pairs), 32, 32), bool)
    frame_uses = np.bincount(pairs[:, :2].ravel())
    # a pair whose revisit frame is in no other pair
    lone = next(i for i, (_, b, _) in enumerate(pairs) if frame_uses[b] == 1)
    masks[lone, :, :16] = False  # the masked-out half is changed: the score must not see it
    frames[pairs[lone][1], :, :16] = 0
    masks[(lone + 1) % len(pairs)] = False  # an empty mask: the pair is skipped, and counted
    path = write_clip(tmp_path, "clip", frames, pairs, masks=masks)
    rc, out, err = run_score(capsys, path, "--backbone", "pixels")
    assert rc == 0 and out["errors"] == [] and len(out["videos"]) == 1
    video = out["videos"][0]
    assert video["path"] == str(path) and video["fps"] == 8.0 and video["fps_source"] == "sidecar"
    for key in REQUIRED:
        assert key in video and key in out["aggregate"]
    rv = video["revisit"]
    assert rv["pairs"] == len(pairs) - 1 and rv["skipped_pairs"] == 1
    assert rv["mse"] == 0.0 and rv["psnr"] == 100.0 and all(b["psnr"] == 100.0 for b in rv["by_lag"])
    assert video["effective_context_s"] == max(pairs[:, 2]) / 8
    assert out["aggregate"]["effective_context_s"] == video["effective_context_s"]
    assert out["methods"]["motion_smoothness"].startswith("linear")
    assert "Lucas-Kanade" in out["methods"]["dynamic_degree"]


def test_cf_score_reports_unreadable_files_by_name(tmp_path, capsys):
    frames, pairs = revisiting_video()
    write_clip(tmp_path, "good", frames, pairs)
    (tmp_path / "broken.mp4").write_bytes(b"this is not a video")
    rc, out, err = run_score(capsys, tmp_path, tmp_path / "missing.webm")
    assert rc == 0 and [v["path"] for v in out["videos"]] == [str(tmp_path / "good.gif")]
    bad = {e["path"]: e["error"] for e in out["errors"]}
    assert set(bad) == {str(tmp_path / "broken.mp4"), str(tmp_path / "missing.webm")}
    assert "cannot read video" in bad[str(tmp_path / "broken.mp4")] and "broken.mp4" in err
    rc, out, err = run_score(capsys, tmp_path / "broken.mp4")
    assert rc == 1 and out["videos"] == [] and out["aggregate"] is None and "broken.mp4" in err


def test_cf_score_overrides_and_shared_revisit_file(tmp_path, capsys):
    frames, pairs = revisiting_video()
    write_video(tmp_path / "a.gif", frames, 8)
    write_video(tmp_path / "b.gif", frames, 8)
    shared = tmp_path / "pairs.json"
    shared.write_text(json.dumps({"revisits": pairs.tolist()}))
    # overrides go right after the paths (argparse gives later positionals no home)
    rc, out, _ = run_score(capsys, tmp_path / "a.gif", tmp_path / "b.gif", "bench.segment_s=0.5",
                           "bench.clip_s=1", "--revisits", shared, "--backbone", "random")
    assert rc == 0 and out["settings"]["segment_s"] == 0.5 and out["settings"]["clip_s"] == 1.0
    assert out["backbone_label"] == "random (test only)"
    assert all(v["revisit"]["pairs"] == len(pairs) for v in out["videos"])
    assert out["aggregate"]["revisit"]["pairs"] == 2 * len(pairs)
    assert len(out["videos"][0]["first_frame_consistency"]) == int(np.ceil(len(frames) / 8 / 0.5))


def test_cf_score_missing_weights_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    frames, pairs = revisiting_video()
    path = write_clip(tmp_path, "clip", frames, pairs)
    rc = main(["score", str(path), "--preset", "smoke", "--backbone", "dino", "--json"])
    _, err = capsys.readouterr()
    assert rc == 2 and "dino_vitbase16_pretrain.pth" in err and "--weights PATH" in err


def test_cf_score_on_cf_world_output(tmp_path, capsys):
    assert main(["world", "--preset", "smoke", "--out", str(tmp_path), "--n", "1", "--seconds", "4",
                 "data.camera_path=revisit"]) == 0
    capsys.readouterr()
    side = read_sidecar(tmp_path / "world_000.json")
    assert side["revisits"] is not None and len(side["revisits"]) > 0 and side["masks"] is not None
    rc, out, _ = run_score(capsys, tmp_path / "world_000.gif", tmp_path / "world_000.mp4",
                           "--backbone", "pixels")
    assert rc == 0 and out["errors"] == []
    gif, mp4 = out["videos"]
    assert gif["revisit"]["pairs"] == len(side["revisits"]) - gif["revisit"]["skipped_pairs"]
    assert gif["revisit"]["mse"] == 0.0 and gif["revisit"]["psnr"] == 100.0  # the gif is exact
    assert gif["effective_context_s"] is not None and gif["effective_context_s"] > 0
    assert 30.0 < mp4["revisit"]["psnr"] < 100.0  # H.264 is close but lossy; its masks were enlarged to fit
