import io

import pytest
import torch
from torch.utils.data import DataLoader

from cf.config import load_config
from cf.data import WorldDataset
from cf.diffusion import denoise
from cf.evaluation.continuation import shift_last
from cf.train.teacher import TeacherModule, dense_frames, dense_layout, window_layout


@pytest.fixture(scope="module")
def batch():
    cfg = load_config("smoke")
    return next(iter(DataLoader(WorldDataset(cfg.data), batch_size=2)))


def _cfg(*overrides):
    return load_config("smoke", overrides=["teacher.min_context_frames=2", *overrides])


def _loss_grad_of_predictions(module, batch):
    """The teacher loss's gradient with respect to every frame of the network's output."""
    seen = {}

    def keep(mod, args, out):
        out.pred.retain_grad()
        seen["pred"] = out.pred

    module.net.register_forward_hook(keep)
    loss, _ = module.loss(batch, step=0)
    loss.backward()
    return seen["pred"].grad


@pytest.mark.parametrize("dense", [False, True])
def test_the_network_predicts_only_the_target_frames_and_all_get_gradient(batch, dense):
    """History (clean) positions are run for their keys and values only: the network's output covers the
    target (noisy) frames alone (out_from; equal to the full forward's, tests/test_model.py), and every one
    of them gets gradient. Window: [history ; target]; dense: [clean ; noisy copies]."""
    torch.manual_seed(0)
    module = TeacherModule(_cfg(f"teacher.dense={str(dense).lower()}"))
    grad = _loss_grad_of_predictions(module, batch)
    if dense:
        _, targets, _ = dense_layout(module.policy, batch["video"].shape[1], module.chunk,
                                     module.min_hist, module.cfg.teacher.context_frames)
        n_target = len(targets) * module.chunk
    else:
        n_target = module.n_target
    assert grad.shape[1] == n_target
    assert all(torch.count_nonzero(grad[:, i]) > 0 for i in range(n_target))


def test_history_changes_the_prediction(batch):
    """...but the history is read: replacing it changes the loss (the target attends to it)."""
    torch.manual_seed(0)
    module = TeacherModule(_cfg("teacher.min_context_frames=4"))
    altered = dict(batch, video=batch["video"].clone())
    altered["video"][:, :2] = -altered["video"][:, :2]
    # frames 0-1 are history whenever the clip start is 0; scan a few steps to find one
    diffs = []
    for step in range(6):
        with torch.no_grad():
            diffs.append(abs(module.loss(batch, step)[0] - module.loss(altered, step)[0]).item())
    assert max(diffs) > 1e-6


def test_window_layout_of_full_is_block_causal_history_and_a_target_that_sees_all():
    """For `full` (the default), the layout the single-window path always had."""
    from cf.memory import build_policy

    policy = build_policy(_cfg("memory.policy=full").memory, 2)
    m = window_layout(policy, n_hist=4, n_target=2, chunk=2)
    assert m[:4, :4].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert m[4:].all() and not m[:4, 4:].any()


ACCEPTED = [  # every teacher.memory the single-window path accepts at smoke (window 4, sink 1, slow 2)
    ("teacher.memory=full",),
    ("teacher.memory=sliding",),  # bounded positions: a shift RoPE cannot see
    ("teacher.memory=sliding", "memory.bounded_positions=false"),
    ("teacher.memory=sink", "memory.bounded_positions=false"),
    ("teacher.memory=slowfast", "memory.promotion=uniform", "memory.bounded_positions=false"),
]


def _window_forward(module, batch, step):
    """The loss's forward on step `step`'s window (noise drawn here): (target prediction, n_hist, start,
    x_t, sigma)."""
    from cf.diffusion import add_noise

    video, camera = batch["video"].double(), batch["camera"].double()
    hist, x0, cam, time_pos, mask, _ = module._window_inputs(dict(batch, video=video, camera=camera), step)
    n_hist, start = module.draw_window(step, video.shape[1])
    g = torch.Generator().manual_seed(step)
    sigma = torch.rand(x0.shape[0], 1, generator=g, dtype=torch.float64).expand(-1, x0.shape[1])
    x_t = add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), sigma)
    net, n = module.net, module.cfg.diffusion.num_timesteps
    cond = net.make_cond(batch["prompt"], camera=cam)
    sig = torch.cat([torch.zeros(sigma.shape[0], n_hist), sigma], 1)
    pred = denoise(net, torch.cat([hist, x_t], 1), sig, cond, num_timesteps=n, time_pos=time_pos,
                   frame_mask=mask).pred[:, n_hist:]
    return pred, n_hist, start, x_t, sigma


