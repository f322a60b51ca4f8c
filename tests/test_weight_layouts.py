"""Every weight layout of the DINO, DINOv2 and CLIP backbones: random weights built and saved with the
reference libraries (timm, open_clip, transformers, TorchScript) load through cf's backbone and give the
reference library's features on the same preprocessed input; files that are not weights, folders with
several candidates and CLIP files that do not say their activation fail with a message that says what
to do. Fast tests use 2-block, 128-wide ViTs; the released sizes are checked under `slow`."""

import argparse
import copy
import json
import pickle
import socket
from pathlib import Path

import pytest
import torch

from cf.errors import CfError
from cf.metrics.backbones import BACKBONES
from cf.metrics.weights import load_state_dict

TOL = 1e-5
W, DEPTH, HEADS = 128, 2, 2  # heads = width // 64, what cf infers when no config names them
EMBED = 64  # CLIP projection width
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 40, 52, generator=g) * 2 - 1  # not square: cf resizes and centre-crops


def randomize(model, seed: int):
    """Every parameter random (norm scales near 1, LayerScale near 0.5), so each one moves the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("gamma", "lambda1")):
                p.copy_(0.5 + 0.1 * noise)
            elif p.ndim == 1 and name.endswith("weight") and ("norm" in name or "ln_" in name):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model.eval()


def assert_matches(backbone, reference, frames, what: str, tol: float = TOL) -> float:
    """cf's features equal the reference's forward on cf's own preprocessed input."""
    with torch.no_grad():
        ref = reference(backbone.preprocess(frames))
    ours = backbone(frames)
    assert ours.shape == ref.shape
    diff = float((ours - ref).abs().max())
    print(f"\n[max |cf - reference|] {what}: {diff:.2e} (features up to {float(ref.abs().max()):.2f})")
    assert float(ref.abs().max()) > 0.05 and diff <= tol, f"{what}: max difference {diff}"
    return diff


def build(name: str, path, **kwargs):
    return BACKBONES.get(name)(str(path), **kwargs)  # uncached, unlike get_backbone


def timm_vit(arch: str, seed: int, **kwargs):
    import timm

    return randomize(timm.create_model(arch, pretrained=False, embed_dim=W, depth=DEPTH, num_heads=HEADS,
                                       **kwargs), seed)


