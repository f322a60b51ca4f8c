"""The procedural world: a camera over a wide panorama with landmarks and moving subjects.

A `World` is a pure function of (data config, seed): its panorama (textured regions and
distinct landmarks), its subjects (sprites with a shape, colour and pattern that move in world
coordinates, leave the frame and come back) and its camera path (whole pixels, so revisits are
pixel-exact). `render` cuts frames out of the precomputed panorama and pastes the subjects,
and returns them with the ground truth that makes memory measurable: which pixels are
background, how long ago each background pixel was last seen (`age`), and every revisit.

Time is absolute: frame t of a world is the same whatever clip it is rendered in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cf.data import textures as tx
from cf.data.camera import CAMERA_PATHS, TOURS, PathSpec, reflect
from cf.errors import CfError

__all__ = ["CAMERA_PATHS", "Clip", "Subject", "World", "find_revisits", "seed_sequence", "visibility_age"]


@dataclass
class Clip:
    """Frames of a world with their ground truth. Tensors are torch, on the CPU."""

    video: Any  # float32 [F, 3, H, W] in [-1, 1] (exactly uint8 / 127.5 - 1, so uint8 round-trips)
    camera: Any  # float32 [F, 2]: (x, y) of each frame's top-left corner in panorama pixels
    prompt: str
    background: Any  # bool [F, H, W]: pixels no subject covers
    age: Any  # int32 [F, H, W]: frames since this background pixel's world location was last
    #           background in an earlier frame of the clip; -1 if never, and on subjects
    revisits: list[tuple[int, int, int]]  # (t_first, t_revisit, lag): same camera pose, lag >= 2
    fps: float
    camera_path: str
    seed: tuple[int, ...]
    start: int  # world time of frame 0
    meta: dict[str, Any] = field(default_factory=dict)  # scene description (regions, landmarks, ...)

    def revisit_mask(self, i: int):
        """bool ``[H, W]``: pixels of revisit `i` that must match: background in both frames and out of
        sight for at least half the lag (a pose revisit of lag L also shows places seen a frame ago,
        which only test copying; the pixels that come back after about L frames test memory)."""
        import torch

        return torch.from_numpy(self._masks(self.revisits[i:i + 1])[0])

    def revisit_masks(self):
        """bool ``[n_revisits, H, W]`` (numpy), one `revisit_mask` per revisit pair."""
        return self._masks(self.revisits)

    def _masks(self, pairs) -> np.ndarray:
        h, w = self.background.shape[1:]
        if not pairs:
            return np.zeros((0, h, w), bool)
        bg, age = self.background.numpy(), self.age.numpy()
        t1, t2, lag = np.array(pairs).T
        return bg[t1] & bg[t2] & (2 * age[t2] >= lag[:, None, None])

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "fps": self.fps,
            "frames": int(self.video.shape[0]),
            "height": int(self.video.shape[2]),
            "width": int(self.video.shape[3]),
            "seed": list(self.seed),
            "start": self.start,
            "camera_path": self.camera_path,
            "camera": self.camera.long().tolist(),
            "revisits": [{"t_first": a, "t_revisit": b, "lag": c} for a, b, c in self.revisits],
            **self.meta,
        }


@dataclass
class Subject:
    """A sprite with an identity that bounces around the panorama in world coordinates."""

    shape: str
    colour: str
    pattern: str
    rgb: np.ndarray  # uint8 [s, s, 3]
    mask: np.ndarray  # bool [s, s]
    x0: float
    y0: float
    vx: float  # pixels per frame
    vy: float

    @property
    def words(self) -> str:
        return f"a {self.colour} {self.pattern} {self.shape}"

    def position(self, t: np.ndarray, pano_w: int, pano_h: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-left corner in panorama pixels at world times `t` -> (x int [F], y int [F])."""
        s = self.mask.shape[0]
        x = reflect(np.rint(self.x0 + self.vx * t).astype(np.int64), pano_w - s)
        y = reflect(np.rint(self.y0 + self.vy * t).astype(np.int64), pano_h - s)
        return x, y


