import json

import numpy as np
import pytest
import torch

from cf.cli import main
from cf.config import load_config
from cf.data.camera import CAMERA_PATHS
from cf.data.world import World, find_revisits, visibility_age
from cf.errors import CfError
from cf.registry import UnknownNameError
from cf.video import read_video, to_float, to_uint8

PATHS = ["pingpong", "random", "revisit", "tour", "tour_anchored"]


def cfg(preset="smoke", *overrides):
    return load_config(preset, overrides=list(overrides))


@pytest.mark.parametrize("path", PATHS)
def test_revisit_pairs_are_exact_and_most_recent(path):
    c = cfg("smoke", f"data.camera_path={path}", "data.n_subjects=3")
    clip = World(c.data, 3).render(120, start=17)
    assert len(clip.revisits) > 10
    cam = clip.camera.long()
    subject_in_the_way, nonempty = 0, 0
    for i, (t1, t2, lag) in enumerate(clip.revisits):
        assert lag == t2 - t1 >= 2
        assert torch.equal(cam[t1], cam[t2])
        between = cam[t1 + 1 : t2]
        assert not (between == cam[t1]).all(1).any(), "t_first must be the most recent visit of the pose"
        mask = clip.revisit_mask(i)
        # background in both, and out of sight for at least half the lag (the pixels that test memory)
        assert torch.equal(mask, clip.background[t1] & clip.background[t2] & (2 * clip.age[t2] >= lag))
        assert not (mask & (clip.age[t2] < lag / 2)).any()
        nonempty += int(mask.any())
        assert torch.equal(clip.video[t1][:, mask], clip.video[t2][:, mask])
        subject_in_the_way += int(not torch.equal(clip.video[t1], clip.video[t2]))
    # the subjects move, so whole frames do differ: the mask is what makes the pairs exact
    assert subject_in_the_way > 0 and nonempty > len(clip.revisits) // 4
    assert np.array_equal(clip.revisit_masks(), np.stack([clip.revisit_mask(i).numpy()
                                                          for i in range(len(clip.revisits))]))


@pytest.mark.parametrize("preset,lags,frames", [("smoke", [4, 8], 60), ("tiny", [8, 16, 32, 48], 260)])
def test_revisit_path_produces_every_configured_lag(preset, lags, frames):
    c = cfg(preset, "data.camera_path=revisit", f"data.revisit_lags={lags}")
    for seed in range(3):
        clip = World(c.data, seed).render(frames)
        found = {lag for _, _, lag in clip.revisits}
        assert set(lags) <= found, (seed, sorted(found))


