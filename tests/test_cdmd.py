"""Contextual DMD: schedule, where gradients flow, what teacher and critic read, the recipes end to end,
resume after a kill, and the stop on non-finite values."""

import json

import pytest
import torch
from lightning.pytorch import Callback
from safetensors.torch import load_file

import cf.rollout as cf_rollout
import cf.train.cdmd as cdmd
from cf.config import load_config
from cf.errors import CfError
from cf.model import CausalVideoDiT, build_model
from cf.train.base import ckpt_path, fit, load_checkpoint, make_trainer
from cf.train.callbacks import NonFiniteError
from cf.train.cdmd import (
    CDMDModule,
    RolloutPlan,
    curriculum_max,
    generator_updates,
    is_generator_step,
    plan_step,
    stage_steps,
)
from cf.train.conditions import ConditionStream, StreamDataModule


def _cfg(method="context_forcing", *overrides):
    return load_config("smoke", method, overrides=["tracking.enabled=false", *overrides])


def _batch(cfg, stage=2, b=2):
    chunks = cfg.cdmd.short_chunks if stage == 1 else cfg.cdmd.long_chunks_end
    stream = ConditionStream(
        cfg.data, frames=chunks * cfg.model.frames_per_chunk, context=cfg.student.context_frames
    )
    samples = [stream.sample(i) for i in range(b)]
    return {
        "prompt": [s["prompt"] for s in samples],
        "camera": torch.stack([s["camera"] for s in samples]),
        "context": torch.stack([s["context"] for s in samples]),
    }


def _module(cfg, stage=2):
    torch.manual_seed(0)
    module = CDMDModule(cfg, stage)
    teacher = CausalVideoDiT(cfg.model, cfg.data).state_dict()
    module.load_start(teacher, CausalVideoDiT(cfg.model, cfg.data).state_dict())
    return module


# ---------------------------------------------------------------------- schedule


def test_update_ratio_and_step_counts():
    assert [is_generator_step(s, 3) for s in range(8)] == [False, False, False, True] * 2
    assert [generator_updates(s, 3) for s in (0, 3, 4, 7, 8)] == [0, 0, 1, 1, 2]
    cfg = _cfg("context_forcing", "cdmd.stage1_steps=7", "cdmd.stage2_steps=5", "cdmd.critic_ratio=4")
    assert (stage_steps(cfg.cdmd, 1), stage_steps(cfg.cdmd, 2)) == (35, 25)
    assert [is_generator_step(s, 0) for s in range(3)] == [True] * 3  # ratio 0: generator only


def test_curriculum_grows_the_longest_rollout_linearly():
    assert [curriculum_max(i, 5, 8, 12) for i in range(7)] == [8, 9, 10, 11, 12, 12, 12]
    assert [curriculum_max(i, 1, 3, 4) for i in range(2)] == [4, 4]  # a one-update stage: the end at once
    cfg = _cfg(
        "context_forcing",
        "cdmd.stage2_steps=5",
        "cdmd.critic_ratio=1",
        "cdmd.long_chunks_start=3",
        "cdmd.long_chunks_end=7",
    )
    plans = [plan_step(cfg.cdmd, 2, s, seed=0, n_steps=4) for s in range(200)]
    for s, p in enumerate(plans):
        assert 3 <= p.n_chunks <= curriculum_max(generator_updates(s, 1), 5, 3, 7)
        assert p.window == cfg.cdmd.short_chunks and 0 <= p.exit_step < 4
    assert {p.n_chunks for p in plans[:2]} == {3}  # the first update: only the start length
    assert max(p.n_chunks for p in plans[8:]) == 7  # the end is reached
    # a pure function of (seed, step): the same on every rank and after a resume
    assert plans[17] == plan_step(cfg.cdmd, 2, 17, seed=0, n_steps=4)
    assert any(plan_step(cfg.cdmd, 2, s, seed=1, n_steps=4) != plans[s] for s in range(20))


