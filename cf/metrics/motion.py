"""Motion metrics as VBench defines them, with the learned parts replaced by named classical ones
(VBench's AMT-S and RAFT weights are not available offline).

- Motion smoothness: interpolate every odd frame from its even neighbours and score
  ``1 - mean|frame - interpolated| / 255`` on 0..255 RGB (VBench: ``(255 - vfi_score) / 255``).
  Interpolator: `INTERPOLATOR`, the mean of the two neighbours. A constant-velocity blend scores 1.
- Dynamic degree: optical flow between consecutive frames (subsampled to ~8 fps as VBench does);
  a pair moves if the mean of its top 5 % flow magnitudes exceeds ``max(1, 8 / fps) * 6 * min(H, W) / 256``
  pixels, and a video is dynamic if at least ``round(4 * n / 16)`` of its n sampled frames' pairs move.
  Flow: `FLOW_METHOD`, a dense pyramidal Lucas-Kanade in torch. The video's dynamic degree is 0 or 1;
  over several videos, the fraction that is dynamic. `flow_magnitude` (pixels per sampled frame, mean
  over pairs of the top-5 % magnitude) is reported beside it. Flow is computed with the shorter side
  at most `FLOW_MAX_SIDE` pixels (CPU cost) and its magnitudes scaled back to the frame's pixels.

Videos are float ``[B, T, 3, H, W]`` in [-1, 1] or uint8 ``[B, T, H, W, 3]``; they are converted a
few frames at a time so long high-resolution videos need not fit in memory as floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from cf.errors import CfError
from cf.metrics.backbones import as_float_video

INTERPOLATOR = "linear (mean of the two even neighbours; VBench uses AMT-S)"
FLOW_METHOD = "pyramidal Lucas-Kanade (dense, torch; VBench uses RAFT)"
CHUNK = 16  # frames converted to float at a time
MIN_LEVEL_SIDE = 8  # smallest pyramid level
FLOW_MAX_SIDE = 128  # flow runs with the shorter side at most this (CPU cost); magnitudes are scaled back


def _check(video: torch.Tensor, who: str) -> torch.Tensor:
    if video.ndim == 4:
        video = video[None]
    if video.ndim != 5:
        raise CfError(f"{who} expects videos [B, T, 3, H, W] (float) or [B, T, H, W, 3] (uint8), "
                      f"got shape {tuple(video.shape)}")
    return video


def motion_smoothness(video: torch.Tensor) -> torch.Tensor:
    """One video ``[T, ...]`` -> scalar smoothness (needs T >= 3)."""
    t = video.shape[0]
    if t < 3:
        raise CfError(f"motion smoothness needs at least 3 frames, got {t}")
    total, count = 0.0, 0
    for i in range(1, t - 1, 2 * CHUNK):
        odd = list(range(i, min(i + 2 * CHUNK, t - 1), 2))
        frames = as_float_video(video[odd[0] - 1: odd[-1] + 2])  # [n, 3, H, W], frames odd[0]-1 .. odd[-1]+1
        mid = frames[1::2]
        interp = 0.5 * (frames[0:-1:2] + frames[2::2])
        # |difference| on 0..255 / 255 == |difference in [-1, 1]| / 2
        total += float((mid - interp).abs().double().sum() / 2)
        count += mid.numel()
    return torch.tensor(1.0 - total / count, dtype=torch.float64)


def _grey(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> [N, 1, H, W] luma on 0..255."""
    w = torch.tensor([0.299, 0.587, 0.114], device=frames.device).view(1, 3, 1, 1)
    return ((frames + 1.0) * 127.5 * w).sum(1, keepdim=True)


