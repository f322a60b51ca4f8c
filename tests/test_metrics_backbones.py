"""Backbones and LPIPS: real offline weights work, missing weights fail clearly, nothing downloads."""


import pytest
import torch

from cf.errors import CfError
from cf.metrics.backbones import BACKBONES, get_backbone, resize_square
from cf.metrics.lpips_net import lpips_or_reason
from cf.metrics.weights import MissingWeightsError, WeightSpec, find_weights, load_into, load_state_dict


def test_registry_names():
    assert BACKBONES.names() == ["clip", "dino", "dinov2", "imagenet", "pixels", "random"]
    assert get_backbone("random").label == "random (test only)"
    assert "dino" not in get_backbone("random").label.lower() and "clip" not in get_backbone("random").label


def test_pixel_and_random_backbones_shapes_and_caching():
    pix = get_backbone("pixels")
    x = torch.rand(3, 3, 16, 24) * 2 - 1
    assert pix(x).shape == (3, 3 * 32 * 32) and get_backbone("pixels") is pix
    same = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(pix(same)[0], same.flatten())  # 32x32 frames pass through untouched
    rnd = get_backbone("random")
    assert rnd(x).shape == (3, 512) and not rnd.training
    assert torch.equal(rnd(x), rnd(x))
    with pytest.raises(CfError, match=r"\[N, 3, H, W\]"):
        pix(torch.rand(3, 16, 16))


def test_resize_square_keeps_the_centre():
    x = torch.arange(2 * 4, dtype=torch.float32).view(1, 1, 2, 4).expand(1, 3, 2, 4)
    y = resize_square(x, 2)
    assert y.shape == (1, 3, 2, 2) and torch.equal(y[0, 0], x[0, 0, :, 1:3])


def test_imagenet_backbone_recognises_photos():
    skimage_data = pytest.importorskip("skimage.data")
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]  # class names, no download
    net = get_backbone("imagenet")
    frames = [torch.from_numpy(img()).permute(2, 0, 1).float() / 127.5 - 1
              for img in (skimage_data.chelsea, skimage_data.coffee)]
    top = [categories[int(net.logits(f[None]).argmax())] for f in frames]
    assert top == ["Egyptian cat", "espresso"]
    assert net(frames[0][None]).shape == (1, 1280)


@pytest.mark.parametrize("name,needs", [("dino", "dino_vitbase16_pretrain.pth"),
                                         ("dinov2", "dinov2_vitb14_pretrain.pth"),
                                         ("clip", "vit_base_patch32_clip_224")])
def test_missing_weights_say_what_file_and_how_to_pass_it(offline, name, needs):
    with pytest.raises(MissingWeightsError) as e:
        get_backbone(name)
    msg = str(e.value)
    assert f"backbone {name!r}" in msg and needs in msg
    assert "--weights PATH" in msg and "bench.weights=PATH" in msg and "never downloads" in msg
    with pytest.raises(MissingWeightsError, match="does not exist"):
        get_backbone(name, str(offline / "nowhere"))
    (offline / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="not found in .*empty"):
        get_backbone(name, str(offline / "empty"))


def test_weight_search_finds_files_in_folders_and_hf_snapshots(offline):
    spec = WeightSpec("test weights", files=("exact.pth",), prefixes=("alexnet-",), hf_dirs=("org--model",))
    snap = offline / "hub" / "models--org--model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    found = find_weights(spec, str(offline / "hub"), who="t", for_backbone=False, option="--weights")
    assert found == (snap / "model.safetensors").resolve()
    (offline / "hub" / "alexnet-owt-1234.pth").write_bytes(b"x")
    other = offline / "dino_weights.pth"
    other.write_bytes(b"x")
    # a file given for another consumer: its folder is searched instead
    found = find_weights(spec, str(other), who="t", for_backbone=False, option="-w")
    assert found.name == "alexnet-owt-1234.pth"
    assert find_weights(spec, str(other), who="t", for_backbone=True, option="-w") == other.resolve()
    hub = offline / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "exact.pth").write_bytes(b"x")
    assert find_weights(spec, None, who="t", for_backbone=False, option="-w") == (hub / "exact.pth").resolve()


def test_state_dict_loading_unwraps_and_reports_wrong_files(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    sd = load_state_dict(path)
    assert set(sd) == set(net.state_dict())
    other = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    load_into(other, sd, path, "a test net")
    assert torch.equal(other[0].weight, net[0].weight)
    with pytest.raises(CfError, match="does not hold a bigger net: 2 weights missing"):
        load_into(torch.nn.Sequential(*other, torch.nn.Linear(1, 1)), sd, path, "a bigger net")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CfError, match="cannot load weights from .*junk.pth"):
        load_state_dict(tmp_path / "junk.pth")


def test_a_wrong_dino_file_is_named(offline):
    folder = offline / "w"
    folder.mkdir()
    torch.save({"blocks.0.norm1.weight": torch.ones(3)}, folder / "dino_vitbase16_pretrain.pth")
    with pytest.raises(CfError, match="dino_vitbase16_pretrain.pth' does not hold DINO ViT weights"):
        get_backbone("dino", str(folder))


def test_lpips_needs_a_trunk_file_and_loads_one(offline):
    net, why = lpips_or_reason(None)
    assert net is None and "LPIPS unavailable" in why and "alexnet-owt-7be5be79.pth" in why
    assert "--weights PATH" in why
    import torchvision

    features = {k: v for k, v in torchvision.models.alexnet(weights=None).state_dict().items()
                if k.startswith("features.")}
    folder = offline / "weights"
    folder.mkdir()
    torch.save(features, folder / "alexnet-owt-7be5be79.pth")
    net, why = lpips_or_reason(str(folder))
    assert why is None and net.label == "lpips (alex, alexnet-owt-7be5be79.pth)"
    assert torch.equal(net.model.net.slice1[0].weight, features["features.0.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x, x).tolist() == [0.0, 0.0] and (net(x, -x) > 0).all()
    torch.save({"features.0.weight": features["features.0.weight"]}, folder / "alexnet-owt-7be5be79.pth")
    with pytest.raises(CfError, match="not a torchvision AlexNet/VGG16 state dict"):
        lpips_or_reason(str(folder))


@pytest.mark.slow
def test_dino_and_clip_load_local_weights_round_trip(offline):
    """Random weights saved in the real formats load back into the real architectures (~1 GB of I/O)."""
    import open_clip
    import timm

    x = torch.rand(2, 3, 40, 40) * 2 - 1
    vit = timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0).eval()
    torch.save(vit.state_dict(), offline / "dino_vitbase16_pretrain.pth")
    dino = BACKBONES.get("dino")(str(offline))
    assert dino.label == "dino (ViT-B/16, dino_vitbase16_pretrain.pth)"
    with torch.no_grad():
        assert torch.allclose(dino(x), vit(dino.preprocess(x)), atol=1e-5)
    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    snap = offline / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "0"
    snap.mkdir(parents=True)
    torch.save(clip.state_dict(), snap / "open_clip_pytorch_model.bin")
    # a bare state dict: the folder's name is no config, so the activation must be set
    with pytest.raises(CfError, match="bench.clip_activation"):
        BACKBONES.get("clip")(str(offline))
    ours = BACKBONES.get("clip")(str(offline), clip_activation="quick_gelu")
    assert ours.label == "clip (ViT-B/32, QuickGELU, timm/vit_base_patch32_clip_224.openai)"
    with torch.no_grad():
        assert torch.allclose(ours(x), clip.encode_image(ours.preprocess(x)), atol=1e-5)
