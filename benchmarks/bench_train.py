"""Training step time and MFU per stage (issue: performance and scale).

    python -m benchmarks.bench_train [--presets smoke tiny] [--steps 30] [--stages teacher ...]

For each stage, the stage's own LightningModule trains `--steps` steps on the world stream through
the same Trainer every stage uses (`cf.train.base.make_trainer`), with random weights (step time
does not depend on them). A `cf.perf.StepProfiler` times every batch (forward, backward, optimizer
step(s)) and counts the FLOPs of one; MFU divides the achieved FLOP/s by the peak matmul FLOP/s
measured in the same process. Writes benchmarks/results/train_<preset>.json and train_<preset>.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from cf.config import load_config
from cf.data.datamodule import VideoDataModule
from cf.perf import StepProfiler, as_callback, mfu, peak_matmul_flops
from cf.train.base import fit, make_trainer
from cf.utils import atomic_write_json, atomic_write_text, compute_dtype, git_sha, pick_device, set_threads

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = {"student": "ODE pairs from a random teacher",
         "cdmd1": "median over critic and generator updates",
         "cdmd2": "median over critic and generator updates, early in the rollout-length curriculum"}
WARMUP = 3  # batches left out of the timings (allocator and kernel warm-up); batch WARMUP is counted


def _teacher(cfg, erft: bool):
    from cf.train.teacher import TeacherModule

    return TeacherModule(cfg, erft=erft), VideoDataModule(cfg), {}


def _student(cfg):
    """The ODE-regression stage on pairs from a random teacher (two batches' worth: speed only)."""
    from cf.model import CausalVideoDiT
    from cf.train.conditions import PairStream, StreamDataModule
    from cf.train.student import StudentModule, sample_ode_pairs

    cfg.student.ode_pairs = 2 * cfg.data.batch_size
    module = StudentModule(cfg)
    with torch.no_grad():
        pairs, prompts = sample_ode_pairs(CausalVideoDiT(cfg.model, cfg.data).eval(), cfg)
    data = StreamDataModule(cfg, lambda **kw: PairStream(pairs, prompts, cfg.seed, **kw))
    return module, data, {}


def _cdmd(cfg, stage: int):
    """A CDMD step as the stage runs it: manual optimisation, critic and generator updates alike."""
    from cf.train.cdmd import CDMDModule
    from cf.train.conditions import ConditionStream, StreamDataModule

    chunks = cfg.cdmd.short_chunks if stage == 1 else cfg.cdmd.long_chunks_end
    frames, context = chunks * cfg.model.frames_per_chunk, cfg.student.context_frames
    data = StreamDataModule(cfg, lambda **kw: ConditionStream(cfg.data, frames=frames, context=context, **kw))
    return CDMDModule(cfg, stage), data, {"grad_clip": 0, "find_unused_parameters": True}


# stage -> factory(cfg) -> (module, datamodule, make_trainer kwargs). Weights are random: speed does
# not depend on them.
STAGES: dict[str, Callable] = {
    "teacher": lambda cfg: _teacher(cfg, erft=False),
    "teacher_erft": lambda cfg: _teacher(cfg, erft=True),
    "student": _student,
    "cdmd1": lambda cfg: _cdmd(cfg, 1),
    "cdmd2": lambda cfg: _cdmd(cfg, 2),
}


def measure(cfg, stage: str, steps: int) -> dict:
    set_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.seed)
    module, data, kwargs = STAGES[stage](cfg)
    prof = StepProfiler(count_batches=(WARMUP,))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, tmp, stage, callbacks=[as_callback(prof)], max_steps=steps + WARMUP + 1,
                               progress_bar=False, **kwargs)
        fit(trainer, module, data, tmp, stage)
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.model.dtype, device)
    peak = peak_matmul_flops(device, dtype)
    timed = prof.times[WARMUP:]
    step_s = statistics.median(timed)
    return {
        "stage": stage, "preset": cfg.preset, "batch_size": cfg.data.batch_size,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "dtype": str(dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "step_s": step_s, "step_s_p90": sorted(timed)[int(0.9 * (len(timed) - 1))], "steps_timed": len(timed),
        "flops_per_step": prof.flops[0], "peak_matmul_flops": peak, "mfu": mfu(prof.flops[0], step_s, peak),
        "samples_per_s": cfg.data.batch_size / step_s,
        "note": NOTES.get(stage, ""), "step_times_s": prof.times,
        "torch": torch.__version__, "git_sha": git_sha(),
    }


def table(preset: str, rows: list[dict]) -> str:
    r0 = rows[0]
    head = (f"# Training benchmark: preset `{preset}`\n\n{r0['device']}, {r0['dtype']}, "
            f"batch {r0['batch_size']}, random weights, git {r0['git_sha'][:10]}. "
            f"Step = forward + backward + optimizer step(s) of one "
            f"batch, median over {r0['steps_timed']} steps after {WARMUP} warm-up. MFU: FLOPs of one step "
            f"(counted by torch) over the median step time, as a fraction of the peak matmul FLOP/s "
            f"measured in the same process ({r0['peak_matmul_flops'] / 1e9:.1f} GFLOP/s).\n\n")
    cols = ("| stage | trainable params | step ms (median) | step ms (p90) | samples/s | GFLOP/step | MFU "
            "| note |\n"
            "|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['stage']} | {r['params']:,} | {r['step_s'] * 1e3:.1f} | {r['step_s_p90'] * 1e3:.1f} | "
             f"{r['samples_per_s']:.1f} | {r['flops_per_step'] / 1e9:.3f} | {r['mfu']:.1%} | {r['note']} |"
             for r in rows]
    return head + cols + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["smoke", "tiny"])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--steps", type=int, default=30, help="timed steps per stage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    for preset in args.presets:
        cfg = load_config(preset, overrides=[f"trainer.threads={args.threads}", "tracking.enabled=false",
                                             "trainer.max_minutes=null"])
        rows = []
        for stage in args.stages:
            print(f"  {preset}/{stage}: {args.steps} steps", flush=True)
            rows.append(measure(cfg.copy(), stage, args.steps))
        atomic_write_json(args.out / f"train_{preset}.json", {"preset": preset, "stages": rows})
        md = table(preset, rows)
        atomic_write_text(args.out / f"train_{preset}.md", md)
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
