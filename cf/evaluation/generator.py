"""A generator (a student or CDMD stage's EMA network) evaluated on held-out worlds.

On `student.eval_videos` held-out worlds (seeds data.eval_seed + i), videos of
`student.eval_seconds` (the first `student.context_frames` clean, then generated) from the
generator, from the untrained student (random initialisation), from the undistilled student (the
teacher's weights in the student's few-step sampler: where distillation starts), from the teacher (its
Euler sampler: what distillation aims at) and the world's own frames, scored by
`cf.metrics.VideoScorer` (`student.eval_backbone`, pixels by default: weight-free): revisit PSNR
(by lag), first-frame consistency, and the rest of the scorer's numbers. Caveat written into
eval.json: a near-static video scores high on both, so read them next to the world's own scores
and the frame contrast. The stage runner (`cf.train.student_stage.finish`) writes and logs the result.
"""

from __future__ import annotations

import math

import torch

from cf.errors import CfError
from cf.metrics.columns import score_columns
from cf.model import CausalVideoDiT, param_dtype

EVAL_ROWS = ("distilled", "untrained", "undistilled", "world", "teacher")
# what the distilled student must improve on: memory read against chance, and consistency over time
CRITERIA = ("revisit_retention", "first_frame_consistency")


def untrained_student(cfg, device: torch.device) -> CausalVideoDiT:
    """The student before any training: the model's random initialisation from seed `cfg.seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = CausalVideoDiT(cfg.model, cfg.data)
    return net.to(device=device, dtype=param_dtype(cfg.model, device)).eval()


def evaluate_generator(
    cfg, net: CausalVideoDiT, teacher: CausalVideoDiT | None = None, progress: bool = True
) -> dict:
    """Score `net`, the untrained student, the world and (if given) the teacher on held-out worlds (see
    the module doc). The teacher samples with its Euler sampler and `diffusion.cfg_scale` (guidance role
    `teacher`), through the same memory policy: what distillation aims at, at
    `diffusion.teacher_steps / len(student_timesteps)` times the student's cost.

    Returns {"setup": ..., "scores": {model: VideoScorer aggregate}, "summary": {model: headline
    numbers}, "distilled_beats_untrained": {metric: bool}, "frames": {model: video 0}}.
    """
    from cf.data.world import World
    from cf.generation import generate
    from cf.metrics.score import VideoScorer

    s, chunk, fps = cfg.student, cfg.model.frames_per_chunk, float(cfg.data.fps)
    if s.eval_videos < 1 or s.eval_seconds <= 0:
        raise CfError(
            f"student.eval_videos={s.eval_videos} and student.eval_seconds={s.eval_seconds} must be positive"
        )
    device = next(net.parameters()).device
    n_ctx = s.context_frames
    n_chunks = max(1, -(-(round(s.eval_seconds * fps) - n_ctx) // chunk))
    total = n_ctx + n_chunks * chunk
    models = {"distilled": net, "untrained": untrained_student(cfg, device)}
    sampler = {"distilled": "student", "untrained": "student", "undistilled": "student", "teacher": "teacher"}
    if teacher is not None:
        models["undistilled"] = models["teacher"] = teacher
    rows = [r for r in EVAL_ROWS if r in models or r == "world"]
    scorers = {m: VideoScorer(cfg, backbone=s.eval_backbone, lpips=None, device=device) for m in rows}
    from cf.metrics.realism import config_reference

    reference = config_reference(cfg, cfg.data, range(s.eval_videos))
    for sc in scorers.values():
        sc.attach_realism(reference)
    from cf.diffusion.guidance import STUDENT, TEACHER, guidance_scale

    # the teacher row samples as "the teacher" does everywhere (its own evaluation, cf generate); the
    # student's sampler reads every other model
    guidance = {m: guidance_scale(cfg, STUDENT) for m in ("distilled", "untrained", "undistilled")}
    guidance["teacher"] = guidance_scale(cfg, TEACHER)
    frames: dict[str, torch.Tensor] = {}
    promoted: dict[str, list[list[int]]] = {}  # model -> per world, the frames its slow memory promoted
    seeds = [cfg.data.eval_seed + i for i in range(s.eval_videos)]
    it = seeds
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(seeds, desc="evaluate generator", unit="world")
    for seed in it:
        clip = World(cfg.data, seed).render(total)
        pairs = revisits_after(clip, n_ctx)
        videos = {}
        for m, model in models.items():
            videos[m], meta = generate(
                cfg, model, n_chunks, sampler=sampler[m], guidance=guidance[m], context=n_ctx, world_seed=seed
            )
            if meta["promoted"] is not None:
                promoted.setdefault(m, []).append(meta["promoted"])
        videos["world"] = clip.video
        for m, video in videos.items():
            scorers[m].score(video, fps, *pairs)
            frames.setdefault(m, video)
    scores = {m: sc.aggregate() for m, sc in scorers.items()}
    summary = {m: headline(scores[m], frames[m]) for m in rows}
    for m, runs in promoted.items():
        summary[m]["slow_promotions"] = sum(map(len, runs)) / len(runs)
    beats = {
        ref: {k: _gt(summary["distilled"][k], summary[ref][k]) for k in CRITERIA}
        for ref in ("untrained", "undistilled") if ref in summary
    }
    return {
        "setup": {
            "worlds": seeds,
            "seconds": total / fps,
            "frames": total,
            "context_frames": n_ctx,
            "backbone": scorers["distilled"].describe()["backbone_label"],
            "sampler": "student",
            "memory": cfg.memory.policy,
            "untrained": f"random initialisation (seed {cfg.seed})",
            "undistilled": "the teacher's weights in the student's sampler and memory policy",
            "slow_memory_promoted": promoted or None,
            "note": "every video starts with the same clean context frames (revisit pairs end after "
            "them); a near-static or low-contrast video scores high on revisit PSNR and first-frame "
            "consistency: read them next to the world's own scores and pixel_std",
        },
        "scores": scores,
        "summary": summary,
        "distilled_beats_untrained": beats["untrained"],
        "distilled_beats_undistilled": beats.get("undistilled", {}),
        "frames": frames,
    }


def revisits_after(clip, n_ctx: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The world's revisit pairs (and masks) whose second frame is generated (t_revisit >= n_ctx) and whose
    mask is not empty, and the camera (what `VideoScorer.score` takes after the video and fps)."""
    masks = clip.revisit_masks()
    keep = [i for i, (_, t2, _) in enumerate(clip.revisits) if t2 >= n_ctx and masks[i].any()]
    if not keep:
        return None, None, clip.camera
    return torch.tensor([clip.revisits[i] for i in keep]), torch.from_numpy(masks[keep]), clip.camera


def _gt(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else bool(a > b)


def headline(agg: dict, video: torch.Tensor) -> dict:
    """The numbers per model that go to eval.json and MLflow: every score column of `cf.metrics.columns`
    (consistency, motion, realism, revisit retention and PSNR per lag bin, effective context: the names
    the benchmark uses), first-frame consistency pooled over segments, and the pixel std (contrast)."""
    out: dict = {k: (None if math.isnan(v) else v) for k, v in score_columns(agg).items()}
    out.setdefault("revisit_psnr", None)
    out.setdefault("revisit_retention", None)
    curve = agg["first_frame_consistency"]
    n = sum(c["frames"] for c in curve if c["value"] is not None)
    out["first_frame_consistency"] = (
        sum(c["value"] * c["frames"] for c in curve if c["value"] is not None) / n if n else None
    )
    out["pixel_std"] = float(video.float().std())
    return out
