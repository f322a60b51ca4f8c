"""Student initialisation: a few-step causal generator fitted to the teacher's ODE trajectories.

The teacher samples videos chunk by chunk through the shared rollout (its Euler ODE, with
guidance) from noise; `TrajectoryRecorder` keeps, per chunk, the ODE state at each of the
student's noise levels (exact on the Euler path: between two Euler steps the state moves on a
straight line towards that step's x0 estimate). The student, initialised with the teacher's
weights, learns to map the state at its k-th noise level straight to the teacher's clean chunk,
reading the teacher's clean earlier chunks through its own memory policy (teacher forcing), so
that DMD starts from a generator that already makes sensible videos in a few steps.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from cf.diffusion import ODE_TARGETS, Sampler, build_sampler, guidance_scale
from cf.errors import CfError
from cf.memory import KVCache
from cf.model import CausalVideoDiT
from cf.rollout import RolloutCallback, prefill, rollout, teacher_forced
from cf.train.base import EMA, EMACheckpoint, adamw_with_schedule, step_generator
from cf.train.conditions import ConditionStream
from cf.train.memories import Memories


class TrajectoryRecorder(RolloutCallback):
    """Records, for every chunk, the ODE state at each of `levels` (decreasing noise levels in
    (0, 1]) from an Euler rollout's steps. `states()` -> [B, K, n_chunks * C, ...]."""

    def __init__(self, sigmas: tuple[float, ...], levels: list[float]):
        if any(not 0 < s <= sigmas[0] for s in levels):
            raise CfError(
                f"student noise levels {levels} must lie in (0, {sigmas[0]}] to be on the teacher's path"
            )
        self.sigmas, self.levels = sigmas, list(levels)
        self._chunks: list[list[Tensor | None]] = []

    def on_chunk_start(self, chunk, cache):
        self._chunks.append([None] * len(self.levels))

    def on_step(self, chunk, step, x_t, x0, sigma):
        hi, lo = self.sigmas[step], self.sigmas[step + 1]
        for k, s in enumerate(self.levels):
            if self._chunks[chunk][k] is None and lo < s <= hi:
                # Euler from sigma `hi`: x(s) = x0 + (s / hi) (x_t - x0) for s in [lo, hi]
                self._chunks[chunk][k] = (x0 + (s / hi) * (x_t - x0)).detach().float().cpu()

    def states(self) -> Tensor:
        per_level = [torch.cat([c[k] for c in self._chunks], dim=1) for k in range(len(self.levels))]
        return torch.stack(per_level, dim=1)


def check_context(cfg) -> None:
    """student.context_frames must be whole chunks (the rollout prefills them chunk by chunk)."""
    n, chunk = cfg.student.context_frames, cfg.model.frames_per_chunk
    if n < 0 or n % chunk:
        raise CfError(
            f"student.context_frames={n} must be a non-negative multiple of "
            f"model.frames_per_chunk={chunk}, e.g. {max(chunk, n - n % chunk)}"
        )


def student_levels(sampler: Sampler) -> list[float]:
    """The student's input noise levels: its sampler's sigmas without the final 0."""
    return list(sampler.sigmas[:-1])


@torch.no_grad()
def sample_ode_pairs(
    teacher: CausalVideoDiT, cfg, progress: bool = True
) -> tuple[dict[str, Tensor], list[str]]:
    """`student.ode_pairs` teacher trajectories of `student.rollout_chunks` chunks continuing the first
    `student.context_frames` frames of the training worlds, with their prompts and camera paths
    (ConditionStream, data.seed).

    Returns ({"context": [N, Fc, C, H, W], "video": [N, F, C, H, W] the teacher's output, "states":
    [N, K, F, C, H, W] the ODE at the student's K levels, "camera": [N, Fc + F, 2]}, N prompts), on the
    CPU. Deterministic given the config.
    """
    s = cfg.student
    chunk = cfg.model.frames_per_chunk
    stream = ConditionStream(cfg.data, frames=s.rollout_chunks * chunk, context=s.context_frames)
    sampler = build_sampler(cfg.diffusion, "teacher")
    levels = student_levels(build_sampler(cfg.diffusion, "student"))
    policy = Memories.from_config(cfg).teacher
    guidance = guidance_scale(cfg, ODE_TARGETS)
    device = next(teacher.parameters()).device
    out: dict[str, list[Tensor]] = {"context": [], "video": [], "states": [], "camera": []}
    prompts: list[str] = []
    bs = cfg.data.batch_size
    starts = range(0, s.ode_pairs, bs)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="teacher ODE pairs", unit="batch")
    for i0 in starts:
        samples = [stream.sample(i) for i in range(i0, min(i0 + bs, s.ode_pairs))]
        camera = torch.stack([x["camera"] for x in samples])
        context = torch.stack([x["context"] for x in samples])
        batch_prompts = [x["prompt"] for x in samples]
        cond = teacher.make_cond(batch_prompts, camera=camera.to(device))
        rec = TrajectoryRecorder(sampler.sigmas, levels)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i0)
        res = rollout(
            teacher,
            KVCache(policy),
            sampler,
            cond,
            s.rollout_chunks,
            context=context.to(device, next(teacher.parameters()).dtype) if s.context_frames else None,
            generator=gen,
            guidance=guidance,
            callbacks=[rec],
        )
        out["context"].append(context)
        out["video"].append(res.video.float().cpu())
        out["states"].append(rec.states())
        out["camera"].append(camera)
        prompts.extend(batch_prompts)
    return {k: torch.cat(v) for k, v in out.items()}, prompts


