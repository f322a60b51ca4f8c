"""`cf generate`: a long video from a checkpoint (or random weights) through a memory policy.

The prompt and the camera path come from a held-out world (seed data.eval_seed + --seed), so a
generated video can be compared with the world it was asked to show. Writes into --out:
  <stem>.mp4   enlarged for viewing        <stem>.gif   native resolution
  <stem>.json  prompt, camera path, policy, sampler, timings, config hash and git commit
"""

COMMAND = ("generate",)
HELP = "generate a long video with a memory policy (random weights unless --ckpt) -> mp4 + gif + json"

# The mp4 is enlarged to about this many pixels on its longer side (a 32x32 frame is unwatchable).
VIEW_SIZE = 256


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=None, help="video length (default: bench.seconds)")
    p.add_argument("--ckpt", default=None, help="Lightning .ckpt (weights under 'model.') or .safetensors")
    p.add_argument("--sampler", choices=("student", "teacher"), default="student",
                   help="student: few-step (diffusion.student_timesteps); "
                        "teacher: Euler, diffusion.teacher_steps")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance "
                        "(default: 1 for the student, diffusion.cfg_scale for the teacher)")
    p.add_argument("--context", type=int, default=0,
                   help="clean world frames to continue from (a multiple of model.frames_per_chunk)")


def run(args, cfg) -> int:
    from pathlib import Path

    from cf.errors import CfError
    from cf.model import build_model
    from cf.rollout import CacheBytes, ChunkTimer, Progress
    from cf.utils import atomic_write_json, pick_device, set_threads
    from cf.video import write_video

    seconds = cfg.bench.seconds if args.seconds is None else args.seconds
    if seconds <= 0:
        raise CfError(f"--seconds {seconds:g} must be positive")
    if args.ckpt is not None:  # a damaged or foreign file fails here, naming it, not inside the loader
        from cf.filecheck import check_weights

        check_weights(args.ckpt, "--ckpt")
    set_threads(cfg.trainer.threads)
    device = pick_device(cfg.device)
    model = build_model(cfg, device, weights=args.ckpt).eval()
    n_frames = max(1, int(round(seconds * cfg.data.fps)))
    chunk = cfg.model.frames_per_chunk
    n_chunks = -(-n_frames // chunk)
    timer, nbytes = ChunkTimer(device), CacheBytes()
    bar = Progress(n_chunks, desc=f"cf generate ({cfg.memory.policy})")
    video, meta = generate(cfg, model, n_chunks, sampler=args.sampler, guidance=args.guidance,
                           context=args.context, callbacks=[bar, timer, nbytes])
    video = video[: args.context + n_frames]

    out = Path(args.out) if args.out else Path(cfg.out) / "generate"
    stem = out / f"{cfg.preset}_{cfg.memory.policy}_seed{cfg.seed}"
    h, w = video.shape[-2:]
    write_video(stem.with_suffix(".mp4"), video, cfg.data.fps, scale=max(1, VIEW_SIZE // max(h, w)))
    write_video(stem.with_suffix(".gif"), video, cfg.data.fps)
    meta.update(
        seconds=seconds, frames=int(video.shape[0]), fps=cfg.data.fps, ckpt=args.ckpt, device=str(device),
        chunk_latency_s=timer.latencies, kv_bytes=nbytes.nbytes,
        camera=meta["camera"][: video.shape[0]],
    )
    atomic_write_json(stem.with_suffix(".json"), meta)
    lat = sorted(timer.latencies)[len(timer.latencies) // 2]
    print(f"wrote {stem}.mp4/.gif/.json: {video.shape[0]} frames ({seconds:g} s at {cfg.data.fps} fps), "
          f"{cfg.memory.policy} memory, {lat * 1e3:.1f} ms per {chunk}-frame chunk (median)")
    if meta["promoted"] is not None:  # a slow memory that never promotes is a sink + window in disguise
        print(f"slow memory: {len(meta['promoted'])} frames promoted (memory.tau={cfg.memory.tau:g}, "
              f"memory.promotion={cfg.memory.promotion}), {cfg.memory.slow_frames} held at most")
    return 0


def generate(cfg, model, n_chunks: int, *, sampler: str = "student", guidance: float | None = None,
             context: int = 0, world_seed: int | None = None, callbacks=()):
    """Roll `model` out for `n_chunks` chunks on a held-out world's prompt and camera path.

    Returns (video float [context + n_chunks * C, C, H, W] on the CPU, meta dict with the prompt,
    the per-frame camera, the world seed, policy, sampler and guidance). `context` clean frames
    of the world come first (and are what the rollout continues from).
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
    xs = torch.from_numpy(world.camera_x(0, total)).to(torch.float64)
    camera = torch.stack([xs, torch.zeros_like(xs)], dim=1)  # [F, 2]; the world's camera pans in x
    clean = world.render(context).video[None].to(device, dtype) if context else None
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
        "context_frames": context, "preset": cfg.preset, "method": cfg.method, "policy": cfg.memory.policy,
        "sampler": sampler, "guidance": guidance, "seed": cfg.seed, "config_hash": config_hash(cfg),
        "git_sha": git_sha(),
        # frames the slow memory promoted (slowfast; None for policies without one): is it doing anything?
        "promoted": list(cache.state.promoted) if cache.policy.slow else None,
    }
    return frames[0].float().cpu(), meta
