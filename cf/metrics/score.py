"""Score whole videos: every metric of `cf.metrics`, per video and aggregated over videos.

`VideoScorer` is what `cf score` and the benchmark runner use: build it once (backbones, LPIPS and the
metric objects), call `score(frames, fps, revisits, masks)` per video (returns that video's results
and accumulates them), then `aggregate()`. `score_video` is the one-video shortcut. All results are
plain JSON-ready Python values; undefined numbers (NaN) become None.

Revisit pairs come as ``[[t_first, t_revisit, lag], ...]`` (frames) with optional masks
``[P, H, W]`` bool; `read_sidecar` reads them from the files `cf world` leaves beside a video
(``<stem>.json`` with key ``revisits``, ``<stem>.revisit_masks.npz`` with key ``masks``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from cf.errors import CfError
from cf.metrics.backbones import embed_frames, get_backbone
from cf.metrics.consistency import FirstFrameConsistency, VBenchConsistency, drift_of
from cf.metrics.lpips_net import lpips_or_reason
from cf.metrics.motion import FLOW_METHOD, INTERPOLATOR, DynamicDegree, MotionSmoothness
from cf.metrics.revisit import PSNR_CAP_DB, RevisitError, check_pairs, effective_context, psnr_from_mse


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def default_config():
    from omegaconf import OmegaConf

    from cf.config.schema import Config

    return OmegaConf.structured(Config)


def read_sidecar(json_path: str | Path, missing_ok: bool = False) -> dict:
    """A video's JSON sidecar -> {"revisits": [P, 3] int or None, "masks": [P, H, W] bool or None,
    "fps": float or None}. Masks come from ``<stem>.revisit_masks.npz`` beside the JSON. The fps is
    the true one where the writer knew it (a gif stores frame delays in 1/100 s, so 8 fps reads 8.33).
    A missing file is an error unless `missing_ok` (then everything is None)."""
    json_path = Path(json_path)
    out = {"revisits": None, "masks": None, "fps": None}
    if missing_ok and not json_path.exists():
        return out
    try:
        data = json.loads(json_path.read_text())
    except (OSError, ValueError) as e:
        raise CfError(f"cannot read revisit file {str(json_path)!r}: {e}") from None
    if not isinstance(data, dict):
        data = {}
    fps = data.get("fps")
    if isinstance(fps, (int, float)) and fps > 0:
        out["fps"] = float(fps)
    if "revisits" not in data:
        return out
    try:  # `cf world` writes {"t_first", "t_revisit", "lag"} objects; plain triples are accepted too
        rows = [[r["t_first"], r["t_revisit"], r["lag"]] if isinstance(r, dict) else r
                for r in data["revisits"]]
        out["revisits"] = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    except (KeyError, TypeError, ValueError):
        raise CfError(f"{str(json_path)!r}: 'revisits' must be a list of [t_first, t_revisit, lag] or of "
                      f'{{"t_first", "t_revisit", "lag"}} (frames)') from None
    mask_path = json_path.with_name(json_path.stem + ".revisit_masks.npz")
    if mask_path.is_file():
        try:
            with np.load(mask_path) as z:
                out["masks"] = z["masks"].astype(bool)
        except (OSError, KeyError, ValueError) as e:
            raise CfError(f"cannot read revisit masks {str(mask_path)!r} (expected key 'masks', bool "
                          f"[pairs, H, W]): {e}") from None
    return out


def _1d(d: dict) -> dict:
    """torchmetrics squeezes one-element results to 0-d tensors; curves stay 1-d here."""
    return {k: torch.atleast_1d(v) for k, v in d.items()}


def _curve(c: dict) -> list[dict]:
    c = _1d(c)
    return [{"start_s": _num(s), "end_s": _num(e), "frames": int(n), "value": _num(v)}
            for s, e, n, v in zip(c["start_s"], c["end_s"], c["frames"], c["value"])]


def _drift(c: dict) -> dict:
    c = _1d(c)
    first_last, slope = drift_of(c["value"], (c["start_s"] + c["end_s"]) / 2)
    return {"first_to_last": _num(first_last), "slope_per_s": _num(slope)}


class VideoScorer:
    """Scores videos one at a time and accumulates the aggregate.

    `cfg` is the run config (defaults if None): it gives `bench.backbone`, `bench.background_backbone`,
    `bench.weights`, `bench.segment_s`, `bench.context_factor`, `bench.lpips` and `device`. `backbone`,
    `background_backbone` (names or `Backbone`s) and `lpips` (an `Lpips`, None for off, or "auto" to
    follow `bench.lpips`) override it.
    """

    def __init__(self, cfg=None, *, backbone=None, background_backbone=None, lpips="auto", device=None):
        from cf.utils import pick_device

        cfg = cfg if cfg is not None else default_config()
        b = cfg.bench
        self.segment_s, self.context_factor = float(b.segment_s), float(b.context_factor)
        self.device = torch.device(device) if device is not None else pick_device(cfg.device)
        self.backbone = get_backbone(backbone or b.backbone, b.weights)
        bg = background_backbone or b.background_backbone or self.backbone
        self.background = get_backbone(bg, b.weights)
        if isinstance(lpips, str) and b.lpips:  # "auto"
            self.lpips, self.lpips_note = lpips_or_reason(b.weights)
        elif isinstance(lpips, str):
            self.lpips, self.lpips_note = None, "off (bench.lpips=false)"
        else:
            self.lpips, self.lpips_note = lpips, (None if lpips is not None else "off")
        self.first_frame = FirstFrameConsistency(self.segment_s).to(self.device)
        self.subject = VBenchConsistency().to(self.device)
        self.background_consistency = VBenchConsistency().to(self.device)
        self.smoothness = MotionSmoothness().to(self.device)
        self.dynamic = DynamicDegree().to(self.device)
        self.revisit = RevisitError(self.lpips).to(self.device)
        self.videos = 0

    def describe(self) -> dict:
        """What produced the numbers: backbone labels, LPIPS, methods, settings."""
        return {
            "backbone": self.backbone.name, "backbone_label": self.backbone.label,
            "background_backbone": self.background.name, "background_backbone_label": self.background.label,
            "lpips": self.lpips.label if self.lpips is not None else None, "lpips_note": self.lpips_note,
            "methods": {"motion_smoothness": INTERPOLATOR, "dynamic_degree": FLOW_METHOD},
            "settings": {"segment_s": self.segment_s, "context_factor": self.context_factor,
                         "psnr_cap_db": PSNR_CAP_DB},
        }

    def _revisit_section(self, r: dict) -> tuple[dict | None, dict]:
        """(the 'revisit' block, the effective-context keys) from RevisitError's output."""
        none = {"effective_context_s": None, "effective_context_frames": None,
                "effective_context_is_lower_bound": None}
        if r is None:
            return None, none
        r = _1d(r)
        if len(r["lag"]) == 0:
            return None, none
        w = r["pairs"].double()
        pooled = {k: (r[k] * w).sum() / w.sum() for k in ("mse", "lpips")}
        rows = zip(r["lag"], r["lag_s"], r["pairs"], r["mse"], r["psnr"], r["lpips"])
        block = {"pairs": int(w.sum()), "skipped_pairs": int(r["skipped"]), "mse": _num(pooled["mse"]),
                 "psnr": _num(psnr_from_mse(pooled["mse"])), "lpips": _num(pooled["lpips"]), "by_lag": [
            {"lag": int(lag), "lag_s": _num(ls), "pairs": int(n), "mse": _num(m), "psnr": _num(p),
             "lpips": _num(lp)} for lag, ls, n, m, p, lp in rows]}
        lag, bound = effective_context(r["lag"].tolist(), r["mse"].tolist(), self.context_factor)
        if lag is None:
            return block, none
        i = r["lag"].tolist().index(lag)
        return block, {"effective_context_s": _num(r["lag_s"][i]), "effective_context_frames": int(lag),
                       "effective_context_is_lower_bound": bound}

    def score(self, frames, fps: float, revisits=None, masks=None) -> dict:
        """One video: uint8 [T, H, W, 3] (numpy or torch) or float [T, 3, H, W] in [-1, 1]; revisits
        [P, 3] (t_first, t_revisit, lag) in frames; masks [P, H, W] bool (True = compare). Returns this
        video's results and adds them to the aggregate. Revisit 'psnr' values are the PSNR of the mean
        MSE (per lag, and over all pairs)."""
        video = torch.as_tensor(frames) if isinstance(frames, np.ndarray) else frames
        if video.ndim != 4:
            raise CfError(f"expected one video [T, H, W, 3] (uint8) or [T, 3, H, W] (float), "
                          f"got shape {tuple(video.shape)}")
        if not fps > 0:
            raise CfError(f"fps={fps} must be positive")
        t = video.shape[0]
        if t < 3:
            raise CfError(f"a video needs at least 3 frames to be scored (motion smoothness), got {t}")
        hw = tuple(video.shape[1:3] if video.dtype == torch.uint8 else video.shape[-2:])
        if revisits is not None:  # checked before any metric is updated: a bad video leaves no trace
            revisits, masks = check_pairs(revisits, masks, t, hw)
        video = video.to(self.device)
        feats = embed_frames(self.backbone, video)[None]  # [1, T, D]
        bg = feats if self.background is self.backbone else embed_frames(self.background, video)[None]
        curve = self.first_frame(feats, fps)
        dyn = self.dynamic(video[None], fps)
        r = self.revisit(video, revisits, fps, masks) if revisits is not None else None
        block, ctx = self._revisit_section(r)
        self.videos += 1
        return {
            "frames": t, "fps": float(fps), "seconds": t / fps, "height": hw[0], "width": hw[1],
            "subject_consistency": _num(self.subject(feats)),
            "background_consistency": _num(self.background_consistency(bg)),
            "first_frame_consistency": _curve(curve),
            "drift": _drift(curve),
            "motion_smoothness": _num(self.smoothness(video[None])),
            "dynamic_degree": _num(dyn["dynamic_degree"]), "flow_magnitude": _num(dyn["flow_magnitude"]),
            "revisit": block, **ctx,
        }

    def aggregate(self) -> dict | None:
        """Over all videos scored so far: means of the per-video scores; the first-frame curve pooled
        per segment over all frames; drift of the pooled curve; revisits pooled by lag."""
        if self.videos == 0:
            return None
        curve = self.first_frame.compute()
        dyn = self.dynamic.compute()
        r = self.revisit.compute() if self.revisit.lag else None
        block, ctx = self._revisit_section(r)
        return {
            "videos": self.videos,
            "subject_consistency": _num(self.subject.compute()),
            "background_consistency": _num(self.background_consistency.compute()),
            "first_frame_consistency": _curve(curve),
            "drift": _drift(curve),
            "motion_smoothness": _num(self.smoothness.compute()),
            "dynamic_degree": _num(dyn["dynamic_degree"]), "flow_magnitude": _num(dyn["flow_magnitude"]),
            "revisit": block, **ctx,
        }

    def reset(self) -> None:
        for m in (self.first_frame, self.subject, self.background_consistency, self.smoothness, self.dynamic,
                  self.revisit):
            m.reset()
        self.videos = 0


def score_video(frames, fps: float, backbone=None, revisits=None, masks=None, cfg=None, lpips="auto") -> dict:
    """Score one video: the per-video results of `VideoScorer.score` plus `VideoScorer.describe`."""
    scorer = VideoScorer(cfg, backbone=backbone, lpips=lpips)
    return {**scorer.describe(), **scorer.score(frames, fps, revisits, masks)}
