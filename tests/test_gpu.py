"""The CUDA path (run with `pytest -m gpu` on a machine with a GPU; skipped elsewhere).

The same code runs on CPU and GPU; these check what only a GPU can show: bf16 autocast with SDPA
kernels agrees with fp32, the rollout loop never waits on the device (no `.item()`-style syncs
per chunk), and a training stage runs on the device.
"""

from __future__ import annotations

import pytest
import torch

from cf.config import load_config
from cf.diffusion import build_sampler
from cf.memory import KVCache, build_policy
from cf.model import attention_kernels, build_model, precision
from cf.rollout import rollout

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _rollout(cfg, n_chunks=6, policy="sliding"):
    cfg.memory.policy = policy
    torch.manual_seed(0)
    model = build_model(cfg, "cuda").eval()
    cache = KVCache(build_policy(cfg.memory, cfg.model.frames_per_chunk))
    with torch.no_grad(), precision(cfg.model, torch.device("cuda")), attention_kernels(cfg.model):
        cond = model.make_cond(["gpu"], camera=torch.zeros(1, n_chunks * cfg.model.frames_per_chunk, 2,
                                                           device="cuda"))
        return rollout(model, cache, build_sampler(cfg.diffusion, "student"), cond, n_chunks,
                       generator=torch.Generator().manual_seed(0)).video.float()


def test_bf16_autocast_agrees_with_fp32():
    fp32 = _rollout(load_config("smoke", overrides=["model.dtype=fp32"]))
    bf16 = _rollout(load_config("smoke", overrides=["model.dtype=auto"]))  # auto = bf16 autocast on CUDA
    assert torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().mean() < 0.05


def test_rollout_loop_never_syncs_with_the_device():
    cfg = load_config("smoke")
    _rollout(cfg, n_chunks=2)  # warm-up: kernels and the cache's buffers allocated
    torch.cuda.set_sync_debug_mode("error")
    try:
        _rollout(cfg, n_chunks=6, policy="sliding")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_teacher_trains_on_the_gpu(tmp_path):
    from cf.train.teacher_stage import train_teacher

    cfg = load_config("smoke", overrides=["device=cuda", "trainer.accelerator=gpu", "tracking.enabled=false"])
    path = train_teacher(cfg, tmp_path, "teacher", evaluate_after=False)
    assert path.is_file()
