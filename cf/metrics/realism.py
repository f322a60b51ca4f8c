"""Realism: the Fréchet distance (FD) between backbone features of generated frames and of real frames
of the same world, FID-style, so that a blurry generator cannot win on PSNR alone.

Definition. Fit a Gaussian to each set of features, (mu_g, S_g) for the generated frames and (mu_r, S_r)
for the reference; then

    FD = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_r S_g)^{1/2})

(lower is more realistic; 0 for identical statistics). The trace of the matrix square root is computed
in its symmetric form, tr (S_r^{1/2} S_g S_r^{1/2})^{1/2}: S_r^{1/2} from the eigendecomposition of S_r,
then the eigenvalues of the symmetric PSD matrix S_r^{1/2} S_g S_r^{1/2}, with round-off negatives
clamped to 0, all in float64. It needs no inverse, so singular covariances are fine.

Features. Raw pooled features `Backbone.__call__` returns (FID uses the raw pool3 activations), not the
L2-normalised ones of `embed_frames`: the activation energy is part of what blur and flat frames change
(a blurred or grey frame has weak texture channels, which normalisation would scale back up), and the
Gaussian fit and its closed form live in a linear space, not on a sphere. Default backbone: `imagenet`
(EfficientNet-Lite0, 1280-d, the one real backbone always available offline).

Few frames. Statistics are running float64 sums (n, sum, sum of outer products), so memory does not
grow with frames. With N frames the covariance has rank at most N - 1, below 1280 for a few hundred
frames. FD is still defined, but it is a biased estimate: the mean term is inflated by about
tr(S_g) / N_g + tr(S_r) / N_r, and the cross term tr (S_r S_g)^{1/2} of two rank-deficient estimates
is too small, so FD is too large, by an amount that shrinks with N. Compare FDs only at equal frame
counts (and the same reference): the bias is then the same for every generator and the ranking holds
(tests/test_realism.py checks it on photographs and world videos at 16 frames per set). As a
better-conditioned companion, `compute` also reports `fd_pca`: the same distance in the `pca_dims`
leading principal directions of the reference (a basis fixed by the reference, so comparable across
generators), where the covariances are estimated from many more frames than dimensions.

Reference. `world_reference` renders clips of worlds drawn from seeds ``(REFERENCE_TAG, seed, i)``:
three-int seeds, disjoint by construction from the one-int (``eval_seed + k``) and two-int
(``(data.seed, i)``, ``(eval_seed, i)``) seeds cf trains and evaluates on; `exclude_seeds` checks it.
`folder_reference` reads every video of a folder. Both return a `Reference`: the statistics and a small
description (``{"source": "world" | "folder", "seeds" | "path", "frames", "backbone", ...}``) that
callers record beside the number, optionally cached in an ``.npz`` keyed by that description.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

from cf.errors import CfError
from cf.metrics.backbones import Backbone, as_float_video, get_backbone
from cf.utils import atomic_path

REFERENCE_TAG = 314159  # world reference seeds are (REFERENCE_TAG, seed, i)
CACHE_VERSION = 1  # bump when the features or the statistics change meaning


def _psd_eigh(m: torch.Tensor, vectors: bool = True):
    """Eigenvalues (ascending) [and eigenvectors] of a symmetric PSD matrix. Eigenvalues below the
    round-off of the largest (D * eps * max) are set to 0: with few frames most of them are truly 0,
    and the square roots of their round-off noise (~1e-8 * max each) would add up over 1280 dims."""
    m = (m + m.T) / 2
    w, v = torch.linalg.eigh(m) if vectors else (torch.linalg.eigvalsh(m), None)
    tol = w.abs().max() * w.numel() * torch.finfo(w.dtype).eps
    w = torch.where(w > tol, w, torch.zeros_like(w))
    return (w, v) if vectors else w


@dataclass(frozen=True)
class FeatureStats:
    """Gaussian statistics of N feature vectors: mean float64 [D], covariance float64 [D, D] (the
    unbiased, N - 1 one)."""

    n: int
    mean: torch.Tensor
    cov: torch.Tensor

    @classmethod
    def from_sums(cls, n: int, total: torch.Tensor, outer: torch.Tensor) -> FeatureStats:
        """From n, sum_i f_i [D] and sum_i f_i f_i^T [D, D]."""
        n = int(n)
        if n < 2:
            raise CfError(f"a covariance needs at least 2 frames, got {n}; score more frames")
        mean = total.double() / n
        cov = (outer.double() - n * torch.outer(mean, mean)) / (n - 1)
        return cls(n, mean, (cov + cov.T) / 2)

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStats:
        """[N, D] -> statistics."""
        f = torch.as_tensor(features).double()
        return cls.from_sums(f.shape[0], f.sum(0), f.T @ f)

    @functools.cached_property
    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The covariance's eigenvalues [D] (ascending, >= 0) and eigenvectors [D, D], computed once: a
        reference is compared with many generated sets."""
        return _psd_eigh(self.cov.double())

    def to(self, device) -> FeatureStats:
        if self.mean.device == torch.device(device):
            return self
        return FeatureStats(self.n, self.mean.to(device), self.cov.to(device))


