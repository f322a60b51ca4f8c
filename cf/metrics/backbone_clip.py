"""The CLIP backbone: one implementation, open_clip's `VisionTransformer` (the image tower of OpenAI's
CLIP), for every layout; the feature is the projected image embedding (``encode_image``).

Layouts, all converted to open_clip's (= OpenAI's) key names:

- an open_clip state dict (``.bin`` / ``.safetensors`` / ``.pt``, keys ``visual.*``), alone or in a hub
  snapshot folder with ``open_clip_config.json``;
- a timm snapshot (``vit_base_patch32_clip_224.openai`` and the like: ``config.json`` + weights);
- a transformers ``CLIPModel`` / ``CLIPVisionModelWithProjection`` folder;
- OpenAI's TorchScript archives (``ViT-B-32.pt``), read with ``torch.jit.load`` only.

Shapes give the architecture (width, patch, depth, position grid, projection), a config the head
count (else width / 64, as in every OpenAI / LAION ViT). The activation is never guessed: OpenAI's
CLIP used QuickGELU and most re-trainings GELU, and the wrong one shifts every feature. It comes from
the files' configs (`activation_evidence`); a file with none needs ``bench.clip_activation``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from cf.errors import CfError
from cf.metrics.backbone_base import (
    CLIP_MEAN,
    CLIP_STD,
    WEIGHTS_OPTION,
    Backbone,
    fuse_qkv,
    rename_keys,
    to_float32,
    unknown_keys_error,
    vit_name,
)
from cf.metrics.weights import assign_exactly, is_torchscript, read_checkpoint
from cf.metrics.weights_layouts import Source, locate

ACTIVATIONS = ("gelu", "quick_gelu")
SETTING = "bench.clip_activation"
WHAT = "CLIP ViT image-tower weights"
BLOCK = r"transformer\.resblocks\.\d+\."
OPEN_CLIP_KEYS = (r"class_embedding|positional_embedding|conv1\.weight|proj"
                  r"|(?:ln_pre|ln_post)\.(?:weight|bias)"
                  rf"|{BLOCK}(?:ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(?:weight|bias)"
                  rf"|{BLOCK}attn\.in_proj_(?:weight|bias)")
TIMM_RULES = [  # timm's CLIP ViT -> open_clip
    (r"cls_token", "class_embedding"),
    (r"pos_embed", "positional_embedding"),
    (r"patch_embed\.proj\.weight", "conv1.weight"),
    (r"norm_pre\.(weight|bias)", r"ln_pre.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"transformer.resblocks.\1.ln_\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"norm\.(weight|bias)", r"ln_post.\1"),
    (r"head\.weight", "proj"),
]
LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
HF_RULES = [  # transformers CLIPModel -> open_clip
    (r"vision_model\.embeddings\.class_embedding", "class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"ln_pre.\1"),
    (LAYER + r"layer_norm([12])\.(weight|bias)", r"transformer.resblocks.\1.ln_\2.\3"),
    (LAYER + r"self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (LAYER + r"mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (LAYER + r"mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_post.\1"),
    (r"visual_projection\.weight", "proj"),
]
HF_QKV = LAYER + r"self_attn\.(q|k|v)_proj\.(weight|bias)"
HF_DROPPED = r"text_model\..*|text_projection\..*|logit_scale|vision_model\.embeddings\.position_ids"


def _flat(raw: object, path) -> dict:
    sd = raw
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CfError(f"{str(path)!r} holds no state dict (a flat dict of tensors) of a CLIP model; got "
                      f"{type(sd).__name__}. Pass the weights themselves (see docs/weights.md)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def open_clip_state(sd: dict, path) -> tuple[dict, str]:
    """Any CLIP layout's keys -> open_clip's image tower (no ``visual.`` prefix), and the layout's name."""
    if "vision_model.embeddings.class_embedding" in sd:
        fused, rest = fuse_qkv(sd, HF_QKV, lambda i, kind: f"transformer.resblocks.{i}.attn.in_proj_{kind}")
        out, unknown = rename_keys(rest, HF_RULES, HF_DROPPED)
        out.update(fused)
        if "proj" in out:
            out["proj"] = out["proj"].t()  # Linear weight [E, D] -> open_clip's matrix [D, E]
        layout = "transformers"
    elif "norm_pre.weight" in sd and "cls_token" in sd:
        bias = sd.get("head.bias")
        if bias is not None and bool(bias.abs().max() > 0):
            raise CfError(f"{str(path)!r}: its head has a bias, so it is a fine-tuned classifier, not CLIP's "
                          f"image projection")
        out, unknown = rename_keys({k: v for k, v in sd.items() if k != "head.bias"}, TIMM_RULES)
        out["class_embedding"] = out["class_embedding"].reshape(-1)  # [1, 1, D] -> [D]
        out["positional_embedding"] = out["positional_embedding"][0]  # [1, N, D] -> [N, D]
        if "proj" in out:
            out["proj"] = out["proj"].t()
        layout = "timm"
    elif "visual.class_embedding" in sd or "class_embedding" in sd:
        if "visual.class_embedding" in sd:
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        out, unknown = rename_keys(sd, [(OPEN_CLIP_KEYS, r"\g<0>")])
        layout = "open_clip"
    else:
        dino = "cls_token" in sd or "embeddings.cls_token" in sd
        raise CfError(f"{str(path)!r} does not hold {WHAT}: " + (
            "it holds a ViT without CLIP's pre-norm (DINO / DINOv2?); use it with backbone 'dino' or 'dinov2'"
            if dino else f"its keys ({', '.join(list(sd)[:4])}, ...) are not those of an open_clip, timm or "
                         f"transformers CLIP ViT (ResNet and timm-tower CLIPs are not supported)"))
    if unknown:
        raise unknown_keys_error(path, WHAT, unknown)
    if "proj" not in out:
        raise CfError(f"{str(path)!r} has no image projection (visual.proj / head.weight / "
                      f"visual_projection); CLIP features are the projected embedding, so cf needs the "
                      f"whole image tower")
    return out, layout