def test_stage1_rolls_out_one_window_at_one_exit_step():
    cfg = _cfg()
    for s in range(10):
        p = plan_step(cfg.cdmd, 1, s, seed=0, n_steps=4)
        assert p.n_chunks == p.window == cfg.cdmd.short_chunks
        assert p.exit_steps(4) == [p.exit_step] * p.n_chunks
    p = RolloutPlan(n_chunks=5, window=2, exit_step=1, generator=True)
    assert p.exit_steps(4) == [3, 3, 3, 1, 1]  # stage 2: history fully denoised, the window at the exit


def test_bad_cdmd_settings_fail_with_the_key():
    with pytest.raises(CfError, match="cdmd.long_chunks_start"):
        CDMDModule(_cfg("context_forcing", "cdmd.long_chunks_start=1"), 2)
    with pytest.raises(CfError, match="cdmd.t_min"):
        CDMDModule(_cfg("context_forcing", "cdmd.t_min=990"), 1)


def test_the_real_score_is_guided_by_its_stage_unless_nothing_conditions_it():
    assert [CDMDModule(_cfg(), stage).guidance for stage in (1, 2)] == [3.0, 5.0]  # cdmd.cfg_stage1 / 2
    bare = _cfg("context_forcing", "model.text_encoder=none", "model.camera=false")
    assert CDMDModule(bare, 2).guidance == 1.0


# ---------------------------------------------------------------------- gradients and history


