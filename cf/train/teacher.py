"""The context teacher: video continuation by flow matching, optionally with ERFT.

A training sample is a clip cut into [history ; target]: a history of random length (a multiple
of the chunk, up to `teacher.context_frames`) read through the teacher's memory policy, then a
target window of `teacher.target_chunks` chunks that attend to each other bidirectionally. One
forward runs over [history ; noisy target] with a frame mask that replays the cache exactly: each
history chunk sees what the policy read when it was written, the target what it reads after the
whole history (`window_layout`). A policy that cannot be replayed so (one that promotes by key
similarity, or compacts positions around a sink or slow memory) is refused when the module is
built. The loss is on the target only.

With `erft=True` (the `teacher_erft` stage) the module also keeps a `ResidualBank` of its own
x0 errors and perturbs history, target and noise with them (cf.train.erft).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from cf.diffusion import add_noise, denoise, loss_weight, sample_sigma, target
from cf.errors import CfError
from cf.memory import POLICIES, build_policy
from cf.model import CausalVideoDiT, Cond
from cf.train.base import EMA, EMACheckpoint, adamw_with_schedule, step_generator
from cf.train.erft import ResidualBank, draw_injection
from cf.train.memories import Memories

LOSS_BINS = 4  # per-noise-level losses logged as teacher/loss_sigma<k>


def replayed_read(policy, n_hist: int, n_query: int) -> Tensor | None:
    """Which of `n_hist` history frames a query of `n_query` frames placed right after them reads through
    `policy` ([K] long), when one forward with the frames' indices as time positions replays that read
    exactly; None when it cannot.

    It can when the policy does not promote by key similarity (promotions depend on the mean keys a
    cache computes chunk by chunk) and its time positions, of the read and of the query, are the frame
    indices up to one shift: RoPE only sees differences, so a sliding window's bounded (compacted)
    positions qualify, a sink or slow memory compacted next to the fast window does not.
    """
    if policy.needs_keys:
        return None
    plan = policy.plan(n_hist, None, n_query=n_query)
    shift = plan.query_positions - torch.arange(n_hist, n_hist + n_query)
    if bool((shift != shift[0]).any()) or bool((plan.positions - plan.indices != shift[0]).any()):
        return None
    return plan.indices


def window_layout(policy, n_hist: int, n_target: int, chunk: int) -> Tensor | None:
    """[n_hist + n_target]^2 bool frame mask of one forward over [history ; target] that gives every frame
    what a cache of `policy` started at the history's first frame gives it: history chunk j attends to the
    policy's read when it was written and to itself; the target (bidirectional inside) to the read after
    the whole history and to itself; the history never sees the target. Time positions: the frame
    indices. None when the policy's reads cannot be replayed (`replayed_read`).
    """
    n = n_hist + n_target
    mask = torch.zeros(n, n, dtype=torch.bool)
    for lo, hi in [(f0, f0 + chunk) for f0 in range(0, n_hist, chunk)] + [(n_hist, n)]:
        read = replayed_read(policy, lo, hi - lo)
        if read is None:
            return None
        mask[lo:hi, read] = True
        mask[lo:hi, lo:hi] = True
    return mask


def dense_layout(policy, n_frames: int, chunk: int, min_chunks: int, context_frames: int):
    """The one-forward teacher-forcing layout of a clip of `n_frames`: [clean chunks 0..n-2 ; noisy
    copies of the target chunks].

    Chunk j's history is its last `context_frames` frames read through `policy` (what
    `policy.plan` gives a chunk after them); its clean frames attend to that history and to their own
    chunk (what the cache saw when they were written), its noisy copy to the same history and to
    itself. Time positions are the frames' indices, which RoPE only sees as differences, so one
    forward equals each chunk's own forward after its own history. Returns (number of clean frames,
    target chunk indices, frame mask [K + T, K + T] bool), or None when the policy's reads cannot be
    replayed (`replayed_read`).
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
        read = replayed_read(policy, j * chunk - lo, chunk)
        if read is None:
            return None
        reads.append(read + lo)
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