def _cached_forward(module, batch, n_hist, start, x_t, sigma):
    """The same target through a cache of the teacher's policy: the history written chunk by chunk
    (`prefill`), then one forward of the noisy target on the cache's read."""
    from cf.memory import KVCache
    from cf.rollout import prefill, read_for_query

    video, camera = batch["video"].double(), batch["camera"].double()
    net, n_target = module.net, module.n_target
    cond = net.make_cond(batch["prompt"], camera=camera[:, start:start + n_hist + n_target])
    cache = KVCache(module.policy)
    prefill(net, cache, video[:, start:start + n_hist], cond)
    read = read_for_query(net, cache, n_target)
    return denoise(net, x_t, sigma, cond.frames(n_hist, n_hist + n_target),
                   num_timesteps=module.cfg.diffusion.num_timesteps, time_pos=read.query_positions,
                   read=read).pred


@pytest.mark.parametrize("overrides", ACCEPTED, ids=lambda o: " ".join(o))
def test_window_forward_equals_the_cached_read_for_every_accepted_policy(batch, overrides):
    """The single-window training forward gives the target exactly what a cache of teacher.memory gives it
    (history written chunk by chunk, then read), in float64, for every history length a step draws.
    Before, a sliding teacher (window 4) read its selected frames as if they had seen each other only:
    1.2e-3 off."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        module = TeacherModule(_cfg("teacher.context_frames=6", *overrides))
        torch.nn.init.normal_(module.net.head.weight, std=0.5)  # outputs of order 1, so differences show
        lengths = set()
        for step in range(12):
            pred, n_hist, start, x_t, sigma = _window_forward(module, batch, step)
            cached = _cached_forward(module, batch, n_hist, start, x_t, sigma)
            assert (pred - cached).abs().max() < 1e-12, (step, n_hist)
            lengths.add(n_hist)
        assert lengths == {2, 4, 6}  # every drawn history length was checked
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_old_selection_was_off_for_a_sliding_teacher(batch):
    """What the test above would catch: the former layout (the policy's read frames only, block-causal among
    themselves) against the cache, for sliding (window 4) after 6 history frames."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        module = TeacherModule(_cfg("teacher.context_frames=6", "teacher.memory=sliding"))
        torch.nn.init.normal_(module.net.head.weight, std=0.5)
        video, camera, net = batch["video"].double(), batch["camera"].double(), module.net
        n_hist, t = 6, module.n_target
        plan = module.policy.plan(n_hist, n_query=t)
        assert plan.indices.tolist() == [4, 5]
        k = len(plan.indices)
        old_mask = torch.ones(k + t, k + t, dtype=torch.bool)
        old_mask[:k, k:] = False
        x_t, sigma = torch.randn(2, t, 3, 16, 16), torch.full((2, t), 0.5)
        cam = torch.cat([camera[:, plan.indices], camera[:, n_hist:n_hist + t]], 1)
        old = denoise(net, torch.cat([video[:, plan.indices], x_t], 1),
                      torch.cat([torch.zeros(2, k), sigma], 1), net.make_cond(batch["prompt"], camera=cam),
                      num_timesteps=1000, time_pos=torch.cat([plan.positions, plan.query_positions]),
                      frame_mask=old_mask).pred[:, k:]
        cached = _cached_forward(module, batch, n_hist, 0, x_t, sigma)
        assert (old - cached).abs().max() > 1e-4
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("overrides, why", [
    (("teacher.memory=slowfast",), "memory.promotion=similarity"),
    (("teacher.memory=sink",), "memory.bounded_positions=true"),
    (("teacher.memory=slowfast", "memory.promotion=uniform"), "memory.bounded_positions=true"),
])
def test_a_teacher_memory_the_window_cannot_replay_is_refused(overrides, why):
    from cf.errors import CfError

    with pytest.raises(CfError, match=r"teacher.memory='\w+' cannot be trained exactly") as e:
        TeacherModule(_cfg(*overrides))
    assert why in str(e.value) and "Accepted with these memory.* settings: full, sliding;" in str(e.value)