def test_gradients_reach_the_generator_only_through_the_last_windows_exit_step():
    cfg = _cfg()
    module = _module(cfg)
    calls = []
    n = cfg.diffusion.num_timesteps  # the network's second input is the timestep sigma * n
    module.net.register_forward_hook(
        lambda mod, args, out: calls.append((out.pred.requires_grad, float(args[1].flatten()[0]) / n))
    )
    plan = RolloutPlan(n_chunks=4, window=2, exit_step=1, generator=True)
    video = module.generate(_batch(cfg), plan, step=0)
    sigmas = module.sampler.sigmas
    assert [s for g, s in calls if g] == [sigmas[1]] * 2  # one forward per window chunk, at the exit
    # history chunks ran all 4 steps, window chunks 2, each chunk wrote its clean frames (sigma 0)
    n_ctx = cfg.student.context_frames // 2
    assert len(calls) == n_ctx + 2 * (4 + 1) + 2 * (2 + 1) - 1
    first = video.shape[1] - 2 * cfg.model.frames_per_chunk
    params = list(module.net.parameters())
    grads = torch.autograd.grad(video[:, :first].sum(), params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(video[:, first:].sum(), params, allow_unused=True)
    assert any(g is not None and g.any() for g in grads)
    calls.clear()
    module.generate(_batch(cfg), RolloutPlan(4, 2, 1, generator=False), step=0)  # a critic step
    assert calls and not any(g for g, _ in calls)


@pytest.mark.parametrize("history", ["policy", "window"])
def test_teacher_and_critic_read_the_same_generated_history(monkeypatch, history):
    cfg = _cfg("context_forcing", f"cdmd.teacher_history={history}")
    module = _module(cfg)
    seen = {"teacher": [], "critic": []}
    name = {id(module.teacher): "teacher", id(module.critic): "critic"}

    in_prefill = [0]

    def spy(fn, kind):
        def wrapped(net, cache, frames=None, *args, **kwargs):
            if id(net) in name and not in_prefill[0]:  # the prefill's own writes are the prefill
                if frames is None:  # read_for_query(net, cache)
                    seen[name[id(net)]].append((kind, tuple(cache.slot_times)))
                else:  # prefill / write_clean: keep the first half (the teacher's batch is [cond ; null])
                    half = len(frames) // (2 if net is module.teacher else 1)
                    seen[name[id(net)]].append((kind, frames[:half]))
            in_prefill[0] += kind == "prefill"
            try:
                return fn(net, cache, frames, *args, **kwargs) if frames is not None else fn(net, cache)
            finally:
                in_prefill[0] -= kind == "prefill"

        return wrapped

    plan = RolloutPlan(n_chunks=4, window=2, exit_step=0, generator=True)
    batch = _batch(cfg)
    with torch.no_grad():
        video = module.generate(batch, plan, step=0)
    # score_window prefills the history, then the teacher-forced loop (cf.rollout) reads and writes
    monkeypatch.setattr(cdmd, "prefill", spy(cdmd.prefill, "prefill"))
    for fn in ("write_clean", "read_for_query"):
        monkeypatch.setattr(cf_rollout, fn, spy(getattr(cf_rollout, fn), fn))
    module.generator_loss(batch, video, plan, step=0)
    t, c = seen["teacher"], seen["critic"]
    assert [k for k, _ in t] == [k for k, _ in c] and len(t) > 2
    for (_, a), (_, b) in zip(t, c):
        assert a == b if isinstance(a, tuple) else torch.equal(a, b)
    first = video.shape[1] - 4
    reads = [sorted(held) for k, held in t if k == "read_for_query"]  # frames held, from the cache start
    if history == "policy":  # the whole history (context included) through the run's memory policy
        assert t[0][0] == "prefill" and torch.equal(t[0][1], video[:, :first])
        # slow-fast: the sink (frame 0, real context) ... the newest frame before the window
        assert reads[0][0] == 0 and reads[0][-1] == first - 1 and len(reads[0]) <= module.policy.capacity
    else:  # only the teacher's own context length (4 frames at smoke) before each chunk
        assert cfg.teacher.context_frames == 4
        assert t[0][0] == "prefill" and torch.equal(t[0][1], video[:, first - 4 : first])
        assert reads == [[0, 1, 2, 3], [2, 3, 4, 5]]


def test_score_window_is_the_teacher_forced_forward_of_the_noised_window():
    """score_window by its numbers (float64, full policy): each window chunk, noised at sigma, is denoised
    on the clean generated video before it (from `start`): one forward over [clean ; noisy window] with a
    mask; under guidance, the [cond ; null] combination of two such forwards."""
    from cf.diffusion import add_noise, denoise, guide, to_x0
    from cf.memory import build_policy
    from cf.model import Cond, block_causal_mask

    torch.set_default_dtype(torch.float64)
    try:
        cfg = _cfg("context_forcing", "memory.policy=full")
        torch.manual_seed(0)
        net = CausalVideoDiT(cfg.model, cfg.data)
        torch.nn.init.normal_(net.head.weight, std=0.5)  # outputs of order 1, so differences show
        g = torch.Generator().manual_seed(3)
        frames, cam = torch.randn(2, 10, 3, 16, 16, generator=g), torch.rand(2, 10, 2, generator=g) * 40
        sigma, noise = torch.rand(2, generator=g), torch.randn(2, 4, 3, 16, 16, generator=g)
        start, first, n = 2, 6, cfg.diffusion.num_timesteps
        sig = sigma[:, None].expand(2, 4)
        x_t = add_noise(frames[:, first:], noise, sig)

        def one_forward(cond):
            chunk_of, noisy = torch.arange(8) // 2, torch.arange(4, 8) // 2  # relative to `start`
            mask = torch.zeros(12, 12, dtype=torch.bool)
            mask[:8, :8] = block_causal_mask(8, 2)
            mask[8:, :8] = chunk_of[None, :] < noisy[:, None]
            mask[8:, 8:] = noisy[None, :] == noisy[:, None]
            seq = Cond(text=cond.text, text_mask=cond.text_mask, null=cond.null,
                       camera=torch.cat([cam[:, start:], cam[:, first:]], 1))
            x, s = torch.cat([frames[:, start:], x_t], 1), torch.cat([torch.zeros(2, 8), sig], 1)
            pred = denoise(net, x, s, seq, num_timesteps=n, frame_mask=mask,
                           time_pos=torch.cat([torch.arange(8), torch.arange(4, 8)])).pred[:, 8:]
            return to_x0(pred, x_t, sig, net.prediction)

        cond = net.make_cond(["a", "b"], camera=cam)
        null = Cond(text=cond.text, text_mask=cond.text_mask, camera=cam,
                    null=torch.ones(2, dtype=torch.bool))
        policy = build_policy(cfg.memory, 2)
        kw = dict(start=start, first=first, sigma=sigma, noise=noise, num_timesteps=n)
        with torch.no_grad():
            plain = cdmd.score_window(net, policy, frames, cond, **kw)
            guided = cdmd.score_window(net, policy, frames, cond, guidance=3.0, **kw)
            assert (plain - one_forward(cond)).abs().max() < 1e-10
            assert (guided - guide(one_forward(cond), one_forward(null), 3.0)).abs().max() < 1e-10
            assert (guided - plain).abs().max() > 1e-3
    finally:
        torch.set_default_dtype(torch.float32)


# ---------------------------------------------------------------------- the recipes end to end


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    from cf.train.teacher_stage import train_teacher

    out = tmp_path_factory.mktemp("teacher")
    return train_teacher(_cfg(), out, "teacher", evaluate_after=False)


@pytest.mark.parametrize("method", ["self_forcing", "longlive", "context_forcing"])
def test_each_recipe_trains_its_stages_at_smoke(tmp_path, teacher_ckpt, method):
    from cf.train.student_stage import GENERATOR_FILE, train_cdmd, train_student

    tracked = method == "context_forcing"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config("smoke", method, overrides=[f"tracking.enabled={tracked}", f"tracking.uri={store}"])
    last = train_student(cfg, tmp_path, teacher_ckpt)
    stages = ["student", "cdmd1"] + (["cdmd2"] if cfg.cdmd.stage2 else [])
    last = train_cdmd(cfg, tmp_path, 1, teacher_ckpt, last)
    if cfg.cdmd.stage2:
        last = train_cdmd(cfg, tmp_path, 2, teacher_ckpt, last)
    else:
        with pytest.raises(CfError, match="stage2=false"):
            train_cdmd(cfg, tmp_path, 2, teacher_ckpt, last)
    undistilled = []
    for stage in stages:
        d = tmp_path / stage
        assert all(
            (d / f).is_file() for f in ("last.ckpt", GENERATOR_FILE, "eval.json", "samples.png", "sample.mp4")
        )
        ev = json.loads((d / "eval.json").read_text())
        assert set(ev["summary"]) == {"distilled", "untrained", "undistilled", "world", "teacher"}
        world = ev["summary"]["world"]
        assert world["revisit_psnr"] == 100.0 and world["revisit_retention"] == 1.0  # exact revisits
        assert world["revisit_chance_psnr"] < 30  # other places look different
        # the benchmark's column names (cf.metrics.columns), not a second naming
        assert {"consistency_pixels", "motion_smoothness", "dynamic_degree"} <= set(world)
        assert set(ev["distilled_beats_untrained"]) == {"revisit_retention", "first_frame_consistency"}
        assert set(ev["distilled_beats_undistilled"]) == {"revisit_retention", "first_frame_consistency"}
        promoted = ev["setup"]["slow_memory_promoted"]
        if cfg.memory.policy == "slowfast":  # the record of what each model's slow memory promoted, per world
            assert set(promoted) == {"distilled", "untrained", "undistilled", "teacher"}
            chunk, after = cfg.model.frames_per_chunk, max(cfg.memory.promote_after, cfg.memory.sink_frames)
            for runs in promoted.values():
                assert len(runs) == cfg.student.eval_videos
                assert all(r and all(f % chunk == 0 and f >= after for f in r) for r in runs)
        else:
            assert promoted is None
        # the undistilled student is the teacher in the student's sampler: the same at every stage
        undistilled.append(ev["summary"]["undistilled"])
    assert all(u == undistilled[0] for u in undistilled)
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] == stage_steps(cfg.cdmd, 2 if cfg.cdmd.stage2 else 1)
    assert ckpt["ema"]["num_updates"] == (cfg.cdmd.stage2_steps if cfg.cdmd.stage2 else cfg.cdmd.stage1_steps)
    # the hand-off: the EMA generator, loadable without knowing the checkpoint's layout
    model = build_model(cfg, "cpu", weights=last.parent / GENERATOR_FILE)
    ema = ckpt["ema"]["shadow"]
    assert all(torch.equal(p, ema[n]) for n, p in model.named_parameters())
    assert load_file(str(last.parent / GENERATOR_FILE)).keys() == model.state_dict().keys()
    if tracked:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(store)
        runs = {
            r.data.tags["stage"]: r
            for r in client.search_runs(
                [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id]
            )
        }
        assert set(runs) == set(stages)
        metrics = runs["cdmd2"].data.metrics
        for key in (
            "cdmd/dmd_loss",
            "cdmd/critic_loss",
            "cdmd/grad_norm",
            "cdmd/rollout_chunks",
            "cdmd/distilled_revisit_psnr",
            "cdmd/untrained_revisit_psnr",
            "cdmd/revisit_retention_gain",  # cf.train.student_stage.CRITERIA
        ):
            assert key in metrics, key
        assert "student/loss" in runs["student"].data.metrics
        artifacts = {a.path for a in client.list_artifacts(runs["cdmd2"].info.run_id)}
        assert {"eval.json", "samples.png", "sample.mp4"} <= artifacts


