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
    """

    text: Tensor | None = None
    text_mask: Tensor | None = None
    camera: Tensor | None = None
    null: Tensor | None = None

    def frames(self, start: int, stop: int) -> Cond:
        """The same conditioning for frames [start, stop) (only the camera is per frame)."""
        return replace(self, camera=None if self.camera is None else self.camera[:, start:stop])

    def with_null(self, batch_size: int) -> Cond:
        """[cond ; null cond] along the batch: one model call evaluates both halves of guidance."""
        null = self.null
        if null is None:
            null = torch.zeros(batch_size, dtype=torch.bool, device=self.device())
        return Cond(
            text=_twice(self.text),
            text_mask=_twice(self.text_mask),
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
