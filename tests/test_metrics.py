"""Consistency, drift, motion and revisit metrics on constructed videos whose answers are known."""

import math

import pytest
import torch
import torch.nn.functional as F

from cf.config import load_config
from cf.errors import CfError
from cf.metrics.backbones import get_backbone
from cf.metrics.consistency import Drift, FirstFrameConsistency, VBenchConsistency, vbench_consistency
from cf.metrics.lpips_net import Lpips
from cf.metrics.motion import DynamicDegree, MotionSmoothness, _grey, lucas_kanade, motion_smoothness
from cf.metrics.revisit import (
    MSE_FLOOR,
    PSNR_CAP_DB,
    AgeBinnedError,
    RevisitError,
    chance_frames,
    check_pairs,
    effective_context,
    retention,
    revisit_errors,
)


def texture(h: int, w: int, seed: int = 0, blur: int = 3) -> torch.Tensor:
    """A smooth random colour texture [3, h, w] in [-1, 1] (smooth, so optical flow is well posed)."""
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    k = torch.ones(3, 1, 5, 5) / 25
    for _ in range(blur):
        x = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k, groups=3)
    return ((x - x.min()) / (x.max() - x.min()) * 2 - 1)[0]


def pan(tex: torch.Tensor, xs, size: int) -> torch.Tensor:
    """Frames [T, 3, size, size] cut from `tex` at left edges `xs` (a camera moving over a panorama)."""
    return torch.stack([tex[:, :size, x:x + size] for x in xs])


# --- consistency ------------------------------------------------------------------------------------

def test_static_video_scores_one_and_no_drift():
    video = pan(texture(32, 32), [0] * 12, 32)[None]  # [1, 12, 3, 32, 32]
    pix = get_backbone("pixels")
    ffc = FirstFrameConsistency(segment_s=0.5, backbone=pix)
    ffc.update(video, fps=8.0)
    curve = ffc.compute()
    assert torch.allclose(curve["value"], torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert curve["start_s"].tolist() == [0.0, 0.5, 1.0]
    assert curve["end_s"].tolist() == [0.5, 1.0, 1.5]
    assert curve["frames"].tolist() == [3, 4, 4]  # frame 0 is not scored against itself
    drift = Drift(segment_s=0.5, backbone=pix)
    drift.update(video, fps=8.0)
    d = drift.compute()
    assert abs(float(d["first_to_last"])) < 1e-6 and abs(float(d["slope_per_s"])) < 1e-6
    vb = VBenchConsistency(backbone=pix)
    vb.update(video, fps=8.0)
    out = vb.compute()
    assert float(out["whole"]) == pytest.approx(1.0, abs=1e-6)
    assert float(out["clips"]) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(float(out["long_range"]))  # 1.5 s hold one 2 s clip: no cross-clip term


def test_hard_cut_drops_first_frame_consistency_after_the_cut():
    a, b = texture(32, 32, seed=1), texture(32, 32, seed=2)
    video = torch.stack([a] * 8 + [b] * 8)[None]  # cut at t = 1 s (fps 8)
    ffc = FirstFrameConsistency(segment_s=1.0, backbone=get_backbone("pixels"))
    ffc.update(video, fps=8.0)
    value = ffc.compute()["value"]
    assert value[0] == pytest.approx(1.0, abs=1e-6)
    assert value[1] < 0.5  # the other scene
    drift = Drift(segment_s=1.0, backbone=get_backbone("pixels"))
    drift.update(video, fps=8.0)
    d = drift.compute()
    assert float(d["first_to_last"]) == pytest.approx(float(value[1] - value[0]))
    # the two segment centres are 1 s apart, so the slope equals the difference
    assert float(d["slope_per_s"]) == pytest.approx(float(value[1] - value[0]))


def test_hard_cut_with_the_imagenet_backbone_on_photos():
    skimage_data = pytest.importorskip("skimage.data")
    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 127.5 - 1
    cup = torch.from_numpy(skimage_data.coffee()).permute(2, 0, 1).float()[None] / 127.5 - 1
    small = [F.interpolate(x, size=(32, 32), mode="area")[0] for x in (cat, cup)]
    video = torch.stack([small[0], small[0], small[1], small[1]])[None]
    ffc = FirstFrameConsistency(segment_s=0.5, backbone=get_backbone("imagenet"))  # fps 4: frame 1 | 2, 3
    ffc.update(video, fps=4.0)
    value = ffc.compute()["value"]
    assert value[0] == pytest.approx(1.0, abs=1e-5) and value[1] < 0.9


def test_shuffled_copy_scores_lower_subject_consistency():
    video = pan(texture(32, 160, seed=3), list(range(0, 96, 3)), 32)  # a smooth pan, [32, 3, 32, 32]
    rest = 1 + torch.randperm(31, generator=torch.Generator().manual_seed(0))
    perm = torch.cat([torch.zeros(1, dtype=torch.long), rest])
    pix = get_backbone("pixels")
    orig, shuf = VBenchConsistency(backbone=pix), VBenchConsistency(backbone=pix)
    orig.update(video[None], fps=8.0)
    shuf.update(video[perm][None], fps=8.0)  # same frames (frame 0 kept), so only the neighbour term differs
    assert float(orig.compute()["whole"]) > float(shuf.compute()["whole"]) + 0.02
    assert float(orig.compute()["clips"]) > float(shuf.compute()["clips"]) + 0.02


def test_vbench_formula_matches_a_hand_computation_on_three_frames():
    # d1 = [1, 0]; d2 = [3, 4] -> [0.6, 0.8]; d3 = [0, 2] -> [0, 1]
    feats = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [0.0, 2.0]]])
    # t=2: 0.5 * (cos(d1,d2) + cos(d1,d2)) = 0.6; t=3: 0.5 * (cos(d1,d3) + cos(d2,d3)) = 0.5 * (0 + 0.8) = 0.4
    m = VBenchConsistency()
    m.update(feats, fps=8.0)
    assert float(m.compute()["whole"]) == pytest.approx((0.6 + 0.4) / 2)
    # negative cosines are clipped at 0: d3 = [-1, 0] gives 0 at t=3
    assert float(vbench_consistency(F.normalize(torch.tensor([[[1.0, 0], [3, 4], [-1, 0]]]), dim=-1))) == \
        pytest.approx(0.6 / 2)


