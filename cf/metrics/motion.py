"""Motion metrics as VBench defines them, with what cannot run offline replaced by named stand-ins.

Motion smoothness: interpolate every odd frame from its even neighbours and score
``1 - mean|frame - interpolated| / 255`` on 0..255 RGB (VBench: ``(255 - vfi_score) / 255``).
Interpolator: `INTERPOLATOR`, the mean of the two neighbours (VBench uses AMT-S). A constant-velocity
blend scores 1.

Dynamic degree. Definition, per video of T frames at `fps`:

1. Sample every ``k = max(1, round(fps / 8))``-th frame (VBench samples to ~8 fps) -> n frames.
2. For each consecutive sampled pair, compute dense optical flow and take ``m`` = the mean of the largest
   5 % of its per-pixel magnitudes, in pixels of the input frames (VBench's per-pair score).
3. A pair moves if ``m > thr`` with ``thr = max(s * 6 * min(H, W) / 256, MIN_THRESHOLD_PX)`` and
   ``s = max(1, 8 / fps)`` (a pair spans s / 8 seconds).
4. The video is dynamic if at least ``max(1, round(4 * n / 16))`` pairs move (VBench: 4 of 16 frames).

Outputs over videos: ``dynamic_degree`` = the fraction of dynamic videos (VBench's number);
``moving_fraction`` = the mean over videos of (moving pairs / pairs), the graded form of step 4;
``flow_magnitude`` = the mean over videos of the mean ``m`` (pixels per sampled pair); and
``flow_magnitude_rel`` = the same per video divided by ``s * min(H, W)``: the fraction of the frame's
shorter side that the fastest 5 % of the frame moves per 1/8 s, comparable across sizes and frame rates
(VBench's threshold is 6 / 256 = 0.023 on this scale).

How it differs from VBench: (a) the floor `MIN_THRESHOLD_PX`. VBench's threshold only scales with the
frame (6 px at 256 px); under 43 px it is below one pixel, so every whole-pixel pan counts as motion, and
so does the flow's noise (see the constant's comment). The floor leaves VBench's rule as it is wherever
``s * min(H, W) >= 64``. Measured on the world at tiny's 32x32, 8 fps (12 worlds x 48 frames, `lk`; the
pingpong camera held still with 4 subjects moving, or panning at 1 or 4 px per frame with 2 subjects):

    camera               still   1 px/frame   4 px/frame
    dynamic_degree        0.00         0.25         1.00   (VBench's 0.75 px threshold: 0.75 / 1.00 / 1.00)
    moving_fraction       0.01         0.20         0.99   (VBench's threshold:         0.40 / 1.00 / 0.99)
    flow_magnitude_rel   0.016        0.040        0.135

The slow pans that read dynamic are those where a subject moves against the camera (up to ~2 px per frame
on screen). (b) s scales the threshold for videos under 8 fps, where VBench would compare frames further
apart against the same threshold. (c) ``max(1, ...)``: VBench's count rounds to 0 on videos of 1-2
sampled frames, which then always read as dynamic. (d) the continuous outputs, so that sets of videos that
all move (all reading 1.0) still compare. (e) the flow:

- ``lk`` (default, `FLOW_METHOD`): a dense pyramidal Lucas-Kanade in torch (VBench uses RAFT, whose
  weights are not available offline), computed with the shorter side at most `FLOW_MAX_SIDE` pixels (CPU
  cost) and its magnitudes scaled back to the frame's pixels. It reads a whole-pixel translation of the
  world at 32 px to within ~0.05 px in the median; its top 5 % overreads by ~0.1-0.4 px (occlusions at the
  frame's edges, subjects). On larger frames with periodic textures its top 5 % can overread by pixels.
- ``raft_small`` / ``raft_large``: torchvision's RAFT architectures with weights from a local file
  (torchvision's ``raft_*_C_T_V2`` checkpoints, trained like VBench's ``raft-things.pth``; never
  downloaded), `RAFT_UPDATES` refinement updates as VBench. RAFT needs both sides >= 128 px and multiples
  of 8: frames are resized (bilinear) so the shorter side is at least `RAFT_MIN_SIDE` and both sides are
  multiples of 8, and the flow's x / y components are scaled back by the width / height ratios, so
  magnitudes are in the input's pixels; the top 5 % is taken on the resized grid (the same share of
  the frame's area).

Videos are float ``[B, T, 3, H, W]`` in [-1, 1] or uint8 ``[B, T, H, W, 3]``; they are converted a
few frames at a time so long high-resolution videos need not fit in memory as floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from cf.errors import CfError
from cf.metrics.backbones import as_float_video
from cf.registry import Registry

INTERPOLATOR = "linear (mean of the two even neighbours; VBench uses AMT-S)"
FLOW_METHOD = "pyramidal Lucas-Kanade (dense, torch; VBench uses RAFT)"
CHUNK = 16  # frames converted to float at a time
MIN_LEVEL_SIDE = 8  # smallest pyramid level
FLOW_MAX_SIDE = 128  # flow runs with the shorter side at most this (CPU cost); magnitudes are scaled back
TOP_SHARE = 0.05  # a pair's score: the mean of its largest 5 % flow magnitudes (VBench)
VBENCH_THRESHOLD = 6.0 / 256.0  # VBench's motion threshold, as a fraction of the frame's shorter side
MOVING_PAIRS = 4.0 / 16.0  # a video is dynamic if this share of its sampled frames' pairs move (VBench)
# The threshold's floor, in pixels per pair: VBench's threshold at 64 px. Measured with `lk` on the world
# at 32x32 (8 worlds x 24 frames): a still frame repeated with i.i.d. noise of std 0.06 in [-1, 1] per frame
# reads m = 0.58 px in the median, 90 % of pairs below 1.25 px (std 0.03: 0.33 / 0.60 px); whole-pixel pans
# of 1 / 2 / 4 px per frame read 1.08 / 2.03 / 4.05 px in the median, 90 % of pairs above 1.03 / 2.00 /
# 4.00 px. 1.5 px is above the noise and the slowest possible pan and below a 2 px pan; VBench's 0.75 px
# at 32 px is below all of them.
MIN_THRESHOLD_PX = 1.5
THRESHOLD_RULE = (f"a pair moves if its top-5 % flow exceeds max(6 * min(H, W) / 256, {MIN_THRESHOLD_PX:g}) "
                  "px per 1/8 s; dynamic if >= 1/4 of pairs move (VBench without the px floor)")
RAFT_MIN_SIDE = 128  # torchvision's RAFT needs 1/8-resolution features of >= 16 px (4 correlation levels)
RAFT_UPDATES = 20  # recurrent refinement updates, as VBench calls RAFT (iters=20)
RAFT_BATCH = 4  # frame pairs per RAFT call (its correlation volume grows with (H * W / 64) ** 2 per pair)


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


# --- flow estimators: frames [n, 3, H, W] in [-1, 1] -> per consecutive pair, flow magnitudes -------------

class LucasKanadeFlow:
    """The built-in flow (`lucas_kanade` on luma), run with the shorter side at most `FLOW_MAX_SIDE`."""

    name = FLOW_METHOD

    def magnitudes(self, frames: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n - 1, P]: per pair, |flow| at P grid points, in pixels of the input frames."""
        g = _grey(frames)  # [n, 1, H, W]
        scale = min(1.0, FLOW_MAX_SIDE / min(g.shape[-2:]))
        if scale < 1.0:
            g = F.interpolate(g, scale_factor=scale, mode="area")
        return lucas_kanade(g[:-1], g[1:]).norm(dim=1).flatten(1) / scale


