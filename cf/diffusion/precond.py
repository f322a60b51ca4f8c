"""Where the noise process meets the network: its scaled input, its timestep input, its output mix.

The network (cf.model) is a function of inputs already scaled for it: frames ``x_in``, a timestep
input ``t_in`` [B, F], conditioning and a history read; it returns its raw output ``F`` (plus the
keys/values a cache stores). What those are in terms of the noisy frames ``x_t`` and their noise
level ``s`` is decided here, as EDM's preconditioning does (Karras et al. 2022), but as functions that
take the network as an argument instead of a module that holds it: the network's state-dict keys stay
its own, and nothing here has parameters.

    t_in = s * diffusion.num_timesteps   (the 0..num_timesteps range its sinusoidal embedding sees)
    model.precondition=none:  x_in = x_t,          pred = F
    model.precondition=edm:   x_in = c_in(s) x_t,  pred = c_skip(s) x_t + c_out(s) F   (x0 prediction)

``pred`` is what ``model.prediction`` names (x0 or velocity); `to_x0` turns it into an x0 estimate.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from cf.diffusion.schedule import edm_coefficients


def noise_levels(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma (a scalar, [B] or [B, F]) -> [B, F] for frames x [B, F, C, H, W], in the angle dtype
    (float64 for float64 frames, else float32: never bf16, whose steps are coarse near 1)."""
    b, f = x.shape[:2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, device=x.device, dtype=dtype)
    return sigma.expand(b, f) if sigma.dim() == 0 else sigma.reshape(b, -1).expand(b, f)


def timestep_input(sigma: Tensor, num_timesteps: int) -> Tensor:
    """The network's timestep input for noise levels sigma in [0, 1]: sigma * `diffusion.num_timesteps`."""
    return sigma * num_timesteps


def denoise(net, x: Tensor, sigma: Tensor | float, cond, *, num_timesteps: int, **kwargs):
    """The network's prediction for noisy frames x [B, F, C, H, W] at noise levels sigma ([B, F], [B]
    or a scalar): the network's output (kv and mean keys included) with ``pred`` [B, F, C, H, W] in the
    space `model.prediction` names. kwargs go to the network (time_pos, read, frame_mask, out_from: then
    ``pred`` covers frames out_from.. only).

    `net.cfg` (the model config) says the preconditioning (`precondition`, `sigma_data`).
    """
    s = noise_levels(sigma, x)
    t_in = timestep_input(s, num_timesteps)
    if net.cfg.precondition != "edm":
        return net(x, t_in, cond, **kwargs)
    c_in, c_skip, c_out = (c[..., None, None, None].to(x.dtype)
                           for c in edm_coefficients(s, net.cfg.sigma_data))
    out = net(x * c_in, t_in, cond, **kwargs)
    k = kwargs.get("out_from", 0)
    return replace(out, pred=c_skip[:, k:] * x[:, k:] + c_out[:, k:] * out.pred)


def encode_clean(net, x: Tensor, cond, **kwargs):
    """The network's pass over clean frames x [B, F, C, H, W] (sigma 0), for the keys and values a cache
    stores. At sigma 0 the timestep input is 0 on every scale and EDM's output is the input itself
    (c_skip 1, c_out 0), so no schedule is needed."""
    return denoise(net, x, 0.0, cond, num_timesteps=1, **kwargs)
