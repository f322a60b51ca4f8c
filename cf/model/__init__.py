"""The causal video DiT, its conditioning and the read interface to the memory.

    model = build_model(cfg, device)                  # or CausalVideoDiT(cfg.model, cfg.data)
    cond = model.make_cond(prompts, camera=cam)       # Cond(text, text_mask, camera [B, F, 2], null [B])
    out = denoise(model, x, sigma, cond, num_timesteps=n, time_pos=pos, read=read)  # cf.diffusion
    out.pred [B, F, C, H, W]; out.kv per layer (k, v) [B, F, N, H, Dh] un-rotated; out.mean_key [B, F, Dk]

The network itself, `model(x_in, t_in, cond, ...)`, takes inputs already scaled by `cf.diffusion.denoise`
(EDM's c_in, the timestep input sigma * diffusion.num_timesteps) and returns its raw output.
"""

from cf.model.cond import Cond
from cf.model.dit import CausalVideoDiT, ModelOutput, block_causal_mask
from cf.model.read import CacheRead
from cf.model.runtime import attention_kernels, build_model, load_weights, param_dtype, precision

__all__ = [
    "CacheRead", "CausalVideoDiT", "Cond", "ModelOutput", "attention_kernels", "block_causal_mask",
    "build_model", "load_weights", "param_dtype", "precision",
]
