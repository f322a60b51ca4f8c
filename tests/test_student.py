"""Student initialisation: the ODE states it is fitted to, its data stream, and that it learns."""

import pytest
import torch

from cf.config import load_config
from cf.diffusion import build_sampler
from cf.errors import CfError
from cf.memory import KVCache, build_policy
from cf.model import CausalVideoDiT
from cf.rollout import rollout
from cf.train.conditions import ConditionStream, PairStream
from cf.train.student import StudentModule, TrajectoryRecorder, sample_ode_pairs, student_levels


def _cfg(*overrides):
    return load_config("smoke", overrides=["tracking.enabled=false", *overrides])


def test_recorded_states_lie_on_the_euler_path():
    """A model predicting x0 = 0 makes the Euler path exactly x(s) = s * noise: every recorded state,
    at teacher sigmas and between them, must be that."""
    cfg = _cfg()
    torch.manual_seed(0)
    net = CausalVideoDiT(cfg.model, cfg.data)
    torch.nn.init.zeros_(net.head.weight)
    torch.nn.init.zeros_(net.head.bias)
    teacher, student = build_sampler(cfg.diffusion, "teacher"), build_sampler(cfg.diffusion, "student")
    levels = student_levels(student)
    assert levels[0] == teacher.sigmas[0] == 1.0 and 0 < levels[-1] < 1
    noise = torch.randn(2, 4, 3, 16, 16)
    rec = TrajectoryRecorder(teacher.sigmas, levels)
    cond = net.make_cond(["a", "b"], camera=torch.zeros(2, 4, 2))
    with torch.no_grad():
        rollout(net, KVCache(build_policy(cfg.memory, 2)), teacher, cond, 2, noise=noise, callbacks=[rec])
    states = rec.states()  # [B, K, F, C, H, W]
    assert states.shape == (2, len(levels), 4, 3, 16, 16)
    for k, s in enumerate(levels):
        torch.testing.assert_close(states[:, k], s * noise, rtol=0, atol=1e-6)


def test_ode_pairs_are_deterministic_and_continue_the_context():
    cfg = _cfg("student.ode_pairs=3", "student.context_frames=2")
    torch.manual_seed(0)
    net = CausalVideoDiT(cfg.model, cfg.data).eval()
    a, prompts = sample_ode_pairs(net, cfg, progress=False)
    b, _ = sample_ode_pairs(net, cfg, progress=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    n, f = 3, cfg.student.rollout_chunks * 2
    assert a["video"].shape == (n, f, 3, 16, 16) and a["states"].shape[:3] == (n, 4, f)
    assert a["camera"].shape == (n, 2 + f, 2) and a["context"].shape == (n, 2, 3, 16, 16)
    stream = ConditionStream(cfg.data, frames=f, context=2)
    assert prompts == [stream.sample(i)["prompt"] for i in range(n)]
    assert torch.equal(a["context"][1], stream.sample(1)["context"])  # the world's own first frames


def test_pair_stream_deals_every_pair_once_per_epoch_and_resumes():
    pairs = {"video": torch.arange(5.0)[:, None]}
    stream = PairStream(pairs, [f"p{i}" for i in range(5)], seed=3)
    drawn = [int(stream.sample(i)["video"]) for i in range(10)]
    assert sorted(drawn[:5]) == sorted(drawn[5:]) == [0, 1, 2, 3, 4]
    assert drawn[:5] != drawn[5:]  # a new order each epoch
    stream.start = 7
    assert [int(s["video"]) for s, _ in zip(stream, range(3))] == drawn[7:10]


def test_student_fits_a_batch_of_pairs():
    """The ODE regression is learnable: 30 steps on one batch cut its loss well down."""
    cfg = _cfg("student.context_frames=2", "student.lr=3e-3", "student.ode_pairs=2")
    torch.manual_seed(0)
    module = StudentModule(cfg)
    pairs, prompts = sample_ode_pairs(module.net, cfg, progress=False)
    batch = {**pairs, "prompt": prompts}
    opt = torch.optim.Adam(module.net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, logs = module.loss(batch, step=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert set(logs) <= {f"student/loss_level{k}" for k in range(4)}


def test_student_reads_the_clean_history_not_its_own_states():
    """Teacher forcing: chunk 1's prediction depends on chunk 0's clean frames (read through the cache)."""
    cfg = _cfg("student.context_frames=0")
    torch.manual_seed(0)
    module = StudentModule(cfg)
    pairs, prompts = sample_ode_pairs(module.net, _cfg("student.context_frames=0"), progress=False)
    batch = {**pairs, "prompt": prompts}
    other = dict(batch, video=batch["video"].clone())
    other["video"][:, :2] += 1.0  # chunk 0's clean frames (history of chunk 1), not its own target
    with torch.no_grad():
        base = module.loss(batch, 0)[0]
        shifted = module.loss(other, 0)[0]
    assert not torch.isclose(base, shifted)


def test_context_frames_must_be_whole_chunks():
    with pytest.raises(CfError, match="student.context_frames=3"):
        StudentModule(_cfg("student.context_frames=3"))


@pytest.mark.parametrize("overrides, want", [
    ((), 3.0), (("model.text_encoder=none", "model.camera=false"), 1.0)])
def test_ode_targets_are_sampled_with_the_ode_targets_guidance(monkeypatch, overrides, want):
    """The teacher samples the ODE pairs at student.guidance (3 at smoke), 1 when nothing conditions it."""
    import cf.train.student as student

    seen = []

    def spy(*args, guidance, **kwargs):
        seen.append(guidance)
        return student_rollout(*args, guidance=guidance, **kwargs)

    student_rollout = student.rollout
    monkeypatch.setattr(student, "rollout", spy)
    cfg = _cfg("student.ode_pairs=1", *overrides)
    torch.manual_seed(0)
    sample_ode_pairs(CausalVideoDiT(cfg.model, cfg.data).eval(), cfg, progress=False)
    assert seen == [want]
