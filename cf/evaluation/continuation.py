"""Does the teacher use its history? Continuation of held-out world clips, scored where memory matters.

Each held-out clip is cut into a context of `teacher.context_frames` frames and the next target
chunk(s). Predictions: the teacher with the long context (`full` policy), the teacher with a
short context (the last `short_frames` frames, `sliding` policy), and two baselines that need no
model: copy the last frame, and shift the last frame by the known camera offset. Each teacher row
comes twice: `long`/`short` are samples (the Euler sampler, `diffusion.teacher_steps`), and
`long_mean`/`short_mean` the teacher's expected continuation: its x0 prediction from pure noise
(sigma 1), the posterior mean, which is what PSNR rewards. A sample of a model that is unsure pays
for its diversity (up to 3 dB against the mean where it is unsure); the baselines are deterministic.

PSNR is pooled over pixels in regions defined by the world's ground truth `age` (how many frames
ago a background pixel was last visible): `recent` (seen inside the short window), `memory` (seen
only before the short window: only a model that remembers can get these right) and `never` (new
content), and by age bins (the revisit-error-vs-lag curve), through `cf.metrics.revisit`'s
`RegionError` and `AgeBinnedError`: the same pooling and PSNR as every other score of the suite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cf.diffusion import build_sampler, euler
from cf.diffusion.guidance import TEACHER, guidance_scale
from cf.errors import CfError
from cf.memory import KVCache, build_policy
from cf.metrics.revisit import AgeBinnedError, RegionError
from cf.model import CausalVideoDiT
from cf.rollout import rollout

AGE_BINS = ((1, 2), (3, 4), (5, 8), (9, 16), (17, 10**9))


def shift_last(last: Tensor, cam_last: Tensor, cams: Tensor) -> Tensor:
    """The last frame [B, C, H, W] moved by the camera offset to each target frame -> [B, T, C, H, W].

    cams [B, T, 2] and cam_last [B, 2] are (x, y) in pixels; newly revealed pixels repeat the edge.
    """
    b, c, h, w = last.shape
    ys = torch.arange(h, device=last.device)
    xs = torch.arange(w, device=last.device)
    out = []
    for t in range(cams.shape[1]):
        d = (cams[:, t] - cam_last).round().long()  # [B, 2]
        src_x = (xs[None] + d[:, 0:1]).clamp(0, w - 1)  # [B, W]
        src_y = (ys[None] + d[:, 1:2]).clamp(0, h - 1)  # [B, H]
        idx = (src_y[:, :, None] * w + src_x[:, None, :]).flatten(1)  # [B, H*W]
        out.append(last.flatten(2).gather(2, idx[:, None].expand(b, c, -1)).view(b, c, h, w))
    return torch.stack(out, 1)


def _policy(cfg, name: str, **knobs):
    """Policy `name` with memory.*'s knobs, some replaced by `knobs` (a continuation's own window)."""
    return build_policy(cfg.memory, cfg.model.frames_per_chunk, policy=name, **knobs)


@torch.no_grad()
def continue_clips(net: CausalVideoDiT, cfg, video: Tensor, camera: Tensor, prompts: list[str],
                   n_ctx: int, n_chunks: int, policy, seed: int = 0, mean: bool = False) -> Tensor:
    """The teacher's continuation of `video[:, :n_ctx]` by `n_chunks` chunks -> [B, n_chunks * C, ...]:
    a sample (its Euler sampler), or with `mean` its x0 prediction at sigma 1 (the expected continuation)."""
    gen = torch.Generator().manual_seed(seed)
    cond = net.make_cond(prompts, camera=camera[:, :n_ctx + n_chunks * cfg.model.frames_per_chunk])
    sampler = euler(1, 1.0, cfg.diffusion.num_timesteps) if mean else build_sampler(cfg.diffusion, "teacher")
    return rollout(net, KVCache(policy), sampler, cond, n_chunks, context=video[:, :n_ctx], generator=gen,
                   guidance=guidance_scale(cfg, TEACHER)).video


def _psnr(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def evaluate(net: CausalVideoDiT, cfg, batches, short_frames: int = 4) -> dict:
    """Score long vs short context and the baselines on held-out batches (dicts from the world).

    Returns {method: {"all", "recent", "memory", "never", "age<lo>-<hi>": PSNR dB}} for methods long,
    short, long_mean, short_mean, shift_last, copy_last, plus
    the pixel counts per region, and one example (`frames`) for a contact sheet.
    """
    chunk = cfg.model.frames_per_chunk
    n_ctx = (cfg.teacher.context_frames // chunk) * chunk
    n_chunks = cfg.teacher.target_chunks
    n_tgt = n_chunks * chunk
    policies = {"long": _policy(cfg, "full"),
                "short": _policy(cfg, "sliding", window_frames=short_frames + chunk)}
    edges = [lo for lo, _ in AGE_BINS]  # AgeBinnedError bin i >= 1: edges[i-1] <= age < edges[i]
    age_names = [f"age{lo}-{hi if hi < 10**9 else 'inf'}" for lo, hi in AGE_BINS]
    region_err: dict[str, RegionError] = {}
    age_err: dict[str, AgeBinnedError] = {}
    example = None
    dev = next(net.parameters()).device
    for bi, batch in enumerate(batches):
        video, camera = batch["video"].to(dev), batch["camera"].to(dev)
        if video.shape[1] < n_ctx + n_tgt:
            raise CfError(f"held-out clips have {video.shape[1]} frames; the evaluation needs "
                             f"{n_ctx + n_tgt} (teacher.context_frames + target): raise data.clip_frames")
        truth = video[:, n_ctx:n_ctx + n_tgt]
        age = batch["age"][:, n_ctx:n_ctx + n_tgt].to(dev)  # [B, T, H, W]
        t_abs = torch.arange(n_ctx, n_ctx + n_tgt, device=dev)[None, :, None, None]
        regions = {
            "all": torch.ones_like(age, dtype=torch.bool),
            "recent": (age >= 1) & (t_abs - age >= n_ctx - short_frames),
            "memory": (age >= 1) & (t_abs - age < n_ctx - short_frames),
            "never": age < 0,
        }
        preds = {
            name + ("_mean" if mean else ""): continue_clips(net, cfg, video, camera, batch["prompt"], n_ctx,
                                                             n_chunks, pol, seed=bi, mean=mean)
            for mean in (False, True) for name, pol in policies.items()
        }
        preds["shift_last"] = shift_last(video[:, n_ctx - 1], camera[:, n_ctx - 1],
                                         camera[:, n_ctx:n_ctx + n_tgt])
        preds["copy_last"] = video[:, n_ctx - 1:n_ctx].expand_as(truth)
        for name, pred in preds.items():
            pred = pred.float()
            region_err.setdefault(name, RegionError(list(regions))).update(pred, truth.float(), regions)
            age_err.setdefault(name, AgeBinnedError(edges)).update(pred, truth.float(), age)
        if example is None:
            example = {"context": video[0, n_ctx - 4:n_ctx].cpu(), "truth": truth[0].cpu(),
                       **{k: v[0].cpu() for k, v in preds.items()}}
    out: dict = {"frames": example}
    for name in region_err:
        by_region = region_err[name].compute()
        by_age = age_err[name].compute()  # "never" first, then one entry per age bin
        out[name] = {r: _psnr(v["psnr"]) for r, v in by_region.items()}
        out[name].update({a: _psnr(p) for a, p in zip(age_names, by_age["psnr"][1:])})
        if "pixels" not in out:
            out["pixels"] = {r: int(v["pixels"]) for r, v in by_region.items()}
            out["pixels"].update({a: int(n) for a, n in zip(age_names, by_age["pixels"][1:])})
    return out
