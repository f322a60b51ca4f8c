"""DINO and DINOv2 backbones: one implementation, timm's `VisionTransformer`, for every layout.

The feature is the CLS token after the final norm (timm with ``num_classes=0``, what DINO's evaluation
and transformers' ``pooler_output`` of `Dinov2Model` give). Layouts, all converted to timm's key names:

- facebookresearch/dino releases (``dino_deitsmall8_pretrain.pth``, ``dino_vitbase16_pretrain.pth``)
  and DINOv2 hub files (``dinov2_vitb14_pretrain.pth``): timm's names already;
- a DINO training checkpoint (``{'teacher': {'backbone.*', 'head.*'}, 'student': ..., 'args': ...}``):
  the teacher's backbone, as DINO's evaluation takes it;
- a timm snapshot folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``);
- a transformers ``ViTModel`` (DINO) / ``Dinov2Model`` folder.

The architecture comes from the tensors' shapes (width, patch, depth, MLP width, LayerScale, the
position grid) and, where a config has them, its head count and LayerNorm epsilon (else heads =
width / 64 and eps = 1e-6, as in every DINO / DINOv2 release). DINO runs at its native resolution;
DINOv2 (released with a 518 px / 37x37 position grid) at 224 px, its position embeddings resized once
at load, bicubically, as DINOv2's and transformers' own code resize them for other input sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from cf.errors import CfError
from cf.metrics.backbone_base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHTS_OPTION,
    Backbone,
    fuse_qkv,
    rename_keys,
    to_float32,
    unknown_keys_error,
    vit_name,
)
from cf.metrics.weights import assign_exactly, read_checkpoint
from cf.metrics.weights_layouts import Source, locate

DINOV2_SIZE = 224  # DINOv2's input side (its linear evaluations' crop), when the weights' grid is larger

HF_VIT_RULES = [  # transformers ViTModel / Dinov2Model -> timm
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
HF_QKV = r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)"
TIMM_VIT_KEYS = (  # what the released DINO / DINOv2 files and timm snapshots hold
    r"cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias)"
    r"|blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma")
# not part of the feature network: DINO's projection head, DINOv2's masking token, classifier heads
DROPPED = r"(?:mask_token|embeddings\.mask_token|head\..*|pooler\..*|classifier\..*)"


def _unwrap(raw: object, path) -> dict:
    """A checkpoint -> the backbone's flat state dict (DINO training checkpoints: the teacher's)."""
    sd = raw
    for key in ("teacher", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CfError(f"{str(path)!r} holds no state dict (a flat dict of tensors) of a ViT; got "
                      f"{type(sd).__name__} with keys {list(sd)[:5] if isinstance(sd, dict) else ''}. Pass "
                      f"the weights themselves (see docs/weights.md)")
    for prefix in ("module.", "backbone.", "vit.", "dinov2."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def timm_state(sd: dict, path, what: str) -> tuple[dict, str]:
    """Any DINO / DINOv2 layout's keys -> timm's, and the layout's name."""
    if "embeddings.cls_token" in sd:
        fused, rest = fuse_qkv(sd, HF_QKV, lambda layer, kind: f"blocks.{layer}.attn.qkv.{kind}")
        out, unknown = rename_keys(rest, HF_VIT_RULES, DROPPED)
        out.update(fused)
        layout = "transformers"
    elif "cls_token" in sd and "patch_embed.proj.weight" in sd and "norm_pre.weight" not in sd:
        out, unknown = rename_keys(sd, [(TIMM_VIT_KEYS, r"\g<0>")], DROPPED)
        layout = "timm"
    else:
        clip = "norm_pre.weight" in sd or any("class_embedding" in k for k in sd)
        raise CfError(f"{str(path)!r} does not hold {what}: " + (
            "it holds CLIP weights; use them with backbone 'clip'" if clip else
            f"its keys ({', '.join(list(sd)[:4])}, ...) are not those of a DINO / timm / transformers ViT"))
    if unknown:
        raise unknown_keys_error(path, what, unknown)
    return out, layout


@dataclass(frozen=True)
class VitArch:
    width: int
    depth: int
    heads: int
    patch: int
    grid: int  # the position embeddings' grid side (native input = grid * patch)
    mlp: int  # hidden width of the MLP
    layerscale: bool
    eps: float

    def __str__(self) -> str:
        return vit_name(self.width, self.patch, self.depth)


def _config_value(configs: dict, *names):
    cfg = configs.get("config.json") or {}
    for source in (cfg, cfg.get("model_args") or {}):
        for n in names:
            if n in source:
                return source[n]
    return None