def _timm_notes_say_quickgelu(arch: str, tag: str) -> bool:
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}")
    except RuntimeError:  # a tag this timm does not know
        return False
    return cfg is not None and any("quickgelu" in n.lower().replace(" ", "") for n in (cfg.notes or ()))


def activation_evidence(src: Source, torchscript: bool) -> list[tuple[str, str, bool]]:
    """What the files say about the activation: (gelu | quick_gelu, where it says so, explicit?).
    Implicit: a config that builds GELU by default without naming it."""
    out = []
    if torchscript:
        out.append(("quick_gelu", "an OpenAI TorchScript archive (OpenAI's CLIP uses QuickGELU)", True))
    oc = src.configs.get("open_clip_config.json")
    if isinstance(oc, dict):
        mc = oc.get("model_cfg") or {}
        if "quick_gelu" in mc:
            out.append(("quick_gelu" if mc["quick_gelu"] else "gelu",
                        f"open_clip_config.json (quick_gelu: {mc['quick_gelu']})", True))
        else:
            out.append(("gelu", "open_clip_config.json (no quick_gelu: open_clip builds GELU)", False))
    cfg = src.configs.get("config.json")
    if isinstance(cfg, dict) and cfg.get("model_type") in ("clip", "clip_vision_model"):
        act = (cfg.get("vision_config") or cfg).get("hidden_act")
        if act not in ACTIVATIONS:
            raise CfError(f"{str(src.file.parent / 'config.json')!r}: hidden_act {act!r}; cf's CLIP supports "
                          f"{' or '.join(ACTIVATIONS)}")
        out.append((act, f"config.json (transformers hidden_act: {act})", True))
    elif isinstance(cfg, dict) and "architecture" in cfg:
        arch = str(cfg["architecture"])
        pcfg = cfg.get("pretrained_cfg") or {}
        tag = str(pcfg.get("tag", ""))
        act_arg = (cfg.get("model_args") or {}).get("act_layer")
        notes = " ".join(pcfg.get("notes") or ()).lower().replace(" ", "")
        where = f"config.json (timm {arch}{'.' + tag if tag else ''}"
        if act_arg in ACTIVATIONS:
            out.append((act_arg, f"{where}, act_layer {act_arg})", True))
        elif "quickgelu" in arch or "quickgelu" in notes or _timm_notes_say_quickgelu(arch, tag):
            out.append(("quick_gelu", f"{where}: natively QuickGELU)", True))
        elif tag.startswith("openai"):
            out.append(("quick_gelu", f"{where}: OpenAI's weights use QuickGELU)", True))
        else:
            out.append(("gelu", f"{where}: timm builds it with GELU)", False))
    return out


def resolve_activation(src: Source, torchscript: bool, setting: str | None) -> tuple[str, str]:
    """(activation, why) from the files' configs, else from `bench.clip_activation`; conflicts and
    silence are errors that say what to do."""
    if setting is not None and setting not in ACTIVATIONS:
        raise CfError(f"{SETTING}={setting!r} is not valid; use {' or '.join(ACTIVATIONS)} "
                      f"(or leave it unset)")
    evidence = activation_evidence(src, torchscript)
    explicit = [e for e in evidence if e[2]]
    chosen = {a for a, _, _ in (explicit or evidence)}
    said = "; ".join(f"{w} says {a}" for a, w, _ in evidence)
    if len(chosen) > 1:
        raise CfError(f"{str(src.file)!r}: its configs disagree on the activation ({said}); fix or "
                      f"remove the wrong config file")
    if chosen and setting is not None and setting not in chosen:
        raise CfError(f"{SETTING}={setting} contradicts the files ({said}); remove the setting, it is only "
                      f"for weight files that come without a config")
    if chosen:
        act = chosen.pop()
        return act, next(w for a, w, _ in (explicit or evidence) if a == act)
    if setting is not None:
        return setting, f"{SETTING}={setting}"
    raise CfError(
        f"{str(src.file)!r} is a CLIP state dict without a config, so nothing says whether it uses QuickGELU "
        f"(OpenAI's CLIP, and open_clip's '*-quickgelu' models) or GELU (most LAION / DataComp "
        f"trainings), and the wrong one changes every feature. Set {SETTING}=quick_gelu or "
        f"{SETTING}=gelu, or put the file in a folder with its open_clip_config.json (see docs/weights.md)")