@dataclass(frozen=True)
class Reference:
    """Reference statistics and the description callers record (see the module docstring)."""

    stats: FeatureStats
    description: dict[str, Any]


def frechet_distance(generated: FeatureStats, reference: FeatureStats) -> dict[str, float]:
    """FD between two Gaussians (formula in the module docstring) -> {fd, mean_term, cov_term}."""
    mu_g, s_g = generated.mean.double(), generated.cov.double()
    mu_r = reference.mean.double().to(mu_g.device)
    if mu_g.shape != mu_r.shape:
        raise CfError(f"feature sizes differ: generated {tuple(mu_g.shape)}, reference {tuple(mu_r.shape)}; "
                      f"both must come from the same backbone")
    w, v = (t.to(mu_g.device) for t in reference.eigh)
    # S_r^{1/2} = V diag(sqrt w) V^T lives in the span of the eigenvectors with w > 0 (rank r <= N_r - 1),
    # so S_r^{1/2} S_g S_r^{1/2} has the nonzero eigenvalues of the r x r matrix below: exact, and cheap
    # when the reference has fewer frames than dimensions.
    keep = w > 0
    root_w, v_r = w[keep].sqrt(), v[:, keep]
    inner = (v_r.T @ s_g @ v_r) * root_w[:, None] * root_w[None, :]  # [r, r]
    cross = _psd_eigh(inner, vectors=False).sqrt().sum() if len(root_w) else s_g.new_zeros(())
    mean_term = float(((mu_g - mu_r) ** 2).sum())
    # tr S_r from the thresholded eigenvalues, consistent with the root used in the cross term
    cov_term = max(float(torch.diagonal(s_g).sum() + w.sum() - 2 * cross), 0.0)
    return {"fd": mean_term + cov_term, "mean_term": mean_term, "cov_term": cov_term}


def project(stats: FeatureStats, basis: torch.Tensor) -> FeatureStats:
    """Statistics of the features projected on the columns of `basis` [D, k]."""
    b = basis.to(stats.mean.device, torch.float64)
    return FeatureStats(stats.n, stats.mean @ b, b.T @ stats.cov @ b)