def save_timm_snapshot(model, folder: Path, architecture=None, tag=None) -> Path:
    """timm's own Hugging Face export, with the config trimmed to what hub repos hold (no model_args)."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(folder), safe_serialization="both")  # model.safetensors and pytorch_model.bin
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("model_args", None)
    cfg["pretrained_cfg"].pop("notes", None)
    if architecture:
        cfg["architecture"] = architecture
    if tag:
        cfg["pretrained_cfg"]["tag"] = tag
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------- DINO


def dino_timm(seed=1):
    return timm_vit("vit_small_patch16_224.dino", seed, num_classes=0, img_size=32, patch_size=8)


def test_dino_release_file_in_a_folder(offline, frames):
    ref = dino_timm()
    (offline / "w").mkdir()
    torch.save(ref.state_dict(), offline / "w" / "dino_deitsmall8_pretrain.pth")
    (offline / "w" / "alexnet-owt-7be5be79.pth").write_bytes(b"another consumer's file")
    net = build("dino", offline / "w")
    assert net.label == "dino (ViT-128w2d/8, dino_deitsmall8_pretrain.pth)" and net.size == 32
    assert_matches(net, ref, frames, "dino: facebookresearch/dino release .pth")


def test_dino_training_checkpoint_takes_the_teacher_backbone(offline, frames):
    teacher, student = dino_timm(1), dino_timm(2)
    head = {"mlp.0.weight": torch.randn(16, W), "last_layer.weight_g": torch.ones(8, 1)}
    ckpt = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
                    **{f"module.head.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    **{f"head.{k}": v for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=8, out_dim=65536, lr=0.0005),
        "dino_loss": {"center": torch.zeros(1, 16)},
    }
    path = offline / "checkpoint.pth"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):  # the Namespace: a plain weights_only load refuses the file
        torch.load(path, weights_only=True)
    net = build("dino", path)
    assert net.label.endswith(", checkpoint.pth)")
    assert_matches(net, teacher, frames, "dino: DINO training checkpoint (teacher)")


def test_dino_timm_snapshot_in_a_hub_cache(offline, frames):
    ref = dino_timm()
    snap = offline / "hub" / "models--timm--vit_small_patch16_224.dino" / "snapshots" / "abc"
    save_timm_snapshot(ref, snap)
    net = build("dino", offline / "hub")  # the same weights in two formats are one candidate
    assert net.label == "dino (ViT-128w2d/8, timm/vit_small_patch16_224.dino)" and net.layout == "timm"
    assert net.source.file.name == "model.safetensors"
    assert_matches(net, ref, frames, "dino: timm snapshot folder")


def test_dino_transformers_vitmodel_folder(offline, frames):
    from transformers import ViTConfig, ViTModel

    ref = randomize(ViTModel(ViTConfig(hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                       intermediate_size=4 * W, image_size=32, patch_size=8)), 4)
    ref.save_pretrained(offline / "dino-vits8")
    net = build("dino", offline / "dino-vits8")
    assert net.layout == "transformers" and net.arch.eps == ref.config.layer_norm_eps
    assert_matches(net, lambda x: ref(pixel_values=x).last_hidden_state[:, 0], frames,
                   "dino: transformers ViTModel folder")


# ---------------------------------------------------------------- DINOv2


def dinov2_timm(seed=5, img_size=56):
    return timm_vit("vit_small_patch14_dinov2.lvd142m", seed, num_classes=0, img_size=img_size)


def test_dinov2_hub_pth_and_timm_snapshot(offline, frames):
    ref = dinov2_timm()
    sd = {**ref.state_dict(), "mask_token": torch.zeros(1, W)}  # the hub file also holds the mask token
    torch.save(sd, offline / "dinov2_vits14_pretrain.pth")
    net = build("dinov2", offline / "dinov2_vits14_pretrain.pth")
    assert net.label == "dinov2 (ViT-128w2d/14, dinov2_vits14_pretrain.pth)" and net.size == 56
    assert_matches(net, ref, frames, "dinov2: hub .pth")
    snap = save_timm_snapshot(ref, offline / "vit_small_patch14_dinov2.lvd142m")
    net = build("dinov2", snap / "pytorch_model.bin")
    assert_matches(net, ref, frames, "dinov2: timm snapshot (pytorch_model.bin)")


def test_dinov2_transformers_folder(offline, frames):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=56,
                       patch_size=14)
    ref = randomize(Dinov2Model(cfg), 6)
    ref.save_pretrained(offline / "dinov2-small")
    net = build("dinov2", offline / "dinov2-small")
    assert_matches(net, lambda x: ref(pixel_values=x).pooler_output, frames, "dinov2: transformers folder")


def test_dinov2_larger_grid_runs_at_224_like_transformers_interpolates(offline, frames):
    """Released DINOv2 has a 37x37 grid (518 px); cf runs it at 224 px, its positions resized once as
    transformers resizes them on every call."""
    from transformers import Dinov2Config, Dinov2Model

    ref = randomize(Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                                             image_size=17 * 14, patch_size=14)), 7)
    ref.save_pretrained(offline / "dinov2-grid17")
    net = build("dinov2", offline / "dinov2-grid17")
    assert net.size == 224 and "at 224px" in net.label
    assert_matches(net, lambda x: ref(pixel_values=x).pooler_output, frames, "dinov2: 17x17 grid at 224 px")


def test_dino_and_dinov2_weights_are_told_apart(offline):
    torch.save(dinov2_timm().state_dict(), offline / "v2.pth")
    with pytest.raises(CfError, match="holds DINOv2 weights .*use it with backbone 'dinov2'"):
        build("dino", offline / "v2.pth")
    torch.save(dino_timm().state_dict(), offline / "v1.pth")
    with pytest.raises(CfError, match="holds DINO weights .*use it with backbone 'dino'"):
        build("dinov2", offline / "v1.pth")


# ---------------------------------------------------------------- CLIP


def open_clip_model(quick_gelu: bool, seed=8):
    import open_clip

    return randomize(open_clip.CLIP(
        embed_dim=EMBED, quick_gelu=quick_gelu,
        vision_cfg=dict(layers=DEPTH, width=W, patch_size=8, image_size=32),
        text_cfg=dict(context_length=8, vocab_size=64, width=64, heads=1, layers=1)), seed)


def open_clip_config(quick_gelu: bool | None) -> dict:
    model_cfg = {"embed_dim": EMBED,
                 "vision_cfg": {"image_size": 32, "layers": DEPTH, "width": W, "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 64, "heads": 1, "layers": 1}}
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = quick_gelu
    return {"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}


def test_clip_bare_state_dict_needs_the_activation_setting(offline, frames):
    ref = open_clip_model(quick_gelu=False)
    (offline / "w").mkdir()
    torch.save(ref.state_dict(), offline / "w" / "open_clip_pytorch_model.bin")
    with pytest.raises(CfError, match="bench.clip_activation=quick_gelu or bench.clip_activation=gelu") as e:
        build("clip", offline / "w")
    assert "open_clip_pytorch_model.bin" in str(e.value)
    net = build("clip", offline / "w", clip_activation="gelu")
    assert net.label == "clip (ViT-128w2d/8@32, GELU, w/open_clip_pytorch_model.bin)"
    assert_matches(net, ref.encode_image, frames, "clip: bare open_clip state dict + clip_activation")
    wrong = build("clip", offline / "w", clip_activation="quick_gelu")  # the activation matters
    assert float((wrong(frames) - net(frames)).abs().max()) > 1e-3
    with pytest.raises(CfError, match="'swish' is not valid"):
        build("clip", offline / "w", clip_activation="swish")


@pytest.mark.parametrize("quick_gelu", [None, False, True])
def test_clip_open_clip_snapshot_takes_the_activation_from_its_config(offline, frames, quick_gelu):
    """A LAION-style config (no quick_gelu key) gives GELU; the folder's name says nothing."""
    from safetensors.torch import save_file

    ref = open_clip_model(quick_gelu=bool(quick_gelu))
    snap = offline / "downloads" / "b32"
    snap.mkdir(parents=True)
    save_file(ref.state_dict(), str(snap / "open_clip_model.safetensors"))
    (snap / "open_clip_config.json").write_text(json.dumps(open_clip_config(quick_gelu)))
    net = build("clip", offline / "downloads")
    assert net.activation == ("quick_gelu" if quick_gelu else "gelu")
    assert_matches(net, ref.encode_image, frames, f"clip: open_clip snapshot (quick_gelu={quick_gelu})")
    with pytest.raises(CfError, match="contradicts the files"):
        build("clip", snap, clip_activation="gelu" if quick_gelu else "quick_gelu")


