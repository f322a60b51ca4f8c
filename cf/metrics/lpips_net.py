"""LPIPS with its AlexNet/VGG16 trunk from a local file, and a masked spatial average.

The `lpips` package ships its linear heads but takes the trunk from torchvision's download cache.
Here the trunk always comes from a file the user has (`bench.weights` or torch's hub cache): a
torchvision ImageNet state dict such as ``alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``.
Without one, LPIPS is unavailable and `lpips_or_reason` says how to provide it. A randomly
initialised trunk exists for tests only (``random=True``) and is labelled so.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cf.errors import CfError
from cf.metrics.weights import MissingWeightsError, WeightSpec, find_weights, load_state_dict

LPIPS_SPEC = WeightSpec("an ImageNet AlexNet or VGG16 state dict for LPIPS's trunk",
                        prefixes=("alexnet-", "vgg16-"),
                        source="torchvision's alexnet-owt-7be5be79.pth (preferred) or vgg16-397923af.pth")
MIN_SIDE = 64  # AlexNet's stride-4 stem and pools leave almost nothing of a 32x32 frame; upsample first


class Lpips(nn.Module):
    """LPIPS distance between frames in [-1, 1]; `forward(a, b, mask)` -> [N]."""

    def __init__(self, trunk: str | Path | None = None, random: bool = False):
        super().__init__()
        import lpips

        if trunk is None and not random:
            raise CfError("Lpips needs a trunk weight file (or random=True, for tests only)")
        sd = load_state_dict(trunk) if trunk is not None else None
        net = "vgg" if sd is not None and ("features.28.weight" in sd or Path(trunk).name.startswith("vgg")) \
            else "alex"
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)  # a random trunk is the same on every run
            warnings.simplefilter("ignore", UserWarning)  # lpips uses torchvision's deprecated `pretrained=`
            self.model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, spatial=True, verbose=False)
        heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
        # `lins.K` aliases `linK` in lpips, so the heads file names only the latter
        result = self.model.load_state_dict(heads, strict=False)
        missing = [k for k in result.missing_keys if k.startswith("lin") and not k.startswith("lins.")]
        if missing:
            raise CfError(f"LPIPS heads {str(heads_path)!r} lack {missing[:3]}; reinstall the lpips package")
        if sd is not None:
            self._load_trunk(sd, trunk)
            self.label = f"lpips ({net}, {Path(trunk).name})"
        else:
            self.label = f"lpips (random {net} trunk, test only)"
        self.model.requires_grad_(False)
        self.eval()

    def _load_trunk(self, sd: dict, path) -> None:
        # lpips slices torchvision's `features` Sequential: trunk key 'sliceK.i.w' is 'features.i.w'
        trunk = self.model.net
        mapped, missing = {}, []
        for name in trunk.state_dict():
            key = "features." + name.split(".", 1)[1]
            if key in sd:
                mapped[name] = sd[key]
            else:
                missing.append(key)
        if missing:
            raise CfError(f"{str(path)!r} is not a torchvision AlexNet/VGG16 state dict: it lacks "
                          f"{', '.join(missing[:3])}; pass alexnet-owt-7be5be79.pth with --weights / "
                          f"bench.weights")
        trunk.load_state_dict(mapped)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """a, b: [N, 3, H, W] in [-1, 1]; mask: [N, H, W] bool (pixels to average) -> [N]."""
        ref = next(iter(self.parameters()))
        if ref.device != a.device:
            self.to(a.device)
        h, w = a.shape[-2:]
        k = max(1, math.ceil(MIN_SIDE / min(h, w)))
        if k > 1:
            a = F.interpolate(a.float(), scale_factor=k, mode="bilinear", align_corners=False)
            b = F.interpolate(b.float(), scale_factor=k, mode="bilinear", align_corners=False)
        dist = self.model(a.float(), b.float())  # [N, 1, kH, kW]: lpips spatial map
        dist = F.avg_pool2d(dist, k)[:, 0] if k > 1 else dist[:, 0]  # [N, H, W]
        if mask is None:
            return dist.flatten(1).mean(1)
        m = mask.to(dist.dtype)
        return (dist * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)


def find_lpips_trunk(weights: str | None) -> Path:
    """The trunk file: `bench.weights` if it is one, else searched beside or inside it, then in
    torch's hub cache."""
    return find_weights(LPIPS_SPEC, weights, who="LPIPS", for_backbone=False,
                        option="--weights PATH (cf score) or bench.weights=PATH (a folder may hold both "
                               "the backbone's and LPIPS's files)")


def lpips_or_reason(weights: str | None) -> tuple[Lpips | None, str | None]:
    """(the LPIPS net, None) when its trunk file is here, else (None, why not and how to fix)."""
    try:
        return Lpips(find_lpips_trunk(weights)), None
    except MissingWeightsError as e:
        return None, f"LPIPS unavailable: {e}"
