"""Data: the procedural world, video-folder datasets and the LightningDataModule.

`DATA_SOURCES` maps ``data.source`` to a dataset factory
``(data_cfg, *, seed, start=0, count=None, block=1, rank=0, world_size=1) -> SampleStream``.
Config validation imports this package, so it stays light: torch and lightning load only when a
dataset or one of the exported classes is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from cf.registry import Registry

DATA_SOURCES: Registry[Any] = Registry("data source")


@DATA_SOURCES.register("world")
def world_source(data_cfg, **kwargs):
    """Fresh procedural worlds (cf.data.world), one per sample."""
    from cf.data.datasets import WorldDataset

    return WorldDataset(data_cfg, **kwargs)


@DATA_SOURCES.register("folder")
def folder_source(data_cfg, **kwargs):
    """Clips cut from the videos in ``data.folder``."""
    from cf.data.folder import VideoFolderDataset

    return VideoFolderDataset(data_cfg, **kwargs)


_EXPORTS = {
    "World": "cf.data.world",
    "Clip": "cf.data.world",
    "CAMERA_PATHS": "cf.data.world",
    "WorldDataset": "cf.data.datasets",
    "SampleStream": "cf.data.datasets",
    "VideoFolderDataset": "cf.data.folder",
    "VideoDataModule": "cf.data.datamodule",
}
__all__ = ["DATA_SOURCES", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cf.data' has no attribute {name!r}")
