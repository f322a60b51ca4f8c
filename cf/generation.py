"""A long video from a model through its memory policy, on a held-out world's prompt and camera path:
the one generation routine behind `cf generate`, the generator stages' evaluation and the benchmark."""

from __future__ import annotations


def picture_context(cfg) -> int:
    """Clean frames a start picture fills: what the student continues (student.context_frames), in whole
    chunks of model.frames_per_chunk, at least one."""
    chunk = cfg.model.frames_per_chunk
    return max(chunk, -(-cfg.student.context_frames // chunk) * chunk)


def load_picture(cfg, path, flag: str = "--image"):
    """A start picture fitted to the config's frame -> (float [3, H, W] in [-1, 1], its crop record). Only for
    RGB frames: a latent model (model.channels != 3) has no VAE here to encode one."""
    from cf.errors import CfError
    from cf.image import load_image, to_frame

    if cfg.model.channels != 3:
        raise CfError(f"{flag} needs a model of RGB frames (model.channels=3); this one has "
                      f"model.channels={cfg.model.channels} and no VAE to encode a picture: use --model wan")
    frame, crop = load_image(path, cfg.data.height, cfg.data.width, flag=flag)
    return to_frame(frame), crop


def generate(cfg, model, n_chunks: int, *, sampler: str = "student", guidance: float | None = None,
             context: int = 0, world_seed: int | None = None, image=None, callbacks=()):
    """Roll `model` out for `n_chunks` chunks on a held-out world's prompt and camera path.

    Returns (video float [context + n_chunks * C, C, H, W] on the CPU, meta dict with the prompt,
    the per-frame camera, the world seed, policy, sampler and guidance). `context` clean frames
    of the world come first (and are what the rollout continues from).

    image: float [3, H, W] in [-1, 1] (`cf.image.to_frame`), a picture to start from instead: it is the
    `context` clean frames (at least one chunk), on a camera held still at the world's first position,
    which then follows the world's path (`cf.data.start.image_clip`). The first frame of the video is
    the picture, exactly.
    """
    import torch

    from cf.config import config_hash
    from cf.data.world import World
    from cf.diffusion import STUDENT, TEACHER, build_sampler, guidance_scale
    from cf.errors import CfError
    from cf.memory import KVCache, build_policy
    from cf.model import attention_kernels, precision
    from cf.rollout import rollout
    from cf.utils import git_sha

    chunk = cfg.model.frames_per_chunk
    if context < 0 or context % chunk:
        raise CfError(f"--context {context} must be a non-negative multiple of "
                      f"model.frames_per_chunk={chunk}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    world_seed = cfg.data.eval_seed + cfg.seed if world_seed is None else world_seed
    world = World(cfg.data, world_seed)
    total = context + n_chunks * chunk
    if image is not None:
        from cf.data.start import image_clip

        if context < 1:
            raise CfError(f"a rollout from a picture needs it as context: pass context >= {chunk} "
                          f"(a multiple of model.frames_per_chunk)")
        clip = image_clip(world, image, context, total)
        xs = clip.camera[:, 0].to(torch.float64)
        clean = clip.video[None, :context].to(device, dtype)
    else:
        xs = torch.from_numpy(world.camera_x(0, total)).to(torch.float64)
        clean = world.render(context).video[None].to(device, dtype) if context else None
    camera = torch.stack([xs, torch.zeros_like(xs)], dim=1)  # [F, 2]; the world's camera pans in x
    if guidance is None:
        guidance = guidance_scale(cfg, STUDENT if sampler == "student" else TEACHER)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad(), precision(cfg.model, device), attention_kernels(cfg.model):
        cond = model.make_cond([world.prompt], camera=camera[None].to(device))
        cache = KVCache(build_policy(cfg.memory, chunk))
        res = rollout(model, cache, build_sampler(cfg.diffusion, sampler), cond, n_chunks, context=clean,
                      generator=gen, guidance=guidance, callbacks=callbacks)
    frames = res.video if clean is None else torch.cat([clean, res.video], dim=1)
    meta = {
        "prompt": world.prompt, "world_seed": world_seed, "camera": camera.long().tolist(),
        "context_frames": context, "start": "image" if image is not None else "world", "preset": cfg.preset,
        "method": cfg.method, "policy": cfg.memory.policy,
        "sampler": sampler, "guidance": guidance, "seed": cfg.seed, "config_hash": config_hash(cfg),
        "git_sha": git_sha(),
        # frames the slow memory promoted (slowfast; None for policies without one): is it doing anything?
        "promoted": list(cache.state.promoted) if cache.policy.slow else None,
    }
    return frames[0].float().cpu(), meta
