"""Running the generator stages: `student` (ODE initialisation), `cdmd1` and `cdmd2` (DMD).

Each stage trains (resuming from its own last.ckpt after a kill), then writes into
`<out>/<stage>/`: `generator.safetensors` (the EMA generator, loadable by
`cf.model.build_model(cfg, device, weights=path)`: the hand-off nobody needs checkpoint internals
for), `eval.json`, `sample.mp4` (ground truth | generated) and `samples.png` (a contact sheet), all
logged to the stage's MLflow run.

Evaluation: on `student.eval_videos` held-out worlds (seeds data.eval_seed + i), videos of
`student.eval_seconds` (the first `student.context_frames` clean, then generated) from the
generator, from the untrained student (random initialisation), from the undistilled student (the
teacher's weights in the student's few-step sampler: where distillation starts), from the teacher (its
Euler sampler: what distillation aims at) and the world's own frames, scored by
`cf.metrics.VideoScorer` (`student.eval_backbone`, pixels by default: weight-free): revisit PSNR
(by lag), first-frame consistency, and the rest of the scorer's numbers. Caveat written into
eval.json: a near-static video scores high on both, so read them next to the world's own scores
and the frame contrast.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cf import tracking
from cf.config import config_hash
from cf.errors import CfError
from cf.metrics.columns import score_columns
from cf.model import CausalVideoDiT, param_dtype, precision
from cf.train.base import export_safetensors, fit, load_checkpoint, load_module_weights, make_trainer
from cf.train.callbacks import WallClockStop
from cf.train.cdmd import STAGES, CDMDModule, stage_steps
from cf.train.conditions import ConditionStream, PairStream, StreamDataModule
from cf.train.student import StudentModule, sample_ode_pairs
from cf.utils import atomic_path, atomic_write_json, pick_device, seed_everything
from cf.video import contact_sheet, write_video

GENERATOR_FILE = "generator.safetensors"
PAIRS_FILE = "ode_pairs.safetensors"
EVAL_ROWS = ("distilled", "untrained", "undistilled", "world", "teacher")
# what the distilled student must improve on: memory read against chance, and consistency over time
CRITERIA = ("revisit_retention", "first_frame_consistency")


# ---------------------------------------------------------------------- weights


def network_weights(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The network of a teacher / student / cdmd checkpoint (`net.` keys, with its EMA when it has one)
    or of a `.safetensors` file (e.g. a stage's generator.safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise CfError(
            f"{what} {str(path)!r} does not exist; train the stage that writes it first or pass another path"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    has_ema = bool(load_checkpoint(path).get("ema", {}).get("shadow"))
    return load_module_weights(path, prefix="net.", ema_key="ema" if has_ema else None)


def _on_device(cfg, weights: dict[str, torch.Tensor], device: torch.device) -> CausalVideoDiT:
    net = CausalVideoDiT(cfg.model, cfg.data)
    net.load_state_dict(weights)
    return net.to(device=device, dtype=param_dtype(cfg.model, device)).eval()


def _weights_digest(weights: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def ode_pairs(cfg, teacher_weights: dict[str, torch.Tensor], stage_dir: Path) -> tuple[dict, list[str]]:
    """The teacher's ODE pairs, sampled once and kept in `<stage>/ode_pairs.safetensors` (a resumed
    stage reads them back); resampled when the teacher or the config that shapes them changed."""
    from safetensors.torch import load_file, save_file

    keys = [
        "seed",
        "data",
        "model",
        "diffusion",
        "memory",
        "teacher",
        "student.ode_pairs",
        "student.rollout_chunks",
        "student.guidance",
    ]
    key = f"{config_hash(cfg, keys)}-{_weights_digest(teacher_weights)}"
    path = stage_dir / PAIRS_FILE
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            return load_file(str(path)), json.loads(meta["prompts"])
    device = pick_device(cfg.device)
    teacher = _on_device(cfg, teacher_weights, device)
    t0 = time.monotonic()
    with precision(cfg.model, device):
        pairs, prompts = sample_ode_pairs(teacher, cfg)
    tracking.log_metrics({"student/ode_seconds": time.monotonic() - t0})
    with atomic_path(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in pairs.items()},
            str(tmp),
            metadata={"key": key, "prompts": json.dumps(prompts)},
        )
    return pairs, prompts


def _clock(cfg, key: str) -> list:
    """A wall-clock stop for the stage from config key `key` (e.g. student.max_minutes), if set."""
    minutes = OmegaConf.select(cfg, key)
    if minutes is not None and minutes <= 0:
        raise CfError(f"{key}={minutes} must be positive, or null for no limit")
    return [] if minutes is None else [WallClockStop(minutes)]


# ---------------------------------------------------------------------- stages


def train_student(
    cfg,
    out_dir: str | Path,
    teacher_ckpt: str | Path,
    parent_run_id: str | None = None,
    evaluate_after: bool = True,
    callbacks: Sequence = (),
) -> Path:
    """Student initialisation from `teacher_ckpt` (a teacher or teacher_erft checkpoint); returns
    `<out_dir>/student/last.ckpt`. A finished stage only re-evaluates. `callbacks`: extra Lightning
    callbacks for the stage's Trainer (profilers, tests)."""
    out_dir = Path(out_dir)
    stage_dir = out_dir / "student"
    seed_everything(cfg.seed)
    teacher = network_weights(teacher_ckpt, "teacher checkpoint")
    module = StudentModule(cfg)
    module.load_start(teacher)
    with tracking.start_run(cfg, "student", parent_run_id=parent_run_id) as run:
        pairs, prompts = ode_pairs(cfg, teacher, stage_dir)
        data = StreamDataModule(cfg, lambda **kw: PairStream(pairs, prompts, cfg.seed, **kw))
        trainer = make_trainer(
            cfg,
            out_dir,
            "student",
            callbacks=[*_clock(cfg, "student.max_minutes"), *callbacks],
            logger=run.lightning_logger(),
            max_steps=cfg.student.steps,
        )
        t0 = time.monotonic()
        last = fit(trainer, module, data, out_dir, "student")
        if evaluate_after and trainer.is_global_zero:
            finish(
                module.ema_net(),
                cfg,
                stage_dir,
                "student",
                trainer.global_step,
                time.monotonic() - t0,
                teacher=_on_device(cfg, teacher, next(module.parameters()).device),
            )
    return last


