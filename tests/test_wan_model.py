"""Wan2.1 in cf's network: a converted tiny random WanTransformer3DModel computes diffusers' function, from
every layout the readers accept (diffusers folder, original naming, Self-Forcing's generator dicts, peft
LoRA), and a mismatched file is refused naming the file, its first mismatched tensors and the fix."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip(
    "diffusers",
    reason="the wan extra is not installed (pip install -e .[wan]): "
    "diffusers builds the reference Wan transformer",
)

from cf.errors import CfError  # noqa: E402
from cf.model import Cond, block_causal_mask  # noqa: E402
from cf.wan import read_wan  # noqa: E402
from cf.wan.convert import WanConfig, naming  # noqa: E402
from cf.wan.tiny import TINY_TRANSFORMER, tiny_transformer  # noqa: E402

B, F, H, W, L = 2, 4, 8, 6, 5  # batch, latent frames, latent height/width, real text tokens
TEXT_LEN = 512


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def ref():
    return tiny_transformer(seed=0)


@pytest.fixture(scope="module")
def diffusers_dir(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("wan") / "transformer"
    ref.save_pretrained(str(d))
    return d


def inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, 4, H, W, generator=g, dtype=dtype)
    t = torch.rand(B, F, generator=g, dtype=dtype) * 1000
    text = torch.randn(B, L, TINY_TRANSFORMER["text_dim"], generator=g, dtype=dtype)
    return x, t, text


class _Masked:
    """A diffusers attention processor that adds a mask to self-attention (diffusers' Wan has none)."""

    def __init__(self, inner, mask):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is None:
            attention_mask = self.mask
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def diffusers_forward(model, x, t, text, frame_mask=None):
    n = (H // 2) * (W // 2)
    padded = torch.nn.functional.pad(text, (0, 0, 0, TEXT_LEN - text.shape[1]))
    procs = {}
    if frame_mask is not None:
        tok = frame_mask.repeat_interleave(n, 0).repeat_interleave(n, 1)
        for blk in model.blocks:
            procs[blk.attn1] = blk.attn1.processor
            blk.attn1.processor = _Masked(blk.attn1.processor, tok)
    try:
        with torch.no_grad():
            out = model(x.permute(0, 2, 1, 3, 4), t.repeat_interleave(n, dim=1), padded, return_dict=False)[0]
    finally:
        for attn, p in procs.items():
            attn.processor = p
    return out.permute(0, 2, 1, 3, 4)


def cf_forward(model, x, t, text, frame_mask=None):
    with torch.no_grad():
        return model(x, t, Cond(text=text), time_pos=torch.arange(F), frame_mask=frame_mask).pred


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "block_causal"])
def test_converted_forward_equals_diffusers(ref, diffusers_dir, causal):
    model = read_wan(diffusers_dir).build(height=H, width=W, frames_per_chunk=2)
    x, t, text = inputs()
    mask = block_causal_mask(F, 2) if causal else None
    want, got = diffusers_forward(ref, x, t, text, mask), cf_forward(model, x, t, text, mask)
    assert want.abs().mean() > 0.1
    assert (got - want).abs().max() <= 1e-5


def test_config_is_read_from_the_files(diffusers_dir):
    w = read_wan(diffusers_dir)
    assert (w.config.dim, w.config.heads, w.config.layers, w.config.freq_dim, w.config.text_dim) == (
        32,
        2,
        2,
        24,
        32,
    )
    assert w.config.in_channels == 4 and w.config.patch == (1, 2, 2)
    model = w.build(height=H, width=W)
    assert model.cfg.qk_norm_across_heads and not model.cfg.null_token and model.null_token is None
    assert model.blocks[0].attn.norm_q.weight.shape == (32,)  # across heads: weight [dim]
    assert model.time_embed[0].in_features == 24  # model.freq_dim


