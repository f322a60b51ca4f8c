"""Every training stage under 2-process DDP on the CPU (gloo), at `smoke`, through its stage function.

Each rank records the random choices its module made at every step (the teacher's history window,
CDMD's rollout length, exit step and update kind) and a digest of its final weights. The ranks must
agree on every choice (else their graphs differ and DDP averages gradients of different problems)
and end with identical weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import hashlib, json, sys
import torch
from lightning.pytorch import Callback
from cf.config import load_config

stage, out = sys.argv[1], sys.argv[2]
cfg = load_config("smoke", overrides=["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                                      "trainer.threads=1", "tracking.enabled=false",
                                      "trainer.max_minutes=null"])


class Record(Callback):
    def __init__(self):
        self.draws = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        step = trainer.global_step
        if hasattr(module, "plan"):  # CDMD: rollout length, exit step, which network updates
            p = module.rollout_plan(step)
            self.draws.append([p.n_chunks, p.window, p.exit_step, bool(p.generator)])
        elif hasattr(module, "draw_window"):  # teacher: history length and window start
            self.draws.append(list(module.draw_window(step, batch["video"].shape[1])))
        else:
            self.draws.append([step])

    def on_train_end(self, trainer, module):
        h = hashlib.sha256()
        for k, v in sorted(module.named_parameters()):  # per-rank buffers (ERFT's bank) may differ
            h.update(k.encode()); h.update(v.detach().cpu().contiguous().numpy().tobytes())
        with open(f"{out}/{stage}-rank{trainer.global_rank}.json", "w") as f:
            json.dump({"draws": self.draws, "weights": h.hexdigest(), "steps": trainer.global_step}, f)


cb = [Record()]
if stage in ("teacher", "teacher_erft"):
    from cf.train.teacher_stage import train_teacher
    train_teacher(cfg, out, stage, evaluate_after=False, callbacks=cb)
elif stage == "student":
    from cf.train.student_stage import train_student
    train_student(cfg, out, f"{out}/teacher/last.ckpt", evaluate_after=False, callbacks=cb)
else:
    from cf.train.student_stage import train_cdmd
    n = int(stage[-1])
    init = f"{out}/student/last.ckpt" if n == 1 else f"{out}/cdmd1/last.ckpt"
    train_cdmd(cfg, out, n, f"{out}/teacher_erft/last.ckpt", init, evaluate_after=False, callbacks=cb)
"""

STAGES = ["teacher", "teacher_erft", "student", "cdmd1", "cdmd2"]


@pytest.mark.slow
def test_every_stage_trains_under_two_process_ddp(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    for stage in STAGES:  # each stage starts from the previous one's checkpoint, as the pipeline does
        res = subprocess.run([sys.executable, str(script), stage, str(tmp_path)], env=env, cwd=tmp_path,
                             timeout=600, capture_output=True, text=True)
        assert res.returncode == 0, f"{stage} failed under DDP:\n{res.stderr[-3000:]}"
        r0, r1 = (json.loads((tmp_path / f"{stage}-rank{r}.json").read_text()) for r in (0, 1))
        assert r0["steps"] == r1["steps"] > 0, stage
        assert r0["draws"] == r1["draws"] and len(r0["draws"]) > 0, stage
        assert r0["weights"] == r1["weights"], f"{stage}: ranks ended with different weights"
        if stage.startswith("cdmd"):  # both kinds of update happened: the critic ratio is exercised
            assert {d[3] for d in r0["draws"]} == {True, False}, stage
