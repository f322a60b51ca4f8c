"""Memory: revisit error against lag, read against chance; effective context; error by pixel age.

A revisit pair ``(t_first, t_revisit, lag)`` says that frame `t_revisit` shows (part of) the place
frame `t_first` showed, `lag` frames later; a mask ``[H, W]`` (True = compare this pixel) restricts
the comparison to the background seen in both. A model that remembers reproduces it.

- Revisit error of a pair: MSE (on [0, 1] RGB) and PSNR over the masked pixels, and LPIPS (spatial
  map averaged over the mask) when an LPIPS net is available. An exact revisit has MSE 0; its PSNR is
  capped at `PSNR_CAP_DB` (100 dB) instead of infinity, so means over pairs stay finite.
- Chance: what a model that forgot would score. For each pair, the same revisit frame (same mask) is
  compared with up to `CHANCE_FRAMES` *earlier showings of other places*: earlier frames that show
  somewhere else (with a camera, any such frame; without one, the first frames of other pairs), taken
  at a similar distance in time (between lag / 2 and 2 * lag before
  the revisit when there are any, else the nearest in log-time), so slow global changes (colour drift,
  exposure) weigh on both errors alike. "Somewhere else": with per-frame camera positions (``camera``
  [T, 2], pixels), a frame whose view does not overlap the revisit's; without them, a frame outside the
  revisit's chain of same-place pairs. A video that invents new content at a revisit scores about its
  chance error, whatever its quality; a video that repeats what it showed scores far below it.
- By lag: pairs are grouped into bins of lag in seconds (`LAG_EDGES_S`, log-like, so 0.5 s and 40 s are
  both resolved); each bin reports the mean MSE, the PSNR of that mean MSE, the mean LPIPS, the mean
  chance MSE (and its PSNR) and the **retention** ``1 - mse / chance_mse``: 1 = reproduces what it
  showed, 0 = no better than chance (negative: worse). Ratios of means, not means of ratios, so one
  near-exact pair cannot dominate a bin.
- Effective context: the longest lag (the largest lag measured in the last bin) up to which every bin's
  retention is at least `RETENTION_LEVEL` (0.5: the revisit error is at most half the chance error, the
  revisit at least 3 dB above chance: halfway between remembering and inventing on the error scale,
  far from both ends, so H.264 noise on a remembered place (retention > 0.95) and a coin-flip between
  two inventions (about 0) are both decided with margin). 0 when the first bin already fails; a lower
  bound (``is_lower_bound``) when every measured bin holds, since longer lags were not measured. Bins
  without a chance reference (a video that never shows another place) are skipped.
- Error by age (optional ground truth): given per-pixel `age` (frames since the world point at that
  pixel was last visible, negative = never seen before) and the true frames, MSE binned by age.

(An earlier definition, "the largest lag whose error stays within 1.5x of the short-lag error", read a
video that forgets everything as an unbounded context, since its error curve is flat, and a near-perfect
one as almost none, since any growth over an exact short-lag revisit exceeds 1.5x.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from cf.errors import CfError

PSNR_CAP_DB = 100.0
MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)
RETENTION_LEVEL = 0.5  # effective context: retention at least this (see the module docstring)
CHANCE_FRAMES = 8  # chance references per pair
CHANCE_BATCH = 256  # (pair, reference) comparisons per batch: bounds memory at high resolution
# Lag bins (seconds): fine where windows live (LongLive's 3 s, Infinity-RoPE's 1.5 s), coarser beyond.
LAG_EDGES_S = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 28.0, 32.0, 36.0,
               40.0, 48.0, 56.0, 64.0, 96.0, 128.0, math.inf)


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


def chance_frames(pairs: torch.Tensor, camera=None, hw: tuple[int, int] | None = None,
                  k: int | None = None) -> list[list[int]]:
    """For each pair [P, 3], up to `k` (default `CHANCE_FRAMES`) earlier frames that show another place:
    the chance references of the module docstring. camera: [T, 2] (x, y) pixels per frame or None;
    hw: the frame size (needed with a camera)."""
    k = CHANCE_FRAMES if k is None else k
    rows = pairs.tolist()
    firsts = np.array(sorted({a for a, _, _ in rows}), dtype=np.int64)
    if camera is not None:
        cam = torch.as_tensor(camera, dtype=torch.float64).reshape(-1, 2).numpy()
        h, w = hw
    else:
        parent: dict[int, int] = {}

        def root(f: int) -> int:  # union-find over frames linked by a pair: one chain = one place
            parent.setdefault(f, f)
            while parent[f] != f:
                parent[f] = parent[parent[f]]
                f = parent[f]
            return f

        for a, b, _ in rows:
            parent[root(a)] = root(b)
        first_roots = np.array([root(int(f)) for f in firsts], dtype=np.int64)

    out = []
    for _, b, lag in rows:
        # with a camera every earlier frame's place is known; without one, only the frames of pairs
        if camera is not None:
            pool = np.arange(b)
            dx, dy = np.abs(cam[:b, 0] - cam[b, 0]), np.abs(cam[:b, 1] - cam[b, 1])
            cands = pool[(dx >= w) | (dy >= h)]
        else:
            cands = firsts[(firsts < b) & (first_roots != root(b))]
        dist = b - cands
        near = cands[(lag / 2 <= dist) & (dist <= 2 * lag)].tolist()
        if not near:  # nothing at a similar distance in time: the nearest in log-time
            near = sorted(sorted(cands.tolist(), key=lambda f: (abs(math.log((b - f) / lag)), f))[:k])
        if len(near) > k:  # evenly spread over the window, deterministic
            near = [near[round(i * (len(near) - 1) / (k - 1))] for i in range(k)] if k > 1 else near[:1]
        out.append(near)
    return out


def held_share(pairs: torch.Tensor, masks: torch.Tensor | None, camera, hw: tuple[int, int],
               held_frames: int) -> torch.Tensor:
    """float64 [P]: for each pair, the share of its compared pixels (mask) whose place the first
    `held_frames` frames showed, i.e. what a memory that keeps only the video's first frames (an attention
    sink, the clean context) could serve. camera: [T, 2] (x, y) pixels per frame; hw: the frame size."""
    cam = torch.as_tensor(camera, dtype=torch.float64).reshape(-1, 2)
    h, w = hw
    first = cam[:held_frames]  # [K, 2]
    at = cam[pairs[:, 1]]  # [P, 2]: where each revisit frame looks
    xs = at[:, :1] + torch.arange(w, dtype=torch.float64)  # [P, W] world x of each column
    ys = at[:, 1:] + torch.arange(h, dtype=torch.float64)  # [P, H]
    in_x = (xs[..., None] >= first[:, 0]) & (xs[..., None] < first[:, 0] + w)  # [P, W, K]
    in_y = (ys[..., None] >= first[:, 1]) & (ys[..., None] < first[:, 1] + h)  # [P, H, K]
    held = (in_y[:, :, None, :] & in_x[:, None, :, :]).any(-1)  # [P, H, W]
    m = torch.ones_like(held) if masks is None else masks.to(held.device)
    return (held & m).flatten(1).sum(1).double() / m.flatten(1).sum(1).double().clamp_min(1)


def chance_errors(video: torch.Tensor, pairs: torch.Tensor, masks: torch.Tensor | None, refs: list[list[int]],
                  lpips=None) -> dict[str, torch.Tensor]:
    """Per pair: the mean error of its revisit frame against its chance frames `refs` (NaN where a pair
    has none) -> {mse, lpips}, each [P]."""
    flat = [(i, f) for i, fs in enumerate(refs) for f in fs]
    p = len(refs)
    mse, lp = torch.zeros(p, dtype=torch.float64), torch.zeros(p, dtype=torch.float64)
    count = torch.zeros(p, dtype=torch.float64)
    for s in range(0, len(flat), CHANCE_BATCH):
        part = flat[s:s + CHANCE_BATCH]
        idx = torch.tensor([i for i, _ in part], dtype=torch.long)
        fake = torch.stack([torch.tensor([f for _, f in part]), pairs[idx, 1], pairs[idx, 2]], 1)
        err = revisit_errors(video, fake, None if masks is None else masks[idx.to(masks.device)], lpips)
        mse.index_add_(0, idx, err["mse"].cpu())
        lp.index_add_(0, idx, err["lpips"].cpu())
        count.index_add_(0, idx, torch.ones(len(part), dtype=torch.float64))
    nan = torch.full_like(mse, math.nan)
    return {"mse": torch.where(count > 0, mse / count.clamp_min(1), nan),
            "lpips": torch.where(count > 0, lp / count.clamp_min(1), nan)}


def retention(mse, chance_mse):
    """1 - mse / chance_mse (elementwise, tensors or floats): 1 = exact, 0 = chance, NaN without chance."""
    mse, chance = torch.as_tensor(mse, dtype=torch.float64), torch.as_tensor(chance_mse, dtype=torch.float64)
    return torch.where(chance > 0, 1.0 - mse / chance.clamp_min(MSE_FLOOR), torch.full_like(chance, math.nan))


def effective_context(lags_s: Sequence[float], retentions: Sequence[float], level: float | None = None):
    """(effective context in seconds, whether it is only a lower bound) from a retention curve: `lags_s`
    is the largest lag of each bin, in increasing order; see the module docstring. (None, False) when no
    bin has a chance reference."""
    level = RETENTION_LEVEL if level is None else level
    if not 0.0 < level < 1.0:
        raise CfError(f"retention level {level} must lie in (0, 1) (1 = exact revisits, 0 = chance)")
    pts = [(float(a), float(r)) for a, r in zip(lags_s, retentions) if not math.isnan(float(r))]
    if not pts:
        return None, False
    best = 0.0
    for lag, r in sorted(pts):
        if r < level:
            return best, False
        best = lag
    return best, True


def lag_bin(lag_s: torch.Tensor) -> torch.Tensor:
    """Index of each lag's bin in `LAG_EDGES_S` (bin i: edges[i] <= lag_s < edges[i + 1])."""
    edges = torch.tensor(LAG_EDGES_S, dtype=torch.float64, device=lag_s.device)
    return torch.bucketize(lag_s.double(), edges, right=True) - 1


