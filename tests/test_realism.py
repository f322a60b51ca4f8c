"""Realism (cf.metrics.realism): the Fréchet distance on data whose answer is known.

- Gaussians: exact statistics against the closed form (commuting covariances, where it is a sum over
  eigenvalues; non-commuting ones, against scipy's general matrix square root) and samples against it.
- Real photographs (scikit-image) through the real `imagenet` backbone: blur and noise of increasing
  strength move a held-out set of crops monotonically away from the sharp reference crops.
- World videos: another world scores far below a box-blurred copy of itself and a grey video.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from cf.errors import CfError
from cf.metrics.backbones import get_backbone
from cf.metrics.realism import (
    REFERENCE_TAG,
    FeatureStats,
    FrechetDistance,
    Reference,
    folder_reference,
    frame_features,
    frechet_distance,
    world_reference,
)

FRAMES = 16  # frames per set in the backbone tests: far below 1280 dims, the rank-deficient regime


def _random_cov(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _stats(mean, cov, n=1000):
    return FeatureStats(n, torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov).double())


def _fd(gen: FeatureStats, ref: FeatureStats) -> float:
    return frechet_distance(gen, ref)["fd"]


# --- the formula ------------------------------------------------------------------------------------


def test_fd_matches_closed_forms_on_exact_gaussians():
    rng = np.random.default_rng(0)
    # 1-D: the 2-Wasserstein distance, (m1 - m2)^2 + (s1 - s2)^2
    assert _fd(_stats([1.0], [[4.0]]), _stats([-2.0], [[0.25]])) == pytest.approx(9 + 1.5**2, rel=1e-12)
    # commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: |dmu|^2 + sum_i (sqrt a_i - sqrt b_i)^2
    d = 12
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = _fd(_stats(m1, q @ np.diag(a) @ q.T), _stats(m2, q @ np.diag(b) @ q.T))
    assert got == pytest.approx(expected, rel=1e-9)
    # general covariances: against scipy's Schur-based sqrtm of the (non-symmetric) product
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=2.0)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    out = frechet_distance(_stats(m1, s1), _stats(m2, s2))
    assert out["fd"] == pytest.approx(expected, rel=1e-9)
    assert out["mean_term"] == pytest.approx(((m1 - m2) ** 2).sum(), rel=1e-12)
    # symmetric in its arguments, as a distance is
    assert _fd(_stats(m2, s2), _stats(m1, s1)) == pytest.approx(expected, rel=1e-9)


def test_fd_of_samples_converges_to_the_closed_form():
    rng = np.random.default_rng(1)
    d, n = 4, 20000
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d, scale=0.5)
    m1, m2 = np.zeros(d), np.full(d, 0.5)
    expected = _fd(_stats(m1, s1), _stats(m2, s2))
    x = rng.multivariate_normal(m1, s1, size=n)
    y = rng.multivariate_normal(m2, s2, size=n)
    metric = FrechetDistance(backbone=None, feature_dim=d)
    for chunk in np.array_split(x, 7):  # streamed in uneven chunks
        metric.update(torch.from_numpy(chunk))
    metric.update(torch.from_numpy(y), real=True)
    out = metric.compute()
    # the estimator's error at n = 20000 is O(tr S / n + sampling noise ~ 1/sqrt(n)): about 1e-2 here
    assert float(out["fd"]) == pytest.approx(expected, abs=0.03 * expected + 0.01)
    assert int(out["n_generated"]) == n and int(out["n_reference"]) == n and int(out["dims"]) == d


def test_running_sums_equal_numpy_statistics_and_memory_is_fixed():
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(300, 10))  # an offset mean: the sums must not lose the covariance
    metric = FrechetDistance(backbone=None, feature_dim=10)
    sizes = [tuple(v.shape) for v in (metric.gen_sum, metric.gen_outer)]
    for chunk in np.array_split(x, 5):
        metric.update(torch.from_numpy(chunk))
    assert [tuple(v.shape) for v in (metric.gen_sum, metric.gen_outer)] == sizes
    stats = metric.generated_stats()
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fd_of_a_set_with_itself_is_zero_even_when_rank_deficient():
    rng = np.random.default_rng(3)
    for n, d in ((500, 8), (20, 256)):  # full rank, then rank 19 in 256 dims
        x = torch.from_numpy(rng.normal(size=(n, d)) * rng.uniform(0.1, 5, d))
        metric = FrechetDistance(backbone=None, feature_dim=d)
        metric.update(x)
        metric.update(x, real=True)
        out = metric.compute()
        total_var = float(FeatureStats.from_features(x).cov.trace())
        assert abs(float(out["fd"])) < 1e-9 * total_var, (n, d, out)
        assert abs(float(out["fd_pca"])) < 1e-9 * total_var


def _exact_samples(mean, cov, n, rng):
    """[n, d] samples whose sample mean and (n - 1) covariance are exactly `mean` and `cov`."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    whiten = np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return torch.from_numpy(z @ whiten @ np.linalg.cholesky(cov).T + mean)


