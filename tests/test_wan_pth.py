"""Wan's own text-encoder and VAE files (`models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth`) load equal
to the diffusers folders. Tiny random models are built from transformers' / diffusers' classes, saved as
diffusers folders, and their state dicts renamed here to Wan2.1's original layout, written out from Wan's own
modules (github.com/Wan-Video/Wan2.1, wan/modules/t5.py: T5Encoder / T5SelfAttention / T5FeedForward /
T5RelativeEmbedding; wan/modules/vae.py: WanVAE_ / Encoder3d / Decoder3d / ResidualBlock / AttentionBlock /
Resample) independently of cf's reader, and saved with torch.save as the release does."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("diffusers", reason="the wan extra is not installed (pip install -e .[wan])")
pytest.importorskip("transformers", reason="the wan extra is not installed (pip install -e .[wan])")

from cf.errors import CfError  # noqa: E402
from cf.wan.pth import T5_FILE, T5_TOKENIZER, VAE_FILE  # noqa: E402
from cf.wan.tiny import TINY_UMT5, randomize, save_tiny_tokenizer  # noqa: E402

# Wan's T5RelativeEmbedding has max_dist=128 fixed, so the tiny encoder uses it too
T5 = {**TINY_UMT5, "relative_attention_max_distance": 128}
# Wan2.1's VAE shape (16 latent channels, no temporal downsampling in the first stage), made tiny
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
           temperal_downsample=[False, True], dropout=0.0)


def wan_t5_names(hf: dict) -> dict:
    """transformers UMT5EncoderModel -> Wan's T5Encoder state dict (umt5: one position table per block)."""
    block = {
        "layer.0.layer_norm.weight": "norm1.weight",
        "layer.0.SelfAttention.q.weight": "attn.q.weight",
        "layer.0.SelfAttention.k.weight": "attn.k.weight",
        "layer.0.SelfAttention.v.weight": "attn.v.weight",
        "layer.0.SelfAttention.o.weight": "attn.o.weight",
        "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
        "layer.1.layer_norm.weight": "norm2.weight",
        "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",  # gate = Sequential(Linear, GELU)
        "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",  # fc1(x) * gate(x)
        "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
    }
    out = {}
    for k, v in hf.items():
        if k == "shared.weight":
            out["token_embedding.weight"] = v
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        elif m := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", k):
            out[f"blocks.{m[1]}.{block[m[2]]}"] = v
        else:
            assert k == "encoder.embed_tokens.weight", k  # tied to shared
    return out


def wan_vae_names(sd: dict, num_res_blocks: int, stages: int) -> dict:
    """diffusers AutoencoderKLWan -> Wan's WanVAE_ state dict. Wan's encoder and decoder hold their stages as
    flat Sequentials (downsamples: per stage num_res_blocks ResidualBlocks then a Resample; upsamples: per
    stage num_res_blocks + 1 ResidualBlocks then a Resample, none after the last); a ResidualBlock is
    residual = [RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d] + shortcut."""
    res = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight",
           "conv1.bias": "residual.2.bias", "norm2.gamma": "residual.3.gamma",
           "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
           "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
    per_up = num_res_blocks + 2
    out = {}
    for k, v in sd.items():
        if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d)\.(.+)", k):
            idx = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{m[2]}.{m[3]}"]
            name = f"{m[1]}.middle.{idx}.{res.get(m[4], m[4])}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", k):
            name = f"encoder.downsamples.{m[1]}.{res.get(m[2], m[2])}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k):
            name = f"decoder.upsamples.{int(m[1]) * per_up + int(m[2])}.{res[m[3]]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k):
            assert int(m[1]) < stages - 1
            name = f"decoder.upsamples.{int(m[1]) * per_up + num_res_blocks + 1}.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(.+)", k):
            name = f"{m[1]}.{ {'conv_in': 'conv1', 'norm_out': 'head.0', 'conv_out': 'head.2'}[m[2]] }.{m[3]}"
        elif m := re.fullmatch(r"(quant_conv|post_quant_conv)\.(.+)", k):
            name = f"{ {'quant_conv': 'conv1', 'post_quant_conv': 'conv2'}[m[1]] }.{m[2]}"
        else:
            raise AssertionError(k)
        out[name] = v
    return out