def test_clip_configs_that_disagree_or_change_the_tower_are_refused(offline):
    ref = open_clip_model(quick_gelu=True)
    snap = offline / "clip"
    snap.mkdir()
    torch.save(ref.state_dict(), snap / "open_clip_pytorch_model.bin")
    (snap / "open_clip_config.json").write_text(json.dumps(open_clip_config(True)))
    transformers_cfg = {"model_type": "clip", "vision_config": {"hidden_act": "gelu"}}
    (snap / "config.json").write_text(json.dumps(transformers_cfg))
    with pytest.raises(CfError, match="configs disagree on the activation"):
        build("clip", snap)
    (snap / "config.json").unlink()
    cfg = open_clip_config(True)
    cfg["model_cfg"]["vision_cfg"]["pool_type"] = "avg"  # same tensors, another computation
    (snap / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CfError, match="sets {'pool_type': 'avg'}"):
        build("clip", snap)


def timm_clip_snapshot(offline, oc, quick_gelu: bool, tag: str) -> tuple[Path, torch.nn.Module]:
    """timm's files of open_clip model `oc` (converted by timm itself), with a hub-style config."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    arch = "vit_base_patch32_clip_quickgelu_224" if quick_gelu else "vit_base_patch32_clip_224"
    tm = timm.create_model(arch, pretrained=False, embed_dim=W, depth=DEPTH, num_heads=HEADS, img_size=32,
                           patch_size=8, num_classes=EMBED).eval()
    tm.load_state_dict(checkpoint_filter_fn(oc.state_dict(), tm))
    snap = offline / "hub" / f"models--timm--vit_base_patch32_clip_224.{tag}" / "snapshots" / "0"
    return save_timm_snapshot(tm, snap, architecture="vit_base_patch32_clip_224", tag=tag), tm


def test_clip_timm_openai_snapshot_with_both_formats(offline, frames):
    """The reported folder: timm's and open_clip's files side by side, open_clip's config silent on the
    activation, timm's tag `openai`: QuickGELU, whichever file is read."""
    oc = open_clip_model(quick_gelu=True)
    snap, tm = timm_clip_snapshot(offline, oc, quick_gelu=True, tag="openai")
    torch.save(oc.state_dict(), snap / "open_clip_pytorch_model.bin")
    (snap / "open_clip_config.json").write_text(json.dumps(open_clip_config(None)))
    net = build("clip", offline / "hub")
    assert net.layout == "open_clip" and net.activation == "quick_gelu"
    assert net.label == "clip (ViT-128w2d/8@32, QuickGELU, timm/vit_base_patch32_clip_224.openai)"
    assert_matches(net, oc.encode_image, frames, "clip: timm openai snapshot (open_clip file)")
    net = build("clip", snap / "model.safetensors")
    assert net.layout == "timm" and net.activation == "quick_gelu"
    assert_matches(net, tm, frames, "clip: timm openai snapshot (timm file)")


