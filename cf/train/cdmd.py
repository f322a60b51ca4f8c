"""Contextual DMD: the student distilled from the teacher by distribution matching (stage 1 and 2).

Three networks: the generator (`net`, the student, rolled out through the shared loop with its
memory policy), the critic (fake score, initialised from the teacher, trained by flow matching on
generated samples) and the frozen teacher (real score, with classifier-free guidance).

A step is one optimizer update. Every batch rolls the student out once (the length and the exit
step are drawn from `step_generator(seed, step, None)`, so DDP ranks agree) and takes one update:
the generator's when `step % (critic_ratio + 1) == critic_ratio`, else the critic's. So
`global_step` counts batches, `stageN_steps` generator updates make `stageN_steps * (ratio + 1)`
steps, and everything is a pure function of the step: exact resume.

- stage 1 (Self-Forcing): `short_chunks` chunks, every chunk exits at the same random step, the
  whole rollout is the DMD window.
- stage 2 (contextual DMD): a long rollout (curriculum: its maximum length grows linearly with
  the generator updates), history chunks fully denoised, a random exit on the last `short_chunks`
  chunks (the window). Teacher and critic read the generated history the same way:
  `cdmd.teacher_history=policy` prefills the whole history through the run's memory policy;
  `window` shows them only the last `teacher.context_frames` frames (the released code's choice).

Rollouts continue the clean first `student.context_frames` frames of a world (0: from noise alone,
the paper's text-to-video); the teacher and the critic read those frames as history too.

Gradients reach the generator only through the exit step of the window's chunks (the rollout
runs everything else without gradient and writes its cache without gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from cf.diffusion import (
    REAL_SCORE_1,
    REAL_SCORE_2,
    Guided,
    add_noise,
    build_sampler,
    guidance_scale,
    loss_weight,
    sample_sigma,
)
from cf.errors import CfError
from cf.memory import KVCache, MemoryPolicy
from cf.model import CausalVideoDiT, Cond
from cf.rollout import prefill, rollout, teacher_forced
from cf.train.base import EMA, EMACheckpoint, build_optimizer, step_generator
from cf.train.memories import Memories
from cf.train.student import check_context

CDMD_STAGES = {1: "cdmd1", 2: "cdmd2"}


# ---------------------------------------------------------------------- schedule (pure functions)


def is_generator_step(step: int, critic_ratio: int) -> bool:
    """Step `step` updates the generator (else the critic): the last of every `critic_ratio + 1`."""
    return step % (critic_ratio + 1) == critic_ratio


def generator_updates(step: int, critic_ratio: int) -> int:
    """Generator updates taken before step `step`."""
    return step // (critic_ratio + 1)


def stage_steps(cdmd_cfg, stage: int) -> int:
    """Optimizer steps (Lightning's max_steps) of a stage: its generator updates x (ratio + 1)."""
    gen = cdmd_cfg.stage1_steps if stage == 1 else cdmd_cfg.stage2_steps
    return gen * (cdmd_cfg.critic_ratio + 1)


def curriculum_max(update: int, steps: int, start: int, end: int) -> int:
    """Longest stage-2 rollout (chunks) at generator update `update`: `start` at 0, growing linearly
    to `end` at the stage's last update (`steps - 1`), `end` after it."""
    frac = 1.0 if steps <= 1 else min(update, steps - 1) / (steps - 1)
    return start + int((end - start) * frac)


@dataclass(frozen=True)
class RolloutPlan:
    n_chunks: int  # chunks rolled out
    window: int  # the last `window` chunks carry the DMD loss (and the gradient)
    exit_step: int  # sampler step whose x0 is each window chunk (history chunks: the last step)
    generator: bool  # this step updates the generator

    def exit_steps(self, n_steps: int) -> list[int]:
        """Per chunk: history fully denoised, window at the drawn exit (stage 1: all at the exit)."""
        return [n_steps - 1] * (self.n_chunks - self.window) + [self.exit_step] * self.window


def plan_step(cdmd_cfg, stage: int, step: int, seed: int, n_steps: int) -> RolloutPlan:
    """Every random choice of a step's rollout, from the generator all ranks share."""
    c = cdmd_cfg
    shared = step_generator(seed, step, None)
    if stage == 1:
        n = c.short_chunks
    else:
        hi = curriculum_max(
            generator_updates(step, c.critic_ratio), c.stage2_steps, c.long_chunks_start, c.long_chunks_end
        )
        n = int(torch.randint(c.long_chunks_start, hi + 1, (1,), generator=shared))
    exit_step = int(torch.randint(0, n_steps, (1,), generator=shared))
    return RolloutPlan(
        n_chunks=n,
        window=min(c.short_chunks, n),
        exit_step=exit_step,
        generator=is_generator_step(step, c.critic_ratio),
    )


def check_config(cfg) -> None:
    """What the type system cannot say about `cdmd.*`; raises CfError naming the key and the fix."""
    check_context(cfg)
    c = cfg.cdmd
    for key in ("stage1_steps", "stage2_steps", "short_chunks", "long_chunks_start", "long_chunks_end"):
        if c[key] < 1:
            raise CfError(f"cdmd.{key}={c[key]} must be >= 1")
    if c.critic_ratio < 0:
        raise CfError(
            f"cdmd.critic_ratio={c.critic_ratio} must be >= 0 (critic updates per generator update)"
        )
    if not c.long_chunks_start <= c.long_chunks_end:
        raise CfError(
            f"cdmd.long_chunks_start={c.long_chunks_start} > cdmd.long_chunks_end={c.long_chunks_end}"
            f"; the stage-2 curriculum grows the rollout, so set start <= end"
        )
    if c.long_chunks_start < c.short_chunks:
        raise CfError(
            f"cdmd.long_chunks_start={c.long_chunks_start} is shorter than the DMD window "
            f"cdmd.short_chunks={c.short_chunks}; stage 2 rolls out at least one window"
        )
    if not 0 <= c.t_min < c.t_max <= cfg.diffusion.num_timesteps:
        raise CfError(
            f"cdmd.t_min={c.t_min}, cdmd.t_max={c.t_max} must satisfy 0 <= t_min < t_max <= "
            f"diffusion.num_timesteps={cfg.diffusion.num_timesteps}"
        )
    if c.dmd_shift <= 0:
        raise CfError(f"cdmd.dmd_shift={c.dmd_shift} must be positive (1 = no shift)")


# ---------------------------------------------------------------------- the DMD math


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD: a loss whose gradient in x is `(x0_fake - x0_real) / mean|x - x0_real|` per sample (/ numel).

    x [B, ...] the generated sample (with gradient); x0_real / x0_fake the real (teacher) and fake
    (critic) denoised estimates of its noised copy. Descending it moves x towards what the teacher
    would denoise it to and away from the critic's, i.e. the generated distribution towards the real.
    """
    with torch.no_grad():
        dims = tuple(range(1, x.dim()))
        norm = (x.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
        grad = (x0_fake.float() - x0_real.float()) / norm
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach())


def dmd_sigma(n: int, cdmd_cfg, num_timesteps: int, generator: torch.Generator, device) -> Tensor:
    """[n] DMD noise levels: U[0, 1] shifted by `dmd_shift`, clamped to [t_min, t_max] / num_timesteps."""
    c = cdmd_cfg
    return sample_sigma(
        (n,),
        c.dmd_shift,
        generator=generator,
        device=device,
        lo=c.t_min / num_timesteps,
        hi=c.t_max / num_timesteps,
    )


def score_window(
    net: CausalVideoDiT,
    policy: MemoryPolicy,
    frames: Tensor,
    cond: Cond,
    *,
    start: int,
    first: int,
    sigma: Tensor,
    noise: Tensor,
    num_timesteps: int,
    guidance: float = 1.0,
) -> Tensor:
    """x0 estimates of the noised window `frames[:, first:]`, given the history `frames[:, start:first]`.

    The history is prefilled into a fresh cache of `policy` (clean, sigma 0, no gradient); then each
    window chunk is noised (`sigma` [B], `noise` like the window), denoised in one forward, and
    written clean before the next chunk reads (`cf.rollout.teacher_forced`). So every window chunk sees
    the clean generated video before it, through the policy: the teacher's and the critic's view of a
    student rollout.
    frames [B, F, C, H, W] (detached), cond covering frame 0 on; returns [B, F - first, C, H, W].
    Gradient flows into `net` only through the window's forwards (when grad is enabled).
    """
    chunk = policy.chunk
    if (first - start) % chunk or (frames.shape[1] - first) % chunk:
        raise CfError(
            f"history [{start}, {first}) and window [{first}, {frames.shape[1]}) must be whole "
            f"{chunk}-frame chunks"
        )
    b, n = frames.shape[:2]
    guided = Guided(guidance)
    run_cond = guided.cond(cond.frames(start, n), b)
    cache = KVCache(policy)
    if first > start:
        prefill(net, cache, guided.twice(frames[:, start:first]), run_cond)
    window = frames[:, first:]
    sig = sigma.to(window.dtype)[:, None].expand(b, n - first)
    x_t = add_noise(window, noise, sig)
    return teacher_forced(net, cache, run_cond.frames(first - start, n - start), x_t, sig, window,
                          num_timesteps=num_timesteps, guidance=guidance)


# ---------------------------------------------------------------------- the module


class CDMDModule(EMACheckpoint, pl.LightningModule):
    """Generator `net`, critic `critic`, frozen `teacher`; manual optimisation (see the module doc)."""

    def __init__(self, cfg, stage: int):
        super().__init__()
        if stage not in CDMD_STAGES:
            raise CfError(f"cdmd stage {stage!r} is not 1 or 2")
        check_config(cfg)
        self.cfg, self.stage = cfg, stage
        self.automatic_optimization = False
        self.net = CausalVideoDiT(cfg.model, cfg.data)
        self.critic = CausalVideoDiT(cfg.model, cfg.data)
        self.teacher = CausalVideoDiT(cfg.model, cfg.data).requires_grad_(False)
        self.chunk = cfg.model.frames_per_chunk
        memories = Memories.from_config(cfg)
        self.policy = memories.student
        # how the teacher and the critic read the generated history (cf.train.memories)
        self.score_policy, self.score_reach = memories.score, memories.score_reach
        self.sampler = build_sampler(cfg.diffusion, "student")
        self.guidance = guidance_scale(cfg, REAL_SCORE_1 if stage == 1 else REAL_SCORE_2)
        self.ema = EMA(self.net, cfg.cdmd.ema)

    def load_start(self, teacher: dict[str, Tensor], generator: dict[str, Tensor]) -> None:
        """Teacher weights into the teacher and the critic, the previous stage's generator into `net`."""
        self.teacher.load_state_dict(teacher)
        self.critic.load_state_dict(teacher)
        self.net.load_state_dict(generator)
        self.ema = EMA(self.net, self.cfg.cdmd.ema)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        c = self.cfg.cdmd
        gen = build_optimizer(self.net.parameters(), self.cfg.trainer, lr=c.generator_lr, betas=c.betas)
        critic = build_optimizer(self.critic.parameters(), self.cfg.trainer, lr=c.critic_lr, betas=c.betas)
        return [gen, critic]

    # ------------------------------------------------------------------ the step
    def rollout_plan(self, step: int) -> RolloutPlan:
        return plan_step(self.cfg.cdmd, self.stage, step, self.cfg.seed, self.sampler.n_steps)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        step = self.global_step
        plan = self.rollout_plan(step)
        gen_opt, critic_opt = self.optimizers()
        video = self.generate(batch, plan, step)
        if plan.generator:
            loss, logs = self.generator_loss(batch, video, plan, step)
            opt, params, name = gen_opt, list(self.net.parameters()), "cdmd/dmd_loss"
        else:
            loss, logs = self.critic_loss(batch, video.detach(), plan, step)
            opt, params, name = critic_opt, list(self.critic.parameters()), "cdmd/critic_loss"
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # unclipped
        if self.cfg.trainer.grad_clip > 0:
            self.clip_gradients(
                opt, gradient_clip_val=self.cfg.trainer.grad_clip, gradient_clip_algorithm="norm"
            )
        opt.step()
        if plan.generator:
            self.ema.update(self.net)
        self.log(name, loss.detach(), prog_bar=True)
        self.log("cdmd/grad_norm" if plan.generator else "cdmd/critic_grad_norm", norm)
        self.log("cdmd/rollout_chunks", float(plan.n_chunks))
        self.log(
            "cdmd/generator_updates",
            float(generator_updates(step, self.cfg.cdmd.critic_ratio) + plan.generator),
        )
        for k, v in logs.items():
            self.log(k, v)

    def generate(self, batch: dict, plan: RolloutPlan, step: int) -> Tensor:
        """[clean context ; the student's rollout] [B, Fc + n_chunks * C, ...] through the shared loop:
        gradient only at the window chunks' exit step, and only on generator steps."""
        context = batch["context"]
        n_ctx = context.shape[1]
        cond = self.net.make_cond(
            batch["prompt"], camera=batch["camera"][:, : n_ctx + plan.n_chunks * self.chunk]
        )
        g = step_generator(self.cfg.seed, step, self.global_rank, stream=1)  # this rank's noise
        with torch.set_grad_enabled(plan.generator and torch.is_grad_enabled()):
            video = rollout(
                self.net,
                KVCache(self.policy),
                self.sampler,
                cond,
                plan.n_chunks,
                context=context if n_ctx else None,
                generator=g,
                exit_step=plan.exit_steps(self.sampler.n_steps),
                grad_chunks=plan.window,
                write_last=False,
            ).video
        return torch.cat([context.to(video.dtype), video], dim=1)

    def _window_inputs(self, batch: dict, video: Tensor, plan: RolloutPlan, step: int):
        """(first window frame, history start for teacher and critic, sigma [B], noise of the window)."""
        first = video.shape[1] - plan.window * self.chunk
        # frames before `start` are out of every read
        start = 0 if self.score_reach is None else max(0, first - self.score_reach)
        g = step_generator(self.cfg.seed, step, self.global_rank, stream=2)
        sigma = dmd_sigma(video.shape[0], self.cfg.cdmd, self.cfg.diffusion.num_timesteps, g, self.device)
        noise = torch.randn(video[:, first:].shape, generator=g, dtype=torch.float32).to(video)
        return first, start, sigma, noise

    def _conds(self, batch: dict, n_frames: int) -> tuple[Cond, Cond]:
        cam = batch["camera"][:, :n_frames]
        return self.teacher.make_cond(batch["prompt"], camera=cam), self.critic.make_cond(
            batch["prompt"], camera=cam
        )

    def generator_loss(self, batch: dict, video: Tensor, plan: RolloutPlan, step: int):
        first, start, sigma, noise = self._window_inputs(batch, video, plan, step)
        frames = video.detach()
        with torch.no_grad():
            t_cond, c_cond = self._conds(batch, video.shape[1])
            kw = dict(start=start, first=first, sigma=sigma, noise=noise,
                      num_timesteps=self.cfg.diffusion.num_timesteps)
            x0_real = score_window(
                self.teacher, self.score_policy, frames, t_cond, guidance=self.guidance, **kw
            )
            x0_fake = score_window(self.critic, self.score_policy, frames, c_cond, **kw)
        x = video[:, first:]
        gap = (x0_fake - x0_real).float().pow(2).mean()
        return dmd_loss(x, x0_real, x0_fake), {"cdmd/real_fake_gap": gap, "cdmd/dmd_sigma": sigma.mean()}

    def critic_loss(self, batch: dict, video: Tensor, plan: RolloutPlan, step: int):
        first, start, sigma, noise = self._window_inputs(batch, video, plan, step)
        _, c_cond = self._conds(batch, video.shape[1])
        x0 = score_window(
            self.critic, self.score_policy, video, c_cond, start=start, first=first, sigma=sigma, noise=noise,
            num_timesteps=self.cfg.diffusion.num_timesteps,
        )
        per_sample = (x0.float() - video[:, first:].float()).pow(2).flatten(1).mean(1)
        return (loss_weight(sigma, self.cfg.model) * per_sample).mean(), {}