def test_pca_variant_is_the_full_fd_when_the_difference_lies_in_the_leading_directions():
    rng = np.random.default_rng(4)
    d, k, n = 10, 3, 200
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    lam = np.array([9.0, 7.0, 5.0] + [0.5] * (d - k))  # the reference's leading directions: q[:, :3]
    ref = _stats(np.zeros(d), q @ np.diag(lam) @ q.T)

    def scores(mean, lam_g):
        metric = FrechetDistance(backbone=None, reference=ref, pca_dims=k)
        metric.update(_exact_samples(mean, q @ np.diag(lam_g) @ q.T, n, rng))
        out = metric.compute()
        assert int(out["pca_dims"]) == k
        return float(out["fd"]), float(out["fd_pca"])

    lam_g = lam.copy()
    lam_g[:k] = [4.0, 8.0, 1.0]
    mean = q[:, :k] @ np.array([1.0, -2.0, 0.5])
    expected = 1 + 4 + 0.25 + ((np.sqrt(lam_g[:k]) - np.sqrt(lam[:k])) ** 2).sum()
    fd, fd_pca = scores(mean, lam_g)
    assert fd == pytest.approx(expected, rel=1e-9) and fd_pca == pytest.approx(expected, rel=1e-9)
    # a difference outside those directions is invisible to fd_pca but not to fd
    lam_g = lam.copy()
    lam_g[-1] = 4.0
    fd, fd_pca = scores(np.zeros(d), lam_g)
    assert fd_pca == pytest.approx(0.0, abs=1e-9)
    assert fd == pytest.approx((2.0 - 0.5**0.5) ** 2, rel=1e-9)


# --- real photographs through the imagenet backbone -------------------------------------------------


@pytest.fixture(scope="module")
def photo_features():
    """imagenet features of FRAMES reference crops and of a held-out set of crops (other positions)
    under blur and noise of increasing strength."""
    import skimage.data
    from scipy.ndimage import gaussian_filter

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]

    def crops(seed, size=160):
        rng = np.random.default_rng(seed)
        out = []
        for i in range(FRAMES):
            p = photos[i % len(photos)]
            y, x = rng.integers(0, p.shape[0] - size + 1), rng.integers(0, p.shape[1] - size + 1)
            out.append(p[y:y + size, x:x + size])
        return np.stack(out)  # uint8 [N, H, W, 3]

    def blur(frames, sigma):
        return np.stack([gaussian_filter(f.astype(np.float64), (sigma, sigma, 0)) for f in frames])

    def noise(frames, std):
        return frames + np.random.default_rng(7).normal(0, std * 255, frames.shape)

    def uint8(frames):
        return np.clip(np.rint(frames), 0, 255).astype(np.uint8)

    held_out = crops(1)
    sets = {"reference": crops(0), "sharp": held_out}
    sets.update({f"blur{s}": uint8(blur(held_out, s)) for s in (1, 2, 4)})
    sets.update({f"noise{s}": uint8(noise(held_out, s)) for s in (0.05, 0.2)})
    backbone = get_backbone("imagenet")
    return {k: frame_features(backbone, v) for k, v in sets.items()}


def test_fd_of_real_photo_features_with_themselves_is_zero(photo_features):
    f = photo_features["reference"]  # 16 frames, 1280 dims: rank 15
    stats = FeatureStats.from_features(f)
    assert int((stats.eigh[0] > 0).sum()) <= FRAMES - 1 < f.shape[1]
    assert abs(_fd(stats, stats)) < 1e-6 * float(stats.cov.trace())


def test_blur_and_noise_move_photos_monotonically_away_from_sharp_ones(photo_features):
    ref = FeatureStats.from_features(photo_features["reference"])

    def score(name):
        metric = FrechetDistance(backbone=None, reference=ref, pca_dims=8)
        metric.update(photo_features[name])
        out = metric.compute()
        return float(out["fd"]), float(out["fd_pca"])

    blur = [score(k) for k in ("sharp", "blur1", "blur2", "blur4")]
    noise = [score(k) for k in ("sharp", "noise0.05", "noise0.2")]
    for curve in (blur, noise):
        for i in (0, 1):  # full FD and the low-dimensional variant
            values = [c[i] for c in curve]
            assert all(a < b for a, b in zip(values, values[1:])), (curve, i)


# --- world videos -----------------------------------------------------------------------------------


def _box_blur(video, factor):
    """[B, T, 3, H, W] -> the same size, averaged over factor x factor boxes and upsampled again."""
    x = video.flatten(0, 1)
    x = F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="bilinear", align_corners=False)
    return x.unflatten(0, video.shape[:2])