class World:
    """A world drawn from `seed` (an int or a tuple of ints) with the sizes in `data_cfg`."""

    def __init__(self, data_cfg, seed: int | Sequence[int]):
        self.seed = (int(seed),) if isinstance(seed, (int, np.integer)) else tuple(int(s) for s in seed)
        d = data_cfg
        self.height, self.width, self.fps = int(d.height), int(d.width), float(d.fps)
        self.pano_width = int(round(d.pano_frames * d.width))
        self.camera_path = str(d.camera_path)
        spec = PathSpec(span=self.pano_width - self.width, speed=float(d.camera_speed),
                        lags=tuple(int(x) for x in d.revisit_lags), view=self.width)
        _check(d, spec, self.pano_width)
        streams = seed_sequence(self.seed).spawn(5)
        pano_rng, land_rng, subj_rng, cam_rng = (np.random.default_rng(s) for s in streams[:4])
        self._sampling = streams[4]  # for `random_start`; a fresh generator each call keeps it pure

        self.panorama, self.regions = tx.panorama(self.height, self.pano_width, self.width, d.texture,
                                                  pano_rng)
        self.landmarks = self._paint_landmarks(int(d.n_landmarks), land_rng)
        self.subjects = [self._subject(subj_rng, float(d.camera_speed)) for _ in range(int(d.n_subjects))]
        path = CAMERA_PATHS.get(self.camera_path)
        self._motion = path.text.format(speed=spec.speed)
        self._path = path.generate(spec, cam_rng)
        self._xs: list[int] = []

    # --- building ---------------------------------------------------------------------------

    def _paint_landmarks(self, n: int, rng: np.random.Generator) -> list[str]:
        """Paint `n` outlined shapes into the panorama, one per equal slot along it, each with its own
        colour (and shape, while there are shapes left), so every landmark marks one place."""
        colours = rng.permutation(len(tx.COLOURS))
        shapes = rng.permutation(len(tx.SHAPES))
        slot = self.pano_width / max(n, 1)
        words = []
        for j in range(n):
            size = int(rng.integers(max(3, int(0.35 * self.height)), max(3, int(0.55 * self.height)) + 1))
            size = min(size, self.height, max(3, int(slot)))
            # distinct colours first; (colour, shape) pairs repeat only after lcm(#colours, #shapes)
            colour = tx.COLOURS[colours[j % len(colours)]]
            shape = tx.SHAPES[shapes[j % len(shapes)]]
            rgb, mask = tx.outlined(shape, size, np.array(tx.PALETTE[colour], np.uint8))
            x = int(np.clip(round(slot * (j + rng.uniform(0.2, 0.8)) - size / 2), 0, self.pano_width - size))
            y = int(rng.integers(0, self.height - size + 1))
            region = self.panorama[y : y + size, x : x + size]
            region[mask] = rgb[mask]
            words.append(f"a {colour} {shape}")
        return words

    def _subject(self, rng: np.random.Generator, speed: float) -> Subject:
        lo = max(3, self.height // 5)
        size = int(rng.integers(lo, max(lo, int(self.height / 3.5)) + 1))
        shape = tx.SHAPES[rng.integers(len(tx.SHAPES))]
        colour = tx.COLOURS[rng.integers(len(tx.COLOURS))]
        pattern = tx.PATTERNS[rng.integers(len(tx.PATTERNS))]
        rgb, mask = tx.outlined(shape, size, tx.pattern_fill(pattern, size, tx.PALETTE[colour]))
        # Subjects move slower than the camera, so the camera both overtakes them and loses them.
        vx = float(rng.choice((-1, 1)) * rng.uniform(0.2, 0.8) * max(speed, 1.0))
        vy = float(rng.choice((-1, 1)) * rng.uniform(0.0, 0.25) * max(speed, 1.0))
        return Subject(shape, colour, pattern, rgb, mask, x0=float(rng.uniform(0, self.pano_width - size)),
                       y0=float(rng.uniform(0, self.height - size)), vx=vx, vy=vy)

    # --- querying ---------------------------------------------------------------------------

    @property
    def prompt(self) -> str:
        text = f"A camera {self._motion} over {_listing(self.regions)}."
        if self.landmarks:
            text += f" Landmarks: {_listing(self.landmarks)}."
        if self.subjects:
            text += f" Moving: {_listing([s.words for s in self.subjects])}."
        return text

    def camera_x(self, start: int, n: int) -> np.ndarray:
        """int64 ``[n]``: the camera's x at world times start .. start + n - 1."""
        while len(self._xs) < start + n:
            self._xs.extend(next(self._path))
        return np.array(self._xs[start : start + n], np.int64)

    def random_start(self, high: int) -> int:
        """A world time in ``[0, high)`` drawn from the seed: the same every call."""
        return int(np.random.default_rng(self._sampling).integers(0, high))

    def render(self, n_frames: int, start: int = 0) -> Clip:
        """Frames at world times start .. start + n_frames - 1 with their ground truth."""
        import torch  # here, not at the top: config validation imports this module for CAMERA_PATHS

        if n_frames < 1 or start < 0:
            raise CfError(f"cannot render n_frames={n_frames} from start={start}; "
                          "need n_frames >= 1 and start >= 0")
        h, w = self.height, self.width
        t = np.arange(start, start + n_frames)
        xs = self.camera_x(start, n_frames)  # [F]
        frames = self.panorama[:, xs[:, None] + np.arange(w)].transpose(1, 0, 2, 3).copy()  # [F, H, W, 3]
        background = np.ones((n_frames, h, w), bool)
        for s in self.subjects:
            sx, sy = s.position(t, self.pano_width, h)
            _paste(frames, background, s, sx - xs, sy)
        # numpy, not torch, for the arithmetic: on tiny tensors torch's thread pool costs more than the work
        video = frames.transpose(0, 3, 1, 2).astype(np.float32, order="C") / np.float32(127.5) - 1
        meta = {"regions": self.regions, "landmarks": self.landmarks,
                "subjects": [s.words for s in self.subjects]}
        return self.clip_of(torch.from_numpy(video), xs, background, int(start), meta)

    def clip_of(self, video, xs: np.ndarray, background: np.ndarray, start: int, meta: dict) -> Clip:
        """A Clip of frames `video` [F, 3, H, W] seen from camera x positions `xs` [F] in this world, with
        their ground truth: pixel ages and revisit pairs from `xs` and the `background` mask [F, H, W]."""
        import torch  # as in `render`

        camera = np.stack([xs, np.zeros_like(xs)], 1)  # [F, 2]; the camera never moves vertically
        return Clip(
            video=video,
            camera=torch.from_numpy(camera.astype(np.float32)),
            prompt=self.prompt,
            background=torch.from_numpy(background),
            age=torch.from_numpy(visibility_age(xs, background, self.pano_width)),
            revisits=find_revisits(camera),
            fps=self.fps,
            camera_path=self.camera_path,
            seed=self.seed,
            start=start,
            meta={**meta, "panorama_width": self.pano_width},
        )


def _paste(frames: np.ndarray, background: np.ndarray, s: Subject, px: np.ndarray, py: np.ndarray) -> None:
    """Draw subject `s` at screen positions (px, py) ``[F]`` into frames ``[F, H, W, 3]`` in place."""
    _, h, w, _ = frames.shape
    size = s.mask.shape[0]
    visible = (px > -size) & (px < w) & (py > -size) & (py < h)
    for i in np.flatnonzero(visible):
        x0, y0 = int(px[i]), int(py[i])
        fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
        m = s.mask[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
        frames[i, fy0:fy1, fx0:fx1][m] = s.rgb[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0][m]
        background[i, fy0:fy1, fx0:fx1][m] = False


def visibility_age(cam_x: np.ndarray, background: np.ndarray, pano_width: int) -> np.ndarray:
    """int32 ``[F, H, W]``: for each background pixel, frames since its world location was last
    background in an earlier frame (-1: never seen before; also -1 on subject pixels).

    cam_x: int ``[F]`` left edge of each frame in the panorama; background: bool ``[F, H, W]``.
    """
    f, h, w = background.shape
    last = np.full((h, pano_width), -1, np.int64)  # frame each world pixel was last background
    age = np.full((f, h, w), -1, np.int32)
    for t in range(f):
        view = last[:, cam_x[t] : cam_x[t] + w]  # a view: writing it updates `last`
        seen = background[t] & (view >= 0)
        age[t][seen] = t - view[seen]
        view[background[t]] = t
    return age


def find_revisits(camera: np.ndarray) -> list[tuple[int, int, int]]:
    """(t_first, t_revisit, lag) for every frame whose pose ``camera[t]`` occurred before: t_first is
    the most recent earlier frame with that exact pose, and only lags >= 2 count (a camera that holds
    still for a frame is not a memory question)."""
    last: dict[tuple[int, ...], int] = {}
    out = []
    for t, pose in enumerate(map(tuple, np.asarray(camera).tolist())):
        if pose in last and t - last[pose] >= 2:
            out.append((last[pose], t, t - last[pose]))
        last[pose] = t
    return out


def seed_sequence(seed: Sequence[int]) -> np.random.SeedSequence:
    """A SeedSequence for a tuple of non-negative ints. The length goes first because numpy ignores
    trailing zeros: without it, seeds (5,) and (5, 0) would draw the same world."""
    if any(s < 0 for s in seed):
        raise CfError(f"seed {tuple(seed)} must be non-negative")
    return np.random.SeedSequence([len(seed), *seed])


def _listing(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _check(d, spec: PathSpec, pano_width: int) -> None:
    if d.height < 3 or d.width < 3:
        raise CfError(f"data.height={d.height}, data.width={d.width}: the world needs frames of at least 3x3")
    step = max(1, round(spec.speed))
    if spec.speed <= 0:
        raise CfError(f"data.camera_speed={d.camera_speed} must be positive (pixels per frame)")
    if spec.span < step:
        raise CfError(
            f"data.pano_frames={d.pano_frames} makes the panorama {pano_width} px wide, only {spec.span} px "
            f"wider than the {d.width} px frame; the camera moves {step} px per frame, so raise "
            f"data.pano_frames (e.g. to 4) or lower data.camera_speed"
        )
    if d.n_landmarks < 0 or d.n_subjects < 0:
        raise CfError(f"data.n_landmarks={d.n_landmarks} and data.n_subjects={d.n_subjects} must be >= 0")
    if d.camera_path in TOURS and spec.span < 2 * spec.view:
        raise CfError(f"data.camera_path={d.camera_path} needs a panorama at least 3 frames wide (a middle "
                      f"zone that sees neither end); data.pano_frames={d.pano_frames} gives {pano_width} px "
                      f"for {d.width} px frames: raise data.pano_frames")
    if d.camera_path in ("revisit", *TOURS) and (not spec.lags or min(spec.lags) < 2):
        raise CfError(f"data.revisit_lags={list(spec.lags)}: the revisit path needs at least one lag, "
                      "all >= 2")
