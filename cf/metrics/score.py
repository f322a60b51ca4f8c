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
from cf.metrics.columns import consistency_column
from cf.metrics.consistency import FirstFrameConsistency, VBenchConsistency, drift_of
from cf.metrics.lpips_net import lpips_or_reason
from cf.metrics.motion import INTERPOLATOR, DynamicDegree, MotionSmoothness
from cf.metrics.revisit import (
    CHANCE_FRAMES,
    PSNR_CAP_DB,
    RETENTION_LEVEL,
    RevisitError,
    check_pairs,
    effective_context,
    psnr_from_mse,
    retention,
)


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def default_config():
    from omegaconf import OmegaConf

    from cf.config.schema import Config

    return OmegaConf.structured(Config)


def read_sidecar(json_path: str | Path, missing_ok: bool = False) -> dict:
    """A video's JSON sidecar -> {"revisits": [P, 3] int or None, "masks": [P, H, W] bool or None,
    "fps": float or None, "camera": [T, 2] float (x, y per frame) or None, "size": (height, width) the
    camera's pixels refer to, or None}. Masks come from ``<stem>.revisit_masks.npz`` beside the JSON.
    The fps is the true one where the writer knew it (a gif stores frame delays in 1/100 s, so 8 fps
    reads 8.33). A missing file is an error unless `missing_ok` (then everything is None)."""
    json_path = Path(json_path)
    out = {"revisits": None, "masks": None, "fps": None, "camera": None, "size": None}
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
    if isinstance(data.get("height"), int) and isinstance(data.get("width"), int):
        out["size"] = (data["height"], data["width"])
    if "camera" in data:
        try:
            out["camera"] = np.asarray(data["camera"], dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            raise CfError(f"{str(json_path)!r}: 'camera' must be a list of [x, y] per frame (pixels of a "
                          f"frame of 'width' x 'height')") from None
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


MOTION = ("dynamic_degree", "moving_fraction", "flow_magnitude", "flow_magnitude_rel")


def _motion(dyn: dict) -> dict:
    return {k: _num(dyn[k]) for k in MOTION}


def _pooled(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The w-weighted mean of x over its non-NaN entries (NaN when there are none)."""
    ok = ~torch.isnan(x)
    return (x * w)[ok].sum() / w[ok].sum() if ok.any() else torch.tensor(math.nan)


def revisit_section(r: dict | None) -> tuple[dict | None, dict]:
    """(the 'revisit' block, the effective-context keys) from `RevisitError.compute()`'s output."""
    none = {"effective_context_s": None, "effective_context_is_lower_bound": None}
    if r is None:
        return None, none
    r = _1d(r)
    if len(r["lag"]) == 0:
        return None, none
    w = r["pairs"].double()
    mse = (r["mse"] * w).sum() / w.sum()
    chance = _pooled(r["chance_mse"], w)
    mse_ok = _pooled(r["mse"].masked_fill(torch.isnan(r["chance_mse"]), math.nan), w)  # bins with a chance
    keys = ("lo_s", "hi_s", "lag", "lag_s", "lag_max_s", "pairs", "mse", "psnr", "lpips", "chance_mse",
            "chance_psnr", "chance_lpips", "retention", "retention_lpips", "sink_share")
    by_lag = [{k: (int(r[k][i]) if k == "pairs" else _num(r[k][i])) for k in keys} for i in range(len(w))]
    block = {"pairs": int(w.sum()), "skipped_pairs": int(r["skipped"]), "mse": _num(mse),
             "psnr": _num(psnr_from_mse(mse)), "lpips": _num((r["lpips"] * w).sum() / w.sum()),
             "chance_psnr": _num(psnr_from_mse(chance)), "retention": _num(retention(mse_ok, chance)),
             "sink_share": _num(_pooled(r["sink_share"], w)), "by_lag": by_lag}
    lag, bound = effective_context(r["lag_max_s"].tolist(), r["retention"].tolist())
    return block, {"effective_context_s": lag,
                   "effective_context_is_lower_bound": None if lag is None else bound}


class VideoScorer:
    """Scores videos one at a time and accumulates the aggregate.

    `cfg` is the run config (defaults if None): it gives `bench.backbone`, `bench.background_backbone`,
    `bench.weights`, `bench.segment_s`, `bench.clip_s`, `bench.lpips` and `device`. `backbone`,
    `background_backbone` (names or `Backbone`s) and `lpips` (an `Lpips`, None for off, or "auto" to
    follow `bench.lpips`) override it. `realism`: a `cf.metrics.realism` reference (see `attach_realism`)
    or None.
    """

    def __init__(self, cfg=None, *, backbone=None, background_backbone=None, lpips="auto", device=None):
        from cf.utils import pick_device

        cfg = cfg if cfg is not None else default_config()
        b = cfg.bench
        self.segment_s, self.clip_s = float(b.segment_s), float(b.clip_s)
        self.device = torch.device(device) if device is not None else pick_device(cfg.device)
        act = self.act = b.clip_activation
        self.weights = b.weights
        self.backbone = get_backbone(backbone or b.backbone, b.weights, clip_activation=act)
        bg = get_backbone(background_backbone or b.background_backbone or self.backbone, b.weights,
                          clip_activation=act)
        self.background = self.backbone if bg.name == self.backbone.name else bg
        if isinstance(lpips, str) and b.lpips:  # "auto"
            self.lpips, self.lpips_note = lpips_or_reason(b.weights)
        elif isinstance(lpips, str):
            self.lpips, self.lpips_note = None, "off (bench.lpips=false)"
        else:
            self.lpips, self.lpips_note = lpips, (None if lpips is not None else "off")
        self.first_frame = FirstFrameConsistency(self.segment_s).to(self.device)
        # one backbone computes both of VBench's consistencies: one measure, named after it
        roles = [("both", self.backbone)] if self.background is self.backbone else \
            [("subject", self.backbone), ("background", self.background)]
        self.consistency = [(role, bb, VBenchConsistency(clip_s=self.clip_s).to(self.device))
                            for role, bb in roles]
        self.smoothness = MotionSmoothness().to(self.device)
        self.dynamic = DynamicDegree(flow=b.flow, flow_weights=b.flow_weights).to(self.device)
        # the clean context frames every rollout starts from (what an attention sink keeps, or part of it):
        # each lag bin reports the share of its compared pixels that these frames showed
        self.held_frames = int(cfg.student.context_frames)
        self.revisit = RevisitError(self.lpips, held_frames=self.held_frames).to(self.device)
        self.realism = None
        self.videos = 0

    def attach_realism(self, reference, stride: int = 1) -> None:
        """Score realism too: the Fréchet distance of every `stride`-th frame's features to `reference` (a
        `cf.metrics.realism.Reference`, built with `world_reference` or `folder_reference`), pooled over
        all videos scored (per video: None; FD needs many frames). Compare FDs at equal frame counts."""
        from cf.metrics.realism import FrechetDistance

        bb = reference.description["backbone"]
        self.realism = FrechetDistance(backbone=get_backbone(bb, self.weights, clip_activation=self.act),
                                       reference=reference).to(self.device)
        self.realism_stride = int(stride)

    def _realism(self) -> dict | None:
        if self.realism is None or not int(self.realism.gen_n):
            return None
        r = self.realism.compute()
        return {"backbone": self.realism.backbone.name, "fd": _num(r["fd"]), "fd_pca": _num(r["fd_pca"]),
                "pca_dims": int(r["pca_dims"]), "frames": int(r["n_generated"]),
                "reference_frames": int(r["n_reference"]), "reference": self.realism.description}

    def describe(self) -> dict:
        """What produced the numbers: backbone labels, LPIPS, methods, settings."""
        out = {
            "backbone": self.backbone.name, "backbone_label": self.backbone.label,
            "background_backbone": self.background.name, "background_backbone_label": self.background.label,
            "lpips": self.lpips.label if self.lpips is not None else None, "lpips_note": self.lpips_note,
            "methods": {"motion_smoothness": INTERPOLATOR, "dynamic_degree": self.dynamic.method,
                        "consistency": {consistency_column(role, bb.name): f"{role}: {bb.label}"
                                        for role, bb, _ in self.consistency}},
            "settings": {"segment_s": self.segment_s, "clip_s": self.clip_s, "psnr_cap_db": PSNR_CAP_DB,
                         "retention_level": RETENTION_LEVEL, "chance_frames": CHANCE_FRAMES,
                         "sink_share_frames": self.held_frames},
        }
        if self.realism is not None:
            out["realism"] = {"backbone": self.realism.backbone.label, "frame_stride": self.realism_stride,
                              "reference": self.realism.description}
        return out

    def _consistency(self, values: list[dict]) -> list[dict]:
        return [{"column": consistency_column(role, bb.name), "role": role, "backbone": bb.name,
                 "label": bb.label, **{k: _num(v) for k, v in terms.items()}}
                for (role, bb, _), terms in zip(self.consistency, values)]

    def score(self, frames, fps: float, revisits=None, masks=None, camera=None) -> dict:
        """One video: uint8 [T, H, W, 3] (numpy or torch) or float [T, 3, H, W] in [-1, 1]; revisits
        [P, 3] (t_first, t_revisit, lag) in frames; masks [P, H, W] bool (True = compare); camera [T, 2]
        (x, y per frame, in this video's pixels) or None. Returns this video's results and adds them to
        the aggregate. Revisit 'psnr' values are the PSNR of the mean MSE (per lag bin, and over all
        pairs)."""
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
        if camera is not None and len(camera) < t:
            raise CfError(f"camera positions cover {len(camera)} frames but the video has {t}; expected one "
                          f"[x, y] per frame")
        video = video.to(self.device)
        feats = embed_frames(self.backbone, video)[None]  # [1, T, D]
        cons = []
        for _, bb, metric in self.consistency:
            f = feats if bb is self.backbone else embed_frames(bb, video)[None]
            cons.append(metric(f, fps))
        curve = self.first_frame(feats, fps)
        dyn = self.dynamic(video[None], fps)
        r = self.revisit(video, revisits, fps, masks, camera) if revisits is not None else None
        block, ctx = revisit_section(r)
        if self.realism is not None:
            self.realism.update(video[::self.realism_stride])
        self.videos += 1
        return {
            "frames": t, "fps": float(fps), "seconds": t / fps, "height": hw[0], "width": hw[1],
            "backbone": self.backbone.name,
            "consistency": self._consistency(cons),
            "first_frame_consistency": _curve(curve),
            "drift": _drift(curve),
            "motion_smoothness": _num(self.smoothness(video[None])),
            **_motion(dyn), "realism": None, "revisit": block, **ctx,
        }

    def aggregate(self) -> dict | None:
        """Over all videos scored so far: means of the per-video scores; the first-frame curve pooled
        per segment over all frames; drift of the pooled curve; revisits pooled by lag bin; realism of
        all frames together."""
        if self.videos == 0:
            return None
        curve = self.first_frame.compute()
        dyn = self.dynamic.compute()
        r = self.revisit.compute() if self.revisit.lag else None
        block, ctx = revisit_section(r)
        return {
            "videos": self.videos,
            "backbone": self.backbone.name,
            "consistency": self._consistency([m.compute() for _, _, m in self.consistency]),
            "first_frame_consistency": _curve(curve),
            "drift": _drift(curve),
            "motion_smoothness": _num(self.smoothness.compute()),
            **_motion(dyn), "realism": self._realism(),
            "revisit": block, **ctx,
        }

    def reset(self) -> None:
        for m in (self.first_frame, self.smoothness, self.dynamic, self.revisit,
                  *(m for _, _, m in self.consistency)):
            m.reset()
        if self.realism is not None:
            self.realism.reset()
        self.videos = 0


def score_video(frames, fps: float, backbone=None, revisits=None, masks=None, cfg=None, lpips="auto",
                camera=None) -> dict:
    """Score one video: the per-video results of `VideoScorer.score` plus `VideoScorer.describe`."""
    scorer = VideoScorer(cfg, backbone=backbone, lpips=lpips)
    return {**scorer.describe(), **scorer.score(frames, fps, revisits, masks, camera)}
