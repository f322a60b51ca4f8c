"""Conditioning handed to the model: text features, per-frame camera, classifier-free-guidance mask."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Cond:
    """What a sample is conditioned on. Any field may be None (absent).

    text:      [B, L, Dt] text features (from `CausalVideoDiT.encode_text`)
    text_mask: [B, L] bool, True for real tokens
    camera:    [B, F, 2] (x, y) of each frame's top-left corner in panorama pixels; F covers the
               frames of the call (a rollout slices it per chunk with `frames`)
    null:      [B] bool, True drops text and the camera embedding (classifier-free guidance).
               World positions stay: they say where a token is, they are not a control.
    null_text: [B, L', Dt] text features of the unconditional branch (a negative prompt, Wan's), with
               null_text_mask [B, L'] (None: all attended). When set, `with_null` puts them in the null
               half; a model without a null token (model.null_token=false) attends them as they are.
    """

    text: Tensor | None = None
    text_mask: Tensor | None = None
    camera: Tensor | None = None
    null: Tensor | None = None
    null_text: Tensor | None = None
    null_text_mask: Tensor | None = None

    def frames(self, start: int, stop: int) -> Cond:
        """The same conditioning for frames [start, stop) (only the camera is per frame)."""
        return replace(self, camera=None if self.camera is None else self.camera[:, start:stop])

    def with_null(self, batch_size: int) -> Cond:
        """[cond ; null cond] along the batch: one model call evaluates both halves of guidance."""
        null = self.null
        if null is None:
            null = torch.zeros(batch_size, dtype=torch.bool, device=self.device())
        if self.null_text is not None:  # the unconditional branch has a text of its own (Wan)
            text, mask = _pair(self.text, self.null_text), _pair_masks(self, self.null_text)
        else:
            text, mask = _twice(self.text), _twice(self.text_mask)
        return Cond(
            text=text,
            text_mask=mask,
            camera=_twice(self.camera),
            null=torch.cat([null, torch.ones_like(null)]),
        )

    def device(self) -> torch.device:
        for t in (self.text, self.camera, self.null, self.text_mask):
            if t is not None:
                return t.device
        return torch.device("cpu")


def _twice(t: Tensor | None) -> Tensor | None:
    return None if t is None else torch.cat([t, t])


def _pair(text: Tensor, null_text: Tensor) -> Tensor:
    """[text ; null_text] along the batch, the shorter zero-padded to the longer's tokens."""
    n = max(text.shape[1], null_text.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, n - t.shape[1]))  # noqa: E731
    return torch.cat([pad(text), pad(null_text.to(text.dtype))])


def _pair_masks(cond: Cond, null_text: Tensor) -> Tensor | None:
    if cond.text_mask is None and cond.null_text_mask is None and cond.text.shape[1] == null_text.shape[1]:
        return None
    n = max(cond.text.shape[1], null_text.shape[1])

    def full(mask, t):
        m = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if mask is None else mask
        return torch.nn.functional.pad(m, (0, n - m.shape[1]), value=False)

    return torch.cat([full(cond.text_mask, cond.text), full(cond.null_text_mask, null_text)])
