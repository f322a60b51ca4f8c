"""Flow-matching math and samplers, checked against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from cf.config import load_config
from cf.diffusion import (
    ROLES,
    Guided,
    add_noise,
    build_sampler,
    edm_coefficients,
    euler,
    few_step,
    guidance_scale,
    guide,
    is_conditioned,
    loss_weight,
    sample_sigma,
    shift_sigma,
    student_sigmas,
    target,
    teacher_sigmas,
    to_x0,
)
from cf.errors import CfError


def test_shift_formula_and_student_warp():
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert shift_sigma(1.0, 5.0) == 1.0 and shift_sigma(0.0, 5.0) == 0.0
    # the paper's student: [1000, 750, 500, 250] warped by shift 5
    paper = student_sigmas([1000, 750, 500, 250], 1000, 5.0)
    assert paper == pytest.approx([1.0, 15 / 16, 5 / 6, 5 / 8, 0.0])
    assert student_sigmas([1000, 750, 500, 250], 1000, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_teacher_schedule():
    s = teacher_sigmas(12, 3.0)
    assert len(s) == 13 and s[0] == 1.0 and s[-1] == 0.0
    assert all(a > b for a, b in zip(s, s[1:]))
    assert s[6] == pytest.approx(0.75)  # the midpoint 0.5 shifted by 3


def test_bad_timesteps_are_explained():
    with pytest.raises(CfError, match="strictly decreasing"):
        student_sigmas([500, 750], 1000, 5.0)
    with pytest.raises(CfError, match=r"\(0, 1000\]"):
        student_sigmas([1500], 1000, 5.0)
    with pytest.raises(CfError, match="teacher_steps=0"):
        teacher_sigmas(0, 1.0)
    with pytest.raises(CfError, match="model.prediction='eps'"):
        to_x0(torch.zeros(1), torch.zeros(1), torch.zeros(1), "eps")


@pytest.mark.parametrize("prediction", ["x0", "velocity"])
def test_targets_convert_back_to_x0(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 5, 5, generator=g), torch.randn(2, 3, 4, 5, 5, generator=g)
    sigma = torch.rand(2, 3, generator=g)
    x_t = add_noise(x0, eps, sigma)
    assert torch.allclose(x_t[1, 2], (1 - sigma[1, 2]) * x0[1, 2] + sigma[1, 2] * eps[1, 2])
    assert torch.allclose(to_x0(target(x0, eps, prediction), x_t, sigma, prediction), x0, atol=1e-6)


def test_euler_follows_the_exact_flow_of_a_gaussian():
    """Data N(mu, s^2): the exact x0 estimate is E[x0 | x_t]; the ODE maps N(0, 1) onto the data law."""
    mu, s = 2.0, 0.5

    def x0_hat(x_t, sig):
        a, b = 1 - sig, sig  # x_t = a x0 + b eps
        var = a * a * s * s + b * b
        return mu + a * s * s / var * (x_t - a * mu)

    sampler = euler(200, 3.0, 1000)
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i in range(sampler.n_steps):
        x = sampler.step(x, x0_hat(x, sampler.sigmas[i]), i)
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, abs=0.02)


def test_few_step_sampler_renoises_from_the_generator():
    sampler = few_step([1000, 750, 500, 250], 1000, 5.0)
    x0 = torch.full((4, 1000), 0.3, dtype=torch.float64)
    a = sampler.step(x0, x0, 0, torch.Generator().manual_seed(1))
    b = sampler.step(x0, x0, 0, torch.Generator().manual_seed(1))
    c = sampler.step(x0, x0, 0, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    s1 = sampler.sigmas[1]
    assert ((a - (1 - s1) * 0.3) / s1).std().item() == pytest.approx(1.0, abs=0.05)  # fresh unit noise
    assert torch.equal(sampler.step(a, x0, 3), x0)  # the last step lands on the x0 estimate


def test_build_sampler_from_config():
    d = load_config("tiny").diffusion
    t, s = build_sampler(d, "teacher"), build_sampler(d, "student")
    assert t.n_steps == d.teacher_steps and not t.renoise
    assert s.n_steps == len(d.student_timesteps) and s.renoise
    with pytest.raises(ValueError, match="teacher, student"):
        build_sampler(d, "ddim")


def test_training_sigmas_are_shifted_and_clamped():
    g = torch.Generator().manual_seed(0)
    s = sample_sigma((100000,), 3.0, generator=g)
    assert s.median().item() == pytest.approx(0.75, abs=0.01)  # the median of U[0,1] shifted by 3
    s = sample_sigma((1000,), 5.0, generator=torch.Generator().manual_seed(0), lo=0.02, hi=0.98)
    assert s.min() >= 0.02 and s.max() <= 0.98
    again = sample_sigma((1000,), 5.0, generator=torch.Generator().manual_seed(0), lo=0.02, hi=0.98)
    assert torch.equal(s, again)


def test_guidance_formula():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    assert guide(c, u, 1.0).tolist() == [1.0, 2.0]
    assert guide(c, u, 3.0).tolist() == [3.0, 4.0]
    assert guide(c, u, 0.0).tolist() == [0.0, 1.0]
    assert math.isclose(float(guide(torch.tensor(2.0), torch.tensor(1.0), 5.0)), 6.0)


def test_edm_preconditioning_is_the_optimal_linear_denoiser_of_gaussian_data():
    """For data N(0, sd^2), E[x0 | x_t] = c_skip x_t exactly, and the network's target
    F = (x0 - c_skip x_t) / c_out has unit variance at every noise level (EDM's two conditions)."""
    sd = 0.5
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, generator=g, dtype=torch.float64) * sd
    eps = torch.randn(200_000, generator=g, dtype=torch.float64)
    for s in (0.05, 0.3, 0.7, 1.0):
        sigma = torch.tensor(s, dtype=torch.float64)
        c_in, c_skip, c_out = edm_coefficients(sigma, sd)
        x_t = add_noise(x0, eps, sigma)
        assert (c_in * x_t).std().item() == pytest.approx(1.0, abs=0.01)
        a = 1 - s
        assert c_skip.item() == pytest.approx(a * sd**2 / (a * a * sd**2 + s * s))  # posterior-mean slope
        assert ((x0 - c_skip * x_t) / c_out).std().item() == pytest.approx(1.0, abs=0.01)
    _, c_skip, c_out = edm_coefficients(torch.tensor(0.0), sd)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0  # clean input: the output is the input