def test_erft_bank_fills_and_survives_a_checkpoint(batch):
    # room for every residual: no replacement
    module = TeacherModule(_cfg("erft.bank_size=64", "teacher.dense=false"), erft=True)
    for step in range(3):
        module.loss(batch, step)
    assert module.bank.filled() == 3 * batch["video"].shape[0] * module.n_target
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    other = TeacherModule(_cfg("erft.bank_size=64"), erft=True)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.bank.residuals, module.bank.residuals)
    assert torch.equal(other.bank.counts, module.bank.counts)


def test_erft_perturbs_history_at_the_configured_rate(batch):
    """With p_clean=0, p_history=1 every history is perturbed; with p_history=0 none is."""
    for p, expect_changed in ((1.0, True), (0.0, False)):
        module = TeacherModule(_cfg("erft.p_clean=0.0", f"erft.p_history={p}", "erft.p_target=0.0",
                                    "erft.p_noise=0.0"), erft=True)
        module.bank.add(torch.ones(4, 3, 16, 16), torch.full((4,), 0.1))
        hist = torch.zeros(2, 2, 3, 16, 16)
        g = torch.Generator().manual_seed(0)
        h, x0, noise = module._inject(hist, torch.zeros(2, 2, 3, 16, 16), torch.zeros(2, 2, 3, 16, 16),
                                      torch.full((2, 2), 0.5), g)
        assert bool((h != 0).any()) is expect_changed
        assert not x0.any() and not noise.any()


def test_shift_last_moves_the_frame_by_the_camera_offset():
    last = torch.arange(16.0).view(1, 1, 4, 4)
    out = shift_last(last, torch.tensor([[0.0, 0.0]]), torch.tensor([[[1.0, 0.0]]]))
    # camera moved right by 1: pixel x shows what was at x+1; the new right column repeats the edge
    assert out[0, 0, 0].tolist() == [[1, 2, 3, 3], [5, 6, 7, 7], [9, 10, 11, 11], [13, 14, 15, 15]]


class _Kill(Exception):
    pass


def _fit_teacher(cfg, out, erft, kill_at=None):
    from lightning.pytorch import Callback

    from cf.data.datamodule import VideoDataModule
    from cf.train.base import fit, make_trainer

    class KillAt(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if kill_at is not None and trainer.global_step == kill_at:
                raise _Kill

    torch.manual_seed(0)
    module = TeacherModule(cfg, erft=erft)
    trainer = make_trainer(cfg, out, "stage", callbacks=[KillAt()], progress_bar=False, max_steps=5)
    fit(trainer, module, VideoDataModule(cfg), out, "stage")
    return module


@pytest.mark.parametrize("erft", [False, True])
def test_killed_teacher_resumes_to_identical_weights(tmp_path, erft):
    """Killed at step 3 (checkpoint at step 2) and resumed: the same weights, EMA and ERFT bank
    as a run never stopped (float64 on the CPU; every draw is keyed by (seed, step))."""
    cfg = _cfg("model.dtype=fp64", "trainer.max_steps=5", "trainer.ckpt_every=2", "tracking.enabled=false",
               "erft.steps=5")
    ref = _fit_teacher(cfg, tmp_path / "ref", erft)
    with pytest.raises(_Kill):
        _fit_teacher(cfg, tmp_path / "run", erft, kill_at=3)
    resumed = _fit_teacher(cfg, tmp_path / "run", erft)
    assert resumed.trainer.global_step == ref.trainer.global_step == 5
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, resumed.ema.shadow[k]) for k, a in ref.ema.shadow.items())