def test_clip_timm_laion_snapshot_is_gelu(offline, frames):
    oc = open_clip_model(quick_gelu=False)
    snap, tm = timm_clip_snapshot(offline, oc, quick_gelu=False, tag="laion2b_s34b_b79k")
    net = build("clip", snap)
    assert net.activation == "gelu" and net.layout == "timm"
    assert_matches(net, tm, frames, "clip: timm laion snapshot")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_transformers_folder(offline, frames, act):
    from transformers import CLIPConfig, CLIPModel

    ref = randomize(CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=W, intermediate_size=4 * W, num_hidden_layers=DEPTH,
                           num_attention_heads=HEADS, image_size=32, patch_size=8, hidden_act=act),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                         hidden_act=act),
        projection_dim=EMBED)), 9)
    ref.save_pretrained(offline / "clip-vit")
    net = build("clip", offline / "clip-vit")
    assert net.activation == act and net.layout == "transformers"

    def image_features(x):
        out = ref.get_image_features(pixel_values=x)
        return getattr(out, "pooler_output", out)

    assert_matches(net, image_features, frames, f"clip: transformers CLIPModel folder ({act})")


def test_clip_openai_torchscript(offline, frames):
    """OpenAI's archives are TorchScript with fp16 weights: scripted open_clip model, loaded by torch.jit."""
    ref = open_clip_model(quick_gelu=True)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())  # the reference holds what fp16 can
    torch.jit.save(torch.jit.script(copy.deepcopy(ref).half()), str(offline / "ViT-B-32.pt"))
    net = build("clip", offline / "ViT-B-32.pt")
    assert net.activation == "quick_gelu" and net.label.endswith("QuickGELU, ViT-B-32.pt)")
    assert_matches(net, ref.encode_image, frames, "clip: OpenAI TorchScript archive")
    with pytest.raises(CfError, match="TorchScript archive"):  # never through torch.load
        load_state_dict(offline / "ViT-B-32.pt")


# ---------------------------------------------------------------- finding and refusing files


def test_several_candidates_are_listed(offline):
    (offline / "w").mkdir()
    for name in ("dino_deitsmall8_pretrain.pth", "dino_vitbase16_pretrain.pth"):
        torch.save({"x": torch.ones(1)}, offline / "w" / name)
    with pytest.raises(CfError, match="2 candidate DINO ViT weights") as e:
        build("dino", offline / "w")
    assert "dino_deitsmall8_pretrain.pth" in str(e.value) and "dino_vitbase16_pretrain.pth" in str(e.value)
    for rev in ("a", "b"):  # two snapshots of one repo in the Hugging Face cache
        snap = offline / "hf" / "models--org--clip" / "snapshots" / rev
        snap.mkdir(parents=True)
        (snap / "open_clip_config.json").write_text("{}")
    with pytest.raises(CfError, match=r"(?s)2 candidate CLIP.*snapshots/a.*snapshots/b"):
        build("clip", offline / "hf")


def test_one_folder_serves_every_backbone(offline, frames):
    """bench.weights is shared by dino, dinov2, clip and LPIPS: each takes its own file from the folder."""
    folder = offline / "weights"
    folder.mkdir()
    dino, dinov2 = dino_timm(), dinov2_timm()
    torch.save(dino.state_dict(), folder / "dino_deitsmall8_pretrain.pth")
    torch.save(dinov2.state_dict(), folder / "dinov2_vits14_pretrain.pth")
    torch.save({"features.0.weight": torch.ones(1)}, folder / "alexnet-owt-7be5be79.pth")
    assert build("dino", folder).source.file.name == "dino_deitsmall8_pretrain.pth"
    assert build("dinov2", folder).source.file.name == "dinov2_vits14_pretrain.pth"
    with pytest.raises(CfError, match="needs CLIP ViT image-tower weights") as e:
        build("clip", folder)
    assert "vit_base_patch32_clip_224" in str(e.value) and "never downloads" in str(e.value)