def test_metrics_accumulate_over_updates_like_one_batch():
    feats = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(0))
    once, parts = FirstFrameConsistency(segment_s=0.5), FirstFrameConsistency(segment_s=0.5)
    once.update(feats, fps=4.0)
    for i in range(3):
        parts.update(feats[i:i + 1], fps=4.0)
    a, b = once.compute(), parts.compute()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double())
    vb_once, vb_parts = VBenchConsistency(clip_s=1.0), VBenchConsistency(clip_s=1.0)
    vb_once.update(feats, fps=4.0)
    # forward: one video's values, accumulated
    per_video = [{k: float(v) for k, v in vb_parts(feats[i:i + 1], fps=4.0).items()} for i in range(3)]
    for term in VBenchConsistency.TERMS:
        assert float(vb_parts.compute()[term]) == pytest.approx(sum(v[term] for v in per_video) / 3)
        assert float(vb_parts.compute()[term]) == pytest.approx(float(vb_once.compute()[term]))
    vb_parts.reset()
    vb_parts.update(feats[:1], fps=4.0)
    assert float(vb_parts.compute()["clips"]) == pytest.approx(per_video[0]["clips"])


def test_features_and_videos_give_the_same_scores():
    video = pan(texture(32, 96, seed=4), [0, 4, 8, 12, 16], 32)[None]
    pix = get_backbone("pixels")
    from_video, from_feats = VBenchConsistency(backbone=pix), VBenchConsistency()
    from_video.update(video, fps=8.0)
    from_feats.update(pix(video[0])[None], fps=8.0)
    assert float(from_video.compute()["whole"]) == pytest.approx(float(from_feats.compute()["whole"]))
    with pytest.raises(CfError, match="no backbone"):
        VBenchConsistency().update(video, fps=8.0)
    with pytest.raises(CfError, match="at least 2 frames"):
        VBenchConsistency().update(torch.randn(1, 1, 8), fps=8.0)