@pytest.fixture(scope="module")
def t5_layouts(tmp_path_factory):
    """(diffusers root: text_encoder/ + tokenizer/, Wan root: the .pth + google/umt5-xxl/)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    enc = randomize(UMT5EncoderModel(UMT5Config(**T5)), 0, 0.05).eval()
    diff, wan = tmp_path_factory.mktemp("t5_diffusers"), tmp_path_factory.mktemp("t5_wan")
    enc.save_pretrained(str(diff / "text_encoder"))
    save_tiny_tokenizer(diff / "tokenizer")
    torch.save(wan_t5_names(enc.state_dict()), wan / T5_FILE)
    save_tiny_tokenizer(wan / T5_TOKENIZER)
    return diff, wan


def test_wan_t5_pth_loads_equal_to_the_diffusers_text_encoder(t5_layouts):
    from cf.wan.text import UMT5Text

    diff, wan = t5_layouts
    a, b = UMT5Text.from_folder(diff), UMT5Text.from_folder(wan)
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.encoder.config.to_diff_dict() == b.encoder.config.to_diff_dict() or all(
        getattr(a.encoder.config, k) == getattr(b.encoder.config, k)
        for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                  "relative_attention_num_buckets", "relative_attention_max_distance", "is_gated_act",
                  "dense_act_fn", "layer_norm_epsilon"))
    prompts = ["a red house by the sea", "a dog walks on the road at night"]
    fa, fb = a(prompts), b(prompts)
    assert fa.shape == fb.shape and torch.equal(fa, fb) and fa.abs().max() > 0


def test_a_bf16_t5_pth_is_read_too(t5_layouts, tmp_path):
    """The release file is bf16: read as it is and cast to the dtype asked for."""
    from cf.wan.pth import load_umt5_pth

    _, wan = t5_layouts
    state = torch.load(wan / T5_FILE, weights_only=True)
    torch.save({k: v.bfloat16() for k, v in state.items()}, tmp_path / T5_FILE)
    enc = load_umt5_pth(tmp_path / T5_FILE, dtype=torch.float32)
    got = enc.state_dict()["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"]
    assert got.dtype == torch.float32
    assert torch.equal(got, state["blocks.1.ffn.gate.0.weight"].bfloat16().float())


@pytest.fixture(scope="module")
def vae_layouts(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = randomize(AutoencoderKLWan(**VAE), 0, 0.05).eval()
    diff, wan = tmp_path_factory.mktemp("vae_diffusers"), tmp_path_factory.mktemp("vae_wan")
    vae.save_pretrained(str(diff / "vae"))
    torch.save(wan_vae_names(vae.state_dict(), VAE["num_res_blocks"], len(VAE["dim_mult"])), wan / VAE_FILE)
    return diff, wan


def test_wan_vae_pth_loads_equal_to_the_diffusers_vae(vae_layouts):
    from cf.wan.vae import load_vae

    diff, wan = vae_layouts
    a, b = load_vae(diff), load_vae(wan)
    for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
                "latents_mean", "latents_std"):
        assert list(a.config[key]) == list(b.config[key]) if isinstance(a.config[key], list) else (
            a.config[key] == b.config[key]), key
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        za, zb = a.encode(x).latent_dist.mode(), b.encode(x).latent_dist.mode()
        assert torch.equal(za, zb) and za.shape == (1, 16, 3, 4, 4)  # 5 frames, temporal 2x
        assert torch.equal(a.decode(za).sample, b.decode(zb).sample)
    assert torch.equal(load_vae(wan / VAE_FILE).decoder.conv_out.weight, a.decoder.conv_out.weight)


def test_the_layout_matches_wans_module_tree(vae_layouts):
    """The renamed file holds exactly the tensors Wan's WanVAE_ has for this config, by name and shape."""
    _, wan = vae_layouts
    state = torch.load(wan / VAE_FILE, weights_only=True)
    b, z = VAE["base_dim"], VAE["z_dim"]
    assert state["encoder.conv1.weight"].shape == (b, 3, 3, 3, 3)
    assert state["conv1.weight"].shape == (2 * z, 2 * z, 1, 1, 1)  # the quant conv, on mean and log-variance
    assert state["conv2.weight"].shape == (z, z, 1, 1, 1)
    # encoder stages: 1 residual block + a resample each; the second resample is temporal (time_conv)
    assert "encoder.downsamples.1.resample.1.weight" in state
    assert "encoder.downsamples.1.time_conv.weight" not in state
    assert "encoder.downsamples.3.time_conv.weight" in state
    assert state["encoder.downsamples.2.shortcut.weight"].shape[:2] == (2 * b, b)
    # decoder stages: 2 residual blocks + a resample each (none after the last); upsample3d first (reversed)
    assert "decoder.upsamples.2.time_conv.weight" in state
    assert "decoder.upsamples.5.resample.1.weight" in state
    assert "decoder.upsamples.5.time_conv.weight" not in state
    assert "decoder.upsamples.7.residual.6.weight" in state and not any(k.startswith("decoder.upsamples.8.")
                                                                         for k in state)
    assert state["decoder.middle.1.to_qkv.weight"].shape == (6 * b, 2 * b, 1, 1)
    assert state["encoder.head.0.gamma"].shape == (2 * b, 1, 1, 1)


def test_what_is_not_wans_layout_is_refused_naming_the_file(vae_layouts, t5_layouts, tmp_path):
    from cf.wan.pth import load_umt5_pth, load_vae_pth

    _, wan_vae = vae_layouts
    state = torch.load(wan_vae / VAE_FILE, weights_only=True)
    torch.save({**state, "decoder.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CfError, match=r"extra\.pth: unexpected tensor decoder\.extra\.weight"):
        load_vae_pth(tmp_path / "extra.pth")
    torch.save(dict(list(state.items())[:5]), tmp_path / "cut.pth")
    with pytest.raises(CfError, match=r"cut\.pth is not a Wan VAE in Wan's own layout"):
        load_vae_pth(tmp_path / "cut.pth")
    torch.save(state, tmp_path / "vae.pth")
    vae = load_vae_pth(tmp_path / "vae.pth", latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    assert list(vae.config.latents_std) == [1.0] * 16
    with pytest.raises(CfError, match=r"not a UMT5 text encoder"):
        load_umt5_pth(tmp_path / "vae.pth")
    torch.save({"a": {"b": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(CfError, match=r"not a state dict of tensors"):
        load_umt5_pth(tmp_path / "nested.pth")