@pytest.mark.parametrize("preset,seconds", [("smoke", 12.0), ("tiny", 40.0)])
def test_tour_hides_each_end_for_the_longest_lag_while_moving(preset, seconds):
    c = cfg(preset, "data.camera_path=tour")
    long = int(round(seconds * c.data.fps))
    c.data.revisit_lags = [long]
    w = c.data.width
    for seed in range(2):
        clip = World(c.data, seed).render(3 * long)
        xs = clip.camera[:, 0].long().numpy()
        span = int(xs.max())
        step = max(1, round(c.data.camera_speed))
        assert xs.min() == 0 and span == clip.meta["panorama_width"] - w
        assert np.abs(np.diff(xs)).max() <= step
        assert (np.diff(xs) == 0).mean() < 0.1  # it pans: a hold only to land on time
        for end in (0, span):
            visits = np.flatnonzero(xs == end)
            starts = visits[np.r_[True, np.diff(visits) > 1]]
            seen = (xs < w) if end == 0 else (xs > span - w)  # views that overlap this end's
            gaps = [b - a for a, b in zip(starts, starts[1:])
                    if not seen[a + w // step + 1:b - w // step].any()]
            assert long in gaps or long - 2 * (-(-span // step)) < 0, (seed, end, gaps)
        assert max(lag for _, _, lag in clip.revisits) >= long


def test_age_on_a_constructed_case():
    # one row, frames 3 px wide over a 6 px panorama; frame 2's middle pixel (world x = 2) is a subject
    cam_x = np.array([0, 1, 1, 3, 0])
    background = np.ones((5, 1, 3), bool)
    background[2, 0, 1] = False
    expected = np.array([[-1, -1, -1], [1, 1, -1], [1, -1, 1], [1, -1, -1], [4, 2, 3]])[:, None, :]
    age = visibility_age(cam_x, background, 6)
    assert age.dtype == np.int32
    assert np.array_equal(age, expected)


def _age_by_brute_force(cam_x, background):
    f, h, w = background.shape
    age = np.full((f, h, w), -1)
    for t in range(f):
        for y in range(h):
            for x in range(w):
                if not background[t, y, x]:
                    continue
                for s in range(t - 1, -1, -1):
                    xs = cam_x[t] + x - cam_x[s]
                    if 0 <= xs < w and background[s, y, xs]:
                        age[t, y, x] = t - s
                        break
    return age


def test_clip_age_matches_a_brute_force_scan():
    c = cfg("smoke", "data.camera_path=random", "data.n_subjects=3")
    clip = World(c.data, 11).render(40, start=3)
    cam_x = clip.camera[:, 0].long().numpy()
    assert np.array_equal(clip.age.numpy(), _age_by_brute_force(cam_x, clip.background.numpy()))
    assert (clip.age[0] == -1).all()
    assert (clip.age[~clip.background] == -1).all()


def test_find_revisits_on_a_constructed_path():
    cam = np.array([[0, 0], [2, 0], [2, 0], [4, 0], [2, 0], [0, 0]])
    # t=2 repeats t=1 at lag 1 (not a memory question); t=4 repeats t=2 (the most recent), t=5 repeats t=0
    assert find_revisits(cam) == [(2, 4, 2), (0, 5, 5)]


def test_same_seed_same_world_other_seed_differs_and_time_is_absolute():
    c = cfg("smoke", "data.n_subjects=2")
    a, b = World(c.data, 7).render(40, 5), World(c.data, 7).render(40, 5)
    for key in ("video", "camera", "background", "age"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert a.prompt == b.prompt and a.revisits == b.revisits and a.to_json() == b.to_json()
    other = World(c.data, 8).render(40, 5)
    assert not torch.equal(a.video, other.video)
    # numpy's SeedSequence ignores trailing zeros; the world must not
    assert not torch.equal(World(c.data, 5).render(4).video, World(c.data, (5, 0)).render(4).video)
    # frame t of a world does not depend on the clip it is rendered in
    whole = World(c.data, 7).render(45, 0)
    assert torch.equal(whole.video[5:], a.video) and torch.equal(whole.camera[5:], a.camera)


def test_video_range_camera_and_shapes():
    c = cfg("smoke")
    clip = World(c.data, 0).render(24)
    assert clip.video.shape == (24, 3, 16, 16) and clip.video.dtype == torch.float32
    assert clip.camera.shape == (24, 2) and clip.camera.dtype == torch.float32
    assert clip.background.shape == (24, 16, 16) and clip.background.dtype == torch.bool
    assert clip.age.shape == (24, 16, 16) and clip.age.dtype == torch.int32
    assert clip.video.min() >= -1 and clip.video.max() <= 1
    # values are uint8 levels exactly, so files round-trip without loss
    assert torch.equal(to_float(to_uint8(clip.video)), clip.video)
    x = clip.camera[:, 0]
    assert torch.equal(x, x.round()) and (clip.camera[:, 1] == 0).all()
    assert x.min() >= 0 and x.max() <= 64 - 16  # panorama 4 frames of 16 px
    assert set((x[1:] - x[:-1]).abs().tolist()) <= {0.0, 1.0, 2.0}  # 2 px per frame, bounces included


def test_prompt_names_the_scene():
    c = cfg("smoke", "data.n_landmarks=5", "data.n_subjects=2", "data.texture=photo")
    world = World(c.data, 2)
    clip = world.render(4)
    assert len(world.landmarks) == 5 and len(set(w.split()[1] for w in world.landmarks)) == 5  # colours
    assert "back and forth at 2 pixels per frame" in clip.prompt
    for words in world.landmarks + [s.words for s in world.subjects]:
        assert words in clip.prompt
    assert all("photo" in r for r in world.regions)
    proc = World(cfg("smoke", "data.texture=procedural").data, 2)
    assert not any("photo" in r for r in proc.regions)


def test_subjects_leave_the_frame_and_come_back():
    c = cfg("tiny")
    world = World(c.data, 0)
    t = np.arange(600)
    cam_x = world.camera_x(0, 600)
    for s in world.subjects:
        sx, _ = s.position(t, world.pano_width, world.height)
        size = s.mask.shape[0]
        visible = (sx + size > cam_x) & (sx < cam_x + world.width)
        assert visible.any() and not visible.all()
        assert (visible[1:] & ~visible[:-1]).sum() >= 2  # entered, left, and entered again


def test_bad_world_configs_say_what_to_fix():
    with pytest.raises(CfError, match=r"data.pano_frames=1.0.*raise data.pano_frames"):
        World(cfg("smoke", "data.pano_frames=1.0").data, 0)
    with pytest.raises(CfError, match=r"data.revisit_lags=\[1\]"):
        World(cfg("smoke", "data.camera_path=revisit", "data.revisit_lags=[1]").data, 0)
    with pytest.raises(CfError, match="n_frames=0"):
        World(cfg("smoke").data, 0).render(0)
    with pytest.raises(UnknownNameError, match="pingpong, random, revisit"):
        cfg("smoke", "data.camera_path=zigzag")
    assert CAMERA_PATHS.names() == PATHS


def test_cf_world_writes_videos_ground_truth_and_sheet(tmp_path):
    a, b, other = tmp_path / "a", tmp_path / "b", tmp_path / "other"
    assert main(["world", "--preset", "smoke", "--n", "2", "--seconds", "6", "--out", str(a)]) == 0
    c = cfg("smoke")
    for k in range(2):
        stem = f"world_{k:03d}"
        for suffix in (".mp4", ".gif", ".json", ".revisit_masks.npz", ".contact.png"):
            assert (a / f"{stem}{suffix}").stat().st_size > 0, suffix
        meta = json.loads((a / f"{stem}.json").read_text())
        clip = World(c.data, (0, k)).render(48)
        assert meta["prompt"] == clip.prompt and meta["fps"] == 8 and meta["camera_path"] == "pingpong"
        assert meta["camera"] == clip.camera.long().tolist()
        pairs = [(r["t_first"], r["t_revisit"], r["lag"]) for r in meta["revisits"]]
        assert pairs == clip.revisits and pairs
        masks = np.load(a / f"{stem}.revisit_masks.npz")["masks"]
        assert masks.dtype == bool and masks.shape == (len(pairs), 16, 16)
        frames, fps = read_video(a / f"{stem}.gif")
        assert fps == pytest.approx(8, rel=0.05)  # gif delays are whole centiseconds
        assert frames.shape[1:] == (16, 16, 3)  # native resolution
        mp4, _ = read_video(a / f"{stem}.mp4")
        assert mp4.shape[0] == 48 and mp4.shape[1] >= 16 * 8  # enlarged for viewing

    assert main(["world", "--preset", "smoke", "--n", "1", "--seconds", "6", "--out", str(b)]) == 0
    assert main(["world", "--preset", "smoke", "--n", "1", "--seconds", "6", "--seed", "1", "--out",
                 str(other)]) == 0
    assert (a / "world_000.json").read_text() == (b / "world_000.json").read_text()
    for name in ("world_000.gif", "world_000.mp4"):
        assert np.array_equal(read_video(a / name)[0], read_video(b / name)[0])
    assert (a / "world_000.json").read_text() != (other / "world_000.json").read_text()
    assert not np.array_equal(read_video(a / "world_000.gif")[0], read_video(other / "world_000.gif")[0])


def test_cf_world_rejects_nothing_to_write(tmp_path, capsys):
    assert main(["world", "--preset", "smoke", "--n", "0", "--out", str(tmp_path)]) == 2
    assert "--n 0" in capsys.readouterr().err


def test_world_gif_is_pixel_exact(tmp_path):
    from cf.video import write_video

    clip = World(cfg("smoke", "data.camera_path=random").data, 4).render(48)
    assert len(np.unique(to_uint8(clip.video).reshape(-1, 3), axis=0)) <= 256
    write_video(tmp_path / "w.gif", clip.video, clip.fps)
    frames, _ = read_video(tmp_path / "w.gif")
    assert np.array_equal(frames, to_uint8(clip.video))