def _warp(img: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample img at x + flow(x) -> (warped [N, 1, H, W], inside [N, 1, H, W]: the sample fell in the frame).
    img [N, 1, H, W], flow [N, 2, H, W] (x, y) in pixels."""
    n, _, h, w = img.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=img.device, dtype=img.dtype),
                            torch.arange(w, device=img.device, dtype=img.dtype), indexing="ij")
    px, py = xs + flow[:, 0], ys + flow[:, 1]  # [N, H, W]
    inside = ((px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)).unsqueeze(1).to(img.dtype)
    grid = torch.stack([px * (2.0 / max(w - 1, 1)) - 1.0, py * (2.0 / max(h - 1, 1)) - 1.0], -1)
    warped = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped, inside


def lucas_kanade(a: torch.Tensor, b: torch.Tensor, levels: int = 5, iters: int = 3, window: int = 7,
                 reg: float = 1.0) -> torch.Tensor:
    """Dense flow [N, 2, H, W] (pixels, x then y) with a(x) ~ b(x + flow): grey images [N, 1, H, W].

    Coarse to fine over an image pyramid; at each level, Gauss-Newton steps on the brightness-constancy
    least squares over a `window` x `window` box, `reg` added to the normal equations' diagonal so
    textureless regions get ~zero flow instead of noise, and the field box-smoothed after each step.
    Recovers a global translation of a textured image to ~0.01 px; motion boundaries are blurred.
    """
    pyr = [(a, b)]
    while len(pyr) < levels and min(pyr[-1][0].shape[-2:]) >= 2 * MIN_LEVEL_SIDE:
        pyr.append((F.avg_pool2d(pyr[-1][0], 2), F.avg_pool2d(pyr[-1][1], 2)))
    flow = torch.zeros(a.shape[0], 2, *pyr[-1][0].shape[-2:], device=a.device, dtype=a.dtype)
    def box(z):  # separable window mean (edge windows average only in-frame pixels)
        z = F.avg_pool2d(z, (1, window), stride=1, padding=(0, window // 2), count_include_pad=False)
        return F.avg_pool2d(z, (window, 1), stride=1, padding=(window // 2, 0), count_include_pad=False)

    for lvl, (pa, pb) in enumerate(reversed(pyr)):
        if lvl > 0:
            flow = 2.0 * F.interpolate(flow, size=pa.shape[-2:], mode="bilinear", align_corners=False)
        for _ in range(iters):
            wb, inside = _warp(pb, flow)
            mean = 0.5 * (pa + wb)
            # pixels whose match left the frame (newly revealed content) carry no evidence: their flow
            # comes from in-frame neighbours in the window and from the coarser level
            px = F.pad(mean, (1, 1, 0, 0), mode="replicate")  # central differences, one-sided at the edges
            py = F.pad(mean, (0, 0, 1, 1), mode="replicate")
            ix = 0.5 * (px[..., 2:] - px[..., :-2]) * inside
            iy = 0.5 * (py[..., 2:, :] - py[..., :-2, :]) * inside
            it = (wb - pa) * inside
            sums = box(torch.cat([ix * ix, ix * iy, iy * iy, ix * it, iy * it], 1))  # one pass for all five
            sxx, sxy, syy, sxt, syt = sums.split(1, 1)
            sxx, syy = sxx + reg, syy + reg
            det = sxx * syy - sxy * sxy
            du = -(syy * sxt - sxy * syt) / det
            dv = -(sxx * syt - sxy * sxt) / det
            flow = flow + torch.cat([du, dv], 1).clamp(-2.0, 2.0)  # larger steps belong to a coarser level
            # per-pixel updates read neighbours' residuals under their own flows; without smoothing the
            # field to the window's assumption of local constancy, the iteration oscillates and diverges
            flow = box(flow)
    return flow


def flow_top_magnitudes(video: torch.Tensor, interval: int) -> torch.Tensor:
    """One video [T, ...] -> per consecutive sampled pair, the mean of the top 5 % flow magnitudes,
    in pixels of the original frame size: [n_pairs]."""
    idx = list(range(0, video.shape[0], interval))
    scores = []
    for s in range(0, len(idx) - 1, CHUNK):
        sel = idx[s: s + CHUNK + 1]
        g = _grey(as_float_video(video[sel]))  # [n, 1, H, W]
        h, w = g.shape[-2:]
        scale = min(1.0, FLOW_MAX_SIDE / min(h, w))
        if scale < 1.0:
            g = F.interpolate(g, scale_factor=scale, mode="area")
        mag = lucas_kanade(g[:-1], g[1:]).norm(dim=1).flatten(1) / scale  # [n-1, h*w]
        k = max(1, int(mag.shape[1] * 0.05))
        scores.append(mag.topk(k, dim=1).values.mean(1))
    return torch.cat(scores).double() if scores else torch.zeros(0, dtype=torch.float64)


def dynamic_degree(video: torch.Tensor, fps: float) -> tuple[bool, float]:
    """One video [T, ...] -> (dynamic by VBench's rule, mean top-5 % flow magnitude in pixels)."""
    interval = max(1, round(fps / 8))
    scores = flow_top_magnitudes(video, interval)
    if scores.numel() == 0:
        raise CfError(f"dynamic degree needs at least 2 frames after sampling every {interval}, "
                      f"got {video.shape[0]} frames")
    h, w = (video.shape[-3:-1] if video.dtype == torch.uint8 else video.shape[-2:])
    thres = max(1.0, 8.0 / fps) * 6.0 * min(h, w) / 256.0
    need = round(4 * (scores.numel() + 1) / 16.0)
    return bool((scores > thres).sum() >= need), float(scores.mean())


class MotionSmoothness(Metric):
    """Mean VBench-style motion smoothness over videos (interpolator: `INTERPOLATOR`)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("videos", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor) -> None:
        for v in _check(videos, type(self).__name__):
            self.total += motion_smoothness(v).to(self.total.device)
            self.videos += 1

    def compute(self) -> torch.Tensor:
        return self.total / self.videos


class DynamicDegree(Metric):
    """VBench dynamic degree (fraction of dynamic videos) and mean flow magnitude (flow: `FLOW_METHOD`)."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("dynamic", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("magnitude", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("videos", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, fps: float) -> None:
        for v in _check(videos, type(self).__name__):
            moving, mag = dynamic_degree(v, fps)
            self.dynamic += int(moving)
            self.magnitude += mag
            self.videos += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {"dynamic_degree": self.dynamic.double() / self.videos,
                "flow_magnitude": self.magnitude / self.videos}