def test_another_world_scores_far_below_a_blurred_copy_and_grey():
    from cf.config import load_config
    from cf.data.world import World

    cfg = load_config("tiny")
    clips, per_clip, stride = 4, FRAMES // 4, 8

    def videos(seeds):  # [B, T, 3, H, W]: every stride-th frame, as the reference takes them
        return torch.stack([World(cfg.data, s).render(per_clip * stride).video[::stride] for s in seeds])

    eval_seeds = [cfg.data.eval_seed + k for k in range(2 * clips)]
    ref = world_reference(cfg.data, clips=clips, frames_per_clip=per_clip, stride=stride,
                          exclude_seeds=eval_seeds)
    assert ref.description["source"] == "world" and ref.description["frames"] == FRAMES
    assert ref.description["backbone"] == "imagenet" and ref.stats.n == FRAMES
    world = videos(eval_seeds[:clips])
    sets = {"world": world, "world2": videos(eval_seeds[clips:]), "blurred": _box_blur(world, 4),
            "grey": torch.zeros_like(world)}
    scores = {}
    for name, video in sets.items():
        metric = FrechetDistance(reference=ref, pca_dims=8)
        metric.update(video)
        out = metric.compute()
        scores[name] = float(out["fd"]), float(out["fd_pca"])
    for i in (0, 1):
        real = [scores["world"][i], scores["world2"][i]]
        spread = abs(real[0] - real[1])  # how much the score moves from one set of worlds to another
        for fake in ("blurred", "grey"):  # "far": the gap is several times that spread
            assert scores[fake][i] - max(real) > 3 * spread, (scores, i)


# --- reference sets, caching, guards ----------------------------------------------------------------


def test_world_reference_seeds_cache_and_description(tmp_path, monkeypatch, smoke_cfg):
    from cf.data import world as world_mod

    kwargs = dict(clips=2, frames_per_clip=3, stride=2, backbone="pixels", cache_dir=tmp_path)
    ref = world_reference(smoke_cfg.data, **kwargs)
    seeds = [tuple(s) for s in ref.description["seeds"]]
    assert seeds == [(REFERENCE_TAG, 0, 0), (REFERENCE_TAG, 0, 1)]
    # the statistics are those of the frames the description names
    frames = torch.cat([world_mod.World(smoke_cfg.data, s).render(6).video[::2] for s in seeds])
    expected = FeatureStats.from_features(get_backbone("pixels")(frames).double())
    torch.testing.assert_close(ref.stats.mean, expected.mean)
    torch.testing.assert_close(ref.stats.cov, expected.cov)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # a second call reads the cache and renders nothing
    monkeypatch.setattr(world_mod.World, "render", lambda *a, **k: pytest.fail("rendered despite the cache"))
    again = world_reference(smoke_cfg.data, **kwargs)
    torch.testing.assert_close(again.stats.cov, ref.stats.cov)
    assert again.description == ref.description
    # ... once per process: a second read in the same process is the same statistics, so an
    # eigendecomposition computed for one evaluation serves the next
    third = world_reference(smoke_cfg.data, **kwargs)
    assert third.stats is again.stats
    monkeypatch.undo()
    # another world config is another reference
    smoke_cfg.data.n_subjects = 0
    other = world_reference(smoke_cfg.data, **kwargs)
    assert other.description["world"] != ref.description["world"]
    assert len(list(tmp_path.glob("*.npz"))) == 2
    with pytest.raises(CfError, match="also evaluated"):
        world_reference(smoke_cfg.data, **{**kwargs, "cache_dir": None},
                        exclude_seeds=[(REFERENCE_TAG, 0, 1)])


def test_folder_reference_reads_every_video(tmp_path):
    from cf.video import read_video, write_video

    rng = np.random.default_rng(5)
    for name in ("a.gif", "sub/b.gif"):
        write_video(tmp_path / name, rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), fps=8)
    cache = tmp_path / "cache"
    ref = folder_reference(tmp_path, backbone="pixels", cache_dir=cache)
    frames = np.concatenate([read_video(tmp_path / n)[0] for n in ("a.gif", "sub/b.gif")])
    expected = FeatureStats.from_features(frame_features(get_backbone("pixels"), frames))
    assert ref.description["source"] == "folder" and ref.description["frames"] == 10 == ref.stats.n
    torch.testing.assert_close(ref.stats.cov, expected.cov)
    # an edited file is read again
    write_video(tmp_path / "a.gif", rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), fps=8)
    assert folder_reference(tmp_path, backbone="pixels", cache_dir=cache).stats.n == 8
    with pytest.raises(CfError, match="no videos"):
        folder_reference(cache, backbone="pixels")


def test_metric_guards_and_reset_keeps_a_given_reference():
    rng = np.random.default_rng(6)
    frames = torch.from_numpy(rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    pixels = get_backbone("pixels")
    ref = Reference(FeatureStats.from_features(frame_features(pixels, frames)),
                    {"source": "folder", "path": "x", "frames": 6, "backbone": "pixels"})
    with pytest.raises(CfError, match="backbone"):
        FrechetDistance(backbone="random", reference=ref)
    metric = FrechetDistance(backbone="pixels", reference=ref)
    with pytest.raises(CfError, match="precomputed reference"):
        metric.update(frames, real=True)
    metric.update(frames)  # uint8 [N, H, W, 3]
    assert float(metric.compute()["fd"]) == pytest.approx(0.0, abs=1e-6)
    metric.reset()
    metric.update(frames.permute(0, 3, 1, 2).float() / 127.5 - 1)  # the same frames as float [N, 3, H, W]
    assert float(metric.compute()["fd"]) == pytest.approx(0.0, abs=1e-6)
