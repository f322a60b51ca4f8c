"""Training clips cut from a folder of the user's own videos (mp4, webm, gif, ...).

Every video is decoded once when the dataset is built, so a missing folder, an empty one or an
unreadable file fails at once with its path (or, with ``data.skip_bad_files=true``, is skipped
and reported in a warning that says how many and which). Clips are resampled in time to
``data.fps`` and resized (centre crop to the aspect, then antialiased bilinear) to
``data.height x data.width``. A real video has no known camera, so `camera` is zeros and `age`
is -1 everywhere.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cf.data.datasets import SampleStream
from cf.data.world import seed_sequence
from cf.errors import CfError
from cf.video import VIDEO_SUFFIXES, read_video, to_float

log = logging.getLogger(__name__)

# Frame rates this close to data.fps are taken frame for frame: containers store timing inexactly.
FPS_TOLERANCE = 0.05
# Decoded, resized videos kept per process: enough to avoid re-decoding a small folder on every clip.
CACHE_VIDEOS = 32


class VideoFolderDataset(SampleStream):
    """Sample i: a clip of ``data.clip_frames`` frames from a video and start time drawn from (seed, i)."""

    def __init__(self, data_cfg, seed: int | None = None, start: int = 0, count: int | None = None,
                 block: int = 1, rank: int = 0, world_size: int = 1):
        super().__init__(data_cfg.seed if seed is None else seed, start, count, block, rank, world_size)
        self.height, self.width = int(data_cfg.height), int(data_cfg.width)
        self.fps, self.frames = float(data_cfg.fps), int(data_cfg.clip_frames)
        self.root = _folder(data_cfg.folder)
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
        if not files:
            raise CfError(f"video folder {str(self.root)!r} holds no videos (looked for "
                          f"{', '.join('*' + s for s in VIDEO_SUFFIXES)}); "
                          "put videos there or fix data.folder")
        self.videos: list[Path] = []
        self.lengths: list[int] = []  # frames at data.fps
        self.prompts: list[str] = []
        self.skipped: list[tuple[str, str]] = []  # (path, why) of the files left out
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        for path in files:
            try:
                clip = self._load(path)
            except CfError as e:
                if not data_cfg.skip_bad_files:
                    raise CfError(f"{e}; fix or remove the file, or set data.skip_bad_files=true") from None
                self.skipped.append((str(path), str(e)))
                continue
            self.videos.append(path)
            self.lengths.append(len(clip))
            self.prompts.append(_prompt(path))
            self._remember(len(self.videos) - 1, clip)
        if self.skipped:
            msg = (f"skipped {len(self.skipped)} of {len(files)} videos in {str(self.root)!r}: "
                   + "; ".join(why for _, why in self.skipped))
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
        if not self.videos:
            raise CfError(f"video folder {str(self.root)!r}: none of its {len(files)} videos can be used "
                          f"({'; '.join(why for _, why in self.skipped)})")

    def _load(self, path: Path) -> np.ndarray:
        """Decode `path` -> uint8 ``[T, H, W, 3]`` at data.fps and the configured size."""
        frames, src_fps = read_video(path)
        if abs(src_fps - self.fps) <= FPS_TOLERANCE * self.fps:
            src_fps = self.fps  # same rate, stored inexactly (a gif's 8 fps is 120 or 130 ms per frame)
        n = int((len(frames) - 1) * self.fps / src_fps) + 1  # frames at data.fps within the video
        if n < self.frames:
            raise CfError(f"video {str(path)!r} lasts {n} frames at data.fps={self.fps:g}, fewer than "
                          f"data.clip_frames={self.frames}")
        src = np.minimum(np.rint(np.arange(n) * src_fps / self.fps).astype(np.int64), len(frames) - 1)
        return _resize(frames[src], self.height, self.width)

    def _remember(self, k: int, clip: np.ndarray) -> None:
        self._cache[k] = clip
        self._cache.move_to_end(k)
        while len(self._cache) > CACHE_VIDEOS:
            self._cache.popitem(last=False)

    def video(self, k: int) -> np.ndarray:
        """uint8 ``[T, H, W, 3]``: video k at data.fps and the configured size."""
        if k not in self._cache:
            self._remember(k, self._load(self.videos[k]))
        self._cache.move_to_end(k)
        return self._cache[k]

    def sample(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng(seed_sequence((self.seed, i)))
        k = int(rng.integers(len(self.videos)))
        t0 = int(rng.integers(0, self.lengths[k] - self.frames + 1))
        return {
            "video": to_float(self.video(k)[t0 : t0 + self.frames]),  # [F, 3, H, W]
            "camera": torch.zeros(self.frames, 2),
            "prompt": self.prompts[k],
            "index": i,
            "age": torch.full((self.frames, self.height, self.width), -1, dtype=torch.int32),
        }


def _folder(folder: str | None) -> Path:
    if folder is None:
        raise CfError("data.source=folder needs a folder of videos: set data.folder=PATH")
    root = Path(folder).expanduser()
    if not root.exists():
        raise CfError(f"video folder {str(root)!r} does not exist; set data.folder to a folder of videos")
    if not root.is_dir():
        raise CfError(f"data.folder={str(root)!r} is a file, not a folder; set data.folder to its folder")
    return root


def _prompt(path: Path) -> str:
    """The sidecar ``NAME.txt`` if there is one, else the file name in words."""
    side = path.with_suffix(".txt")
    if side.is_file():
        return side.read_text().strip()
    return " ".join(path.stem.replace("_", " ").replace("-", " ").split())


def _resize(frames: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 ``[T, h0, w0, 3]`` -> uint8 ``[T, h, w, 3]``: centre crop to the aspect h:w, then resize."""
    t, h0, w0, _ = frames.shape
    if (h0, w0) == (h, w):
        return frames
    if h0 * w > w0 * h:  # too tall
        ch = max(1, round(w0 * h / w))
        frames = frames[:, (h0 - ch) // 2 : (h0 - ch) // 2 + ch]
    else:
        cw = max(1, round(h0 * w / h))
        frames = frames[:, :, (w0 - cw) // 2 : (w0 - cw) // 2 + cw]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # [T, 3, h', w']
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