def frame_features(backbone: Backbone, x, batch_size: int = 32, device=None) -> torch.Tensor:
    """Raw backbone features [N, D] of frames in any of cf's layouts: float [N, 3, H, W] or
    [B, T, 3, H, W] in [-1, 1], uint8 [N, H, W, 3] or [B, T, H, W, 3] (torch or numpy)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if x.ndim == 5:
        x = x.flatten(0, 1)
    out = [backbone(as_float_video(x[i:i + batch_size], device)) for i in range(0, len(x), batch_size)]
    return torch.cat(out).double()


class FrechetDistance(Metric):
    """FD of generated frames to a reference (module docstring).

    `reference`: a `Reference` or `FeatureStats` computed beforehand (kept across `reset`), or None to
    accumulate the reference with ``update(x, real=True)``. `backbone` (a name or a `Backbone`; None to
    pass features only) must be the one the reference was computed with. `feature_dim`: needed only
    without a backbone and a reference. `update(x, real=False)`: frames (see `frame_features`) or
    features [N, D]. `compute()` -> {fd, mean_term, cov_term, fd_pca, pca_dims, n_generated,
    n_reference, dims}. `description`: the given `Reference`'s description, for callers to record.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, backbone: str | Backbone | None = "imagenet", weights: str | None = None,
                 reference: Reference | FeatureStats | None = None, pca_dims: int = 64,
                 batch_size: int = 32, feature_dim: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = get_backbone(backbone, weights) if backbone is not None else None
        self.description = None
        if isinstance(reference, Reference):
            self.description = reference.description
            ref_bb = reference.description.get("backbone")
            if self.backbone is not None and ref_bb != self.backbone.name:
                raise CfError(f"the reference was computed with backbone {ref_bb!r}, the metric uses "
                              f"{self.backbone.name!r}; build both with the same backbone")
            reference = reference.stats
        self.reference = reference
        if pca_dims < 1:
            raise CfError(f"pca_dims={pca_dims} must be >= 1")
        self.pca_dims, self.batch_size = int(pca_dims), int(batch_size)
        if reference is not None:
            dim = reference.mean.numel()
        elif self.backbone is not None:
            s = self.backbone.size
            dim = self.backbone(torch.zeros(1, 3, s, s)).shape[1]
        elif feature_dim is not None:
            dim = int(feature_dim)
        else:
            raise CfError("FrechetDistance needs a backbone, a reference or feature_dim= (the feature size)")
        self.dims = dim
        for who in ("gen", "ref"):  # running float64 sums: memory is independent of the frame count
            self.add_state(f"{who}_n", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"{who}_sum", default=torch.zeros(dim, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{who}_outer", default=torch.zeros(dim, dim, dtype=torch.float64),
                           dist_reduce_fx="sum")

    def _features(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        if x.ndim == 2:
            return x.double()
        if self.backbone is None:
            raise CfError("FrechetDistance got frames but has no backbone; pass backbone= or features [N, D]")
        return frame_features(self.backbone, x, self.batch_size, device=self.gen_sum.device)

    def update(self, x, real: bool = False) -> None:
        if real and self.reference is not None:
            raise CfError("this FrechetDistance was given a precomputed reference; update(x, real=True) "
                          "would mix a second one in. Use one or the other")
        f = self._features(x).to(self.gen_sum.device)  # [N, D]
        if f.shape[1] != self.dims:
            raise CfError(f"features of size {f.shape[1]}, expected {self.dims} (the backbone or reference "
                          f"this metric was built with)")
        who = "ref" if real else "gen"
        setattr(self, f"{who}_n", getattr(self, f"{who}_n") + f.shape[0])
        setattr(self, f"{who}_sum", getattr(self, f"{who}_sum") + f.sum(0))
        setattr(self, f"{who}_outer", getattr(self, f"{who}_outer") + f.T @ f)

    def generated_stats(self) -> FeatureStats:
        return FeatureStats.from_sums(self.gen_n, self.gen_sum, self.gen_outer)

    def reference_stats(self) -> FeatureStats:
        if self.reference is not None:  # moved once, so its cached eigendecomposition is kept
            self.reference = self.reference.to(self.gen_sum.device)
            return self.reference
        return FeatureStats.from_sums(self.ref_n, self.ref_sum, self.ref_outer)

    def compute(self) -> dict[str, torch.Tensor]:
        gen, ref = self.generated_stats(), self.reference_stats()
        full = frechet_distance(gen, ref)
        # the reference's leading principal directions; beyond n_ref - 1 its covariance is zero
        k = min(self.pca_dims, ref.n - 1, self.dims)
        basis = ref.eigh[1][:, -k:]
        low = frechet_distance(project(gen, basis), project(ref, basis))
        out = {**full, "fd_pca": low["fd"], "pca_dims": k, "n_generated": gen.n, "n_reference": ref.n,
               "dims": self.dims}
        return {key: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.long)
                for key, v in out.items()}


# --- reference sets ---------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# cache file (path, mtime, size) -> the Reference read from it in this process: a pipeline's stages and the
# benchmark share one reference, whose covariance's eigendecomposition (~4 s at smoke's 3,072 pixel dims) is
# then computed once per process instead of once per evaluation
_LOADED: dict[tuple[str, int, int], Reference] = {}


def _cached(cache_dir, key: dict, description: dict, build) -> Reference:
    """The reference stored under `key` in `cache_dir`, or `build()` (then stored, atomically)."""
    if cache_dir is None:
        return Reference(build(), description)
    path = Path(cache_dir) / f"realism_ref_{_digest(key)}.npz"
    if path.is_file():
        st = path.stat()
        seen = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if seen in _LOADED:
            return _LOADED[seen]
        try:
            with np.load(path) as z:
                stats = FeatureStats(int(z["n"]), torch.from_numpy(z["mean"]), torch.from_numpy(z["cov"]))
                _LOADED[seen] = Reference(stats, json.loads(str(z["description"])))
                return _LOADED[seen]
        except (OSError, KeyError, ValueError):
            pass  # unreadable (e.g. an older layout): rebuild and overwrite
    stats = build()
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, n=stats.n, mean=stats.mean.cpu().numpy(), cov=stats.cov.cpu().numpy(),
                 key=json.dumps(key, default=str), description=json.dumps(description, default=str))
    return Reference(stats, description)


def _accumulate(backbone: Backbone, videos: Iterable, batch_size: int, device) -> FeatureStats:
    m = FrechetDistance(backbone=backbone, batch_size=batch_size).to(device or "cpu")
    for video in videos:
        m.update(video)
    return m.generated_stats()