@pytest.mark.parametrize("kind", ["text", "truncated", "safetensors_header", "pickled_object", "empty"])
def test_files_that_are_not_weights_are_named(offline, kind):
    path = offline / ("dino_vits16.safetensors" if kind == "safetensors_header" else "dino_vits16.pth")
    if kind == "text":
        path.write_text("these are my notes, not weights\n")
    elif kind == "truncated":
        torch.save(dino_timm().state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "safetensors_header":
        path.write_bytes((40).to_bytes(8, "little") + b'{"w": {"dtype": "F32", "shape": [2], "da')
    elif kind == "pickled_object":
        torch.save({"w": torch.ones(1), "when": socket.AF_INET}, path)  # an enum: weights_only refuses it
    else:
        path.write_bytes(b"")
    with pytest.raises(CfError) as e:
        build("dino", path)
    msg = str(e.value)
    assert str(path) in msg and "DINO ViT weights" in msg and "Fix:" in msg and "bench.weights=PATH" in msg
    # no torch / safetensors traceback behind it
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)
    if kind == "pickled_object":
        assert "AddressFamily" in msg and "weights_only" in msg


def test_a_folder_of_the_wrong_family_says_which_backbone_it_is_for(offline):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64,
                       image_size=16, patch_size=8)).save_pretrained(offline / "vit")
    with pytest.raises(CfError, match="transformers 'vit' model .*not CLIP.*backbone 'dino'"):
        build("clip", offline / "vit")
    (offline / "vit" / "model.safetensors").unlink()
    with pytest.raises(CfError, match="no weight file .*incomplete"):
        build("dino", offline / "vit")


# ---------------------------------------------------------------- released sizes (slow)

DINO_SIZES = [("S", 16, 384, 12), ("S", 8, 384, 12), ("B", 16, 768, 12), ("B", 8, 768, 12)]


@pytest.mark.slow
@pytest.mark.parametrize("size,patch,width,depth", DINO_SIZES)
def test_dino_released_sizes(offline, frames, size, patch, width, depth):
    from timm.models.vision_transformer import VisionTransformer

    ref = randomize(VisionTransformer(patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 64,
                                      num_classes=0), 10)
    name = f"dino_{'deitsmall' if size == 'S' else 'vitbase'}{patch}_pretrain.pth"
    torch.save(ref.state_dict(), offline / name)
    net = build("dino", offline / name)
    assert net.label == f"dino (ViT-{size}/{patch}, {name})" and net.size == 224
    assert net(frames).shape == (2, width)
    assert_matches(net, ref, frames, f"dino ViT-{size}/{patch} (released size)")


@pytest.mark.slow
@pytest.mark.parametrize("size,width,depth", [("S", 384, 12), ("B", 768, 12), ("L", 1024, 24)])
def test_dinov2_released_sizes(offline, frames, size, width, depth):
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                       image_size=518, patch_size=14)
    ref = randomize(Dinov2Model(cfg), 11)
    ref.save_pretrained(offline / f"dinov2-{size}")
    net = build("dinov2", offline / f"dinov2-{size}")
    assert net.label.startswith(f"dinov2 (ViT-{size}/14 at 224px") and net(frames).shape == (2, width)
    assert_matches(net, lambda x: ref(pixel_values=x).pooler_output, frames, f"dinov2 ViT-{size}/14")


@pytest.mark.slow
@pytest.mark.parametrize("size,patch,width,depth,embed", [("B", 32, 768, 12, 512), ("B", 16, 768, 12, 512),
                                                          ("L", 14, 1024, 24, 768)])
def test_clip_released_sizes(offline, frames, size, patch, width, depth, embed):
    from open_clip.transformer import QuickGELU, VisionTransformer

    tower = randomize(VisionTransformer(image_size=224, patch_size=patch, width=width, layers=depth,
                                        heads=width // 64, mlp_ratio=4.0, output_dim=embed,
                                        act_layer=QuickGELU), 12)
    name = f"ViT-{size}-{patch}.bin"
    torch.save({f"visual.{k}": v for k, v in tower.state_dict().items()}, offline / name)
    net = build("clip", offline / name, clip_activation="quick_gelu")
    assert net.label == f"clip (ViT-{size}/{patch}, QuickGELU, {name})" and net(frames).shape == (2, embed)
    assert_matches(net, tower, frames, f"clip ViT-{size}/{patch}")