class RevisitError(Metric):
    """Revisit error and chance by lag bin over all pairs seen. `compute` -> dict of [L] tensors (one per
    non-empty bin of `LAG_EDGES_S`): lag (mean, frames), lag_s (mean), lag_max_s, lo_s, hi_s (bin edges),
    pairs, mse, psnr (of the mean MSE), lpips (NaN without an LPIPS net), chance_mse, chance_psnr,
    chance_lpips, retention, retention_lpips, sink_share (the mean share of compared pixels whose place
    the first `held_frames` frames showed, `held_share`: what a sink could serve; NaN without a camera or
    with held_frames=0); and `skipped` (pairs whose mask was empty)."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False
    PER_PAIR = ("lag", "lag_s", "mse", "lpips_value", "chance_mse", "chance_lpips", "held")

    def __init__(self, lpips=None, held_frames: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.lpips = lpips
        self.held_frames = int(held_frames)
        for name in self.PER_PAIR:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.add_state("skipped", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, video: torch.Tensor, pairs, fps: float, masks=None, camera=None) -> None:
        """video [T, 3, H, W] (float) / [T, H, W, 3] (uint8); pairs [P, 3]; masks [P, H, W] or None;
        camera [T, 2] (x, y in pixels of this video) or None. Pairs whose mask is empty are skipped and
        counted in `skipped`; chance frames are chosen among all pairs."""
        hw = tuple(video.shape[1:3] if video.dtype == torch.uint8 else video.shape[-2:])
        pairs, masks = check_pairs(pairs, masks, video.shape[0], hw)
        refs = chance_frames(pairs, camera, hw)
        if masks is not None:
            keep = masks.flatten(1).any(1)
            self.skipped += int((~keep).sum())
            refs = [r for r, k in zip(refs, keep.tolist()) if k]
            pairs, masks = pairs[keep], masks[keep]
        if len(pairs) == 0:
            return
        err = revisit_errors(video, pairs, masks, self.lpips)
        chance = chance_errors(video, pairs, masks, refs, self.lpips)
        lag = pairs[:, 2].double().to(err["mse"].device)
        self.lag.append(lag)
        self.lag_s.append(lag / fps)
        self.mse.append(err["mse"])
        self.lpips_value.append(err["lpips"])
        self.chance_mse.append(chance["mse"].to(lag.device))
        self.chance_lpips.append(chance["lpips"].to(lag.device))
        held = (held_share(pairs, masks, camera, hw, self.held_frames)
                if camera is not None and self.held_frames else torch.full_like(lag, math.nan))
        self.held.append(held.to(lag.device))

    def compute(self) -> dict[str, torch.Tensor]:
        keys = ("lag", "lag_s", "lag_max_s", "lo_s", "hi_s", "pairs", "mse", "psnr", "lpips", "chance_mse",
                "chance_psnr", "chance_lpips", "retention", "retention_lpips", "sink_share")
        if not self.lag:
            empty = torch.zeros(0, dtype=torch.float64)
            return {**{k: empty for k in keys}, "skipped": self.skipped}
        lag_s = dim_zero_cat(self.lag_s).double()
        bins = lag_bin(lag_s)
        values, group = torch.unique(bins, sorted=True, return_inverse=True)
        count = torch.bincount(group, minlength=len(values)).double()

        def mean(x, finite_only=False):
            x = dim_zero_cat(x).double()
            if not finite_only:
                return torch.zeros_like(count).index_add_(0, group, x) / count
            ok = ~torch.isnan(x)  # chance: pairs without a reference do not count
            n = torch.zeros_like(count).index_add_(0, group, ok.double())
            s = torch.zeros_like(count).index_add_(0, group, torch.where(ok, x, torch.zeros_like(x)))
            return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, math.nan))

        mse, lp = mean(self.mse), mean(self.lpips_value)
        chance, chance_lp = mean(self.chance_mse, True), mean(self.chance_lpips, True)
        lag_max = torch.full_like(count, -math.inf).scatter_reduce(0, group, lag_s, "amax")
        edges = torch.tensor(LAG_EDGES_S, dtype=torch.float64)
        return {"lag": mean(self.lag), "lag_s": mean(self.lag_s), "lag_max_s": lag_max,
                "lo_s": edges[values.cpu()], "hi_s": edges[values.cpu() + 1], "pairs": count.long(),
                "mse": mse, "psnr": psnr_from_mse(mse), "lpips": lp, "chance_mse": chance,
                "chance_psnr": psnr_from_mse(chance), "chance_lpips": chance_lp,
                "retention": retention(mse, chance),
                "retention_lpips": retention(lp, chance_lp),
                "sink_share": mean(self.held, True),
                "skipped": self.skipped}


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


class RegionError(Metric):
    """MSE between predicted and true frames pooled over named pixel regions. `update(pred, target,
    regions)` with pred, target [..., 3, H, W] in [-1, 1] and regions {name: bool [..., H, W]};
    `compute` -> {name: {"mse", "psnr", "pixels"}} (mse NaN for a region that held no pixel)."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.names = list(names)
        n = len(self.names)
        self.add_state("sse", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("pixels", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor, regions: dict) -> None:
        if pred.shape != target.shape or set(regions) != set(self.names):
            raise CfError(f"RegionError: pred {tuple(pred.shape)} and target {tuple(target.shape)} must "
                          f"match, and regions {sorted(regions)} must be {sorted(self.names)}")
        err = (((pred - target) / 2.0) ** 2).double().mean(-3)  # per pixel, [0, 1] scale
        for i, name in enumerate(self.names):
            m = regions[name]
            self.sse[i] += err[m].sum()
            self.pixels[i] += m.sum()

    def compute(self) -> dict[str, dict[str, torch.Tensor]]:
        nan = torch.full_like(self.sse, math.nan)
        mse = torch.where(self.pixels > 0, self.sse / self.pixels.clamp_min(1), nan)
        psnr = psnr_from_mse(mse)
        return {name: {"mse": mse[i], "psnr": psnr[i], "pixels": self.pixels[i].long()}
                for i, name in enumerate(self.names)}

