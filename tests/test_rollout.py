"""The rollout through the cache, proven against single forward passes, in float64 on a tiny model."""

from __future__ import annotations

import pytest
import torch

from cf.config import load_config
from cf.diffusion import build_sampler, denoise, encode_clean, to_x0
from cf.errors import CfError
from cf.memory import KVCache, build_policy
from cf.model import CacheRead, CausalVideoDiT, block_causal_mask
from cf.rollout import CacheBytes, ChunkTimer, RolloutCallback, rollout

N_CHUNKS = 4


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    yield
    torch.set_default_dtype(torch.float32)


def setup(policy="full", seed=0, **overrides):
    extra = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config("smoke", overrides=[f"memory.policy={policy}", *extra])
    torch.set_default_dtype(torch.float64)  # restored by the autouse fixture below
    torch.manual_seed(seed)
    model = CausalVideoDiT(cfg.model, cfg.data).double()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # outputs of order 1, so differences show
    c = cfg.model.frames_per_chunk
    cam = torch.rand(1, 4 * N_CHUNKS * c, 2, generator=torch.Generator().manual_seed(seed))
    cond = model.make_cond(["a red house by the sea"], camera=cam * 40)
    return cfg, model, cond


def run(cfg, model, cond, n_chunks=N_CHUNKS, seed=0, sampler="student", **kw):
    cache = KVCache(build_policy(cfg.memory, cfg.model.frames_per_chunk))
    gen = torch.Generator().manual_seed(seed)
    res = rollout(model, cache, build_sampler(cfg.diffusion, sampler), cond, n_chunks, generator=gen, **kw)
    return res, cache


class Steps(RolloutCallback):
    def __init__(self):
        self.x_t, self.x0, self.sigma, self.grad = {}, {}, {}, {}

    def on_step(self, chunk, step, x_t, x0, sigma):
        self.x_t[chunk, step], self.x0[chunk, step] = x_t.detach().clone(), x0.detach().clone()
        self.sigma[chunk, step], self.grad[chunk, step] = sigma, x0.requires_grad


def test_full_rollout_equals_one_block_causal_forward():
    """Cache contents = the keys/values of one forward over the whole clean video with a block-causal
    mask; every sampler step's prediction = one forward over [clean video ; noisy chunks] where each
    noisy chunk sees the clean chunks before it (the same noise, absolute positions)."""
    cfg, model, cond = setup("full")
    steps = Steps()
    with torch.no_grad():
        res, cache = run(cfg, model, cond, callbacks=[steps])
        video = res.video
        b, f = video.shape[:2]
        c = cfg.model.frames_per_chunk
        cam = cond.camera[:, :f]
        whole = encode_clean(model, video, cond.frames(0, f), time_pos=torch.arange(f),
                             frame_mask=block_causal_mask(f, c))
    r = cache.read()
    order = torch.argsort(r.times)
    assert r.times[order].tolist() == list(range(f))
    for (k_ref, v_ref), k, v in zip(whole.kv, r.k, r.v):
        assert (k[:, order] - k_ref).abs().max() < 1e-10
        assert (v[:, order] - v_ref).abs().max() < 1e-10

    # the noisy steps: [clean ; noisy] in one call, noisy chunk j attends clean chunks < j and itself
    chunk_of = torch.arange(f) // c
    mask = torch.zeros(2 * f, 2 * f, dtype=torch.bool)
    mask[:f, :f] = block_causal_mask(f, c)
    mask[f:, :f] = chunk_of[None, :] < chunk_of[:, None]
    mask[f:, f:] = chunk_of[None, :] == chunk_of[:, None]
    cond2 = cond.frames(0, f)
    cond2.camera = torch.cat([cam, cam], dim=1)
    n_steps = build_sampler(cfg.diffusion, "student").n_steps
    for i in range(n_steps):
        x_noisy = torch.cat([steps.x_t[j, i] for j in range(N_CHUNKS)], dim=1)
        sig = torch.cat([torch.zeros(b, f), torch.full((b, f), steps.sigma[0, i])], dim=1)
        with torch.no_grad():
            out = denoise(model, torch.cat([video, x_noisy], dim=1), sig, cond2,
                          num_timesteps=cfg.diffusion.num_timesteps, time_pos=torch.arange(f).repeat(2),
                          frame_mask=mask)
        x0 = to_x0(out.pred[:, f:], x_noisy, sig[:, f:], model.prediction)
        ref = torch.cat([steps.x0[j, i] for j in range(N_CHUNKS)], dim=1)
        assert (x0 - ref).abs().max() < 1e-10
    assert video.abs().mean() > 0.1  # a real signal, not a vanishing one