def infer_arch(sd: dict, configs: dict, path, what: str) -> VitArch:
    """The architecture from shapes, the head count and eps from a config when it has them."""
    proj = sd["patch_embed.proj.weight"]  # [D, 3, p, p]
    width, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    n_pos = sd["pos_embed"].shape[-2] - 1  # minus the CLS position
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos or depth == 0 or proj.shape[-2] != patch:
        raise CfError(f"{str(path)!r} does not hold {what}: {n_pos} patch positions, {depth} blocks, patch "
                      f"{tuple(proj.shape[-2:])} (expected a square grid of square patches)")
    heads = _config_value(configs, "num_attention_heads", "num_heads") or width // 64
    eps = _config_value(configs, "layer_norm_eps") or 1e-6
    pool = (configs.get("config.json") or {}).get("global_pool")
    if pool not in (None, "token"):
        raise CfError(f"{str(path)!r}: its timm config pools with {pool!r}; DINO's feature is the CLS token")
    act = _config_value(configs, "hidden_act", "act_layer")
    if act not in (None, "gelu"):
        raise CfError(f"{str(path)!r}: its config asks for activation {act!r}; DINO / DINOv2 use exact GELU")
    size = _config_value(configs, "hidden_size", "embed_dim")
    layers = _config_value(configs, "num_hidden_layers", "depth")
    if size not in (None, width) or layers not in (None, depth):
        raise CfError(f"{str(path)!r} holds a {depth}-block ViT of width {width}, but its config.json says "
                      f"{layers} blocks of width {size}: the files do not belong together")
    if width % heads:
        raise CfError(f"{str(path)!r}: width {width} is not divisible by {heads} heads")
    return VitArch(width, depth, int(heads), patch, grid, int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
                   "blocks.0.ls1.gamma" in sd, float(eps))


def resample_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + n*n, D] -> [1, 1 + grid*grid, D]: the patch positions resized bicubically (no antialias,
    as DINOv2 and transformers do at run time), the CLS position kept."""
    cls, patches = pos[:, :1], pos[:, 1:]
    n, dim = math.isqrt(patches.shape[1]), patches.shape[-1]
    img = patches.reshape(1, n, n, dim).permute(0, 3, 1, 2)  # [1, D, n, n]
    img = F.interpolate(img.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def build_vit(arch: VitArch, size: int) -> nn.Module:
    """timm's VisionTransformer for `arch` at input side `size`, on the meta device (weights assigned
    later; initialising a ViT-L first costs seconds)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        return VisionTransformer(
            img_size=size, patch_size=arch.patch, embed_dim=arch.width, depth=arch.depth,
            num_heads=arch.heads,
            mlp_ratio=arch.mlp / arch.width, qkv_bias=True, init_values=1.0 if arch.layerscale else None,
            norm_layer=partial(nn.LayerNorm, eps=arch.eps), act_layer=nn.GELU, num_classes=0,
            global_pool="token", weight_init="skip")


class VitBackbone(Backbone):
    """DINO (``dino``) or DINOv2 (``dinov2``) from any supported layout; see the module doc."""

    def __init__(self, name: str, weights: str | None):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.name = name
        what = "DINOv2 ViT weights" if name == "dinov2" else "DINO ViT weights"
        src: Source = locate(name, weights, who=f"backbone {name!r}", option=WEIGHTS_OPTION)
        self.source = src
        raw = read_checkpoint(src.file, what=what,
                              fix=f"pass {what} (a file or snapshot folder, see docs/weights.md) with "
                                  f"{WEIGHTS_OPTION}")
        sd, self.layout = timm_state(_unwrap(raw, src.file), src.file, what)
        arch = infer_arch(sd, src.configs, src.file, what)
        if arch.layerscale != (name == "dinov2"):
            other = "dinov2" if arch.layerscale else "dino"
            raise CfError(f"{str(src.file)!r} holds {'DINOv2' if arch.layerscale else 'DINO'} weights "
                          f"({'with' if arch.layerscale else 'without'} LayerScale), not {what}; use it with "
                          f"backbone {other!r}")
        native = arch.grid * arch.patch
        self.size = min(native, DINOV2_SIZE) if name == "dinov2" else native
        if self.size != native:
            sd["pos_embed"] = resample_positions(sd["pos_embed"], self.size // arch.patch)
        self.net = build_vit(arch, self.size)
        assign_exactly(self.net, to_float32(sd), src.file, f"{what} ({arch})")
        self.arch = arch
        at = f" at {self.size}px" if self.size != native else ""
        self.label = f"{name} ({arch}{at}, {src.name})"
        self.eval()

    def features(self, x):
        return self.net(x)  # [N, D]: CLS after the final norm