def _seed_tuple(s) -> tuple[int, ...]:
    return (int(s),) if isinstance(s, (int, np.integer)) else tuple(int(x) for x in s)


def world_reference(data_cfg, *, clips: int = 16, frames_per_clip: int = 16, stride: int = 4, seed: int = 0,
                    backbone: str | Backbone = "imagenet", weights: str | None = None,
                    exclude_seeds: Sequence = (), cache_dir=None, batch_size: int = 32,
                    device=None) -> Reference:
    """Reference statistics of `clips` worlds of `data_cfg` (seeds ``(REFERENCE_TAG, seed, i)``), each
    rendered for ``frames_per_clip * stride`` frames from time 0 and every `stride`-th frame kept
    (neighbouring frames are near copies, so striding spreads the same frame budget over more of the
    world). `exclude_seeds`: the seeds of the evaluated videos (ints or tuples); an overlap is an error."""
    from cf.data.world import World

    if clips < 1 or frames_per_clip < 1 or stride < 1 or clips * frames_per_clip < 2:
        raise CfError(f"clips={clips}, frames_per_clip={frames_per_clip}, stride={stride}: all must be "
                      f">= 1 with at least 2 frames in all")
    seeds = [(REFERENCE_TAG, int(seed), i) for i in range(clips)]
    clash = set(seeds) & {_seed_tuple(s) for s in exclude_seeds}
    if clash:
        raise CfError(f"reference seeds {sorted(clash)} are also evaluated; pick another seed= for the "
                      f"reference")
    bb = get_backbone(backbone, weights)
    world_keys = ("height", "width", "fps", "pano_frames", "texture", "n_landmarks", "n_subjects",
                  "camera_speed", "camera_path", "revisit_lags")
    world = {k: data_cfg[k] if isinstance(data_cfg, dict) else getattr(data_cfg, k) for k in world_keys}
    world = json.loads(json.dumps(world, default=lambda o: list(o)))
    description = {"source": "world", "seeds": [list(s) for s in seeds], "frames": clips * frames_per_clip,
                   "frames_per_clip": frames_per_clip, "stride": stride, "backbone": bb.name,
                   "world": _digest(world)}
    key = {"version": CACHE_VERSION, "backbone_label": bb.label, "world_config": world, **description}

    def build():
        videos = (World(data_cfg, s).render(frames_per_clip * stride).video[::stride] for s in seeds)
        return _accumulate(bb, videos, batch_size, device)

    return _cached(cache_dir, key, description, build)


def folder_reference(path, *, max_frames: int | None = None, stride: int = 1,
                     backbone: str | Backbone = "imagenet", weights: str | None = None, cache_dir=None,
                     batch_size: int = 32, device=None) -> Reference:
    """Reference statistics of every video under `path` (recursively, `cf.video.VIDEO_SUFFIXES`):
    every `stride`-th frame of the first `max_frames` of each. The cache key includes each file's
    name, size and modification time, so an edited folder is read again."""
    from cf.video import VIDEO_SUFFIXES, read_video

    root = Path(path)
    if not root.is_dir():
        raise CfError(f"reference folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise CfError(f"reference folder {str(root)!r} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    if stride < 1:
        raise CfError(f"stride={stride} must be >= 1")
    bb = get_backbone(backbone, weights)
    files_key = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    videos = (read_video(p, max_frames)[0][::stride] for p in files)  # uint8 [T, H, W, 3] each

    description = {"source": "folder", "path": str(root.resolve()), "videos": len(files),
                   "max_frames": max_frames, "stride": stride, "backbone": bb.name}
    key = {"version": CACHE_VERSION, "backbone_label": bb.label, "files": files_key, **description}
    ref = _cached(cache_dir, key, description, lambda: _accumulate(bb, videos, batch_size, device))
    return Reference(ref.stats, {**ref.description, "frames": ref.stats.n})


def config_reference(cfg, data_cfg, seeds) -> Reference:
    """The realism reference of a run: `bench.realism_clips` real clips of the world `data_cfg` (the
    benchmark's or the evaluation's) from reference seeds, never the evaluated worlds
    ``data.eval_seed + k`` for k in `seeds`, with `bench.realism_backbone` features, cached under
    ``<out>/cache/realism``."""
    return world_reference(data_cfg, clips=int(cfg.bench.realism_clips), backbone=cfg.bench.realism_backbone,
                           weights=cfg.bench.weights, exclude_seeds=[cfg.data.eval_seed + k for k in seeds],
                           cache_dir=Path(cfg.out) / "cache" / "realism")