def to_original(state: dict) -> dict:
    """diffusers names -> Wan's own (the inverse table, written independently of cf.wan.convert)."""
    top = {
        "condition_embedder.text_embedder.linear_1": "text_embedding.0",
        "condition_embedder.text_embedder.linear_2": "text_embedding.2",
        "condition_embedder.time_embedder.linear_1": "time_embedding.0",
        "condition_embedder.time_embedder.linear_2": "time_embedding.2",
        "condition_embedder.time_proj": "time_projection.1",
        "proj_out": "head.head",
        "scale_shift_table": "head.modulation",
    }
    blk = {
        "attn1.to_q": "self_attn.q",
        "attn1.to_k": "self_attn.k",
        "attn1.to_v": "self_attn.v",
        "attn1.to_out.0": "self_attn.o",
        "attn1.norm_q": "self_attn.norm_q",
        "attn1.norm_k": "self_attn.norm_k",
        "attn2.to_q": "cross_attn.q",
        "attn2.to_k": "cross_attn.k",
        "attn2.to_v": "cross_attn.v",
        "attn2.to_out.0": "cross_attn.o",
        "attn2.norm_q": "cross_attn.norm_q",
        "attn2.norm_k": "cross_attn.norm_k",
        "norm2": "norm3",
        "ffn.net.0.proj": "ffn.0",
        "ffn.net.2": "ffn.2",
        "scale_shift_table": "modulation",
    }
    out = {}
    for k, v in state.items():
        name = k
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            for a, b in blk.items():
                if rest.startswith(a + ".") or rest == a:
                    name = f"blocks.{i}.{b}{rest[len(a) :]}"
                    break
        else:
            for a, b in top.items():
                if k.startswith(a + ".") or k == a:
                    name = b + k[len(a) :]
                    break
        out[name] = v.clone()
    return out


def test_self_forcing_generator_dict_loads_equal(ref, diffusers_dir, tmp_path):
    """Self-Forcing / Context Forcing layout: {'generator': ..., 'generator_ema': ...} in Wan's own names
    under the wrapper's `model.` prefix; the EMA is the one read."""
    orig = to_original(ref.state_dict())
    assert naming(orig) == "original"
    noise = {k: v + 1.0 for k, v in orig.items()}  # a different 'generator': must not be the one read
    path = tmp_path / "self_forcing.pt"
    torch.save(
        {
            "generator": {f"model.{k}": v for k, v in noise.items()},
            "generator_ema": {f"model._orig_mod.{k}": v for k, v in orig.items()},
        },
        path,
    )
    x, t, text = inputs(1)
    want = cf_forward(read_wan(diffusers_dir).build(height=H, width=W), x, t, text)
    # with the base folder's config, and alone (architecture from the shapes, heads given)
    for model in (
        read_wan(diffusers_dir, ckpt=path).build(height=H, width=W),
        read_wan(ckpt=path, heads=2).build(height=H, width=W),
    ):
        assert (cf_forward(model, x, t, text) - want).abs().max() == 0