def train_cdmd(
    cfg,
    out_dir: str | Path,
    stage: int,
    teacher_ckpt: str | Path,
    init_ckpt: str | Path,
    parent_run_id: str | None = None,
    evaluate_after: bool = True,
    callbacks: Sequence = (),
) -> Path:
    """CDMD stage 1 or 2: the generator from `init_ckpt` (the student's checkpoint for stage 1,
    cdmd1's for stage 2; a .ckpt or a generator.safetensors), teacher and critic from `teacher_ckpt`.
    Returns `<out_dir>/cdmd<stage>/last.ckpt`. A finished stage only re-evaluates. `callbacks`: as for
    `train_student`."""
    if stage not in STAGES:
        raise CfError(f"cdmd stage {stage!r} is not 1 or 2")
    if stage == 2 and not cfg.cdmd.stage2:
        raise CfError(
            f"method {cfg.method!r} has cdmd.stage2=false (its generator is cdmd1); "
            "pass cdmd.stage2=true to run stage 2 anyway"
        )
    name = STAGES[stage]
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)
    module = CDMDModule(cfg, stage)
    module.load_start(
        network_weights(teacher_ckpt, "teacher checkpoint"),
        network_weights(init_ckpt, "generator checkpoint"),
    )
    chunks = cfg.cdmd.short_chunks if stage == 1 else cfg.cdmd.long_chunks_end
    frames = chunks * cfg.model.frames_per_chunk
    context = cfg.student.context_frames
    data = StreamDataModule(cfg, lambda **kw: ConditionStream(cfg.data, frames=frames, context=context, **kw))
    with tracking.start_run(cfg, name, parent_run_id=parent_run_id) as run:
        # manual optimisation: the module clips; generator and critic steps leave the other net unused
        trainer = make_trainer(
            cfg,
            out_dir,
            name,
            callbacks=[*_clock(cfg, f"cdmd.stage{stage}_max_minutes"), *callbacks],
            logger=run.lightning_logger(),
            max_steps=stage_steps(cfg.cdmd, stage),
            grad_clip=0,
            find_unused_parameters=True,
        )
        t0 = time.monotonic()
        last = fit(trainer, module, data, out_dir, name)
        if evaluate_after and trainer.is_global_zero:
            finish(
                module.ema_net(),
                cfg,
                out_dir / name,
                name,
                trainer.global_step,
                time.monotonic() - t0,
                teacher=module.teacher.eval(),
            )
    return last


# ---------------------------------------------------------------------- evaluation


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
    from cf.generation import generate
    from cf.data.world import World
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


def finish(
    net: CausalVideoDiT,
    cfg,
    stage_dir: Path,
    stage: str,
    step: int,
    train_seconds: float,
    teacher: CausalVideoDiT | None = None,
) -> dict:
    """Export the generator, evaluate it (beside `teacher` if given), write eval.json + samples, log them
    to the open run."""
    export_safetensors(
        net,
        stage_dir / GENERATOR_FILE,
        metadata={"stage": stage, "step": str(step), "config_hash": config_hash(cfg)},
    )
    t0 = time.monotonic()
    with torch.no_grad():
        res = evaluate_generator(cfg, net, teacher)
    frames = res.pop("frames")
    prefix = "student" if stage == "student" else "cdmd"
    metrics = {
        f"{prefix}/{m}_{k}": v for m, row in res["summary"].items() for k, v in row.items() if v is not None
    }
    for k in CRITERIA:
        a, b = res["summary"]["distilled"][k], res["summary"]["untrained"][k]
        if a is not None and b is not None:
            metrics[f"{prefix}/{k}_gain"] = a - b
    metrics[f"{prefix}/train_seconds"] = train_seconds
    tracking.log_metrics(metrics, step=step)
    atomic_write_json(
        stage_dir / "eval.json",
        {
            "stage": stage,
            "step": step,
            "train_seconds": train_seconds,
            "eval_seconds": time.monotonic() - t0,
            **res,
        },
    )
    n = frames["world"].shape[0]
    cols = list(range(0, n, max(1, n // 10)))[:10]
    sheet = contact_sheet(
        stage_dir / "samples.png",
        [frames[m][cols] for m in ("world", "teacher", "distilled", "untrained") if m in frames],
        row_labels=[
            {"distilled": stage}.get(m, m)
            for m in ("world", "teacher", "distilled", "untrained")
            if m in frames
        ],
        col_labels=[f"{i / cfg.data.fps:.1f}s" for i in cols],
        title=f"{stage} at step {step}: world {res['setup']['worlds'][0]}, {cfg.memory.policy} memory",
    )
    side = torch.cat([frames["world"], frames["distilled"]], dim=-1)  # [T, C, H, 2W]
    video = write_video(stage_dir / "sample.mp4", side, cfg.data.fps, scale=8)
    for path in (sheet, video, stage_dir / "eval.json"):
        tracking.log_artifact(path)
    return res