@pytest.mark.parametrize("context", [4, 16])
def test_dense_forward_equals_a_cached_rollout_read(batch, context):
    """One teacher-forcing forward over [clean ; noisy] gives every target chunk exactly what a cached
    rollout gives it: its clean history written chunk by chunk through the policy (here the last
    `context` frames: a sliding window), then one forward of the noisy chunk on the cache's read."""
    from cf.memory import KVCache, build_policy
    from cf.rollout import prefill, read_for_query

    torch.set_default_dtype(torch.float64)
    try:
        cfg = _cfg(f"teacher.context_frames={context}", "memory.bounded_positions=false")
        torch.manual_seed(0)
        module = TeacherModule(cfg)
        net, chunk = module.net, module.chunk
        video, camera = batch["video"].double(), batch["camera"].double()
        n_clean, targets, mask = dense_layout(module.policy, video.shape[1], chunk, 1, context)
        g = torch.Generator().manual_seed(1)
        noisy = torch.randn(video.shape[0], len(targets) * chunk, *video.shape[2:], generator=g)
        sig = torch.rand(video.shape[0], len(targets), generator=g).repeat_interleave(chunk, 1)
        frames = dense_frames(n_clean, targets, chunk)
        x = torch.cat([video[:, :n_clean], noisy], 1)
        sigma = torch.cat([sig.new_zeros(sig.shape[0], n_clean), sig], 1)
        n = cfg.diffusion.num_timesteps
        dense = denoise(net, x, sigma, net.make_cond(batch["prompt"], camera=camera[:, frames]),
                        num_timesteps=n, time_pos=frames, frame_mask=mask).pred[:, n_clean:]
        cfg.memory.policy, cfg.memory.window_frames = "sliding", context + chunk
        cond = net.make_cond(batch["prompt"], camera=camera)
        for i, j in enumerate(targets):
            cache = KVCache(build_policy(cfg.memory, chunk))
            prefill(net, cache, video[:, :j * chunk], cond)
            read = read_for_query(net, cache)
            own = slice(i * chunk, (i + 1) * chunk)
            cached = denoise(net, noisy[:, own], sig[:, own], cond.frames(j * chunk, (j + 1) * chunk),
                             num_timesteps=n, time_pos=read.query_positions, read=read).pred
            assert torch.allclose(dense[:, own], cached, atol=1e-9), f"chunk {j}"
    finally:
        torch.set_default_dtype(torch.float32)


def test_dense_refuses_a_policy_it_cannot_replay():
    from cf.errors import CfError

    with pytest.raises(CfError, match="teacher.dense"):
        TeacherModule(_cfg("teacher.memory=slowfast", "teacher.dense=true"))


def test_mean_continuation_is_the_x0_prediction_from_pure_noise(batch):
    """`mean=True` continues with the teacher's x0 prediction at sigma 1 on its history read: one forward
    of the noise the sampler would start from (the expected continuation PSNR is scored on)."""
    from cf.diffusion import randn_like
    from cf.evaluation.continuation import _policy, continue_clips
    from cf.memory import KVCache
    from cf.rollout import prefill, read_for_query

    cfg = _cfg()
    torch.manual_seed(0)
    net = TeacherModule(cfg).net.eval()
    video, camera, chunk = batch["video"], batch["camera"], cfg.model.frames_per_chunk
    n_ctx = 4
    with torch.no_grad():
        got = continue_clips(net, cfg, video, camera, batch["prompt"], n_ctx, 1, _policy(cfg, "full"),
                             seed=3, mean=True)
        cond = net.make_cond(batch["prompt"], camera=camera[:, :n_ctx + chunk])
        cache = KVCache(_policy(cfg, "full"))
        prefill(net, cache, video[:, :n_ctx], cond)
        read = read_for_query(net, cache)
        noise = randn_like(video[:, :chunk], torch.Generator().manual_seed(3))
        want = denoise(net, noise, torch.ones(video.shape[0], chunk), cond.frames(n_ctx, n_ctx + chunk),
                       num_timesteps=cfg.diffusion.num_timesteps, time_pos=read.query_positions,
                       read=read).pred
        sample = continue_clips(net, cfg, video, camera, batch["prompt"], n_ctx, 1, _policy(cfg, "full"),
                                seed=3)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(sample, want, atol=1e-3)  # the sampler's own steps differ from one x0
