"""The `Backbone` base class and what the pretrained-ViT backbones share: input preparation, key
renaming between weight layouts, and naming what was loaded."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cf.errors import CfError

WEIGHTS_OPTION = "--weights PATH (cf score) or bench.weights=PATH"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIT_SIZES = {384: "S", 768: "B", 1024: "L", 1280: "H", 1536: "g"}  # width -> the name releases use


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


def vit_name(width: int, patch: int, depth: int) -> str:
    """"ViT-B/16"; widths no release uses (test models) spell out width and depth."""
    size = VIT_SIZES.get(width, f"{width}w{depth}d")
    return f"ViT-{size}/{patch}"


Rule = tuple[str, str]


def rename_keys(sd: dict, rules: list[Rule], drop: str = "") -> tuple[dict, list[str]]:
    """Rename `sd`'s keys by the first of `rules` ((regex, replacement), whole-key matches) that matches;
    keys matching `drop` go. Returns (renamed dict, keys no rule knew)."""
    compiled = [(re.compile(p), r) for p, r in rules]
    dropped = re.compile(drop) if drop else None
    out, unknown = {}, []
    for k, v in sd.items():
        if dropped is not None and dropped.fullmatch(k):
            continue
        for pattern, repl in compiled:
            if pattern.fullmatch(k):
                out[pattern.sub(repl, k)] = v
                break
        else:
            unknown.append(k)
    return out, unknown


def fuse_qkv(sd: dict, pattern: str, target: Callable[[str, str], str]) -> tuple[dict, dict]:
    """Separate query / key / value projections -> one fused [3D, D] (or [3D]) tensor per layer, in that
    order, as timm's ``qkv`` and PyTorch's ``in_proj`` hold them. `pattern` has groups (layer, q|k|v part,
    weight|bias); `target(layer, kind)` names the fused key. Returns (fused, everything else)."""
    regex = re.compile(pattern)
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for k, v in sd.items():
        m = regex.fullmatch(k)
        if m:
            parts.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
        else:
            rest[k] = v
    fused = {}
    for (layer, kind), qkv in parts.items():
        names = sorted(qkv, key=lambda n: "qkv".index(n[0]))  # query/q_proj, key/k_proj, value/v_proj
        if len(names) != 3:
            raise CfError(f"layer {layer} has only {', '.join(names)} of its query/key/value {kind}s")
        fused[target(layer, kind)] = torch.cat([qkv[n] for n in names])
    return fused, rest


def to_float32(sd: dict) -> dict:
    """Owned float32 copies (files may hold fp16, and torch.load's mmap keeps tensors tied to the file)."""
    return {k: v.detach().to(torch.float32, copy=True).contiguous() for k, v in sd.items()}


def unknown_keys_error(path, what: str, unknown: list[str]) -> CfError:
    return CfError(f"{str(path)!r} does not hold {what}: {len(unknown)} weights cf cannot place (e.g. "
                   f"{', '.join(unknown[:4])}); this layout or variant is not supported "
                   f"(see docs/weights.md)")
