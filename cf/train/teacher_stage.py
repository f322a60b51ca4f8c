"""Running the teacher stages: `teacher` (flow matching) and `teacher_erft` (resumes from it with ERFT).

Each stage: train (resuming from its own last.ckpt after a kill), then evaluate the EMA network's
continuation of held-out clips (cf.evaluation.continuation), write `eval.json`, a contact sheet and a
sample video into `<out>/<stage>/`, and log all of it to the stage's MLflow run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cf import tracking
from cf.data import WorldDataset
from cf.data.datamodule import VideoDataModule
from cf.errors import CfError
from cf.evaluation.continuation import evaluate
from cf.train.base import ckpt_path, load_module_weights, run_stage
from cf.train.teacher import TeacherModule
from cf.utils import atomic_write_json, seed_everything
from cf.video import contact_sheet, write_video

TEACHER_STAGES = {"teacher": False, "teacher_erft": True}
TEACHER_ROWS = ("long", "long_mean", "short", "short_mean", "shift_last", "copy_last")


def train_teacher(cfg, out_dir: str | Path, stage: str = "teacher", evaluate_after: bool = True,
                  init_ckpt: str | Path | None = None, parent_run_id: str | None = None,
                  callbacks: Sequence = ()) -> Path:
    """Train one teacher stage; returns its checkpoint. A finished stage only re-evaluates.

    `teacher_erft` starts from `init_ckpt` (default: `<out_dir>/teacher/last.ckpt`). `callbacks`: extra
    Lightning callbacks for the stage's Trainer (profilers, tests).
    """
    if stage not in TEACHER_STAGES:
        raise CfError(f"unknown teacher stage {stage!r}; expected one of {sorted(TEACHER_STAGES)}")
    erft = TEACHER_STAGES[stage]
    out_dir = Path(out_dir)
    seed_everything(cfg.seed)
    module = TeacherModule(cfg, erft=erft)
    if erft and not ckpt_path(out_dir, stage).is_file():
        src = Path(init_ckpt) if init_ckpt is not None else ckpt_path(out_dir, "teacher")
        if not src.is_file():
            raise CfError(f"teacher_erft starts from the teacher's checkpoint {str(src)!r}, which does not "
                          f"exist; run `cf train teacher --out {out_dir}` first")
        module.net.load_state_dict(load_module_weights(src, prefix="net.", ema_key="ema"))
        module.ema.load_state_dict({"shadow": {k: v.clone() for k, v in module.net.state_dict().items()
                                               if k in dict(module.net.named_parameters())},
                                    "num_updates": 0, "decay": cfg.trainer.ema})
    steps = cfg.erft.steps if erft else cfg.trainer.max_steps

    def after(step: int, seconds: float) -> None:
        report(module, cfg, out_dir / stage, step)

    return run_stage(cfg, out_dir, stage, module, lambda: VideoDataModule(cfg), max_steps=steps,
                     parent_run_id=parent_run_id, callbacks=callbacks,
                     evaluate=after if evaluate_after else None)


def eval_batches(cfg, n_clips: int):
    data = WorldDataset(cfg.data, seed=cfg.data.eval_seed, count=n_clips)
    return DataLoader(data, batch_size=min(cfg.data.batch_size * 2, n_clips))


def report(module: TeacherModule, cfg, stage_dir: Path, step: int) -> dict:
    """Evaluate, write eval.json + contact sheet + sample video, log them to the open run."""
    net = module.ema_net().to(module.device)
    with torch.no_grad():
        res = evaluate(net, cfg, eval_batches(cfg, cfg.data.eval_clips))
    frames = res.pop("frames")
    metrics = {f"teacher/psnr_{m}_{r}": v for m in TEACHER_ROWS
               for r, v in res[m].items() if v is not None}
    tracking.log_metrics(metrics, step=step)
    atomic_write_json(stage_dir / "eval.json", {"step": step, **res})
    order = ["context", "truth", *TEACHER_ROWS]
    sheet = contact_sheet(stage_dir / "continuation.png", [frames[k] for k in order], row_labels=order,
                          title=f"teacher continuation at step {step} (context: last 4 of "
                                f"{cfg.teacher.context_frames} frames)")
    clip = torch.cat([frames["context"], frames["long"]], 0)
    video = write_video(stage_dir / "continuation.mp4", clip, cfg.data.fps, scale=8)
    for path in (sheet, video, stage_dir / "eval.json"):
        tracking.log_artifact(path)
    return res
