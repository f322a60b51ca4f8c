"""Memory: revisit error against lag, effective context length, and error by pixel age.

A revisit pair ``(t_first, t_revisit, lag)`` says that frame `t_revisit` shows (part of) the place
frame `t_first` showed, `lag` frames later; a mask ``[H, W]`` (True = compare this pixel) restricts
the comparison to the background seen in both. A model that remembers reproduces it.

- Revisit error of a pair: MSE (on [0, 1] RGB) and PSNR over the masked pixels, and LPIPS (spatial
  map averaged over the mask) when an LPIPS net is available. An exact revisit has MSE 0; its PSNR is
  capped at `PSNR_CAP_DB` (100 dB) instead of infinity, so means over pairs stay finite.
- By lag: pairs are grouped by lag (frames); each group reports the mean MSE, the PSNR of that mean
  MSE (not a mean of capped per-pair PSNRs, which one exact pair would dominate) and the mean LPIPS.
- Effective context length: with e(L) the mean MSE at lag L and L_0 the shortest lag measured, the
  largest lag L such that every measured lag L' <= L has e(L') <= factor * max(e(L_0), MSE_FLOOR)
  (`bench.context_factor`). MSE_FLOOR (the MSE at the PSNR cap) keeps an exact short-lag revisit from
  demanding exactness at every longer lag beyond float precision. In seconds: lag / fps. When every
  measured lag passes, the result is only a lower bound (`is_lower_bound`), since longer lags were not
  measured.
- Error by age (optional ground truth): given per-pixel `age` (frames since the world point at that
  pixel was last visible, negative = never seen before) and the true frames, MSE binned by age.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cf.errors import CfError

PSNR_CAP_DB = 100.0
MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB for images on [0, 1], capped at `PSNR_CAP_DB`."""
    return 10.0 * torch.log10(1.0 / mse.double().clamp_min(MSE_FLOOR))