def teacher_layouts(cfg, policy, min_hist: int, max_hist: int):
    """The teacher's one-forward layouts for `policy`: `dense_layout` of the clip (teacher.dense), else
    {history frames: `window_layout`} for every history length a sample can draw ([min_hist, max_hist]
    chunks). None when the policy's reads cannot be replayed in one forward."""
    chunk = cfg.model.frames_per_chunk
    if cfg.teacher.dense:
        return dense_layout(policy, cfg.data.clip_frames, chunk, min_hist, cfg.teacher.context_frames)
    n_target = cfg.teacher.target_chunks * chunk
    windows = {m * chunk: window_layout(policy, m * chunk, n_target, chunk)
               for m in range(min_hist, max_hist + 1)}
    return None if any(w is None for w in windows.values()) else windows


def refuse_teacher_memory(cfg, policy, min_hist: int, max_hist: int) -> CfError:
    """The error for a teacher.memory the one-forward training cannot replay: why, and what works."""
    accepted = []
    for name in POLICIES:
        other = build_policy(cfg.memory, cfg.model.frames_per_chunk, policy=name)
        if teacher_layouts(cfg, other, min_hist, max_hist) is not None:
            accepted.append(name)
    why = ("it promotes frames by the similarity of mean keys that only a cache computes, chunk by chunk "
           "(memory.promotion=similarity)" if policy.needs_keys else
           "its time positions are not the frames' indices up to one shift (memory.bounded_positions=true "
           "compacts a sink or slow memory next to the fast window), so no one position per frame serves "
           "every read")
    layout = "teacher.dense=true" if cfg.teacher.dense else "teacher.dense=false: one window"
    return CfError(f"teacher.memory={policy.name!r} cannot be trained exactly as a cache reads it: the "
                   f"teacher replays its history's reads in one forward ({layout}), and {why}. Accepted "
                   f"with these memory.* settings: {', '.join(accepted)}; set teacher.memory=full (every "
                   f"frame at its own index), or memory.bounded_positions=false / memory.promotion=uniform")


def dense_frames(n_clean: int, targets: list[int], chunk: int) -> Tensor:
    """The clip frame index of every position of the dense sequence: the clean frames, then each
    target chunk's frames again (the noisy copies). Also their RoPE time positions."""
    return torch.cat([torch.arange(n_clean)] + [torch.arange(j * chunk, (j + 1) * chunk) for j in targets])


class TeacherModule(EMACheckpoint, pl.LightningModule):
    def __init__(self, cfg, erft: bool = False):
        super().__init__()
        self.cfg = cfg
        self.net = CausalVideoDiT(cfg.model, cfg.data)
        self.policy = Memories.from_config(cfg).teacher
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
        # the layouts depend only on the clip and history lengths: built once, which also refuses a policy
        # the one-forward training cannot replay exactly now, not at step 1
        self.layouts = teacher_layouts(cfg, self.policy, self.min_hist, self.max_hist)
        if self.layouts is None:
            raise refuse_teacher_memory(cfg, self.policy, self.min_hist, self.max_hist)
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
        x_clean, x0, cam, time_pos, mask, n_sigma = build(batch, step)

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
                       time_pos=time_pos.to(self.device), frame_mask=mask.to(self.device), out_from=k).pred

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

    def _window_inputs(self, batch: dict, step: int):
        """One target window after a random-length history, laid out as the teacher's cache would read it
        (`window_layout`): (clean history [B, K, ...], target x0 [B, T, ...], cameras of the sequence,
        time positions, frame mask, 1)."""
        video, camera = batch["video"], batch["camera"]
        n_hist, start = self.draw_window(step, video.shape[1])
        n = n_hist + self.n_target
        hist, x0 = video[:, start:start + n_hist], video[:, start + n_hist:start + n]
        return hist, x0, camera[:, start:start + n], torch.arange(n), self.layouts[n_hist], 1

    def _dense_inputs(self, batch: dict, step: int):
        """Teacher forcing: every chunk from the shortest history on is a target, read by its own noisy
        copy; see `dense_layout`. Same return as `_window_inputs`, with one noise level per target chunk."""
        video, camera = batch["video"], batch["camera"]
        if video.shape[1] != self.cfg.data.clip_frames:
            raise CfError(f"the batch has {video.shape[1]}-frame clips; the dense teacher was laid out for "
                          f"data.clip_frames={self.cfg.data.clip_frames}")
        n_clean, targets, mask = self.layouts
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
