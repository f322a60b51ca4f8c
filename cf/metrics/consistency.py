"""Feature consistency over time: first-frame consistency per time segment, drift, and VBench's
subject / background consistency.

Every metric takes, per `update`, either L2-normalisable features ``[B, T, D]`` (computed once and
shared between metrics, as `cf.metrics.score` does) or videos ``[B, T, 3, H, W]`` in [-1, 1], which
the metric embeds with the backbone it was given.

Definitions (d_t: the L2-normalised feature of frame t, t = 0..T-1):

- first-frame consistency of frame t >= 1: cos(d_0, d_t). Frame 0 itself is left out (it would add
  a trivial 1 to the first segment). Segment k holds the frames whose time t / fps lies in
  [k * segment_s, (k + 1) * segment_s); its value is the mean over those frames (over all videos,
  frame-weighted, in the aggregate).
- drift: from the per-segment curve, `first_to_last` = last segment - first segment, and
  `slope_per_s` = least-squares slope of segment value against segment centre time (seconds).
  Undefined (NaN) with fewer than two segments. Negative = losing consistency.
- VBench consistency (subject with DINO, background with CLIP in VBench):
  S = 1/(T-1) * sum_{t=1..T-1} 0.5 * (max(0, cos(d_0, d_t)) + max(0, cos(d_{t-1}, d_t))),
  averaged over videos. `VBenchConsistency` reports it three ways:
  ``whole``: S over the whole video (VBench on a short video);
  ``clips``: VBench-Long's score, the mean of S over consecutive clips of `clip_s` seconds (2 s; a last
  clip shorter than 2 frames is dropped), so it only sees change within 2 s;
  ``long_range``: VBench-Long's cross-clip term, S over the sequence of the clips' first frames (each
  clip's keyframe against the first clip's and the previous clip's): the only one of the three that
  sees a 60 s video lose its first scene. VBench-Long weights it 0 unless asked; cf reports it apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cf.errors import CfError


def _features(x: torch.Tensor, backbone, who: str) -> torch.Tensor:
    """[B, T, D] features or [B, T, 3, H, W] videos -> normalised features [B, T, D]."""
    if x.ndim == 5:
        if backbone is None:
            raise CfError(f"{who} got videos [B, T, 3, H, W] but has no backbone; pass backbone= or features")
        from cf.metrics.backbones import embed_frames

        b, t = x.shape[:2]
        x = embed_frames(backbone, x.flatten(0, 1)).unflatten(0, (b, t))
    if x.ndim != 3:
        raise CfError(f"{who} expects features [B, T, D] or videos [B, T, 3, H, W], got {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise CfError(f"{who} needs videos of at least 2 frames, got {x.shape[1]}")
    return F.normalize(x.float(), dim=-1)


def vbench_consistency(features: torch.Tensor) -> torch.Tensor:
    """[B, T, D] normalised features -> [B] VBench consistency (the formula in the module docstring)."""
    to_first = (features[:, 1:] * features[:, :1]).sum(-1).clamp_min(0)  # [B, T-1]
    to_prev = (features[:, 1:] * features[:, :-1]).sum(-1).clamp_min(0)  # [B, T-1]
    return (0.5 * (to_first + to_prev)).mean(1)


def drift_of(values, centres) -> tuple[float, float]:
    """(last - first, least-squares slope per second) of a per-segment curve; NaN segments are skipped."""
    pts = [(float(c), float(v)) for c, v in zip(centres, values) if not math.isnan(float(v))]
    if len(pts) < 2:
        return math.nan, math.nan
    c = torch.tensor([p[0] for p in pts], dtype=torch.float64)
    v = torch.tensor([p[1] for p in pts], dtype=torch.float64)
    slope = ((c - c.mean()) * (v - v.mean())).sum() / ((c - c.mean()) ** 2).sum()
    return pts[-1][1] - pts[0][1], float(slope)


class FirstFrameConsistency(Metric):
    """Mean cos(d_0, d_t) per time segment of `segment_s` seconds; `compute` -> dict of [S] tensors:
    value, start_s, end_s, frames (frames counted in the segment)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, segment_s: float, backbone=None, **kwargs):
        super().__init__(**kwargs)
        if not segment_s > 0:
            raise CfError(f"segment_s={segment_s} must be positive (seconds per segment, "
                          f"e.g. bench.segment_s=10)")
        self.segment_s = float(segment_s)
        self.backbone = backbone
        # one entry per scored frame (t >= 1): its cosine to frame 0, its segment and its end time
        self.add_state("cos", default=[], dist_reduce_fx="cat")
        self.add_state("segment", default=[], dist_reduce_fx="cat")
        self.add_state("end_s", default=[], dist_reduce_fx="cat")

    def update(self, x: torch.Tensor, fps: float) -> None:
        d = _features(x, self.backbone, type(self).__name__)  # [B, T, D]
        b, t = d.shape[:2]
        cos = (d[:, 1:] * d[:, :1]).sum(-1)  # [B, T-1]
        times = torch.arange(1, t, device=d.device, dtype=torch.float64) / fps  # [T-1]
        # a tiny tolerance so a frame exactly on a boundary (k * segment_s) is not lost to rounding
        seg = torch.floor(times / self.segment_s + 1e-9).long()
        self.cos.append(cos.flatten())
        self.segment.append(seg.repeat(b))
        self.end_s.append((times + 1.0 / fps).repeat(b))

    def compute(self) -> dict[str, torch.Tensor]:
        cos, seg, end = dim_zero_cat(self.cos).double(), dim_zero_cat(self.segment), dim_zero_cat(self.end_s)
        n = int(seg.max()) + 1
        count = torch.bincount(seg, minlength=n).double()
        total = torch.zeros(n, dtype=torch.float64, device=cos.device).index_add_(0, seg, cos)
        last = torch.zeros(n, dtype=torch.float64, device=cos.device)
        last.scatter_reduce_(0, seg, end.double(), "amax")
        start = torch.arange(n, dtype=torch.float64, device=cos.device) * self.segment_s
        return {
            "value": torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan)),
            "start_s": start,
            "end_s": torch.minimum(start + self.segment_s, last).where(count > 0, start + self.segment_s),
            "frames": count.long(),
        }