def test_sliding_with_a_long_window_equals_full():
    c = 2
    cfg, model, cond = setup("sliding", **{"memory.window_frames": N_CHUNKS * c})
    with torch.no_grad():
        sliding, _ = run(cfg, model, cond)
        cfg.memory.policy = "full"
        full, _ = run(cfg, model, cond)
        cfg.memory.policy, cfg.memory.window_frames = "sliding", 2 * c
        short, _ = run(cfg, model, cond)
    assert (sliding.video - full.video).abs().max() < 1e-10
    assert (short.video - full.video).abs().max() > 1e-3  # a short window does change the video


def test_slowfast_without_slow_memory_equals_sink():
    kw = {"memory.sink_frames": 2, "memory.window_frames": 4, "memory.slow_frames": 0,
          "memory.promote_after": 0}
    cfg, model, cond = setup("slowfast", **kw)
    with torch.no_grad():
        a, _ = run(cfg, model, cond, n_chunks=6)
        cfg.memory.policy = "sink"
        b, _ = run(cfg, model, cond, n_chunks=6)
        cfg.memory.policy, cfg.memory.slow_frames, cfg.memory.promotion = "slowfast", 2, "uniform"
        with_slow, _ = run(cfg, model, cond, n_chunks=6)
    assert (a.video - b.video).abs().max() < 1e-10
    assert (with_slow.video - b.video).abs().max() > 1e-3


def test_plan_agrees_with_the_cached_rollout():
    cfg, model, cond = setup("slowfast", **{"memory.promotion": "similarity", "memory.tau": 0.9999,
                                            "memory.promote_every": 1, "memory.promote_after": 2})
    keys = []
    cache = KVCache(build_policy(cfg.memory, cfg.model.frames_per_chunk))
    write = cache.write
    cache.write = lambda kv, cam, mk: (keys.append(mk), write(kv, cam, mk))[1]
    with torch.no_grad():
        rollout(model, cache, build_sampler(cfg.diffusion, "student"), cond, 8,
                generator=torch.Generator().manual_seed(0))
    mean_keys = torch.cat(keys, dim=1)
    plan = cache.policy.plan(cache.n_written, mean_keys)
    r = cache.read()
    assert dict(zip(r.times.tolist(), r.positions.tolist())) == dict(zip(plan.indices.tolist(),
                                                                        plan.positions.tolist()))
    assert torch.equal(r.query_positions, plan.query_positions)
    assert cache.state.slow, "the test should exercise promotion"


def test_plan_drives_a_cacheless_read():
    """The teacher's path: select history frames per `plan` from one forward and read them with
    CacheRead.from_kv; identical to the cache's read when the history K/V are the same (full)."""
    cfg, model, cond = setup("full")
    with torch.no_grad():
        res, cache = run(cfg, model, cond)
        f = res.video.shape[1]
        whole = encode_clean(model, res.video, cond.frames(0, f), time_pos=torch.arange(f),
                             frame_mask=block_causal_mask(f, 2))
        plan = cache.policy.plan(f)
        read = CacheRead.from_kv(whole.kv, plan.indices, plan.positions, plan.query_positions,
                                 cond.camera[:, :f])
        x = torch.randn(1, 2, 3, 16, 16, dtype=torch.float64)
        sig = torch.full((1, 2), 0.5, dtype=torch.float64)
        a = model(x, sig, cond.frames(f, f + 2), time_pos=plan.query_positions, read=read).pred
        r = cache.read()
        b = model(x, sig, cond.frames(f, f + 2), time_pos=r.query_positions, read=r).pred
    assert (a - b).abs().max() < 1e-10


