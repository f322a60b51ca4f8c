"""Consistency, motion and memory metrics (torchmetrics `Metric`s) and the backbones they use.

- `cf.metrics.backbones`: `BACKBONES`, `get_backbone`, `embed_frames` (pixels, imagenet, dino, dinov2,
  clip; random for tests).
- `cf.metrics.consistency`: `FirstFrameConsistency`, `Drift`, `VBenchConsistency`.
- `cf.metrics.motion`: `MotionSmoothness`, `DynamicDegree`.
- `cf.metrics.revisit`: `RevisitError` (revisit error, chance and retention by lag), `effective_context`,
  `AgeBinnedError`, `RegionError`.
- `cf.metrics.realism`: `FrechetDistance`, `world_reference`, `folder_reference` (realism).
- `cf.metrics.columns`: `score_columns`, the one naming of every score for tables and MLflow.
- `cf.metrics.lpips_net`: `Lpips`, `lpips_or_reason` (trunk from a local file only).
- `cf.metrics.score`: `VideoScorer`, `score_video`, `read_sidecar` (what `cf score` runs).

Names are imported lazily (`from cf.metrics import VideoScorer` works), so loading a config, which
checks `bench.backbone` against `BACKBONES`, does not import torchmetrics.
"""

import importlib

_EXPORTS = {
    "BACKBONES": "backbones", "get_backbone": "backbones", "embed_frames": "backbones",
    "FirstFrameConsistency": "consistency", "Drift": "consistency", "VBenchConsistency": "consistency",
    "MotionSmoothness": "motion", "DynamicDegree": "motion",
    "RevisitError": "revisit", "AgeBinnedError": "revisit", "RegionError": "revisit",
    "effective_context": "revisit",
    "FrechetDistance": "realism", "world_reference": "realism", "folder_reference": "realism",
    "score_columns": "columns",
    "Lpips": "lpips_net", "lpips_or_reason": "lpips_net",
    "VideoScorer": "score", "score_video": "score", "read_sidecar": "score",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"cf.metrics.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'cf.metrics' has no attribute {name!r}")
