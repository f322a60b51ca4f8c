"""Running the generator stages: `student` (ODE initialisation), `cdmd1` and `cdmd2` (DMD).

Each stage trains (resuming from its own last.ckpt after a kill), then writes into
`<out>/<stage>/`: `generator.safetensors` (the EMA generator, loadable by
`cf.model.build_model(cfg, device, weights=path)`: the hand-off nobody needs checkpoint internals
for), `eval.json`, `sample.mp4` (ground truth | generated) and `samples.png` (a contact sheet), all
logged to the stage's MLflow run.

Evaluation: `cf.evaluation.generator`, written and logged by `finish`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cf import tracking
from cf.config import config_hash
from cf.errors import CfError
from cf.evaluation.generator import CRITERIA, evaluate_generator
from cf.model import CausalVideoDiT, param_dtype, precision
from cf.train.base import export_safetensors, load_checkpoint, load_module_weights, run_stage
from cf.train.cdmd import CDMD_STAGES, CDMDModule, stage_steps
from cf.train.conditions import ConditionStream, PairStream, StreamDataModule
from cf.train.student import StudentModule, sample_ode_pairs
from cf.utils import atomic_path, atomic_write_json, pick_device, seed_everything
from cf.video import contact_sheet, write_video

GENERATOR_FILE = "generator.safetensors"
PAIRS_FILE = "ode_pairs.safetensors"


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

    def data():  # inside the stage's run: the ODE pairs log their time there
        pairs, prompts = ode_pairs(cfg, teacher, stage_dir)
        return StreamDataModule(cfg, lambda **kw: PairStream(pairs, prompts, cfg.seed, **kw))

    def evaluate(step: int, seconds: float) -> None:
        device = next(module.parameters()).device
        on_device = _on_device(cfg, teacher, device)
        finish(module.ema_net(), cfg, stage_dir, "student", step, seconds, teacher=on_device)

    return run_stage(cfg, out_dir, "student", module, data, max_steps=cfg.student.steps,
                     parent_run_id=parent_run_id, callbacks=callbacks, clock="student.max_minutes",
                     evaluate=evaluate if evaluate_after else None)


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
    if stage not in CDMD_STAGES:
        raise CfError(f"cdmd stage {stage!r} is not 1 or 2")
    if stage == 2 and not cfg.cdmd.stage2:
        raise CfError(
            f"method {cfg.method!r} has cdmd.stage2=false (its generator is cdmd1); "
            "pass cdmd.stage2=true to run stage 2 anyway"
        )
    name = CDMD_STAGES[stage]
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

    def data():
        stream = lambda **kw: ConditionStream(cfg.data, frames=frames, context=context, **kw)  # noqa: E731
        return StreamDataModule(cfg, stream)

    def evaluate(step: int, seconds: float) -> None:
        finish(module.ema_net(), cfg, out_dir / name, name, step, seconds, teacher=module.teacher.eval())

    # manual optimisation: the module clips; generator and critic steps leave the other net unused
    return run_stage(cfg, out_dir, name, module, data, max_steps=stage_steps(cfg.cdmd, stage),
                     parent_run_id=parent_run_id, callbacks=callbacks, clock=f"cdmd.stage{stage}_max_minutes",
                     evaluate=evaluate if evaluate_after else None, grad_clip=0, find_unused_parameters=True)


# ---------------------------------------------------------------------- after training


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