def test_vbench_long_terms_match_a_hand_computation():
    # 4 frames at 1 fps in 2 s clips: clips [d0, d1] and [d2, d3]; keyframes d0, d2
    e = torch.eye(3)
    d0, d1, d2, d3 = e[0], F.normalize(e[0] + e[1], dim=0), e[1], F.normalize(e[1] + e[2], dim=0)
    feats = torch.stack([d0, d1, d2, d3])[None]
    c = float(F.cosine_similarity(d0, d1, dim=0))  # same within both clips: cos 45 degrees
    m = VBenchConsistency(clip_s=2.0)
    m.update(feats, fps=1.0)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["clips"] == pytest.approx(c)  # each clip: 0.5 * (c + c)
    assert out["long_range"] == pytest.approx(0.0)  # keyframes d0, d2 are orthogonal: the scene was lost
    # whole: t=1: c; t=2: 0.5 * (0 + c); t=3: 0.5 * (0 + c)
    assert out["whole"] == pytest.approx((c + c / 2 + c / 2) / 3)


# --- motion -----------------------------------------------------------------------------------------

def test_motion_smoothness_is_exact_on_linear_and_alternating_videos():
    ramp = torch.linspace(-1, 1, 9).view(9, 1, 1, 1).expand(9, 3, 8, 8)  # brightness changes linearly
    assert float(motion_smoothness(ramp)) == pytest.approx(1.0)
    flicker = torch.tensor([-1.0, 1.0] * 3 + [-1.0]).view(7, 1, 1, 1).expand(7, 3, 8, 8)  # black/white
    assert float(motion_smoothness(flicker)) == pytest.approx(0.0)
    half = torch.tensor([-1.0, 0.0, -1.0]).view(3, 1, 1, 1).expand(3, 3, 4, 4)  # |0 - (-1)| on 0..255 = 127.5
    assert float(motion_smoothness(half)) == pytest.approx(1 - 127.5 / 255)
    uint8 = ((ramp + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # [T, H, W, 3] is accepted too
    assert float(motion_smoothness(uint8)) == pytest.approx(1.0, abs=1e-3)
    m = MotionSmoothness()
    m.update(torch.stack([ramp, ramp]))
    m.update(flicker[:5][None].expand(1, 5, 3, 8, 8))
    assert float(m.compute()) == pytest.approx(2 / 3)


def test_flow_recovers_a_known_translation():
    tex = texture(64, 256, seed=5)
    video = pan(tex, [4 * t for t in range(6)], 64)  # content moves 4 px left per frame
    flow = lucas_kanade(_grey(video[:-1]), _grey(video[1:]))
    inner = flow[..., 8:-8, 8:-8]
    assert inner[:, 0].median() == pytest.approx(-4.0, abs=0.05)
    assert inner[:, 1].abs().median() < 0.05


def test_dynamic_degree_static_versus_moving():
    tex = texture(64, 256, seed=6)
    m = DynamicDegree()
    still = m(pan(tex, [0] * 10, 64)[None], fps=8.0)
    assert float(still["dynamic_degree"]) == 0.0 and float(still["flow_magnitude"]) < 0.01
    moving = m(pan(tex, [4 * t for t in range(10)], 64)[None], fps=8.0)  # threshold 6 * 64 / 256 = 1.5 px
    assert float(moving["dynamic_degree"]) == 1.0
    assert float(moving["flow_magnitude"]) == pytest.approx(4.0, abs=0.3)
    total = m.compute()
    assert float(total["dynamic_degree"]) == 0.5


# --- revisits ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def random_lpips():
    return Lpips(random=True)


def test_exact_revisit_gives_capped_psnr_and_zero_lpips(random_lpips):
    assert "test only" in random_lpips.label
    tex = texture(32, 128, seed=7)
    video = pan(tex, [0, 4, 8, 4, 0, 4, 8], 32)
    pairs = torch.tensor([[0, 4, 4], [1, 3, 2], [2, 6, 4], [1, 5, 4]])
    err = revisit_errors(video, pairs, lpips=random_lpips)
    assert err["mse"].tolist() == [0.0] * 4
    assert err["psnr"].tolist() == [PSNR_CAP_DB] * 4
    assert err["lpips"].tolist() == [0.0] * 4


def test_revisit_error_values_and_masks(random_lpips):
    tex = texture(32, 64, seed=8)
    video = pan(tex, [0, 8, 0], 32).clone()
    video[2, :, :16] += 0.2  # top half off by 0.1 on [0, 1]: MSE 0.01 there
    pairs = torch.tensor([[0, 2, 2]])
    whole = revisit_errors(video, pairs)
    assert float(whole["mse"]) == pytest.approx(0.005)  # half the pixels
    assert float(whole["psnr"]) == pytest.approx(10 * math.log10(1 / 0.005))
    top = torch.zeros(1, 32, 32, dtype=torch.bool)
    top[:, :16] = True
    assert float(revisit_errors(video, pairs, top)["psnr"]) == pytest.approx(20.0)
    assert float(revisit_errors(video, pairs, ~top, random_lpips)["mse"]) == 0.0
    lp_top = float(revisit_errors(video, pairs, top, random_lpips)["lpips"])
    lp_bottom = float(revisit_errors(video, pairs, ~top, random_lpips)["lpips"])
    assert lp_top > lp_bottom >= 0.0  # the spatial LPIPS map is averaged over the mask


def test_revisit_metric_groups_by_lag_and_skips_empty_masks():
    tex = texture(32, 64, seed=9)
    video = pan(tex, [0, 4, 0, 4, 0, 4], 32).clone()
    video[4] += 0.2  # the lag-4 revisit of frame 0 is off by 0.1 everywhere
    m = RevisitError()
    masks = torch.ones(3, 32, 32, dtype=torch.bool)
    masks[2] = False
    m.update(video, [[0, 2, 2], [0, 4, 4], [1, 3, 2]], fps=4.0, masks=masks)
    r = m.compute()
    assert r["lag"].tolist() == [2.0, 4.0] and r["pairs"].tolist() == [1, 1] and int(r["skipped"]) == 1
    assert r["lag_s"].tolist() == [0.5, 1.0]
    assert r["mse"][0] == 0.0 and float(r["mse"][1]) == pytest.approx(0.01)
    assert math.isnan(float(r["lpips"][0]))  # no LPIPS net: NaN, never a made-up number


def test_effective_context_definition():
    # retention by lag (seconds): the longest lag up to which every bin holds (>= 0.5)
    assert effective_context([0.5, 1, 4, 16], [0.99, 0.9, 0.6, 0.1]) == (4.0, False)
    assert effective_context([0.5, 1, 4], [1.0, 0.9, 0.8]) == (4.0, True)  # never failed: a lower bound
    # every shorter lag must hold too; lags need not come sorted
    assert effective_context([4, 0.5, 1], [0.9, 0.9, 0.2]) == (0.5, False)
    assert effective_context([0.5, 1], [0.1, 0.9]) == (0.0, False)  # forgot at once
    assert effective_context([0.5, 1], [math.nan, 0.9]) == (1.0, True)  # no chance reference: no evidence
    assert effective_context([], []) == (None, False)
    assert effective_context([1, 2], [0.7, 0.65], level=0.68) == (1.0, False)
    assert MSE_FLOOR == pytest.approx(1e-10)
    with pytest.raises(CfError, match="retention level"):
        effective_context([2], [1.0], level=1.5)


def test_retention_is_one_when_exact_and_zero_at_chance():
    assert retention(0.0, 0.02).item() == 1.0 and retention(0.02, 0.02).item() == 0.0
    assert retention(0.04, 0.02).item() == -1.0 and math.isnan(retention(0.0, 0.0).item())


def test_chance_frames_are_other_places_at_a_similar_distance_in_time():
    # poses per frame: 0 1 2 3 2 1 0 1 2 3 (a pan there and back, twice)
    xs = [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    pairs = torch.tensor([[2, 4, 2], [1, 5, 4], [0, 6, 6], [5, 7, 2], [4, 8, 4], [3, 9, 6]])
    refs = chance_frames(pairs)  # without a camera: frames outside the revisit's chain of pairs
    chains = {0: {0, 6}, 1: {1, 5, 7}, 2: {2, 4, 8}, 3: {3, 9}}
    firsts = set(pairs[:, 0].tolist())
    for (_, b, _), ref in zip(pairs.tolist(), refs):
        place = next(c for c in chains.values() if b in c)
        assert ref and all(f < b and f in firsts and f not in place for f in ref)
    # with a camera (x in frame widths here: frames 1 px wide), overlapping views are excluded as well
    cam = torch.tensor([[x, 0] for x in xs])
    for (_, b, _), ref in zip(pairs.tolist(), chance_frames(pairs, cam, (1, 1))):
        assert all(xs[f] != xs[b] for f in ref)
    # at most k references, spread over the window
    assert all(len(r) <= 2 for r in chance_frames(pairs, k=2))


def _chance_frames_by_loop(pairs, camera, hw, k=8):
    """The chance references written as the definition reads, frame by frame (a reference for the
    vectorised `chance_frames`)."""
    rows = pairs.tolist()
    firsts = sorted({a for a, _, _ in rows})
    chain = {}
    for a, b, _ in rows:  # one place = one chain of pairs; label every frame by its chain's members
        ids = chain.get(a, {a}) | chain.get(b, {b})
        for f in ids:
            chain[f] = ids
    out = []
    for _, b, lag in rows:
        if camera is None:
            cands = [f for f in firsts if f < b and f not in chain.get(b, {b})]
        else:
            cands = [f for f in range(b) if abs(float(camera[f][0] - camera[b][0])) >= hw[1]
                     or abs(float(camera[f][1] - camera[b][1])) >= hw[0]]
        near = [f for f in cands if lag / 2 <= b - f <= 2 * lag]
        if not near:
            near = sorted(sorted(cands, key=lambda f: (abs(math.log((b - f) / lag)), f))[:k])
        if len(near) > k:
            near = [near[round(i * (len(near) - 1) / (k - 1))] for i in range(k)]
        out.append(near)
    return out


@pytest.mark.parametrize("path", ["tour_anchored", "random"])
def test_chance_frames_equal_the_frame_by_frame_definition(path):
    from cf.data.world import World

    c = load_config("tiny", overrides=[f"data.camera_path={path}", "data.revisit_lags=[120]"])
    clip = World(c.data, 4).render(300)
    pairs = torch.tensor(clip.revisits)
    assert len(pairs) > 50
    assert chance_frames(pairs, clip.camera, (32, 32)) == _chance_frames_by_loop(pairs, clip.camera, (32, 32))
    assert chance_frames(pairs) == _chance_frames_by_loop(pairs, None, None)


def test_revisit_pairs_and_masks_are_checked():
    with pytest.raises(CfError, match=r"revisit pair 1 \[3, 9, 6\]"):
        check_pairs([[0, 2, 2], [3, 9, 6]], None, t=8, hw=(4, 4))
    with pytest.raises(CfError, match="2 pairs, H, W"):
        check_pairs([[0, 2, 2], [1, 3, 2]], torch.ones(3, 4, 4, dtype=torch.bool), t=8, hw=(4, 4))
    _, big = check_pairs([[0, 2, 2]], torch.eye(4, dtype=torch.bool)[None], t=8, hw=(12, 12))
    assert big.shape == (1, 12, 12) and big[0, 11, 11] and not big[0, 0, 11]  # nearest enlargement x3
    with pytest.raises(CfError, match="integer enlargement"):
        check_pairs([[0, 2, 2]], torch.ones(1, 4, 4, dtype=torch.bool), t=8, hw=(10, 12))


def test_age_binned_error():
    target = torch.zeros(2, 3, 4, 4)
    pred = target.clone()
    age = torch.full((2, 4, 4), -1)
    age[1, :2] = 5  # 8 pixels last seen 5 frames ago, reproduced 0.1 off
    age[1, 2:] = 1
    pred[1, :, :2] += 0.2
    m = AgeBinnedError(edges=(0, 1, 2, 4, 8))
    m.update(pred, target, age)
    r = m.compute()
    # bins: never, [0,1), [1,2), [2,4), [4,8), [8,inf)
    assert r["pixels"].tolist() == [16, 0, 8, 0, 8, 0]
    assert r["mse"][0] == 0 and r["mse"][2] == 0 and float(r["mse"][4]) == pytest.approx(0.01)
    assert float(r["psnr"][4]) == pytest.approx(20.0) and math.isnan(float(r["mse"][1]))