def build_tower(sd: dict, heads: int | None, eps: float, act: str):
    """open_clip's ViT image tower for `sd`'s shapes, on the meta device (weights assigned after)."""
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer

    width, patch = int(sd["conv1.weight"].shape[0]), int(sd["conv1.weight"].shape[-1])
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    mlp = int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    heads = heads or width // 64
    with torch.device("meta"):
        tower = VisionTransformer(
            image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
            mlp_ratio=mlp / width, output_dim=int(sd["proj"].shape[1]),
            act_layer=QuickGELU if act == "quick_gelu" else nn.GELU, norm_layer=partial(LayerNorm, eps=eps))
    return tower, vit_name(width, patch, layers), grid * patch


def _check_open_clip_config(configs: dict, path) -> None:
    """Refuse open_clip image-tower options that change the computation without changing the tensors'
    names (pooling, where the final norm sits, ...): cf's tower is the plain OpenAI one."""
    from dataclasses import fields

    from open_clip.model import CLIPVisionCfg

    vision = ((configs.get("open_clip_config.json") or {}).get("model_cfg") or {}).get("vision_cfg") or {}
    defaults = {f.name: f.default for f in fields(CLIPVisionCfg)}
    shape_keys = ("image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout")
    odd = {k: v for k, v in vision.items()
           if k not in shape_keys and (k not in defaults or defaults[k] != v)}
    if odd:
        raise CfError(f"{str(path)!r}: open_clip_config.json sets {odd}; cf's CLIP backbone is the plain "
                      f"OpenAI-style ViT image tower and does not support these options")


def _heads_eps(configs: dict) -> tuple[int | None, float]:
    """Head count and LayerNorm epsilon where a config states them (eps: transformers only; else 1e-5,
    as OpenAI's and open_clip's)."""
    oc = ((configs.get("open_clip_config.json") or {}).get("model_cfg") or {}).get("vision_cfg") or {}
    cfg = configs.get("config.json") or {}
    vision = cfg.get("vision_config") or cfg
    eps = float(vision.get("layer_norm_eps", 1e-5))
    if "width" in oc:
        return int(oc["width"]) // int(oc.get("head_width", 64)), eps
    return vision.get("num_attention_heads") or (cfg.get("model_args") or {}).get("num_heads"), eps


def _mean_std(configs: dict):
    pp = (configs.get("open_clip_config.json") or {}).get("preprocess_cfg") or {}
    pcfg = (configs.get("config.json") or {}).get("pretrained_cfg") or {}
    for cfg in (pp, pcfg):
        if "mean" in cfg and "std" in cfg:
            return tuple(cfg["mean"]), tuple(cfg["std"])
    return CLIP_MEAN, CLIP_STD


class ClipBackbone(Backbone):
    name = "clip"

    def __init__(self, weights: str | None, clip_activation: str | None = None):
        src: Source = locate("clip", weights, who="backbone 'clip'", option=WEIGHTS_OPTION)
        super().__init__(*_mean_std(src.configs))
        self.source = src
        torchscript = is_torchscript(src.file)
        if torchscript:
            try:  # compiled TorchScript, never pickle: its tensors are all cf takes
                raw = torch.jit.load(str(src.file), map_location="cpu").state_dict()
            except Exception as e:  # noqa: BLE001 - a damaged archive raises anything
                raise CfError(f"cannot load the TorchScript archive {str(src.file)!r}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}. Expected OpenAI's CLIP "
                              f"(e.g. ViT-B-32.pt); re-download it") from None
        else:
            raw = read_checkpoint(src.file, what=WHAT, fix=f"pass {WHAT} (see docs/weights.md) with "
                                                            f"{WEIGHTS_OPTION}")
        sd, self.layout = open_clip_state(_flat(raw, src.file), src.file)
        _check_open_clip_config(src.configs, src.file)
        pool = (src.configs.get("config.json") or {}).get("global_pool")
        if pool not in (None, "token"):
            raise CfError(f"{str(src.file)!r}: its timm config pools with {pool!r}; CLIP pools the class "
                          f"token")
        self.activation, self.activation_source = resolve_activation(src, torchscript, clip_activation)
        self.net, arch, self.size = build_tower(sd, *_heads_eps(src.configs), self.activation)
        assign_exactly(self.net, to_float32(sd), src.file, f"{WHAT} ({arch})")
        act = "QuickGELU" if self.activation == "quick_gelu" else "GELU"
        at = f"@{self.size}" if self.size != 224 else ""
        self.label = f"clip ({arch}{at}, {act}, {src.name})"
        self.eval()

    def features(self, x):
        return self.net(x)  # [N, E]: open_clip's encode_image without normalising
