"""THE rollout loop: generate a video chunk by chunk through a memory policy's cache.

Every caller uses this one function: student inference, the student's self-rollout in training
(exit step, gradient window), teacher sampling (multi-step Euler with guidance over a long
history), every baseline. What differs is the model, the cache's policy and the sampler.

Per chunk: read the history the policy selects (rotated once), run the sampler's steps on
fresh noise (the exit step's x0 prediction is the chunk), then re-run the clean chunk at
sigma 0 without gradient and write its keys/values to the cache. Observers hook in through
callbacks; the loop itself has no prints, timers or branches for them. `teacher_forced` is the
same chunk loop when the clean frames are given instead of generated (student fitting, DMD scores).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from cf.diffusion import Guided, Sampler, denoise, encode_clean, randn_like, to_x0
from cf.errors import CfError
from cf.memory import KVCache
from cf.model import CacheRead, Cond


@dataclass
class RolloutResult:
    video: Tensor  # [B, n_chunks * C, C, H, W]: each chunk's x0 at its exit step (grad where asked)
    exit_steps: list[int]  # per chunk


class RolloutCallback:
    """Observer of a rollout. Override what you need; every hook is optional."""

    def on_chunk_start(self, chunk: int, cache: KVCache) -> None: ...

    def on_step(self, chunk: int, step: int, x_t: Tensor, x0: Tensor, sigma: float) -> None: ...

    def on_chunk_end(self, chunk: int, frames: Tensor, cache: KVCache) -> None: ...


def rollout(
    model: torch.nn.Module,
    cache: KVCache,
    sampler: Sampler,
    cond: Cond,
    n_chunks: int,
    *,
    context: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    exit_step: int | Sequence[int] | Tensor | None = None,
    grad_chunks: int = 0,
    write_last: bool = True,
    callbacks: Sequence[RolloutCallback] = (),
) -> RolloutResult:
    """Generate `n_chunks` chunks of `model.cfg.frames_per_chunk` frames. Resets `cache` first.

    cond:        conditioning of the whole video; its camera [B, Fc + n_chunks * C, 2] covers the
                 context frames first, then the generated ones
    context:     [B, Fc, C, H, W] clean frames to continue from (Fc a multiple of C), written to the
                 cache chunk by chunk at sigma 0 without gradient
    noise:       [B, n_chunks * C, C, H, W] starting noise of each chunk; else drawn from `generator`
                 (which also draws the few-step sampler's re-noising: every random number comes
                 from it, so ranks seeded alike agree)
    guidance:    classifier-free guidance scale; != 1 evaluates [cond ; null] as one doubled batch
                 (the cache then holds both halves)
    exit_step:   sampler step whose x0 prediction is the chunk's output: an int, or one per chunk
                 (a list or CPU tensor, chosen on the host so no device sync is needed); earlier
                 steps run without gradient, later ones are skipped. None: the last step.
    grad_chunks: only the last `grad_chunks` chunks compute their exit step with gradient (and only
                 if grad is enabled); earlier chunks run entirely without it
    write_last:  also write the last chunk to the cache (to continue, or inspect the final state)
    """
    chunk = model.cfg.frames_per_chunk
    if cache.policy.chunk != chunk:
        raise CfError(f"the cache's policy was built for {cache.policy.chunk}-frame chunks but the model "
                      f"generates {chunk} (model.frames_per_chunk); build the policy with the model's value")
    n_ctx = 0 if context is None else context.shape[1]
    if n_ctx % chunk:
        raise CfError(f"context has {n_ctx} frames, not a multiple of model.frames_per_chunk={chunk}; "
                      f"trim it to {n_ctx - n_ctx % chunk} frames")
    total = n_ctx + n_chunks * chunk
    if cond.camera is not None and cond.camera.shape[1] < total:
        raise CfError(f"cond.camera covers {cond.camera.shape[1]} frames but the rollout needs {total} "
                      f"({n_ctx} context + {n_chunks} chunks x {chunk})")
    exits = _exit_steps(exit_step, n_chunks, sampler.n_steps)
    param = next(model.parameters())
    b = _batch_size(cond, context, noise)
    frame_shape = (model.channels, model.height, model.width)
    guided = Guided(guidance)
    run_cond = guided.cond(cond, b)

    cache.reset()
    if context is not None:
        prefill(model, cache, guided.twice(context), run_cond)

    outputs = []
    for j in range(n_chunks):
        f0 = n_ctx + j * chunk
        for cb in callbacks:
            cb.on_chunk_start(j, cache)
        if noise is not None:
            x = noise[:, j * chunk:(j + 1) * chunk].to(param.device, param.dtype, non_blocking=True)
        else:
            x = randn_like(param.new_empty(b, chunk, *frame_shape), generator)
        x0 = chunk_step(model, cache, sampler, run_cond.frames(f0, f0 + chunk), x, exit_step=exits[j],
                        grad=torch.is_grad_enabled() and j >= n_chunks - grad_chunks, generator=generator,
                        guidance=guidance, write=write_last or j < n_chunks - 1, callbacks=callbacks, index=j)
        outputs.append(x0)
        for cb in callbacks:
            cb.on_chunk_end(j, x0, cache)
    return RolloutResult(video=torch.cat(outputs, dim=1), exit_steps=exits)


def chunk_step(
    model: torch.nn.Module,
    cache: KVCache,
    sampler: Sampler,
    cond: Cond,
    x: Tensor,
    *,
    exit_step: int,
    grad: bool = False,
    generator: torch.Generator | None = None,
    guidance: float = 1.0,
    write: bool = True,
    callbacks: Sequence[RolloutCallback] = (),
    index: int = 0,
) -> Tensor:
    """The body of the rollout loop: one chunk from noise x [B, C, ...] to its x0 at `exit_step`.

    Reads the cache (rotated once), runs the sampler's steps (only the exit step with gradient, and
    only if `grad`), then writes the clean chunk at sigma 0 without gradient (if `write`). cond is
    this chunk's conditioning, already [cond ; null] doubled when guidance != 1. Returns x0.
    """
    guided = Guided(guidance)
    read = read_for_query(model, cache)
    for i in range(exit_step + 1):
        sigma = sampler.sigmas[i]
        with torch.set_grad_enabled(grad and i == exit_step):
            xin = guided.twice(x)
            sig = xin.new_full(xin.shape[:2], sigma)
            pred = denoise(model, xin, sig, cond, num_timesteps=sampler.num_timesteps,
                           time_pos=read.query_positions, read=read).pred
            x0 = guided.combine(to_x0(pred, xin, sig, model.prediction))
        for cb in callbacks:
            cb.on_step(index, i, x, x0, sigma)
        if i < exit_step:
            with torch.no_grad():
                x = sampler.step(x, x0, i, generator)
    if write:
        write_clean(model, cache, guided.twice(x0), cond, read)
    return x0


def teacher_forced(
    model: torch.nn.Module,
    cache: KVCache,
    cond: Cond,
    x_t: Tensor,
    sigma: Tensor,
    clean: Tensor,
    *,
    num_timesteps: int,
    guidance: float = 1.0,
    write_last: bool = False,
) -> Tensor:
    """x0 estimates [B, F, C, H, W] of noisy frames x_t [B, F, C, H, W] at noise levels sigma [B, F], chunk
    by chunk, each chunk reading the cache after the clean frames `clean` [B, F, C, H, W] of the chunks
    before it: teacher forcing, what a rollout's cache holds when it generated exactly `clean`.

    The cache holds the history before these frames already (e.g. `prefill`); cond covers these F frames,
    already [cond ; null] doubled when guidance != 1 (as `chunk_step`'s). Per chunk: read (rotated once),
    one forward of the noisy chunk (with gradient when enabled), then its clean frames written at sigma 0
    without gradient before the next chunk reads (the last one too if `write_last`). How the student is
    fitted to the teacher's ODE states and how the DMD teacher and critic score a generated window.
    """
    chunk = cache.policy.chunk
    if x_t.shape[1] % chunk or x_t.shape[:2] != clean.shape[:2] or sigma.shape != x_t.shape[:2]:
        raise CfError(f"teacher forcing takes whole {chunk}-frame chunks: x_t {tuple(x_t.shape[:2])}, "
                      f"sigma {tuple(sigma.shape)} and clean {tuple(clean.shape[:2])} must agree as [B, F]")
    guided = Guided(guidance)
    out = []
    for f0 in range(0, x_t.shape[1], chunk):
        c = cond.frames(f0, f0 + chunk)
        xin, sig = guided.twice(x_t[:, f0:f0 + chunk]), guided.twice(sigma[:, f0:f0 + chunk])
        read = read_for_query(model, cache)
        pred = denoise(model, xin, sig, c, num_timesteps=num_timesteps, time_pos=read.query_positions,
                       read=read).pred
        out.append(guided.combine(to_x0(pred, xin, sig, model.prediction)))
        if write_last or f0 + chunk < x_t.shape[1]:
            write_clean(model, cache, guided.twice(clean[:, f0:f0 + chunk]), c, read)
    return torch.cat(out, dim=1)


def read_for_query(model: torch.nn.Module, cache: KVCache, n_query: int | None = None) -> CacheRead:
    """The cache's read for the next query, keys rotated once (reused by every sampler step)."""
    read = cache.read(n_query)
    device = next(model.parameters()).device
    if read.n_frames == 0:  # nothing held yet: only the query's positions matter, on the model's device
        return replace(read, query_positions=read.query_positions.to(device, non_blocking=True))
    return model.rotate_read(read)


@torch.no_grad()
def write_clean(model: torch.nn.Module, cache: KVCache, frames: Tensor, cond: Cond,
                read: CacheRead | None = None) -> None:
    """Run clean frames [B, m, C, H, W] at sigma 0 on `read` and write their keys/values to the cache.

    cond covers exactly these m frames; read defaults to the cache's current read.
    """
    read = read_for_query(model, cache, frames.shape[1]) if read is None else read
    x = frames.detach().to(next(model.parameters()).dtype)
    out = encode_clean(model, x, cond, time_pos=read.query_positions, read=read)
    cache.write(out.kv, cond.camera, out.mean_key if cache.policy.needs_keys else None)


def prefill(model: torch.nn.Module, cache: KVCache, frames: Tensor, cond: Cond) -> None:
    """Write clean history [B, Fh, C, H, W] chunk by chunk at sigma 0, continuing the cache's video.

    cond covers the whole video from frame 0 (its camera is sliced at the cache's frame index).
    This is what a rollout does with its context, and how a teacher or critic reads a student's
    history through the policy: prefill, then `read_for_query` and one forward on the target.
    """
    chunk = cache.policy.chunk
    if frames.shape[1] % chunk:
        raise CfError(f"history has {frames.shape[1]} frames, not a multiple of the {chunk}-frame chunk")
    for j in range(0, frames.shape[1], chunk):
        f0 = cache.n_written
        write_clean(model, cache, frames[:, j:j + chunk], cond.frames(f0, f0 + chunk))


def _batch_size(cond: Cond, context: Tensor | None, noise: Tensor | None) -> int:
    for t in (noise, context, cond.text, cond.camera, cond.null):
        if t is not None:
            return t.shape[0]
    raise CfError("rollout cannot tell the batch size: give noise, context, or a cond with text or camera")


def _exit_steps(exit_step, n_chunks: int, n_steps: int) -> list[int]:
    if exit_step is None:
        steps = [n_steps - 1] * n_chunks
    elif isinstance(exit_step, int):
        steps = [exit_step] * n_chunks
    else:
        steps = [int(s) for s in (exit_step.tolist() if isinstance(exit_step, Tensor) else exit_step)]
    if len(steps) != n_chunks or any(not 0 <= s < n_steps for s in steps):
        raise CfError(f"exit_step={steps if len(steps) < 20 else '...'} must be one int or {n_chunks} ints "
                      f"in [0, {n_steps}) (the sampler has {n_steps} steps)")
    return steps


# ---------------------------------------------------------------------- observers


class ChunkTimer(RolloutCallback):
    """Wall seconds per chunk (synchronising CUDA at chunk boundaries: in the observer, not the loop),
    and this process's CPU seconds per chunk (less sensitive to other processes on a shared CPU)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.latencies: list[float] = []
        self.cpu_times: list[float] = []

    def _now(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def on_chunk_start(self, chunk, cache):
        self._t0 = self._now()

    def on_chunk_end(self, chunk, frames, cache):
        wall, cpu = self._now()
        self.latencies.append(wall - self._t0[0])
        self.cpu_times.append(cpu - self._t0[1])


class CacheBytes(RolloutCallback):
    """Bytes and frames the cache holds after each chunk."""

    def __init__(self):
        self.nbytes: list[int] = []
        self.frames: list[int] = []

    def on_chunk_end(self, chunk, frames, cache):
        self.nbytes.append(cache.nbytes())
        self.frames.append(cache.used)


class Progress(RolloutCallback):
    """A tqdm bar over chunks."""

    def __init__(self, total: int, desc: str = "rollout", unit: str = "chunk"):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit)

    def on_chunk_end(self, chunk, frames, cache):
        self.bar.update(1)
        if chunk + 1 == self.bar.total:
            self.bar.close()