def test_original_release_folder_loads_equal(ref, diffusers_dir, tmp_path):
    """Wan's own release: a WanModel config.json and safetensors in the original naming."""
    from safetensors.torch import save_file

    c = TINY_TRANSFORMER
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "WanModel",
                "model_type": "t2v",
                "dim": 32,
                "num_heads": 2,
                "ffn_dim": c["ffn_dim"],
                "freq_dim": c["freq_dim"],
                "in_dim": 4,
                "out_dim": 4,
                "num_layers": 2,
                "text_len": 512,
                "text_dim": c["text_dim"],
                "eps": 1e-6,
            }
        )
    )
    save_file(to_original(ref.state_dict()), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    x, t, text = inputs(2)
    want = diffusers_forward(ref, x, t, text)
    got = cf_forward(read_wan(tmp_path).build(height=H, width=W), x, t, text)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", ["peft_folder", "original_names_bare_file"])
def test_peft_lora_merged_at_load_equals_peft_merged(ref, diffusers_dir, tmp_path, layout):
    """peft's adapter folder (alpha_pattern honoured) on a diffusers base; and LongLive's way: a bare file of
    lora tensors in Wan's own naming under wrapper prefixes, on a Self-Forcing-style generator dict, with
    lora_alpha from the training config."""
    peft = pytest.importorskip("peft", reason="peft is in the wan extra")
    from safetensors.torch import load_file

    base = tiny_transformer(seed=0)
    pattern = {"ffn.net.0.proj": 2} if layout == "peft_folder" else {}
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        alpha_pattern=pattern,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj"],
    )
    lora = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # lora_B starts at 0: give it a value
    lora.save_pretrained(str(tmp_path / "adapter"))
    merged = lora.merge_and_unload()
    x, t, text = inputs(3)
    want = diffusers_forward(merged, x, t, text)
    assert (want - diffusers_forward(ref, x, t, text)).abs().max() > 1e-2  # the adapter changes the output
    if layout == "peft_folder":
        w = read_wan(diffusers_dir, lora=tmp_path / "adapter")
    else:
        tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
        plain = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
        (tmp_path / "run").mkdir()
        torch.save(
            {"generator_lora": {f"base_model.model.model.{k}": v for k, v in to_original(plain).items()}},
            tmp_path / "run" / "lora.pt",
        )
        torch.save(
            {"generator_ema": {f"model.{k}": v for k, v in to_original(ref.state_dict()).items()}},
            tmp_path / "run" / "base.pt",
        )
        w = read_wan(
            diffusers_dir, ckpt=tmp_path / "run" / "base.pt", lora=tmp_path / "run" / "lora.pt", lora_alpha=8
        )
    got = cf_forward(w.build(height=H, width=W), x, t, text)
    assert (got - want).abs().max() <= 1e-5


def test_a_mismatched_file_is_refused_naming_file_tensors_and_fix(ref, diffusers_dir, tmp_path):
    big = tiny_transformer(seed=1, ffn_dim=96)
    path = tmp_path / "other.pt"
    torch.save({"generator_ema": big.state_dict()}, path)
    with pytest.raises(CfError) as e:
        read_wan(diffusers_dir, ckpt=path).build(height=H, width=W)
    msg = str(e.value)
    assert str(path) in msg and "blocks.0.ffn.0.weight (96, 32) (expected (64, 32))" in msg
    assert "--weights DIR" in msg  # the fix
    # not a Wan checkpoint at all
    torch.save({"generator": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(CfError, match="foreign.pt is not a Wan transformer checkpoint"):
        read_wan(ckpt=tmp_path / "foreign.pt")
    # a pickle that is more than tensors is never executed
    torch.save({"generator": {"x": object()}}, tmp_path / "code.pt")
    with pytest.raises(CfError, match="weights_only=True"):
        read_wan(ckpt=tmp_path / "code.pt")
    with pytest.raises(CfError, match="image-conditioned"):
        WanConfig.from_json({"num_attention_heads": 2, "attention_head_dim": 16, "image_dim": 1280})


def test_native_defaults_are_unchanged():
    """The new model.* keys default to the native network: per-head q/k norms, a null token, the
    sinusoid as wide as the model, no text padding, no fp32 islands."""
    from cf.config import load_config
    from cf.model import CausalVideoDiT

    cfg = load_config("smoke")
    m = cfg.model
    assert (m.qk_norm_across_heads, m.freq_dim, m.null_token, m.text_pad_tokens, m.fp32_modulation) == (
        False,
        None,
        True,
        0,
        False,
    )
    model = CausalVideoDiT(m, cfg.data)
    assert model.null_token is not None and model.time_embed[0].in_features == m.dim
    assert model.blocks[0].attn.norm_q.weight.shape == (m.dim // m.heads,)


def test_sharded_diffusers_folder_and_pipeline_root(ref, tmp_path):
    """Shards listed by *.safetensors.index.json; a pipeline root is read through its transformer/ folder."""
    ref.save_pretrained(str(tmp_path / "transformer"), max_shard_size="20KB")
    assert list((tmp_path / "transformer").glob("*.index.json"))
    x, t, text = inputs(4)
    want = diffusers_forward(ref, x, t, text)
    assert (cf_forward(read_wan(tmp_path).build(height=H, width=W), x, t, text) - want).abs().max() <= 1e-5
    shard = sorted((tmp_path / "transformer").glob("*-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CfError, match="lists shards that are not in"):
        read_wan(tmp_path)
