"""DMD on an analytic toy: a Gaussian target with exact real and fake scores, a two-parameter generator.

Target x0 ~ N(mu, diag(std^2)) in D dims; generator x = b + a * z, z ~ N(0, I), so the generated
distribution is N(b, diag(a^2)) and both denoisers are exact posterior means under the flow-matching
noising x_t = (1 - s) x0 + s eps:  E[x0 | x_t] = m + (1 - s) v / ((1 - s)^2 v + s^2) (x_t - (1 - s) m).
`cf.train.cdmd.dmd_loss` and `dmd_sigma` (the code CDMD trains with) must move N(b, a^2) onto the target.
"""

import torch

from cf.config import load_config
from cf.train.cdmd import dmd_loss, dmd_sigma

MU = torch.tensor([1.0, -0.5, 2.0, 0.0])
STD = torch.tensor([0.5, 1.0, 0.3, 2.0])
TOL_MEAN, TOL_STD = 0.05, 0.05  # absolute, per dimension, after 300 updates (it reaches ~1e-5)


def posterior_mean(x_t, sigma, mean, var):
    s = sigma[:, None]
    return mean + (1 - s) * var / ((1 - s) ** 2 * var + s**2) * (x_t - (1 - s) * mean)


def train(sign: float, steps: int = 300, n: int = 256):
    """Fit (a, b) by DMD; sign=-1 swaps the real and fake scores (the gradient's sign flipped)."""
    cfg = load_config("smoke")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    a = torch.ones(4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.02)
    for _ in range(steps):
        x = b + a * torch.randn(n, 4, generator=g)
        sigma = dmd_sigma(n, cfg.cdmd, cfg.diffusion.num_timesteps, g, "cpu")
        x_t = (1 - sigma[:, None]) * x.detach() + sigma[:, None] * torch.randn(n, 4, generator=g)
        real = posterior_mean(x_t, sigma, MU, STD**2)
        fake = posterior_mean(x_t, sigma, b.detach(), a.detach() ** 2)
        loss = dmd_loss(x, real, fake) if sign > 0 else dmd_loss(x, fake, real)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return b.detach(), a.detach().abs()


def test_dmd_gradient_is_the_normalised_score_difference():
    x = torch.randn(3, 5, requires_grad=True)
    real, fake = torch.randn(3, 5), torch.randn(3, 5)
    dmd_loss(x, real, fake).backward()
    norm = (x.detach() - real).abs().mean(1, keepdim=True)
    assert torch.allclose(x.grad, (fake - real) / norm / x.numel(), atol=1e-7)


def test_dmd_moves_the_generated_gaussian_onto_the_target():
    mean, std = train(sign=+1)
    assert (mean - MU).abs().max() < TOL_MEAN, (mean, MU)
    assert (std - STD).abs().max() < TOL_STD, (std, STD)


def test_a_wrong_sign_gradient_fails_the_same_check():
    mean, std = train(sign=-1)
    assert (mean - MU).abs().max() > 10 * TOL_MEAN or (std - STD).abs().max() > 10 * TOL_STD
