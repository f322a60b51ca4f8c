"""The context teacher: video continuation by flow matching, optionally with ERFT.

A training sample is a clip cut into [history ; target]: a history of random length (a multiple
of the chunk, up to `teacher.context_frames`) read through the teacher's memory policy, then a
target window of `teacher.target_chunks` chunks that attend to each other bidirectionally. One
forward runs over [selected history ; noisy target] with a frame mask (history block-causal, as
the cache would have seen it; the target sees all of it). The loss is on the target only.

With `erft=True` (the `teacher_erft` stage) the module also keeps a `ResidualBank` of its own
x0 errors and perturbs history, target and noise with them (cf.train.erft).
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import Tensor

from cf.diffusion import add_noise, denoise, encode_clean, loss_weight, sample_sigma, target
from cf.errors import CfError
from cf.memory import build_policy
from cf.model import CausalVideoDiT, Cond, block_causal_mask
from cf.train.base import EMA, EMACheckpoint, adamw_with_schedule, step_generator
from cf.train.erft import ResidualBank, draw_injection

LOSS_BINS = 4  # per-noise-level losses logged as teacher/loss_sigma<k>


def teacher_policy(cfg):
    """The policy the teacher reads its history through (`teacher.memory`, other knobs from memory.*)."""
    mem = copy.deepcopy(cfg.memory)
    mem.policy = cfg.teacher.memory
    return build_policy(mem, cfg.model.frames_per_chunk)


def history_mask(indices: Tensor, n_target: int, chunk: int) -> Tensor:
    """[K + T, K + T] bool frame mask over [selected history ; target].

    History frame i sees history frame j when j's chunk is not after i's (what the cache held
    when i was written); the target sees every history frame and itself; history never sees the
    target.
    """
    k = len(indices)
    c = indices // chunk
    m = torch.zeros(k + n_target, k + n_target, dtype=torch.bool)
    m[:k, :k] = c[None, :] <= c[:, None]
    m[k:, :] = True
    return m


def dense_layout(policy, n_frames: int, chunk: int, min_chunks: int, context_frames: int):
    """The one-forward teacher-forcing layout of a clip of `n_frames`: [clean chunks 0..n-2 ; noisy
    copies of the target chunks].

    Chunk j's history is its last `context_frames` frames read through `policy` (what
    `policy.plan` gives a chunk after them); its clean frames attend to that history and to their own
    chunk (what the cache saw when they were written), its noisy copy to the same history and to
    itself. Time positions are the frames' indices, which RoPE only sees as differences, so one
    forward equals each chunk's own forward after its own history. Returns (number of clean frames,
    target chunk indices, frame mask [K + T, K + T] bool).
    """
    n_chunks = n_frames // chunk
    targets = list(range(max(min_chunks, 0), n_chunks))
    if not targets:
        raise CfError(f"a {n_frames}-frame clip has no target chunk after teacher.min_context_frames; "
                      f"raise data.clip_frames")
    n_clean = (n_chunks - 1) * chunk
    reads = []
    for j in range(n_chunks):
        lo = max(0, j * chunk - context_frames)
        n_hist = j * chunk - lo
        plan = None if policy.needs_keys else policy.plan(n_hist, None, n_query=chunk)
        query = torch.arange(n_hist, n_hist + chunk)
        if plan is None or not (torch.equal(plan.positions, plan.indices)
                                and torch.equal(plan.query_positions, query)):
            raise CfError(f"teacher.dense needs a teacher memory whose time positions are frame indices and "
                          f"that does not promote by key similarity; teacher.memory={policy.name!r} is not "
                          f"one: set teacher.memory=full (or sliding/sink with "
                          f"memory.bounded_positions=false), or teacher.dense=false")
        reads.append(plan.indices + lo)
    n = n_clean + len(targets) * chunk
    mask = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n_chunks - 1):  # clean chunk j: its history and itself
        rows = slice(j * chunk, (j + 1) * chunk)
        mask[rows, reads[j]] = True
        mask[rows, rows] = True
    for i, j in enumerate(targets):  # noisy chunk j: the same history, then itself
        rows = slice(n_clean + i * chunk, n_clean + (i + 1) * chunk)
        mask[rows, reads[j]] = True
        mask[rows, rows] = True
    return n_clean, targets, mask


def dense_frames(n_clean: int, targets: list[int], chunk: int) -> Tensor:
    """The clip frame index of every position of the dense sequence: the clean frames, then each
    target chunk's frames again (the noisy copies). Also their RoPE time positions."""
    return torch.cat([torch.arange(n_clean)] + [torch.arange(j * chunk, (j + 1) * chunk) for j in targets])


