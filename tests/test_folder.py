import numpy as np
import pytest
import torch

from cf.config import load_config
from cf.data import VideoDataModule
from cf.data.folder import VideoFolderDataset
from cf.data.world import World
from cf.errors import CfError
from cf.video import to_uint8, write_video


def folder_cfg(folder, *overrides):
    return load_config("smoke", overrides=["data.source=folder", f"data.folder={folder}", *overrides])


def ramp_video(frames: int, h: int, w: int) -> np.ndarray:
    """uint8 [T, h, w, 3]: frame k is a flat grey of level 8 * k (its index survives H.264)."""
    return np.repeat((8 * np.arange(frames, dtype=np.uint8))[:, None, None, None], h * w * 3).reshape(
        frames, h, w, 3)


def test_reads_a_real_mp4_resampled_resized_with_prompts(tmp_path):
    write_video(tmp_path / "slow_pan-left.mp4", ramp_video(30, 24, 40), fps=16)  # 16 fps -> 8 fps
    write_video(tmp_path / "b.mp4", ramp_video(20, 16, 16), fps=8)
    (tmp_path / "b.txt").write_text("a grey ramp\n")
    (tmp_path / "notes.md").write_text("not a video")
    ds = VideoFolderDataset(folder_cfg(tmp_path).data)
    assert [p.name for p in ds.videos] == ["b.mp4", "slow_pan-left.mp4"]
    assert ds.prompts == ["a grey ramp", "slow pan left"]
    assert ds.lengths == [20, 15]
    seen = set()
    for i in range(12):
        s = ds.sample(i)
        assert s["index"] == i
        assert s["video"].shape == (8, 3, 16, 16) and s["video"].dtype == torch.float32
        assert torch.equal(s["camera"], torch.zeros(8, 2))
        assert s["age"].dtype == torch.int32 and (s["age"] == -1).all()
        levels = to_uint8(s["video"]).reshape(8, -1).mean(1)
        step = 16 if s["prompt"] == "slow pan left" else 8  # every other frame of the 16 fps video
        assert np.abs(np.diff(levels) - step).max() < 3, levels
        seen.add(s["prompt"])
    assert seen == {"a grey ramp", "slow pan left"}
    again = VideoFolderDataset(folder_cfg(tmp_path).data)
    assert torch.equal(ds.sample(3)["video"], again.sample(3)["video"])


def test_reads_world_gifs_through_the_datamodule(tmp_path):
    cfg = folder_cfg(tmp_path)
    clip = World(cfg.data, 0).render(cfg.data.clip_frames + 4)
    write_video(tmp_path / "world.gif", clip.video, clip.fps)
    batch = next(iter(VideoDataModule(cfg).train_dataloader()))
    assert batch["video"].shape == (cfg.data.batch_size, cfg.data.clip_frames, 3, 16, 16)
    assert batch["prompt"] == ["world", "world"]
    # the gif decodes at the world's rate and size: each clip is a run of consecutive frames (up to gif
    # palette rounding), found in the rendered clip
    frames = to_uint8(clip.video).astype(int)
    for v in batch["video"]:
        v = to_uint8(v).astype(int)
        errs = [np.abs(frames[t : t + len(v)] - v).mean() for t in range(len(frames) - len(v) + 1)]
        assert min(errs) < 1  # the next best offset is ~30 levels off


def test_missing_empty_and_not_a_folder_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CfError, match=f"{missing}.*does not exist"):
        VideoFolderDataset(folder_cfg(missing).data)
    (tmp_path / "readme.txt").write_text("no videos here")
    with pytest.raises(CfError, match=f"{tmp_path}.*holds no videos"):
        VideoFolderDataset(folder_cfg(tmp_path).data)
    with pytest.raises(CfError, match="readme.txt.*not a folder"):
        VideoFolderDataset(folder_cfg(tmp_path / "readme.txt").data)
    with pytest.raises(CfError, match="set data.folder"):
        VideoFolderDataset(load_config("smoke", overrides=["data.source=folder"]).data)


def test_corrupt_and_short_files_fail_by_name_or_are_skipped_and_reported(tmp_path):
    write_video(tmp_path / "good.mp4", ramp_video(20, 16, 16), fps=8)
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    good_bytes = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "truncated.webm").write_bytes(good_bytes[: len(good_bytes) // 3])
    write_video(tmp_path / "short.gif", ramp_video(3, 16, 16), fps=8)
    with pytest.raises(CfError, match="corrupt.mp4.*data.skip_bad_files=true"):
        VideoFolderDataset(folder_cfg(tmp_path).data)
    with pytest.warns(UserWarning, match="skipped 3 of 4 videos") as record:
        ds = VideoFolderDataset(folder_cfg(tmp_path, "data.skip_bad_files=true").data)
    message = str(record[0].message)
    for name in ("corrupt.mp4", "truncated.webm", "short.gif"):
        assert name in message
    assert "good.mp4" not in message
    assert "lasts 3 frames" in message and "data.clip_frames=8" in message
    assert [p.name for p in ds.videos] == ["good.mp4"] and len(ds.skipped) == 3
    assert ds.sample(0)["video"].shape == (8, 3, 16, 16)
    (tmp_path / "good.mp4").unlink()
    with pytest.warns(UserWarning), pytest.raises(CfError, match="none of its 3 videos can be used"):
        VideoFolderDataset(folder_cfg(tmp_path, "data.skip_bad_files=true").data)