class Drift(FirstFrameConsistency):
    """Drift of first-frame consistency: `compute` -> {first_to_last, slope_per_s} (see module doc)."""

    higher_is_better = None

    def compute(self) -> dict[str, torch.Tensor]:
        curve = super().compute()
        first_last, slope = drift_of(curve["value"], (curve["start_s"] + curve["end_s"]) / 2)
        return {"first_to_last": torch.tensor(first_last), "slope_per_s": torch.tensor(slope)}


def vbench_long(features: torch.Tensor, fps: float, clip_s: float) -> dict[str, torch.Tensor]:
    """[B, T, D] normalised features -> {whole, clips, long_range}, each [B] (NaN where undefined:
    long_range needs two clips)."""
    b, t = features.shape[:2]
    n = max(2, int(round(clip_s * fps)))  # frames per clip
    starts = [s for s in range(0, t, n) if min(s + n, t) - s >= 2]
    clips = torch.stack([vbench_consistency(features[:, s:s + n]) for s in starts], 1).mean(1)
    keys = features[:, starts]  # [B, clips, D]
    cross = vbench_consistency(keys) if len(starts) >= 2 else torch.full((b,), math.nan, device=keys.device)
    return {"whole": vbench_consistency(features), "clips": clips, "long_range": cross}


class VBenchConsistency(Metric):
    """VBench subject / background consistency, the mean over videos of the per-video S; `compute` ->
    {whole, clips, long_range} (see the module docstring)."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False
    TERMS = ("whole", "clips", "long_range")

    def __init__(self, backbone=None, clip_s: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        if not clip_s > 0:
            raise CfError(f"clip_s={clip_s} must be positive (seconds per VBench-Long clip, e.g. 2)")
        self.backbone, self.clip_s = backbone, float(clip_s)
        for term in self.TERMS:
            self.add_state(term, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{term}_videos", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, x: torch.Tensor, fps: float) -> None:
        scores = vbench_long(_features(x, self.backbone, type(self).__name__), fps, self.clip_s)
        for term, s in scores.items():
            ok = ~torch.isnan(s)
            setattr(self, term, getattr(self, term) + s[ok].double().sum())
            setattr(self, f"{term}_videos", getattr(self, f"{term}_videos") + int(ok.sum()))

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(math.nan, dtype=torch.float64)
        return {term: getattr(self, term) / getattr(self, f"{term}_videos") if getattr(self, f"{term}_videos")
                else nan for term in self.TERMS}