class TeacherModule(EMACheckpoint, pl.LightningModule):
    def __init__(self, cfg, erft: bool = False):
        super().__init__()
        self.cfg = cfg
        self.net = CausalVideoDiT(cfg.model, cfg.data)
        self.policy = teacher_policy(cfg)
        self.chunk = cfg.model.frames_per_chunk
        self.n_target = cfg.teacher.target_chunks * self.chunk
        need = cfg.teacher.context_frames + self.n_target
        if cfg.data.clip_frames < self.n_target + self.chunk:
            raise CfError(f"data.clip_frames={cfg.data.clip_frames} leaves no history before a "
                          f"{self.n_target}-frame target; use data.clip_frames >= {need}")
        self.max_hist = min(cfg.teacher.context_frames, cfg.data.clip_frames - self.n_target) // self.chunk
        self.min_hist = -(-cfg.teacher.min_context_frames // self.chunk)
        if self.min_hist > self.max_hist:
            raise CfError(f"teacher.min_context_frames={cfg.teacher.min_context_frames} exceeds the longest "
                          f"history that fits ({self.max_hist * self.chunk} frames)")
        # the dense layout depends only on the clip length: built once (which also refuses a policy the
        # one-forward layout cannot replay now, not at step 1)
        self.dense = (dense_layout(self.policy, cfg.data.clip_frames, self.chunk, self.min_hist,
                                   cfg.teacher.context_frames) if cfg.teacher.dense else None)
        self.erft = erft
        if erft:
            shape = (cfg.model.channels, cfg.data.height, cfg.data.width)
            self.bank = ResidualBank(cfg.erft.bins, cfg.erft.bank_size, shape)
        self.ema = EMA(self.net, cfg.trainer.ema)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        steps = self.cfg.erft.steps if self.erft else self.cfg.trainer.max_steps
        return adamw_with_schedule(self.net.parameters(), self.cfg.trainer, total_steps=steps)

    def on_train_batch_end(self, *args) -> None:
        self.ema.update(self.net)

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, logs = self.loss(batch, self.global_step)
        self.log("teacher/loss", loss, prog_bar=True)
        for k, v in logs.items():
            self.log(k, v)
        return loss

    def loss(self, batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Flow-matching loss on the target frames; returns (loss, extra logs)."""
        cfg = self.cfg
        b = batch["video"].shape[0]
        g = step_generator(cfg.seed, step, self.global_rank, stream=1)
        null = torch.rand(b, generator=g) < cfg.teacher.cond_drop
        cond = self.net.make_cond(batch["prompt"], camera=None, null=null.to(self.device))
        build = self._dense_inputs if cfg.teacher.dense else self._window_inputs
        x_clean, x0, cam, time_pos, mask, n_sigma = build(batch, step, cond)

        sigma = sample_sigma((b, n_sigma), cfg.diffusion.train_shift, generator=g, device=self.device)
        sigma = sigma.to(x0.dtype).repeat_interleave(x0.shape[1] // n_sigma, dim=1)  # [B, T] per frame
        noise = torch.randn(x0.shape, generator=g).to(x0)
        x0_in, noise_in = x0, noise
        if self.erft:
            x_clean, x0_in, noise_in = self._inject(x_clean, x0, noise, sigma, g)
        x_t = add_noise(x0_in, noise_in, sigma)

        k = x_clean.shape[1]
        x = torch.cat([x_clean, x_t], dim=1)
        sig = torch.cat([sigma.new_zeros(b, k), sigma], dim=1)
        seq_cond = Cond(text=cond.text, text_mask=cond.text_mask, camera=cam, null=cond.null)
        pred = denoise(self.net, x, sig, seq_cond, num_timesteps=cfg.diffusion.num_timesteps,
                       time_pos=time_pos.to(self.device), frame_mask=mask.to(self.device)).pred[:, k:]

        per_frame = (pred - target(x0, noise, cfg.model.prediction)).pow(2).flatten(2).mean(2)  # [B, T]
        if cfg.model.precondition != "none":  # x0 MSE -> the MSE of the network's own output
            per_frame = per_frame * loss_weight(sigma, cfg.model)
        logs = self._bin_losses(per_frame.detach().flatten(), sigma.flatten())
        if self.erft:
            x0_pred = pred.detach() if cfg.model.prediction == "x0" else (x_t - sigma[..., None, None, None]
                                                                          * pred.detach())
            if step % cfg.erft.collect_every == 0:
                self.bank.add((x0_pred - x0).flatten(0, 1), sigma.flatten())
            logs["teacher/bank_filled"] = torch.tensor(float(self.bank.filled()))
        return per_frame.mean(), logs

    def _window_inputs(self, batch: dict, step: int, cond: Cond):
        """One target window after a random-length history read through the policy: (clean frames
        [B, K, ...], target x0 [B, T, ...], cameras of the sequence, time positions, frame mask, 1)."""
        video, camera = batch["video"], batch["camera"]
        n_hist, start = self.draw_window(step, video.shape[1])
        hist = video[:, start:start + n_hist]
        x0 = video[:, start + n_hist:start + n_hist + self.n_target]
        cam = camera[:, start:start + n_hist + self.n_target]
        plan = self.policy.plan(n_hist, self._mean_keys(hist, cam, cond), n_query=self.n_target)
        idx = plan.indices.to(self.device)
        seq_cam = torch.cat([cam[:, idx], cam[:, n_hist:]], dim=1)
        time_pos = torch.cat([plan.positions, plan.query_positions])
        return hist[:, idx], x0, seq_cam, time_pos, history_mask(plan.indices, self.n_target, self.chunk), 1

    def _dense_inputs(self, batch: dict, step: int, cond: Cond):
        """Teacher forcing: every chunk from the shortest history on is a target, read by its own noisy
        copy; see `dense_layout`. Same return as `_window_inputs`, with one noise level per target chunk."""
        video, camera = batch["video"], batch["camera"]
        if video.shape[1] != self.cfg.data.clip_frames:
            raise CfError(f"the batch has {video.shape[1]}-frame clips; the dense teacher was laid out for "
                          f"data.clip_frames={self.cfg.data.clip_frames}")
        n_clean, targets, mask = self.dense
        frames = dense_frames(n_clean, targets, self.chunk)
        x0 = video[:, frames[n_clean:]]
        return video[:, :n_clean], x0, camera[:, frames], frames, mask, len(targets)

    def draw_window(self, step: int, clip_frames: int) -> tuple[int, int]:
        """(history length, first frame) of step `step`'s sample window: drawn from the generator
        every rank shares, so all ranks cut their clips alike and their graphs match under DDP."""
        shared = step_generator(self.cfg.seed, step, None)
        n_hist = self.chunk * int(torch.randint(self.min_hist, self.max_hist + 1, (1,), generator=shared))
        start = int(torch.randint(0, clip_frames - n_hist - self.n_target + 1, (1,), generator=shared))
        return n_hist, start

    def _mean_keys(self, hist: Tensor, cam: Tensor, cond: Cond) -> Tensor | None:
        """Mean keys of the history frames, for policies that promote by key similarity."""
        if not self.policy.needs_keys or hist.shape[1] == 0:
            return None
        n = hist.shape[1]
        with torch.no_grad():
            c = Cond(text=cond.text, text_mask=cond.text_mask, camera=cam[:, :n], null=cond.null)
            out = encode_clean(self.net, hist, c, time_pos=torch.arange(n, device=self.device),
                               frame_mask=block_causal_mask(n, self.chunk, self.device))
        return out.mean_key

    def _inject(self, hist: Tensor, x0: Tensor, noise: Tensor, sigma: Tensor, g: torch.Generator):
        """ERFT: add recycled errors to history, clean target and noise, per the drawn injection."""
        e = self.cfg.erft
        inj = draw_injection(hist.shape[0], e.p_clean, e.p_history, e.p_target, e.p_noise, g)
        dev = self.device

        def residuals(like: Tensor, sig: Tensor) -> Tensor:
            return self.bank.sample(sig.flatten().cpu(), generator=g).to(like).reshape(like.shape)

        if hist.shape[1]:
            # history errors come from the low-noise bins: the student's history is finished
            # frames, whose errors look like late-step x0 errors, not like high-noise blur
            hs = torch.rand(hist.shape[:2], generator=g) * e.history_sigma_max
            hist = hist + inj.history.to(dev)[:, None, None, None, None] * residuals(hist, hs)
        x0 = x0 + inj.target.to(dev)[:, None, None, None, None] * residuals(x0, sigma)
        noise = noise + inj.noise.to(dev)[:, None, None, None, None] * residuals(noise, sigma)
        return hist, x0, noise

    @staticmethod
    def _bin_losses(per_sample: Tensor, sigma: Tensor) -> dict[str, Tensor]:
        bins = (sigma.float() * LOSS_BINS).long().clamp_max(LOSS_BINS - 1)
        return {f"teacher/loss_sigma{k}": per_sample[bins == k].mean()
                for k in range(LOSS_BINS) if bool((bins == k).any())}

    def ema_net(self) -> CausalVideoDiT:
        """A copy of the network with the EMA weights (what sampling and the next stage use)."""
        net = copy.deepcopy(self.net)
        if self.ema.enabled:
            self.ema.copy_to(net)
        return net.eval()
