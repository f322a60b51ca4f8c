"""`cf generate`: a long video from a checkpoint (or random weights) through a memory policy.

The prompt and the camera path come from a held-out world (seed data.eval_seed + --seed), so a
generated video can be compared with the world it was asked to show. With --image the video starts
from a picture instead (resized and centre-cropped to the frame, `cf.image`): it is the clean context
the rollout continues, and the camera pans away from it and back along the world's path. Writes into
--out:
  <stem>.mp4   enlarged for viewing        <stem>.gif   native resolution
  <stem>.json  prompt, camera path, policy, sampler, timings, the picture's crop, config hash and git commit

--model wan runs real Wan2.1 weights instead (cf.wan.generate; docs/wan.md). A flag that belongs to the
other model is refused (`ONLY_FOR`), never ignored.
"""

COMMAND = ("generate",)
HELP = "generate a long video with a memory policy (random weights unless --ckpt) -> mp4 + gif + json"

# The mp4 is enlarged to about this many pixels on its longer side (a 32x32 frame is unwatchable).
VIEW_SIZE = 256

# flag -> the --model it belongs to; given with the other model it is refused (cf.cli.refuse_foreign_flags).
# Their defaults are None, so "given" is "not None". FOR_EVERY_MODEL: the flags both models read.
ONLY_FOR = {
    "--context": "native",
    "--weights": "wan",
    "--lora": "wan",
    "--prompt": "wan",
    "--negative-prompt": "wan",
}
MODEL_FLAG = "--model"
FOR_EVERY_MODEL = ("--seconds", "--ckpt", "--sampler", "--guidance", "--image")


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=None, help="video length (default: bench.seconds)")
    p.add_argument("--ckpt", default=None,
                   help="native: Lightning .ckpt (weights under 'model.') or .safetensors; "
                        "wan: a generator checkpoint replacing --weights' transformer")
    p.add_argument("--sampler", choices=("student", "teacher"), default="student",
                   help="student: few-step (diffusion.student_timesteps); "
                        "teacher: Euler, diffusion.teacher_steps")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance "
                        "(default: 1 for the student, diffusion.cfg_scale for the teacher)")
    p.add_argument("--image", default=None, metavar="PATH",
                   help="start from this PNG/JPEG (resized to cover the frame, centre-cropped): the first "
                        "clean context frames (native: --context of them, default student.context_frames, "
                        "at least one chunk; wan: one chunk of latents through the Wan VAE)")
    p.add_argument("--context", type=int, default=None,
                   help="native: clean world frames to continue from (a multiple of model.frames_per_chunk; "
                        "default 0), or with --image the frames the picture fills")
    # --model wan: real Wan2.1-based weights from local files (cf/wan, docs/wan.md)
    p.add_argument(MODEL_FLAG, choices=("native", "wan"), default="native",
                   help="wan: a Wan2.1 T2V model from --weights/--ckpt/--lora and --prompt (docs/wan.md)")
    p.add_argument("--weights", default=None,
                   help="--model wan: a Wan2.1-T2V folder (diffusers', or Wan's own with its .pth files)")
    p.add_argument("--lora", default=None, help="--model wan: a peft LoRA adapter merged at load")
    p.add_argument("--prompt", default=None, help="--model wan: the prompt")
    p.add_argument("--negative-prompt", default=None, help="--model wan: the unconditional branch's prompt")


def run(args, cfg) -> int:
    if args.model == "wan":
        from cf.wan.generate import run_command

        return run_command(args, cfg)
    from pathlib import Path

    from cf.errors import CfError
    from cf.generation import generate
    from cf.model import build_model
    from cf.rollout import CacheBytes, ChunkTimer, Progress
    from cf.utils import atomic_write_json, pick_device, set_threads
    from cf.video import write_video

    seconds = cfg.bench.seconds if args.seconds is None else args.seconds
    if seconds <= 0:
        raise CfError(f"--seconds {seconds:g} must be positive")
    chunk = cfg.model.frames_per_chunk
    image, crop, context = None, None, args.context or 0
    if args.image is not None:  # read and checked before any weights load: a bad picture costs nothing
        image, crop, context = start_image(args, cfg)
    if args.ckpt is not None:  # a damaged or foreign file fails here, naming it, not inside the loader
        from cf.filecheck import check_weights

        check_weights(args.ckpt, "--ckpt")
    set_threads(cfg.trainer.threads)
    device = pick_device(cfg.device)
    model = build_model(cfg, device, weights=args.ckpt).eval()
    n_frames = max(1, int(round(seconds * cfg.data.fps)))
    n_chunks = -(-n_frames // chunk)
    timer, nbytes = ChunkTimer(device), CacheBytes()
    bar = Progress(n_chunks, desc=f"cf generate ({cfg.memory.policy})")
    video, meta = generate(cfg, model, n_chunks, sampler=args.sampler, guidance=args.guidance,
                           context=context, image=image, callbacks=[bar, timer, nbytes])
    video = video[: context + n_frames]

    out = Path(args.out) if args.out else Path(cfg.out) / "generate"
    stem = out / f"{cfg.preset}_{cfg.memory.policy}_seed{cfg.seed}"
    h, w = video.shape[-2:]
    write_video(stem.with_suffix(".mp4"), video, cfg.data.fps, scale=max(1, VIEW_SIZE // max(h, w)))
    write_video(stem.with_suffix(".gif"), video, cfg.data.fps)
    meta.update(
        seconds=seconds, frames=int(video.shape[0]), fps=cfg.data.fps, ckpt=args.ckpt, device=str(device),
        chunk_latency_s=timer.latencies, kv_bytes=nbytes.nbytes,
        camera=meta["camera"][: video.shape[0]], image=crop,
    )
    atomic_write_json(stem.with_suffix(".json"), meta)
    lat = sorted(timer.latencies)[len(timer.latencies) // 2]
    print(f"wrote {stem}.mp4/.gif/.json: {video.shape[0]} frames ({seconds:g} s at {cfg.data.fps} fps), "
          f"{cfg.memory.policy} memory, {lat * 1e3:.1f} ms per {chunk}-frame chunk (median)")
    if meta["promoted"] is not None:  # a slow memory that never promotes is a sink + window in disguise
        print(f"slow memory: {len(meta['promoted'])} frames promoted (memory.tau={cfg.memory.tau:g}, "
              f"memory.promotion={cfg.memory.promotion}), {cfg.memory.slow_frames} held at most")
    return 0


def start_image(args, cfg):
    """--image for the native model -> (frame float [3, H, W], crop record, context frames it fills)."""
    from cf.errors import CfError
    from cf.generation import load_picture, picture_context

    chunk = cfg.model.frames_per_chunk
    context = picture_context(cfg) if args.context is None else args.context
    if context < chunk or context % chunk:
        raise CfError(f"--context {context} with --image: the picture fills the first context frames, "
                      f"a positive multiple of model.frames_per_chunk={chunk}")
    frame, crop = load_picture(cfg, args.image)
    return frame, crop, context
