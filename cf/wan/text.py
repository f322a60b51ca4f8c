"""UMT5 prompts, as Wan encodes them: tokens padded to 512, the encoder run with its mask, each row's
features cut to its real tokens (the rest zero: the DiT pads them to model.text_pad_tokens and attends all).

    enc = UMT5Text.from_folder(DIR)            # DIR/text_encoder + DIR/tokenizer (diffusers' Wan pipeline),
                                               # or Wan's models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl
    feats = enc(["a red fox in the snow"])     # [B, L, 4096], zero past each row's tokens

Any callable prompts -> [B, L, text_dim] features plugs in the same place (`generate(..., text=...)`),
so a tokenizer that cannot be built offline never blocks a run. Needs transformers (the `wan` extra).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch
from torch import Tensor

from cf.errors import CfError

MAX_TOKENS = 512


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning without ftfy: HTML entities decoded, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class UMT5Text:
    def __init__(self, tokenizer, encoder, max_tokens: int = MAX_TOKENS):
        self.tokenizer, self.encoder, self.max_tokens = tokenizer, encoder, max_tokens

    @classmethod
    def from_folder(
        cls, weights: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> UMT5Text:
        """From a Wan folder, offline: diffusers' (text_encoder/ and tokenizer/) or Wan's own release
        (`models_t5_umt5-xxl-enc-bf16.pth` and the tokenizer in google/umt5-xxl/, cf.wan.pth)."""
        try:
            from transformers import AutoTokenizer, UMT5EncoderModel
        except ImportError as e:
            raise CfError(f"the UMT5 text encoder needs transformers ({e}); pip install -e .[wan]") from None
        from cf.wan.pth import T5_FILE, T5_TOKENIZER, load_umt5_pth

        root = Path(weights)
        enc_dir, pth = root / "text_encoder", root / T5_FILE
        tok_dir = root / "tokenizer"
        if not enc_dir.is_dir() and pth.is_file():  # Wan's own layout
            tok_dir = tok_dir if tok_dir.is_dir() else root / T5_TOKENIZER
        elif not enc_dir.is_dir():
            raise CfError(
                f"{root} holds no UMT5 text encoder: --weights must hold text_encoder/ (diffusers' layout, "
                f"Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or {T5_FILE} (Wan's own release); see docs/wan.md"
            )
        if not tok_dir.is_dir():
            raise CfError(
                f"{tok_dir} does not exist: --weights must hold the UMT5 tokenizer (tokenizer.json or "
                f"spiece.model) in tokenizer/ (diffusers) or {T5_TOKENIZER}/ (Wan's release); see docs/wan.md"
            )
        tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        if enc_dir.is_dir():
            enc = UMT5EncoderModel.from_pretrained(str(enc_dir), local_files_only=True, torch_dtype=dtype)
        else:
            enc = load_umt5_pth(pth, dtype=dtype)
        return cls(tok, enc.to(device).eval())

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        """Prompts -> features [B, L, D] (L the longest prompt's tokens; zero past each row's own)."""
        device = next(self.encoder.parameters()).device
        t = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            max_length=self.max_tokens,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = t.input_ids.to(device), t.attention_mask.to(device)
        feats = self.encoder(ids, mask).last_hidden_state
        lens = mask.gt(0).sum(dim=1)
        n = int(lens.max())
        keep = torch.arange(n, device=device)[None, :] < lens[:, None]
        return feats[:, :n] * keep[..., None].to(feats.dtype)
