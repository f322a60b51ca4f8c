"""Tiny random Wan parts saved in their real layouts: what the tests, the benchmark's `--tiny` run and the
docs' offline example use instead of downloads (nothing here reaches a network).

    save_tiny_pipeline(DIR)    DIR/transformer (diffusers), DIR/text_encoder (UMT5), DIR/tokenizer, DIR/vae

Needs the `wan` extra (diffusers, transformers, tokenizers).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# 2 layers, 2 heads of 16, 4 channels: the tiny transformer
TINY_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=24,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
TINY_UMT5 = dict(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
TINY_VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[True, True],
    dropout=0.0,
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.8, 1.2, 1.0],
)  # 4x spatial, 4x temporal (Wan's: 8x, 4x)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter (norm weights of 1, zero biases) so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def tiny_transformer(seed: int = 0, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return randomize(WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}), seed).eval()


def save_tiny_tokenizer(folder: Path) -> None:
    """A word-level tokenizer built offline (no sentencepiece model to download), saved as tokenizer.json
    with UMT5's special tokens (pad 0, eos 1, unk 2). AutoTokenizer loads it like Wan's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = (
        "a the red blue green house sea by car road tree sky city night day dog cat walks runs on in "
        "of and with under over big small bright dark low quality blurry"
    ).split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(str(folder))


def save_tiny_pipeline(root: str | Path, seed: int = 0) -> Path:
    """A Wan2.1-T2V-Diffusers-shaped folder of tiny random parts: transformer/, text_encoder/, tokenizer/,
    vae/. Returns root."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    root = Path(root)
    tiny_transformer(seed).save_pretrained(str(root / "transformer"))
    torch.manual_seed(seed)
    enc = UMT5EncoderModel(UMT5Config(**TINY_UMT5))
    randomize(enc, seed, 0.02).eval().save_pretrained(str(root / "text_encoder"))
    save_tiny_tokenizer(root / "tokenizer")
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**TINY_VAE)
    vae.save_pretrained(str(root / "vae"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "_note": "tiny random"}))
    return root