def test_gradients_flow_only_through_the_exit_step_of_the_last_chunks():
    cfg, model, cond = setup("sliding", **{"memory.window_frames": 4})
    steps = Steps()
    exits = [3, 1, 2, 1]
    res, cache = run(cfg, model, cond, exit_step=exits, grad_chunks=1, callbacks=[steps])
    assert res.exit_steps == exits
    assert {k for k, g in steps.grad.items() if g} == {(3, 1)}
    assert set(steps.x0) == {(j, i) for j in range(4) for i in range(exits[j] + 1)}
    loss = (res.video ** 2).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    # the same gradient by hand: the last chunk's exit step on the recorded input and the cache's read
    # before that chunk (rebuilt by a no-grad rollout of the first 3 chunks with the same randomness)
    with torch.no_grad():
        _, cache3 = run(cfg, model, cond, n_chunks=3, exit_step=exits[:3])
    read = cache3.read()
    x_t, sigma = steps.x_t[3, 1], steps.sigma[3, 1]
    cond = model.make_cond(["a red house by the sea"], camera=cond.camera)  # a fresh graph to the text table
    sig = torch.full(x_t.shape[:2], sigma, dtype=x_t.dtype)
    pred = denoise(model, x_t, sig, cond.frames(6, 8), num_timesteps=cfg.diffusion.num_timesteps,
                   time_pos=read.query_positions, read=read).pred
    x0 = to_x0(pred, x_t, sig, model.prediction)
    assert (x0.detach() - res.video[:, 6:8].detach()).abs().max() < 1e-10
    (x0 ** 2).sum().backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert (p.grad - grads[n]).abs().max() < 1e-9 * (1 + grads[n].abs().max()), n


def test_no_gradient_anywhere_with_grad_chunks_zero():
    cfg, model, cond = setup("full")
    res, _ = run(cfg, model, cond, n_chunks=2, exit_step=1, grad_chunks=0)
    assert not res.video.requires_grad
    res, _ = run(cfg, model, cond, n_chunks=2, exit_step=1, grad_chunks=2)
    assert res.video.requires_grad


@pytest.mark.parametrize("policy, guidance, overrides", [
    ("full", 1.0, {}),
    ("sliding", 2.0, {}),
    ("slowfast", 2.0, {"memory.promotion": "similarity", "memory.tau": 0.9999, "memory.promote_every": 1}),
    ("slowfast", 1.0, {"model.prediction": "velocity"}),
])
def test_teacher_forcing_on_a_rollouts_own_video_gives_the_rollouts_predictions(policy, guidance, overrides):
    """Fed the rollout's own video as the clean frames and its noisy states at one sampler step, the
    teacher-forced loop predicts exactly what the rollout predicted at that step: the same reads (the
    same promotions, from the same mean keys), the same doubled batch under guidance."""
    from cf.diffusion import Guided
    from cf.rollout import teacher_forced

    cfg, model, cond = setup(policy, **overrides)
    steps = Steps()
    with torch.no_grad():
        res, cache = run(cfg, model, cond, n_chunks=6, sampler="teacher", guidance=guidance,
                         callbacks=[steps])
        video, f = res.video, res.video.shape[1]
        sampler = build_sampler(cfg.diffusion, "teacher")
        for i in (0, sampler.n_steps - 1):
            x_t = torch.cat([steps.x_t[j, i] for j in range(6)], dim=1)
            sigma = torch.full(x_t.shape[:2], steps.sigma[0, i])
            fresh = KVCache(build_policy(cfg.memory, cfg.model.frames_per_chunk))
            x0 = teacher_forced(model, fresh, Guided(guidance).cond(cond.frames(0, f), 1), x_t, sigma, video,
                                num_timesteps=sampler.num_timesteps, guidance=guidance)
            ref = torch.cat([steps.x0[j, i] for j in range(6)], dim=1)
            assert (x0 - ref).abs().max() < 1e-12, i
    if policy == "slowfast" and overrides.get("memory.promotion") == "similarity":
        promoted = fresh.state.promoted
        assert promoted and promoted == cache.state.promoted[:len(promoted)]


