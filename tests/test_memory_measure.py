"""The memory measure on videos nobody here made to suit it: pans over real photographs (scikit-image's),
through H.264 at the quality people encode (CRF 23, ffmpeg's default), that come back to places they
showed. Right answers are known by construction: a video that repeats what it showed remembers at every
lag; one that shows another photograph at every return remembers nothing; one that forgets after L
seconds remembers up to L."""

import numpy as np
import pytest
from skimage import data

from cf.metrics.revisit import LAG_EDGES_S, RETENTION_LEVEL
from cf.metrics.score import VideoScorer
from cf.video import read_video, write_video

FPS = 4.0  # 112-frame lags = 28 s
SIZE, STEP = 64, 8


def _photo(name: str) -> np.ndarray:
    img = getattr(data, name)()
    return img[:, :, :3] if img.ndim == 3 else np.repeat(img[:, :, None], 3, 2)


def pan(photo: np.ndarray):
    """Right across the photo and back: (camera x per frame, frames uint8 [T, SIZE, SIZE, 3])."""
    w = photo.shape[1]
    out = list(range(0, w - SIZE + 1, STEP))
    xs = out + out[-2::-1]
    top = (photo.shape[0] - SIZE) // 2
    return np.array(xs), np.stack([photo[top:top + SIZE, x:x + SIZE] for x in xs])


def pairs_of(xs: np.ndarray) -> np.ndarray:
    """(most recent earlier frame with the same camera x, this frame, lag) for lags >= 2."""
    last, out = {}, []
    for t, x in enumerate(xs.tolist()):
        if x in last and t - last[x] >= 2:
            out.append([last[x], t, t - last[x]])
        last[x] = t
    return np.array(out)


def h264(frames: np.ndarray, tmp_path, name: str) -> np.ndarray:
    path = write_video(tmp_path / f"{name}.mp4", frames, FPS, crf=23)
    decoded, _ = read_video(path)
    return np.asarray(decoded)


def score(frames, pairs, xs=None, smoke_cfg=None):
    scorer = VideoScorer(smoke_cfg, backbone="pixels", lpips=None)
    camera = None if xs is None else np.stack([xs, np.zeros_like(xs)], 1)
    return scorer.score(frames, FPS, pairs, None, camera)


@pytest.fixture(scope="module")
def astronaut():
    xs, frames = pan(_photo("astronaut"))
    return xs, frames, pairs_of(xs)


def _replace(frames, xs, which, photo="astronaut", shift=SIZE * 4):
    """Frames `which` show another place of `photo` (the camera's x + `shift`, wrapped): what a model
    that forgot and invented something plausible shows."""
    img = _photo(photo)
    top, span = (img.shape[0] - SIZE) // 2, img.shape[1] - SIZE + 1
    out = frames.copy()
    for t in which:
        x = (xs[t] + shift) % span
        out[t] = img[top:top + SIZE, x:x + SIZE]
    return out


@pytest.mark.parametrize("with_camera", [True, False])
def test_a_video_that_repeats_what_it_showed_remembers_at_every_lag(astronaut, tmp_path, smoke_cfg,
                                                                     with_camera):
    xs, frames, pairs = astronaut
    out = score(h264(frames, tmp_path, "same"), pairs, xs if with_camera else None, smoke_cfg)
    longest = pairs[:, 2].max() / FPS
    assert longest >= 24
    assert out["effective_context_s"] == longest and out["effective_context_is_lower_bound"] is True
    rv = out["revisit"]
    assert rv["psnr"] > 35 and rv["chance_psnr"] < 20  # H.264 costs a little; another place costs a lot
    assert min(b["retention"] for b in rv["by_lag"]) > 0.95


@pytest.mark.parametrize("with_camera", [True, False])
def test_a_video_that_shows_other_content_at_every_revisit_remembers_nothing(astronaut, tmp_path,
                                                                              smoke_cfg, with_camera):
    xs, frames, pairs = astronaut
    forgot = h264(_replace(frames, xs, pairs[:, 1], photo="coffee"), tmp_path, "forgot")
    out = score(forgot, pairs, xs if with_camera else None, smoke_cfg)
    assert out["effective_context_s"] == 0.0 and out["effective_context_is_lower_bound"] is False
    assert abs(out["revisit"]["retention"]) < 0.25  # over all pairs
    assert abs(np.mean([b["retention"] for b in out["revisit"]["by_lag"]])) < 0.25  # and bin by bin
    assert out["revisit"]["by_lag"][0]["retention"] < RETENTION_LEVEL


@pytest.mark.parametrize("forget_after_s", [6.0, 12.0, 20.0])
def test_a_video_that_forgets_after_l_scores_l_within_one_bin(astronaut, tmp_path, smoke_cfg, forget_after_s):
    xs, frames, pairs = astronaut
    late = pairs[pairs[:, 2] / FPS > forget_after_s][:, 1]
    video = h264(_replace(frames, xs, late), tmp_path, f"forgets{forget_after_s:g}")
    out = score(video, pairs, xs, smoke_cfg)
    got = out["effective_context_s"]
    assert out["effective_context_is_lower_bound"] is False
    edges = np.array(LAG_EDGES_S)
    bin_of = np.searchsorted(edges, [got, forget_after_s], side="right") - 1
    assert got <= forget_after_s and bin_of[1] - bin_of[0] <= 1, (got, forget_after_s)


def test_noise_on_the_revisit_frames_lowers_retention_monotonically(astronaut, smoke_cfg):
    xs, frames, pairs = astronaut
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(frames.shape)
    got = []
    for sigma in (0.0, 4.0, 8.0, 16.0, 32.0, 64.0):  # on 0..255
        noisy = frames.astype(np.float64)
        noisy[pairs[:, 1]] += sigma * noise[pairs[:, 1]]
        out = score(np.clip(noisy, 0, 255).round().astype(np.uint8), pairs, xs, smoke_cfg)
        got.append(out["revisit"]["retention"])
    assert all(a > b for a, b in zip(got, got[1:])), got
    assert got[0] == 1.0 and got[-1] < 0.9