# ---------------------------------------------------------------------- resume and stops


class _Kill(Exception):
    pass


class _KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if self.step is not None and trainer.global_step == self.step:
            raise _Kill


def _fit(cfg, out, kill_at=None, stream=ConditionStream):
    module = _module(cfg)
    frames = cfg.cdmd.long_chunks_end * cfg.model.frames_per_chunk
    context = cfg.student.context_frames
    data = StreamDataModule(cfg, lambda **kw: stream(cfg.data, frames=frames, context=context, **kw))
    trainer = make_trainer(
        cfg,
        out,
        "cdmd2",
        callbacks=[_KillAt(kill_at)],
        progress_bar=False,
        max_steps=stage_steps(cfg.cdmd, 2),
        grad_clip=0,
        find_unused_parameters=True,
    )
    fit(trainer, module, data, out, "cdmd2")
    return module


def _resume_cfg(*overrides):
    return _cfg(
        "context_forcing",
        "model.dtype=fp64",
        "cdmd.stage2_steps=2",
        "cdmd.critic_ratio=2",
        "trainer.ckpt_every=2",
        "cdmd.long_chunks_start=2",
        "cdmd.long_chunks_end=3",
        *overrides,
    )


def test_killed_cdmd_resumes_to_identical_weights(tmp_path):
    """Killed at step 3 (checkpoint at step 2) and resumed: generator, critic, EMA and both optimizers
    as in a run never stopped, with 2 generator and 4 critic updates in 6 steps."""
    cfg = _resume_cfg()
    ref = _fit(cfg, tmp_path / "ref")
    with pytest.raises(_Kill):
        _fit(cfg, tmp_path / "run", kill_at=3)
    assert load_checkpoint(ckpt_path(tmp_path / "run", "cdmd2"))["global_step"] == 2
    resumed = _fit(cfg, tmp_path / "run")
    assert resumed.trainer.global_step == ref.trainer.global_step == 6
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, resumed.ema.shadow[k]) for k, a in ref.ema.shadow.items())
    gen, critic = (opt.optimizer if hasattr(opt, "optimizer") else opt for opt in ref.optimizers())
    assert {int(s["step"]) for s in gen.state.values()} == {2}
    assert {int(s["step"]) for s in critic.state.values()} == {4}
    assert ref.ema.num_updates == resumed.ema.num_updates == 2


class _PoisonedStream(ConditionStream):
    """Sample 4 (the first of batch 2, a generator step) has a NaN camera."""

    def sample(self, i):
        s = super().sample(i)
        if i == 4:
            s["camera"] = torch.full_like(s["camera"], float("nan"))
        return s


def test_non_finite_values_stop_training_and_keep_the_last_good_checkpoint(tmp_path):
    cfg = _resume_cfg("model.dtype=fp32")
    with pytest.raises(NonFiniteError, match="cdmd/dmd_loss"):
        _fit(cfg, tmp_path, stream=_PoisonedStream)
    ckpt = load_checkpoint(ckpt_path(tmp_path, "cdmd2"))
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