def check_pairs(pairs, masks, t: int, hw: tuple[int, int], where: str = ""):
    """Validate revisit pairs [P, 3] (ints) and masks [P, H, W] (bool) for a video of `t` frames
    -> (pairs long [P, 3], masks bool [P, H, W] at the video's size, or None)."""
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 3)
    bad = (pairs[:, 0] < 0) | (pairs[:, 1] <= pairs[:, 0]) | (pairs[:, 1] >= t) | (pairs[:, 2] <= 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise CfError(f"revisit pair {i} {pairs[i].tolist()}{where} is not [t_first, t_revisit, lag] with "
                      f"0 <= t_first < t_revisit < {t} frames and lag > 0")
    if masks is not None:
        masks = torch.as_tensor(masks).bool()
        if masks.ndim != 3 or masks.shape[0] != len(pairs):
            raise CfError(f"revisit masks{where} have shape {tuple(masks.shape)}; expected "
                          f"[{len(pairs)} pairs, H, W] bool")
        if tuple(masks.shape[1:]) != tuple(hw):
            masks = resize_masks(masks, hw, where)
    return pairs, masks


def resize_masks(masks: torch.Tensor, hw: tuple[int, int], where: str = "") -> torch.Tensor:
    """Masks at the world's frame size -> the video's (written enlarged by an integer factor)."""
    h, w = masks.shape[1:]
    if hw[0] % h or hw[1] % w or hw[0] // h != hw[1] // w:
        raise CfError(f"revisit masks{where} are {h}x{w} but the video is {hw[0]}x{hw[1]}; expected the same "
                      f"size or an integer enlargement of it")
    k = hw[0] // h
    return masks.repeat_interleave(k, 1).repeat_interleave(k, 2)


def revisit_errors(video: torch.Tensor, pairs: torch.Tensor, masks: torch.Tensor | None = None,
                   lpips=None) -> dict[str, torch.Tensor]:
    """video [T, 3, H, W] in [-1, 1] (or uint8 [T, H, W, 3]); pairs [P, 3]; masks [P, H, W] ->
    per pair: mse, psnr, lpips (NaN without a net), pixels (masked pixel count); each [P]."""
    from cf.metrics.backbones import as_float_video

    first = as_float_video(video[pairs[:, 0]])  # [P, 3, H, W]
    again = as_float_video(video[pairs[:, 1]].to(first.device))
    if masks is None:
        m = torch.ones(first.shape[0], *first.shape[-2:], dtype=torch.bool, device=first.device)
    else:
        m = masks.to(first.device)
    w = m.unsqueeze(1).double()  # [P, 1, H, W]
    pixels = w.flatten(1).sum(1)
    sq = (((first - again) / 2.0) ** 2).double() * w  # [-1, 1] -> [0, 1] scale
    mse = sq.flatten(1).sum(1) / (3.0 * pixels).clamp_min(1.0)
    lp = lpips(first, again, m).double() if lpips is not None else torch.full_like(mse, math.nan)
    return {"mse": mse, "psnr": psnr_from_mse(mse), "lpips": lp, "pixels": pixels}


def effective_context(lags: Sequence[float], mse: Sequence[float], factor: float):
    """(the effective context in lag units, whether it is only a lower bound); see the module doc."""
    if not factor >= 1.0:
        raise CfError(f"bench.context_factor={factor} must be >= 1 (allowed growth of the revisit error)")
    pts = sorted((float(a), float(e)) for a, e in zip(lags, mse) if not math.isnan(float(e)))
    if not pts:
        return None, False
    limit = factor * max(pts[0][1], MSE_FLOOR)
    best = None
    for lag, e in pts:
        if e > limit:
            return best, False
        best = lag
    return best, True


class RevisitError(Metric):
    """Revisit error by lag over all pairs seen. `compute` -> dict of [L] tensors (one per distinct lag):
    lag, lag_s, pairs, mse, psnr (of the mean MSE), lpips (NaN without an LPIPS net); and `skipped`
    (pairs whose mask was empty)."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, lpips=None, **kwargs):
        super().__init__(**kwargs)
        self.lpips = lpips
        for name in ("lag", "lag_s", "mse", "lpips_value"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, video: torch.Tensor, pairs, fps: float, masks=None) -> None:
        """video [T, 3, H, W] (float) / [T, H, W, 3] (uint8); pairs [P, 3]; masks [P, H, W] or None.
        Pairs whose mask is empty are skipped and counted in `skipped`."""
        hw = tuple(video.shape[1:3] if video.dtype == torch.uint8 else video.shape[-2:])
        pairs, masks = check_pairs(pairs, masks, video.shape[0], hw)
        if masks is not None:
            keep = masks.flatten(1).any(1)
            self.skipped += int((~keep).sum())
            pairs, masks = pairs[keep], masks[keep]
        if len(pairs) == 0:
            return
        err = revisit_errors(video, pairs, masks, self.lpips)
        lag = pairs[:, 2].double().to(err["mse"].device)
        self.lag.append(lag)
        self.lag_s.append(lag / fps)
        self.mse.append(err["mse"])
        self.lpips_value.append(err["lpips"])

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.lag:
            empty = torch.zeros(0, dtype=torch.float64)
            out = {k: empty for k in ("lag", "lag_s", "pairs", "mse", "psnr", "lpips")}
            return {**out, "skipped": self.skipped}
        lag = dim_zero_cat(self.lag)
        values, group = torch.unique(lag, sorted=True, return_inverse=True)
        count = torch.bincount(group, minlength=len(values)).double()

        def mean(x):
            return torch.zeros_like(values).index_add_(0, group, dim_zero_cat(x).double()) / count

        mse = mean(self.mse)
        return {"lag": values, "lag_s": mean(self.lag_s), "pairs": count.long(), "mse": mse,
                "psnr": psnr_from_mse(mse), "lpips": mean(self.lpips_value), "skipped": self.skipped}


class AgeBinnedError(Metric):
    """MSE between generated and true frames binned by pixel age. Bins: 'never seen' (age < 0), then
    [edges[i], edges[i+1]) and [edges[-1], inf). `compute` -> {edges, mse, psnr, pixels}, 'never' first."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, edges: Sequence[int] = (0, 1, 2, 4, 8, 16, 32, 64), **kwargs):
        super().__init__(**kwargs)
        if list(edges) != sorted(set(edges)) or edges[0] < 0:
            raise CfError(f"age bin edges {list(edges)} must be increasing and start at >= 0")
        self.edges = torch.tensor(list(edges), dtype=torch.float64)
        n = len(edges) + 1
        self.add_state("sse", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixels", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, age: torch.Tensor) -> None:
        """pred, target [..., 3, H, W] in [-1, 1]; age [..., H, W] (frames; < 0 = never seen)."""
        if pred.shape != target.shape or pred.shape[:-3] + pred.shape[-2:] != age.shape:
            raise CfError(f"AgeBinnedError: pred {tuple(pred.shape)}, target {tuple(target.shape)} and age "
                          f"{tuple(age.shape)} do not match ([..., 3, H, W] twice and [..., H, W])")
        err = (((pred - target) / 2.0) ** 2).double().mean(-3).flatten()  # per pixel, [0, 1] scale
        age = age.double().flatten()
        edges = self.edges.to(age.device)
        # bin 0 = never seen; bin i >= 1 = edges[i-1] <= age < edges[i] (last bin open-ended)
        bins = torch.where(age < 0, torch.zeros_like(age, dtype=torch.long),
                           torch.bucketize(age, edges, right=True))
        self.sse += torch.zeros_like(self.sse).index_add_(0, bins, err)
        self.pixels += torch.bincount(bins, minlength=len(self.sse)).double()

    def compute(self) -> dict[str, torch.Tensor]:
        mse = self.sse / self.pixels.clamp_min(1)
        mse = torch.where(self.pixels > 0, mse, torch.full_like(mse, math.nan))
        return {"edges": self.edges, "mse": mse, "psnr": psnr_from_mse(mse), "pixels": self.pixels.long()}
