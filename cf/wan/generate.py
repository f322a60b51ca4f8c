"""`cf generate --model wan`: a long video from real Wan-based weights through cf's one rollout and any memory
policy, decoded chunk by chunk by the Wan VAE and written to an mp4 as it goes, with its JSON (prompt, seed,
policy, promotions, timing) beside it, ready for `cf score`.

    run_wan(cfg, weights=DIR, ckpt=FILE, lora=DIR, prompt="...", seconds=60, out=OUT)

Latent frames per second and the frame geometry come from the config (`data.fps` latents per second,
`data.height` x `data.width` latents: the `wan` preset's 4, 60 x 104 = 16 fps 480 x 832 video); the network
from the files (cf.wan.read). docs/wan.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from cf.errors import CfError

# Wan's default negative prompt (its generate.py / WanPipeline examples), in English
DEFAULT_NEGATIVE = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)


class Mp4Stream:
    """An H.264 mp4 written frame by frame (uint8 [T, H, W, 3] batches), atomically on close."""

    def __init__(self, path: Path, fps: int, crf: int = 18):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.partial.mp4")
        self.container = av.open(str(self.tmp), mode="w", format="mp4")
        self.fps, self.crf, self.stream, self.frames = fps, crf, None, 0

    def write(self, frames: np.ndarray) -> None:
        import av

        if self.stream is None:
            h, w = frames.shape[1:3]
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.width, self.stream.height = w + w % 2, h + h % 2
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": str(self.crf), "threads": "1"}
        if frames.shape[1] % 2 or frames.shape[2] % 2:
            frames = np.pad(
                frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge"
            )
        for f in frames:
            for packet in self.stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            ):
                self.container.mux(packet)
        self.frames += len(frames)

    def close(self) -> Path:
        if self.stream is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
        self.container.close()
        self.tmp.replace(self.path)
        return self.path


def compute_dtype(cfg, device: torch.device) -> torch.dtype:
    """model.dtype: auto = bf16 on CUDA (weights converted, Wan's fp32 parts kept), fp32 on the CPU."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return table[cfg.model.dtype]


def run_wan(
    cfg,
    *,
    weights: str | Path | None,
    prompt: str,
    out: str | Path,
    ckpt: str | Path | None = None,
    lora: str | Path | None = None,
    seconds: float | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    sampler: str = "student",
    text=None,
    vae=None,
    decode: bool = True,
    heads: int | None = None,
    image: str | Path | None = None,
    callbacks=(),
) -> dict:
    """Generate and write `<out>/<stem>.mp4` + `<stem>.json`; returns the JSON's dict.

    text: a callable prompts -> features [B, L, text_dim] (default: UMT5 from --weights); vae: a diffusers
    AutoencoderKLWan (default: from --weights; decode=False writes latents' first channels instead, for speed
    runs without a VAE). guidance: None = 1 for the few-step student (Self-Forcing and its descendants
    distil guidance in), diffusion.cfg_scale for sampler=teacher.

    image: a PNG/JPEG to start from. It is resized and centre-cropped to the video's pixel size (`cf.image`),
    held still for one chunk of latents (1 + 4 * (C - 1) video frames) and encoded by the Wan VAE
    (`encode_still`: the first latent is the picture alone, as in Wan's I2V); those C latents are the
    rollout's clean context, read through the memory policy like any history (a sink keeps them for good),
    and their decoded frames open the video. The JSON records the crop and the VAE's round trip of frame 0.
    """
    from cf.config import config_hash
    from cf.diffusion import build_sampler
    from cf.memory import KVCache, build_policy
    from cf.model import Cond, attention_kernels
    from cf.rollout import CacheBytes, ChunkTimer, RolloutCallback, rollout
    from cf.utils import atomic_write_json, git_sha, pick_device
    from cf.video import to_uint8
    from cf.wan.read import read_wan

    t_start = time.perf_counter()
    seconds = cfg.bench.seconds if seconds is None else seconds
    if seconds <= 0:
        raise CfError(f"--seconds {seconds:g} must be positive")
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg, device)
    chunk = cfg.model.frames_per_chunk
    if image is not None and not decode:
        raise CfError("--image is encoded by the Wan VAE; it cannot run with decode=False")
    if image is not None:  # the picture is read and checked before any weights load
        _check_picture(image)
    w = read_wan(weights, ckpt, lora, heads=heads)
    model = w.build(cfg.data, frames_per_chunk=chunk, dtype=dtype, device=device).eval()
    if text is None:
        from cf.wan.text import UMT5Text

        if weights is None:
            raise CfError(
                "no text encoder: pass --weights DIR holding text_encoder/ and tokenizer/ (diffusers) or "
                "models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/ (Wan's release); docs/wan.md"
            )
        text = UMT5Text.from_folder(weights, device=device, dtype=torch.float32)
    if guidance is None:
        guidance = 1.0 if sampler == "student" else float(cfg.diffusion.cfg_scale)
    negative_prompt = DEFAULT_NEGATIVE if negative_prompt is None else negative_prompt
    t_text = time.perf_counter()
    feats = text([prompt]).to(device)
    null = text([negative_prompt]).to(device) if guidance != 1 else None
    t_text = time.perf_counter() - t_text
    cond = Cond(text=feats, null_text=null)
    text = None  # UMT5 (11 GB in bf16 at full size) is not needed past this point
    if device.type == "cuda":
        torch.cuda.empty_cache()

    decoder = None
    if decode:
        from cf.wan.vae import StreamDecoder, load_vae

        if vae is None:
            if weights is None:
                raise CfError("no VAE: pass --weights DIR holding vae/ (diffusers) or Wan2.1_VAE.pth; "
                              "docs/wan.md")
            vae = load_vae(weights, device=device, dtype=torch.float32 if dtype == torch.float64 else dtype)
        decoder = StreamDecoder(vae)
    n_latents = max(1, int(round(seconds * cfg.data.fps)))
    n_chunks = -(-n_latents // chunk)
    video_fps = int(cfg.data.fps * decoder.temporal) if decoder is not None else int(cfg.data.fps)
    context, crop, first_error, start_frames, t_image = None, None, None, 0, 0.0
    if image is not None:
        t_image = time.perf_counter()
        from cf.image import load_image, to_frame
        from cf.wan.vae import encode_still

        pixels, crop = load_image(image, cfg.data.height * decoder.spatial, cfg.data.width * decoder.spatial)
        context = encode_still(decoder.vae, to_frame(pixels), chunk).to(device, dtype)

    out = Path(out)
    stem = out / f"wan_{cfg.memory.policy}_seed{cfg.seed}"
    writer = Mp4Stream(stem.with_suffix(".mp4"), video_fps)
    if context is not None:  # the picture's frames, as the VAE gives them back, open the video
        start = decoder.decode(context)[0].float().cpu()
        first_error = _round_trip(start[0], to_frame(pixels))
        writer.write(to_uint8(start))
        start_frames, t_image = start.shape[0], time.perf_counter() - t_image

    class Decode(RolloutCallback):
        """Each chunk's latents decoded (causally, continuing the video) and appended to the mp4."""

        def __init__(self):
            self.seconds: list[float] = []

        def on_chunk_end(self, j, frames, cache):
            t0 = time.perf_counter()
            lat = frames[:1].float() if decoder is None else frames[:1]
            pix = decoder.decode(lat)[0] if decoder is not None else lat[0, :, :3].clamp(-1, 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            writer.write(to_uint8(pix.float().cpu()))
            self.seconds.append(time.perf_counter() - t0)

    timer, nbytes, dec = ChunkTimer(device), CacheBytes(), Decode()
    policy = build_policy(cfg.memory, chunk)
    cache = KVCache(policy)
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        with torch.no_grad(), attention_kernels(cfg.model):
            rollout(
                model,
                cache,
                build_sampler(cfg.diffusion, sampler),
                cond,
                n_chunks,
                context=context,
                generator=gen,
                guidance=guidance,
                callbacks=[timer, nbytes, dec, *callbacks],
            )
        writer.close()
    except BaseException:
        writer.container.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    dit_s = sum(timer.latencies)  # the timer ends each chunk before Decode runs: DiT (and cache) only
    frames = writer.frames
    made = frames - start_frames  # generated frames (the picture's opening frames were encoded, not made)
    meta = {
        "model": "wan",
        "prompt": prompt,
        "negative_prompt": negative_prompt if guidance != 1 else None,
        "seed": cfg.seed,
        "sampler": sampler,
        "guidance": guidance,
        "policy": cfg.memory.policy,
        "memory": {k: cfg.memory[k] for k in cfg.memory},
        "promoted": list(cache.state.promoted) if policy.slow else None,
        "seconds": seconds,
        "latent_frames": n_chunks * chunk + (0 if context is None else chunk),
        "image": crop,
        # --image: the picture's latents are clean context read through the memory policy (docs/wan.md)
        "image_mode": None if context is None else "context",
        "context_latents": 0 if context is None else chunk,
        "first_frame_round_trip": first_error,
        "frames": frames,
        "fps": video_fps,
        "height": int(cfg.data.height * (decoder.spatial if decoder else 1)),
        "width": int(cfg.data.width * (decoder.spatial if decoder else 1)),
        "decoded": decoder is not None,
        "weights": w.sources,
        "wan_config": w.config.as_dict(),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "timing": {
            "chunk_latency_s": timer.latencies,
            "decode_s": dec.seconds,
            "text_s": t_text,
            "dit_s": dit_s,
            "total_s": time.perf_counter() - t_start,
            "image_s": t_image,
            "video_fps_dit": made / dit_s if dit_s > 0 else None,
            "video_fps_with_decode": made / (dit_s + sum(dec.seconds)) if timer.latencies else None,
        },
        "kv_bytes": nbytes.nbytes,
        "config_hash": config_hash(cfg),
        "git_sha": git_sha(),
    }
    atomic_write_json(stem.with_suffix(".json"), meta)
    return {**meta, "mp4": str(stem.with_suffix(".mp4")), "json": str(stem.with_suffix(".json"))}


def _check_picture(image) -> None:
    """Read the picture once before the weights load, so a bad file fails in a second, not after minutes
    (what is refused does not depend on the size it is fitted to)."""
    from cf.image import load_image

    load_image(image, 8, 8)


def _round_trip(decoded: torch.Tensor, picture: torch.Tensor) -> dict:
    """How far the VAE's frame 0 is from the resized picture: max and mean |difference| in [0, 255], PSNR."""
    diff = (decoded.float() - picture.float()).abs() * 127.5
    mse = float(((decoded.float() - picture.float()) / 2).pow(2).mean())
    return {"max_abs_255": float(diff.max()), "mean_abs_255": float(diff.mean()),
            "psnr_db": float(10 * np.log10(1 / max(mse, 1e-10)))}


def run_command(args, cfg) -> int:
    """`cf generate --model wan` (the command's flags: --weights, --ckpt, --lora, --prompt, --negative-prompt,
    --seconds, --sampler, --guidance, --out). Without --preset the `wan` preset is used (cf's default preset,
    tiny, has no Wan shapes)."""
    from cf.config import load_config

    if getattr(args, "preset", None) in (None, "tiny"):
        overrides = list(args.overrides)
        if args.memory is not None:
            overrides.append(f"memory.policy={args.memory}")
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        cfg = load_config("wan", args.method, overrides, out=args.out)
    if not args.prompt:
        raise CfError('cf generate --model wan needs --prompt "..." (the text of the video)')
    if args.weights is None and args.ckpt is None:
        raise CfError(
            "cf generate --model wan needs --weights DIR (a Wan2.1-T2V diffusers folder: "
            "transformer/, text_encoder/, tokenizer/, vae/; or Wan's own release folder) and optionally "
            "--ckpt FILE / --lora DIR; docs/wan.md"
        )
    if getattr(args, "context", None):
        raise CfError("--context continues a world's clean frames; it does not apply to --model wan")
    from cf.rollout import Progress

    out = Path(args.out) if args.out else Path(cfg.out) / "generate"
    seconds = cfg.bench.seconds if args.seconds is None else args.seconds
    n_chunks = -(-max(1, int(round(seconds * cfg.data.fps))) // cfg.model.frames_per_chunk)
    bar = Progress(n_chunks, desc=f"cf generate --model wan ({cfg.memory.policy})")
    meta = run_wan(
        cfg,
        weights=args.weights,
        ckpt=args.ckpt,
        lora=getattr(args, "lora", None),
        prompt=args.prompt,
        negative_prompt=getattr(args, "negative_prompt", None),
        seconds=seconds,
        guidance=args.guidance,
        sampler=args.sampler,
        out=out,
        image=getattr(args, "image", None),
        callbacks=[bar],
    )
    t = meta["timing"]
    print(
        f"wrote {meta['mp4']} + .json: {meta['frames']} frames ({meta['seconds']:g} s at {meta['fps']} "
        f"fps), {meta['policy']} memory; DiT {t['dit_s']:.1f} s ({t['video_fps_dit']:.1f} video FPS), "
        f"VAE {sum(t['decode_s']):.1f} s"
    )
    if meta["promoted"] is not None:
        print(f"slow memory: {len(meta['promoted'])} frames promoted (memory.tau={cfg.memory.tau:g})")
    return 0
