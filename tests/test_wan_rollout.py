"""The one rollout through a Wan-configured DiT (read from a tiny random diffusers folder): the cached causal
rollout equals the block-causal full forward in float64, Self-Forcing's positions are absolute, and the
unconditional branch of guidance is the negative prompt's text (Cond.null_text)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="the wan extra is not installed (pip install -e .[wan])")

from cf.config import load_config  # noqa: E402
from cf.diffusion import build_sampler, denoise, encode_clean, to_x0  # noqa: E402
from cf.memory import KVCache, build_policy  # noqa: E402
from cf.model import Cond, block_causal_mask  # noqa: E402
from cf.rollout import RolloutCallback, rollout  # noqa: E402
from cf.wan import read_wan  # noqa: E402
from cf.wan.tiny import tiny_transformer  # noqa: E402

N_CHUNKS, CHUNK, H, W = 4, 3, 4, 6


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("wan") / "transformer"
    tiny_transformer(seed=0).save_pretrained(str(d))
    return d


def setup(folder, policy="full", **overrides):
    cfg = load_config(
        "wan", overrides=[f"memory.policy={policy}", *(f"{k}={v}" for k, v in overrides.items())]
    )
    # 16 padded text tokens instead of Wan's 512: the same code path, cheaper (the equality with diffusers
    # at 512 is test_wan_model's)
    model = (
        read_wan(folder)
        .build(height=H, width=W, frames_per_chunk=CHUNK, dtype=torch.float64, text_pad_tokens=16)
        .eval()
    )
    g = torch.Generator().manual_seed(0)
    cond = Cond(
        text=torch.randn(1, 5, 32, generator=g, dtype=torch.float64),
        null_text=torch.randn(1, 3, 32, generator=g, dtype=torch.float64),
    )
    return cfg, model, cond


def run(cfg, model, cond, n_chunks=N_CHUNKS, **kw):
    cache = KVCache(build_policy(cfg.memory, CHUNK))
    res = rollout(
        model,
        cache,
        build_sampler(cfg.diffusion, "student"),
        cond,
        n_chunks,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    return res, cache


class Steps(RolloutCallback):
    def __init__(self):
        self.x_t, self.x0, self.sigma = {}, {}, {}

    def on_step(self, chunk, step, x_t, x0, sigma):
        self.x_t[chunk, step], self.x0[chunk, step], self.sigma[chunk, step] = x_t.clone(), x0.clone(), sigma


def test_cached_rollout_equals_the_block_causal_forward(folder):
    cfg, model, cond = setup(folder, "full")
    steps = Steps()
    with torch.no_grad():
        res, cache = run(cfg, model, cond, callbacks=[steps])
        video = res.video
        b, f = video.shape[:2]
        whole = encode_clean(
            model, video, cond, time_pos=torch.arange(f), frame_mask=block_causal_mask(f, CHUNK)
        )
    r = cache.read()
    order = torch.argsort(r.times)
    for (k_ref, v_ref), k, v in zip(whole.kv, r.k, r.v):
        assert (k[:, order] - k_ref).abs().max() < 1e-10 and (v[:, order] - v_ref).abs().max() < 1e-10
    chunk_of = torch.arange(f) // CHUNK
    mask = torch.zeros(2 * f, 2 * f, dtype=torch.bool)
    mask[:f, :f] = block_causal_mask(f, CHUNK)
    mask[f:, :f] = chunk_of[None, :] < chunk_of[:, None]
    mask[f:, f:] = chunk_of[None, :] == chunk_of[:, None]
    worst = 0.0
    for i in range(build_sampler(cfg.diffusion, "student").n_steps):
        x_noisy = torch.cat([steps.x_t[j, i] for j in range(N_CHUNKS)], dim=1)
        sig = torch.full((b, 2 * f), steps.sigma[0, i], dtype=torch.float64)
        sig[:, :f] = 0
        with torch.no_grad():
            out = denoise(
                model,
                torch.cat([video, x_noisy], dim=1),
                sig,
                cond,
                num_timesteps=cfg.diffusion.num_timesteps,
                time_pos=torch.arange(f).repeat(2),
                frame_mask=mask,
            )
        x0 = to_x0(out.pred[:, f:], x_noisy, sig[:, f:], model.prediction)
        ref = torch.cat([steps.x0[j, i] for j in range(N_CHUNKS)], dim=1)
        worst = max(worst, (x0 - ref).abs().max().item())
    assert worst < 1e-10
    assert video.abs().mean() > 0.1


def test_self_forcing_window_reads_absolute_positions(folder):
    """Self-Forcing's released inference: the last `local_attn_size` frames (current chunk included), keys
    at the absolute frame index they were written at = sliding + memory.bounded_positions=false."""
    cfg, model, cond = setup(
        folder, "sliding", **{"memory.window_frames": 6, "memory.bounded_positions": False}
    )
    with torch.no_grad():
        _, cache = run(cfg, model, cond, n_chunks=5)
    r = cache.read()
    # after 15 frames: the next chunk (frames 15..17) reads frames 12..14 at positions 12..14
    assert sorted(r.times.tolist()) == [12, 13, 14] and sorted(r.positions.tolist()) == [12, 13, 14]
    assert r.query_positions.tolist() == [15, 16, 17]
    # LongLive: a frame sink of 3 + a window, absolute positions
    cfg, model, cond = setup(
        folder,
        "sink",
        **{"memory.sink_frames": 3, "memory.window_frames": 6, "memory.bounded_positions": False},
    )
    with torch.no_grad():
        _, cache = run(cfg, model, cond, n_chunks=5)
    r = cache.read()
    assert sorted(r.positions.tolist()) == [0, 1, 2, 12, 13, 14] and r.query_positions.tolist() == [
        15,
        16,
        17,
    ]


def test_the_unconditional_branch_is_the_negative_prompt(folder):
    """guidance 0 = the rollout conditioned on the negative prompt's text alone (no null token in Wan)."""
    cfg, model, cond = setup(folder, "sink")
    neg = Cond(text=cond.null_text)
    with torch.no_grad():
        g0, cache = run(cfg, model, cond, n_chunks=3, guidance=0.0)
        unc, _ = run(cfg, model, neg, n_chunks=3)
        g1, _ = run(cfg, model, cond, n_chunks=3, guidance=1.0)
    assert cache.read().k[0].shape[0] == 2
    assert (g0.video - unc.video).abs().max() < 1e-10
    assert (g1.video - unc.video).abs().max() > 1e-3


def test_bf16_keeps_wan_fp32_parts(folder):
    """Converted to bf16, the time embedding, modulation and cross-attention norms stay fp32 (as Wan keeps
    them), the cache holds bf16, and the output is close to fp32's."""
    cfg, model32, cond = setup(folder, "full")
    model32 = model32.float()
    model16 = (
        read_wan(folder)
        .build(height=H, width=W, frames_per_chunk=CHUNK, dtype=torch.bfloat16, text_pad_tokens=16)
        .eval()
    )
    assert (
        model16.time_embed[0].weight.dtype == torch.float32
        and model16.blocks[0].modulation.dtype == torch.float32
    )
    assert model16.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    c = Cond(text=cond.text.float())
    x = torch.randn(1, CHUNK, 4, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model32(x, torch.full((1, CHUNK), 500.0), c, time_pos=torch.arange(CHUNK))
        b = model16(x.bfloat16(), torch.full((1, CHUNK), 500.0), c, time_pos=torch.arange(CHUNK))
    assert b.kv[0][0].dtype == torch.bfloat16
    assert (a.pred - b.pred.float()).abs().max() < 0.05 * a.pred.abs().max()