def test_loss_weights_per_parameterisation():
    sigma = torch.tensor([0.1, 0.5, 1.0])
    cfg = load_config("smoke").model
    assert torch.equal(loss_weight(sigma, cfg), torch.ones(3))
    cfg.prediction = "velocity"
    assert torch.allclose(loss_weight(sigma, cfg), sigma.pow(-2))
    cfg.prediction, cfg.precondition = "x0", "edm"
    c_out = edm_coefficients(sigma, cfg.sigma_data)[2]
    assert torch.allclose(loss_weight(sigma, cfg), c_out.pow(-2))
    assert torch.isfinite(loss_weight(torch.zeros(1), cfg)).all()  # sigma 0 is floored, not infinite


def test_guidance_is_resolved_by_role_in_one_place():
    """Every role's scale comes from its one key; a model with nothing to guide gets 1 in every role."""
    cfg = load_config("smoke", overrides=["diffusion.cfg_scale=2.0"])
    assert {r: guidance_scale(cfg, r) for r in ROLES} == {
        "teacher": 2.0, "ode_targets": 3.0, "student": 1.0, "real_score_1": 3.0, "real_score_2": 5.0}
    bare = load_config("smoke", overrides=["diffusion.cfg_scale=2.0", "model.text_encoder=none",
                                           "model.camera=false"])
    assert not is_conditioned(bare.model) and is_conditioned(cfg.model)
    assert {guidance_scale(bare, r) for r in ROLES} == {1.0}
    text_only = load_config("smoke", overrides=["model.camera=false"])
    assert guidance_scale(text_only, "real_score_2") == 5.0
    with pytest.raises(ValueError, match="guidance role 'critic' is not one of teacher, ode_targets"):
        guidance_scale(cfg, "critic")


def test_guided_call_doubles_the_batch_only_when_it_guides():
    from cf.model import Cond

    x = torch.arange(6.0).view(2, 3)
    cond = Cond(camera=torch.zeros(2, 4, 2))
    off, on = Guided(1.0), Guided(3.0)
    assert off.twice(x) is x and off.cond(cond, 2) is cond and off.combine(x) is x
    assert torch.equal(on.twice(x), torch.cat([x, x]))
    both = on.cond(cond, 2)
    assert both.null.tolist() == [False, False, True, True] and both.camera.shape == (4, 4, 2)
    x0 = torch.cat([x, torch.zeros_like(x)])  # [cond ; null]
    assert torch.equal(on.combine(x0), guide(x, torch.zeros_like(x), 3.0)) and on.combine(x0).shape == x.shape