def test_teacher_forcing_equals_one_uncached_forward():
    """After a clean history (prefilled), each noisy chunk at its own noise level sees the clean frames
    before it and itself: one forward over [clean history and window ; noisy window] with that frame mask
    (full policy, float64)."""
    from cf.diffusion import denoise, encode_clean
    from cf.rollout import prefill, teacher_forced

    cfg, model, cond = setup("full")
    c, h, w = 2, 4, 6  # chunk, history frames, window frames
    g = torch.Generator().manual_seed(5)
    clean = torch.randn(1, h + w, 3, 16, 16, generator=g)
    x_t = torch.randn(1, w, 3, 16, 16, generator=g)
    sigma = torch.rand(1, w // c, generator=g).repeat_interleave(c, dim=1)  # one level per chunk
    n = cfg.diffusion.num_timesteps
    cache = KVCache(build_policy(cfg.memory, c))
    with torch.no_grad():
        prefill(model, cache, clean[:, :h], cond)
        x0 = teacher_forced(model, cache, cond.frames(h, h + w), x_t, sigma, clean[:, h:], num_timesteps=n)
        chunk_of = torch.arange(h + w) // c
        noisy_chunk = chunk_of[h:]
        mask = torch.zeros(h + 2 * w, h + 2 * w, dtype=torch.bool)
        mask[:h + w, :h + w] = block_causal_mask(h + w, c)
        mask[h + w:, :h + w] = chunk_of[None, :] < noisy_chunk[:, None]
        mask[h + w:, h + w:] = noisy_chunk[None, :] == noisy_chunk[:, None]
        both = cond.frames(0, h + w)
        both.camera = torch.cat([both.camera, both.camera[:, h:]], dim=1)
        sig = torch.cat([torch.zeros(1, h + w), sigma], dim=1)
        time_pos = torch.cat([torch.arange(h + w), torch.arange(h, h + w)])
        pred = denoise(model, torch.cat([clean, x_t], dim=1), sig, both, num_timesteps=n, time_pos=time_pos,
                       frame_mask=mask).pred
        whole = encode_clean(model, clean, cond.frames(0, h + w), time_pos=torch.arange(h + w),
                             frame_mask=block_causal_mask(h + w, c))
    assert (x0 - to_x0(pred[:, h + w:], x_t, sigma, model.prediction)).abs().max() < 1e-10
    assert (pred[:, :h + w] - whole.pred).abs().max() < 1e-10  # the clean part is the cache's content
    with pytest.raises(CfError, match="whole 2-frame chunks"):
        teacher_forced(model, cache, cond, x_t[:, :3], sigma[:, :3], clean[:, :3], num_timesteps=n)


def test_continuing_from_context_reproduces_the_rollout():
    """Writing clean context at sigma 0 is exactly what the rollout did with its own chunks."""
    cfg, model, cond = setup("slowfast", **{"memory.promotion": "uniform", "memory.promote_every": 1})
    b, c = 1, 2
    noise = torch.randn(b, 6 * c, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sampler = "teacher"  # deterministic given the starting noise
    with torch.no_grad():
        whole, _ = run(cfg, model, cond, n_chunks=6, noise=noise, sampler=sampler)
        cont, _ = run(cfg, model, cond, n_chunks=2, noise=noise[:, 4 * c:], sampler=sampler,
                      context=whole.video[:, :4 * c])
    assert (cont.video - whole.video[:, 4 * c:]).abs().max() < 1e-10


def test_guidance_zero_is_the_unconditional_rollout():
    cfg, model, cond = setup("sink")
    null = cond.__class__(text=cond.text, text_mask=cond.text_mask, camera=cond.camera,
                          null=torch.ones(1, dtype=torch.bool))
    with torch.no_grad():
        g0, cache = run(cfg, model, cond, guidance=0.0)
        unc, _ = run(cfg, model, null)
        g1, _ = run(cfg, model, cond, guidance=1.0)
        g3, _ = run(cfg, model, cond, guidance=3.0)
    assert cache.read().k[0].shape[0] == 2  # the cache holds both halves of guidance
    assert (g0.video - unc.video).abs().max() < 1e-10
    assert (g1.video - unc.video).abs().max() > 1e-3 and (g3.video - g1.video).abs().max() > 1e-3


def test_randomness_comes_from_the_generator():
    cfg, model, cond = setup("slowfast")
    with torch.no_grad():
        a, _ = run(cfg, model, cond, seed=1)
        torch.manual_seed(123)  # the global RNG must not matter
        b, _ = run(cfg, model, cond, seed=1)
        c, _ = run(cfg, model, cond, seed=2)
    assert torch.equal(a.video, b.video)
    assert (a.video - c.video).abs().max() > 1e-3


def test_observers_and_teacher_sampler_with_velocity_prediction():
    cfg, model, cond = setup("slowfast", **{"model.prediction": "velocity"})
    timer, nbytes = ChunkTimer(), CacheBytes()
    with torch.no_grad():
        res, cache = run(cfg, model, cond, n_chunks=5, sampler="teacher", guidance=2.0,
                         callbacks=[timer, nbytes])
    assert res.video.shape == (1, 10, 3, 16, 16) and torch.isfinite(res.video).all()
    assert len(timer.latencies) == 5 and all(t > 0 for t in timer.latencies)
    assert nbytes.nbytes[-1] == cache.nbytes() and nbytes.frames[-1] == cache.used


def test_bad_arguments_say_what_to_do():
    cfg, model, cond = setup("full")
    with pytest.raises(CfError, match=r"exit_step=.*in \[0, 4\)"):
        run(cfg, model, cond, exit_step=4)
    with pytest.raises(CfError, match="exit_step"):
        run(cfg, model, cond, exit_step=[0, 1])
    with pytest.raises(CfError, match="multiple of model.frames_per_chunk=2"):
        run(cfg, model, cond, context=torch.zeros(1, 3, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(CfError, match="cond.camera covers"):
        run(cfg, model, cond, n_chunks=100)
    cache = KVCache(build_policy(cfg.memory, 3))
    with pytest.raises(CfError, match="built for 3-frame chunks"):
        rollout(model, cache, build_sampler(cfg.diffusion, "student"), cond, 1)


def test_prefill_writes_history_like_the_rollout():
    """A teacher/critic reads a student's history by prefilling a cache: the same keys as the rollout's."""
    from cf.rollout import prefill, read_for_query

    cfg, model, cond = setup("slowfast", **{"memory.promotion": "uniform", "memory.promote_every": 1})
    with torch.no_grad():
        res, cache = run(cfg, model, cond, n_chunks=5)
        other = KVCache(build_policy(cfg.memory, 2))
        prefill(model, other, res.video, cond)
    a, b = read_for_query(model, cache), read_for_query(model, other)
    assert a.times.tolist() == b.times.tolist() and torch.equal(a.positions, b.positions)
    assert all((ka - kb).abs().max() < 1e-10 for ka, kb in zip(a.k, b.k))


@pytest.mark.filterwarnings("ignore:Mismatch dtype")  # CPU autocast leaves RMSNorm unfused; CUDA does not
def test_bf16_autocast_keeps_the_cache_in_bf16():
    """The CUDA path in miniature: under bf16 autocast the cache holds bf16 keys and values."""
    cfg = load_config("smoke", overrides=["memory.policy=sink"])
    model = CausalVideoDiT(cfg.model, cfg.data)
    cond = model.make_cond(["a cat"], camera=torch.rand(1, 8, 2) * 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        res, cache = run(cfg, model, cond, n_chunks=4)
    r = cache.read()
    assert r.k[0].dtype == r.v[0].dtype == torch.bfloat16 and torch.isfinite(res.video).all()


@pytest.mark.slow  # ~1 min on 2 cores: 4,680-token chunks attending to 9,360 keys
def test_wan_shapes_run_through_the_same_rollout():
    """The `wan` preset's frame geometry (16-channel 60x104 latents, patch 2 = 1560 tokens per frame,
    3-frame chunks, velocity prediction, grid positions, slow-fast 3 + 12 + 6) through the shared
    loop, with a narrow 1-layer network so the CPU can afford it; the speed run uses the full width."""
    from cf.model import build_model

    cfg = load_config("wan", overrides=["model.depth=1", "model.dim=64", "model.heads=1", "model.ffn_dim=64",
                                        "model.text_tokens=4", "model.text_dim=32", "device=cpu"])
    torch.manual_seed(0)
    model = build_model(cfg, "cpu").eval()
    assert model.tokens_per_frame() == 1560
    cache = KVCache(build_policy(cfg.memory, cfg.model.frames_per_chunk))
    with torch.no_grad():
        cond = model.make_cond(["a wan-shaped rollout"])
        res = rollout(model, cache, build_sampler(cfg.diffusion, "student"), cond, 2,
                      generator=torch.Generator().manual_seed(0))
    assert res.video.shape == (1, 6, 16, 60, 104) and torch.isfinite(res.video).all()
    assert cache.n_written == 6 and cache.read().positions.max() < 3 + 12 + 6  # bounded positions
