"""A video that starts from a user's picture instead of the world's own frames.

The picture is the first `n_ctx` frames (clean context), seen by a camera that holds still at the world's
first camera position; from frame `n_ctx` on, the camera follows the world's path from its start, so it pans
away from the picture and comes back to it whenever the path returns to where it began. What the world
would show elsewhere is unknown (the picture is not part of the panorama): those frames are left blank
(0 in [-1, 1], mid grey) and only the pixels' ages and the revisit pairs, which depend on the camera alone,
are ground truth. A revisit to the picture's place asks: does the model still show the picture?

    clip = image_clip(World(cfg.data, seed), frame, n_ctx=4, n_frames=480)
    clip.camera, clip.revisits, clip.revisit_masks()   # as for a rendered clip
"""

from __future__ import annotations

import numpy as np

from cf.data.world import Clip, World
from cf.errors import CfError


def held_camera_x(world: World, n_ctx: int, n_frames: int) -> np.ndarray:
    """int64 [n_frames]: the world's first x for the `n_ctx` picture frames, then its path from the start."""
    if n_frames < n_ctx:
        raise CfError(f"{n_frames} frames cannot hold the picture's {n_ctx} context frames")
    path = world.camera_x(0, max(1, n_frames - n_ctx))
    return np.concatenate([np.full(n_ctx, path[0], np.int64), path])[:n_frames]


def image_clip(world: World, frame, n_ctx: int, n_frames: int) -> Clip:
    """A `Clip` of `n_frames` whose first `n_ctx` frames are `frame` (float [3, H, W] in [-1, 1], the world's
    frame size), on the held camera of `held_camera_x`; later frames are blank (unknown). Every pixel counts
    as background: the picture has no subject mask, and the world's subjects are not in it."""
    import torch

    h, w = world.height, world.width
    frame = torch.as_tensor(frame, dtype=torch.float32)
    if tuple(frame.shape) != (3, h, w):
        raise CfError(f"the start picture is {tuple(frame.shape)}; the world's frames are (3, {h}, {w})")
    if n_ctx < 1:
        raise CfError("a video that starts from a picture needs at least one context frame to hold it")
    xs = held_camera_x(world, n_ctx, n_frames)
    video = torch.zeros(n_frames, 3, h, w)
    video[:n_ctx] = frame
    background = np.ones((n_frames, h, w), bool)
    return world.clip_of(video, xs, background, 0, {"start": "image", "context_frames": int(n_ctx)})