class RaftFlow:
    """torchvision's RAFT (`arch`: raft_small | raft_large) with weights from a local file.

    Frames are resized so the shorter side is at least `RAFT_MIN_SIDE` and both sides are multiples of 8;
    the flow's x / y are scaled back by the width / height ratios. The network follows its input's device.
    """

    def __init__(self, arch: str, model: torch.nn.Module, weights_name: str):
        self.model = model.eval().requires_grad_(False)
        size = arch.split("_")[1]
        self.name = (f"RAFT-{size} (torchvision {arch} architecture, weights {weights_name}, {RAFT_UPDATES} "
                     f"updates; frames resized to a shorter side >= {RAFT_MIN_SIDE} px in multiples of 8 and "
                     f"the flow scaled back; VBench uses RAFT-large with raft-things.pth)")

    @staticmethod
    def working_size(h: int, w: int) -> tuple[int, int]:
        up = max(1.0, RAFT_MIN_SIDE / min(h, w))
        return tuple(8 * math.ceil(round(s * up / 8, 6)) for s in (h, w))  # round: no 8 px for float error

    def magnitudes(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[-2:]
        hh, ww = self.working_size(h, w)
        if (hh, ww) != (h, w):
            frames = F.interpolate(frames, size=(hh, ww), mode="bilinear", align_corners=False)
        model = self.model.to(frames.device)
        ratio = torch.tensor([w / ww, h / hh], device=frames.device, dtype=frames.dtype).view(1, 2, 1, 1)
        out = []
        with torch.no_grad():
            for i in range(0, frames.shape[0] - 1, RAFT_BATCH):
                j = min(i + RAFT_BATCH, frames.shape[0] - 1)  # pairs (i, i + 1) .. (j - 1, j)
                flow = model(frames[i:j], frames[i + 1: j + 1], num_flow_updates=RAFT_UPDATES)[-1]
                out.append((flow * ratio).norm(dim=1).flatten(1))  # [p, 2, hh, ww] -> [p, hh * ww]
        return torch.cat(out)


def _lucas_kanade_flow(weights) -> LucasKanadeFlow:
    if weights is not None:
        others = ", ".join(n for n in FLOWS.names() if n != "lk")
        raise CfError(f"flow 'lk' is built in and takes no weights, got flow_weights={str(weights)!r}; drop "
                      f"it, or pick a flow that loads weights: {others}")
    return LucasKanadeFlow()


def _raft_builder(arch: str):
    def build(weights) -> RaftFlow:
        from torchvision.models import optical_flow

        from cf.metrics.weights import MissingWeightsError, WeightSpec, find_weights, load_state_dict

        size = arch.split("_")[1]
        known = getattr(optical_flow, f"Raft_{size.capitalize()}_Weights").C_T_V2
        spec = WeightSpec(
            what=f"torchvision RAFT-{size} weights", prefixes=(f"{arch}_",),
            source=f"e.g. {known.url.rsplit('/', 1)[-1]} from {known.url} (torchvision's {known}, trained on "
                   "FlyingChairs + FlyingThings3D like VBench's raft-things.pth); a .pth state dict or "
                   ".safetensors")
        option = f"flow_weights=PATH (DynamicDegree(flow={arch!r}, flow_weights=PATH))"
        if weights is not None and not Path(weights).expanduser().exists():
            raise MissingWeightsError(f"flow {arch!r}: flow_weights={str(weights)!r} does not exist; pass "
                                      f"{spec.describe()}, or a folder holding it, with {option}")
        path = find_weights(spec, None if weights is None else str(weights), who=f"flow {arch!r}",
                            for_backbone=True, option=option)
        model = getattr(optical_flow, arch)(weights=None)
        try:
            result = model.load_state_dict(load_state_dict(path), strict=False)
        except RuntimeError as e:  # shape mismatches: another network's weights
            problem = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        else:
            missing, unexpected = result.missing_keys, result.unexpected_keys
            problem = (f"{len(missing)} weights missing and {len(unexpected)} unexpected, e.g. "
                       f"{', '.join([*missing, *unexpected][:3])}") if missing or unexpected else None
        if problem:
            raise CfError(f"{str(path)!r} does not hold torchvision {arch} weights ({problem}); pass "
                          f"{spec.describe()} with {option}")
        return RaftFlow(arch, model, path.name)

    return build


FLOWS: Registry = Registry("flow")  # name -> builder(weights) -> estimator with `name` and `magnitudes`
FLOWS.add("lk", _lucas_kanade_flow)
FLOWS.add("raft_small", _raft_builder("raft_small"))
FLOWS.add("raft_large", _raft_builder("raft_large"))


def get_flow(name: str = "lk", weights: str | Path | None = None):
    """A flow estimator by name (`FLOWS`): ``lk`` (built in, no weights) or ``raft_small`` / ``raft_large``
    (`weights`: the torchvision checkpoint file, or a folder holding it; torch's hub cache is searched
    when None). It has `name` (the method string to report) and `magnitudes(frames)`."""
    return FLOWS.get(name)(weights)


# --- dynamic degree -------------------------------------------------------------------------------------

def sampling_interval(fps: float) -> int:
    """Frames between the sampled frames that flow compares (VBench samples to ~8 fps)."""
    return max(1, round(fps / 8))


def time_scale(fps: float) -> float:
    """s in the module docstring: 1/8 s per sampled pair at >= 8 fps, 8 / fps below."""
    return max(1.0, 8.0 / fps)


def motion_threshold(h: int, w: int, fps: float) -> float:
    """Pixels per sampled pair above which a pair moves: VBench's, with the floor `MIN_THRESHOLD_PX`."""
    return max(time_scale(fps) * VBENCH_THRESHOLD * min(h, w), MIN_THRESHOLD_PX)


def flow_top_magnitudes(video: torch.Tensor, interval: int, flow=None) -> torch.Tensor:
    """One video [T, ...] -> per consecutive sampled pair, the mean of its top `TOP_SHARE` flow magnitudes,
    in pixels of the input frames: [n_pairs]. `flow`: an estimator from `get_flow` (default ``lk``)."""
    flow = flow if flow is not None else LucasKanadeFlow()
    idx = list(range(0, video.shape[0], interval))
    scores = []
    for s in range(0, len(idx) - 1, CHUNK):
        mag = flow.magnitudes(as_float_video(video[idx[s: s + CHUNK + 1]]))  # [n - 1, P]
        k = max(1, int(mag.shape[1] * TOP_SHARE))
        scores.append(mag.topk(k, dim=1).values.mean(1))
    return torch.cat(scores).double() if scores else torch.zeros(0, dtype=torch.float64)


@dataclass(frozen=True)
class VideoMotion:
    dynamic: bool  # VBench's decision
    moving_fraction: float  # moving pairs / pairs
    flow_magnitude: float  # mean top-5 % magnitude, pixels per sampled pair
    flow_magnitude_rel: float  # flow_magnitude / (s * min(H, W))
    threshold: float  # pixels per sampled pair


def dynamic_degree(video: torch.Tensor, fps: float, flow=None) -> VideoMotion:
    """One video [T, ...] -> its dynamic degree terms (module docstring)."""
    interval = sampling_interval(fps)
    scores = flow_top_magnitudes(video, interval, flow)
    if scores.numel() == 0:
        raise CfError(f"dynamic degree needs at least 2 frames after sampling every {interval}, "
                      f"got {video.shape[0]} frames")
    h, w = (video.shape[-3:-1] if video.dtype == torch.uint8 else video.shape[-2:])
    thr = motion_threshold(h, w, fps)
    moving = int((scores > thr).sum())
    need = max(1, round(MOVING_PAIRS * (scores.numel() + 1)))  # VBench counts sampled frames
    mag = float(scores.mean())
    return VideoMotion(dynamic=moving >= need, moving_fraction=moving / scores.numel(), flow_magnitude=mag,
                       flow_magnitude_rel=mag / (time_scale(fps) * min(h, w)), threshold=thr)


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
    """VBench dynamic degree with a pixel floor on the threshold, and its continuous companions (module
    docstring). `flow`: ``lk`` (default) | ``raft_small`` | ``raft_large``; `flow_weights`: the RAFT
    checkpoint (file or folder). `method` (the flow, `flow_method`, and `THRESHOLD_RULE`) is the string
    to report beside the numbers."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, flow: str = "lk", flow_weights: str | Path | None = None, **kwargs):
        super().__init__(**kwargs)
        self.flow = get_flow(flow, flow_weights)
        self.flow_method = self.flow.name
        self.method = f"{self.flow_method}; {THRESHOLD_RULE}"
        self.add_state("dynamic", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("moving", "magnitude", "magnitude_rel"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("videos", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, videos: torch.Tensor, fps: float) -> None:
        for v in _check(videos, type(self).__name__):
            r = dynamic_degree(v, fps, self.flow)
            self.dynamic += int(r.dynamic)
            self.moving += r.moving_fraction
            self.magnitude += r.flow_magnitude
            self.magnitude_rel += r.flow_magnitude_rel
            self.videos += 1

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.videos.double()
        return {"dynamic_degree": self.dynamic.double() / n, "moving_fraction": self.moving / n,
                "flow_magnitude": self.magnitude / n, "flow_magnitude_rel": self.magnitude_rel / n}
