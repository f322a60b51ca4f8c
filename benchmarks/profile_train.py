"""Where a training step's time goes, per stage (issue: a faster tiny pipeline).

    python -m benchmarks.profile_train [--preset tiny] [--stages teacher ...] [--steps 20] [--threads 2]

Each stage trains `--steps` batches through the Trainer every stage uses (as `benchmarks.bench_train`,
random weights) under torch's profiler. Operator self time is grouped into what a step is made of
(matmuls, attention, element-wise math, norms, copies and layout, the optimizer, EMA, data) and
compared with the wall time of the same batches: the remainder is Python and framework overhead
(Lightning's loop, autograd bookkeeping, logging). MFU says how far the step is from the machine's
matmul peak; this table says which part of the rest could go. Writes
benchmarks/results/profile_<preset>.json and .md. Not part of `make bench` (the profiler slows what it
measures); run it by hand.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_train import STAGES, WARMUP
from cf.config import load_config
from cf.train.base import fit, make_trainer
from cf.utils import atomic_write_json, atomic_write_text, git_sha, set_threads

RESULTS = Path(__file__).resolve().parent / "results"
# operator name (aten::<name>, without the namespace) -> group; the first matching prefix wins
GROUPS = (
    ("matmul", ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul")),
    ("attention", ("_scaled_dot_product", "scaled_dot_product")),
    ("norm", ("native_layer_norm", "layer_norm", "rms_norm", "_fused_rms_norm")),
    ("optimizer", ("_fused_adamw", "_foreach_add", "_foreach_mul", "_foreach_addcmul", "_foreach_addcdiv",
                   "_foreach_sqrt", "_foreach_div", "addcmul_", "addcdiv_", "sqrt")),
    ("ema", ("_foreach_lerp", "lerp_")),
    ("copy / layout", ("copy_", "cat", "stack", "_to_copy", "clone", "contiguous", "index", "repeat",
                       "expand", "fill_", "zero_", "zeros", "empty", "where", "masked_fill")),
    ("element-wise", ("mul", "add", "sub", "div", "gelu", "silu", "sin", "cos", "exp", "pow", "neg", "sum",
                      "mean", "tanh", "sigmoid", "rsqrt", "clamp", "abs", "log")),
)


def group_of(op: str) -> str:
    name = op.split("::", 1)[-1]
    for group, prefixes in GROUPS:
        if name.startswith(prefixes):
            return group
    return "other ops"


class _Window:
    """Runs the profiler over the batches after warm-up only (set-up, ODE pairs and warm-up left out), and
    times them: from the first profiled batch's start to the last one's end."""

    def __init__(self, prof, last: int):
        self.prof, self.last = prof, last
        self.t0 = self.t1 = 0.0

    def callback(self):
        from lightning.pytorch import Callback

        outer = self

        class _CB(Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == WARMUP:
                    outer.prof.start()
                    outer.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if batch_idx == outer.last:
                    outer.t1 = time.perf_counter()
                    outer.prof.stop()

        return _CB()


def profile_stage(cfg, stage: str, steps: int) -> dict:
    set_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.seed)
    module, data, kwargs = STAGES[stage](cfg)
    prof = profile(activities=[ProfilerActivity.CPU])
    window = _Window(prof, WARMUP + steps - 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(cfg, tmp, stage, callbacks=[window.callback()], max_steps=steps + WARMUP,
                               progress_bar=False, **kwargs)
        fit(trainer, module, data, tmp, stage)
    groups: dict[str, float] = {}
    data_ms = total_self = 0.0
    for ev in prof.key_averages():
        if ev.key.startswith("enumerate(DataLoader)"):
            data_ms += ev.cpu_time_total / 1e3
        elif ev.key.startswith("aten::"):
            g = group_of(ev.key)
            groups[g] = groups.get(g, 0.0) + ev.self_cpu_time_total / 1e3
            total_self += ev.self_cpu_time_total / 1e3
    return {
        "stage": stage, "preset": cfg.preset, "threads": torch.get_num_threads(), "batches": steps,
        "step_ms": 1e3 * (window.t1 - window.t0) / steps, "data_ms": data_ms / steps,
        "op_ms": {g: ms / steps for g, ms in groups.items()}, "op_total_ms": total_self / steps,
        "git_sha": git_sha(), "torch": torch.__version__,
    }


def table(preset: str, rows: list[dict]) -> str:
    groups = [g for g, _ in GROUPS] + ["other ops"]
    head = (f"# Where a training step's time goes: preset `{preset}`\n\n"
            f"cpu ({rows[0]['threads']} threads), batch as the stage trains, random weights, git "
            f"{rows[0]['git_sha'][:10]}; `python -m benchmarks.profile_train`, {rows[0]['batches']} batches "
            f"after warm-up. ms per batch: `wall` under the profiler (it slows small ops), `data` the "
            f"DataLoader (world rendering, in the main process), then operator time grouped (torch's self "
            f"time of each aten op, as the main thread waits for it), and `outside ops` the rest: Python, "
            f"Lightning's loop, autograd's bookkeeping, logging.\n\n")
    cols = "| stage | wall | data | " + " | ".join(groups) + " | outside ops |\n"
    cols += "|---" * (4 + len(groups)) + "|\n"
    lines = []
    for r in rows:
        cells = [f"{r['op_ms'].get(g, 0.0):.1f}" for g in groups]
        rest = r["step_ms"] - r["data_ms"] - r["op_total_ms"]
        lines.append(f"| {r['stage']} | {r['step_ms']:.1f} | {r['data_ms']:.1f} | " + " | ".join(cells)
                     + f" | {rest:.1f} |")
    return head + cols + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    cfg = load_config(args.preset, overrides=[f"trainer.threads={args.threads}", "tracking.enabled=false",
                                              "trainer.max_minutes=null"])
    rows = []
    for stage in args.stages:
        print(f"  {args.preset}/{stage}: {args.steps} steps under the profiler", flush=True)
        rows.append(profile_stage(cfg.copy(), stage, args.steps))
    atomic_write_json(args.out / f"profile_{args.preset}.json", {"preset": args.preset, "stages": rows})
    md = table(args.preset, rows)
    atomic_write_text(args.out / f"profile_{args.preset}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