class StudentModule(EMACheckpoint, pl.LightningModule):
    """The few-step student regressing the teacher's clean chunks from its ODE states."""

    def __init__(self, cfg):
        super().__init__()
        s = cfg.student
        for key in ("steps", "ode_pairs", "rollout_chunks"):
            if s[key] < 1:
                raise CfError(f"student.{key}={s[key]} must be >= 1")
        check_context(cfg)
        self.cfg = cfg
        self.net = CausalVideoDiT(cfg.model, cfg.data)
        self.chunk = cfg.model.frames_per_chunk
        self.policy = Memories.from_config(cfg).student
        self.register_buffer(
            "levels", torch.tensor(student_levels(build_sampler(cfg.diffusion, "student"))), persistent=False
        )
        self.ema = EMA(self.net, s.ema)

    def load_start(self, weights: dict[str, Tensor]) -> None:
        """Start from these (the teacher's) weights; the EMA starts there too."""
        self.net.load_state_dict(weights)
        self.ema = EMA(self.net, self.cfg.student.ema)

    def configure_optimizers(self):
        return adamw_with_schedule(
            self.net.parameters(),
            self.cfg.trainer,
            lr=self.cfg.student.lr,
            total_steps=self.cfg.student.steps,
        )

    def on_train_batch_end(self, *args) -> None:
        self.ema.update(self.net)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, logs = self.loss(batch, self.global_step)
        self.log("student/loss", loss, prog_bar=True)
        for k, v in logs.items():
            self.log(k, v)
        return loss

    def loss(self, batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean x0 MSE over the chunks; each chunk of each sample at a random student level.

        batch: context [B, Fc, C, H, W], video [B, F, C, H, W], states [B, K, F, C, H, W], camera
        [B, Fc + F, 2], prompt.
        """
        video, states, context = batch["video"], batch["states"], batch["context"]
        b, n_frames = video.shape[:2]
        n_chunks = n_frames // self.chunk
        g = step_generator(self.cfg.seed, step, self.global_rank, stream=1)
        k = torch.randint(0, len(self.levels), (b, n_chunks), generator=g).to(self.device)
        cond = self.net.make_cond(batch["prompt"], camera=batch["camera"])
        cache = KVCache(self.policy)
        n_ctx = context.shape[1]
        if n_ctx:
            prefill(self.net, cache, context.to(video.dtype), cond)
        level_of = k.repeat_interleave(self.chunk, dim=1)  # [B, F] each frame's chunk's level
        rows = torch.arange(b, device=self.device)[:, None]
        # [B, F, C, H, W]: each chunk's ODE state at its sample's level
        x_t = states[rows, level_of, torch.arange(n_frames, device=self.device)]
        sigma = self.levels[level_of].to(x_t.dtype)
        # teacher forcing: every chunk reads the teacher's clean chunks before it, through the policy
        x0 = teacher_forced(self.net, cache, cond.frames(n_ctx, n_ctx + n_frames), x_t, sigma, video,
                            num_timesteps=self.cfg.diffusion.num_timesteps)
        se = (x0.float() - video.float()).pow(2).unflatten(1, (n_chunks, self.chunk))
        per_sample = se.flatten(2).mean(2).flatten()  # [B * n_chunks]
        level = k.flatten()
        logs = {
            f"student/loss_level{i}": per_sample[level == i].mean()
            for i in range(len(self.levels))
            if bool((level == i).any())
        }
        return per_sample.mean(), logs
