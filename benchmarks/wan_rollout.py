"""Video FPS of a long slow-fast rollout at Wan2.1-T2V-1.3B shapes, and the Wan VAE's decode cost (issue 16,
item 7). A GPU script: `make bench` does not run it (it globs bench_*.py, the CPU benchmarks).

    python -m benchmarks.wan_rollout                                   # random 1.3B weights, bf16, SDPA, 60 s
    python -m benchmarks.wan_rollout --compile --attention flash       # compiled, flash kernel pinned
    python -m benchmarks.wan_rollout --weights Wan2.1-T2V-1.3B-Diffusers [--ckpt self_forcing_dmd.pt]
    python -m benchmarks.wan_rollout --tiny                            # CPU, tiny shapes: checks the script

Writes benchmarks/results/wan_rollout_<tag>.json: the device, the shapes, per-chunk DiT latencies,
video FPS of the DiT rollout (whole run and steady state), the VAE's per-chunk decode time, peak GPU
memory, and the goal it reports against (30 video FPS for the DiT rollout on one H100-class GPU;
Self-Forcing and Context Forcing report 17, LongLive 20.7). Speed does not depend on the weights'
values, so random weights measure the same as real ones of the same shapes; --weights reads real ones
(cf.wan) when they are at hand.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_FPS = 30.0
REPORTED = {
    "self_forcing": 17.0,
    "context_forcing": 17.0,
    "longlive": 20.7,
    "plain bf16 SDPA stack, eager (issue 16)": 25.6,
    "plain bf16 SDPA stack, compiled (issue 16)": 29.0,
}
# the tiny transformer (2 layers, 2 heads of 16, 4 channels) at 4 x 6 latents
TINY = dict(
    dim=32,
    heads=2,
    ffn_dim=64,
    freq_dim=24,
    text_dim=32,
    in_channels=4,
    out_channels=4,
    layers=2,
    text_len=16,
)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a check of the script)")
    p.add_argument(
        "--weights", default=None, help="a Wan2.1 T2V folder (diffusers or Wan's own); else random"
    )
    p.add_argument(
        "--ckpt", default=None, help="a generator checkpoint (Self-Forcing / Context Forcing layout)"
    )
    p.add_argument(
        "--seconds", type=float, default=60.0, help="video length (16 fps, 4 video frames per latent)"
    )
    p.add_argument("--policy", default="slowfast", help="memory policy (wan preset: sink 3, slow 12, fast 6)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "fp16"))
    p.add_argument("--attention", default="auto", choices=("auto", "flash", "efficient", "cudnn", "math"))
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's forward")
    p.add_argument("--no-vae", action="store_true", help="skip the VAE decode measurement")
    p.add_argument(
        "--vae-chunks", type=int, default=8, help="chunks decoded to time the VAE (of the rollout's)"
    )
    p.add_argument("--warmup", type=int, default=2, help="chunks run before timing (compilation, kernels)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tag", default=None, help="result file tag (default: tiny / the GPU's name)")
    p.add_argument(
        "--out", default=None, help="result JSON path (default: benchmarks/results/wan_rollout_<tag>.json)"
    )
    return p.parse_args(argv)


def build(args, device, dtype):
    """(cfg, model, text features, wan config) for the run."""
    from cf.config import load_config
    from cf.config.schema import ModelConfig
    from cf.model import CausalVideoDiT
    from cf.wan.convert import WanConfig, model_overrides

    over = [f"memory.policy={args.policy}", f"model.attention_backend={args.attention}"]
    if args.tiny:
        over += ["data.height=4", "data.width=6"]
    cfg = load_config("wan", overrides=over)
    if args.weights or args.ckpt:
        from cf.wan import read_wan

        w = read_wan(args.weights, args.ckpt)
        wc, model = (
            w.config,
            w.build(cfg.data, frames_per_chunk=cfg.model.frames_per_chunk, dtype=dtype, device=device),
        )
    else:
        wc = WanConfig(**TINY) if args.tiny else WanConfig()  # Wan2.1-T2V-1.3B
        keys = {**model_overrides(wc), "frames_per_chunk": cfg.model.frames_per_chunk}
        torch.manual_seed(0)
        with torch.device(device):
            model = CausalVideoDiT(ModelConfig(**keys), cfg.data)
        model = model.to(dtype=dtype).keep_fp32()
    text = torch.randn(
        1, min(wc.text_len, 64), wc.text_dim, device=device, dtype=dtype
    )  # padded to 512 inside
    return cfg, model.eval(), text, wc


def time_vae(args, device, dtype, latents_shape, n_chunks, chunk):
    """Per-chunk decode seconds of the Wan VAE (random weights at Wan2.1's config unless --weights)."""
    try:
        from diffusers import AutoencoderKLWan
    except ImportError:
        return {"skipped": "diffusers is not installed (pip install -e .[wan])"}
    from cf.wan.vae import StreamDecoder, load_vae

    if args.weights and (Path(args.weights) / "vae").is_dir():
        vae = load_vae(args.weights, device=device, dtype=dtype)
        source = str(Path(args.weights) / "vae")
    else:
        from cf.wan.tiny import TINY_VAE

        torch.manual_seed(
            0
        )  # the tiny VAE has the tiny DiT's 4 latent channels; the default config is Wan2.1's
        vae = AutoencoderKLWan(**(TINY_VAE if args.tiny else {})).to(device=device, dtype=dtype).eval()
        source = "random (tiny)" if args.tiny else "random (Wan2.1 VAE config)"
    dec = StreamDecoder(vae)
    b, _, c, h, w = latents_shape
    secs = []
    g = torch.Generator().manual_seed(0)
    for _ in range(n_chunks):
        z = torch.randn(b, chunk, c, h, w, generator=g).to(device, dtype)
        sync(device)
        t0 = time.perf_counter()
        frames = dec.decode(z)
        sync(device)
        secs.append(time.perf_counter() - t0)
    steady = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
    return {
        "source": source,
        "chunks": n_chunks,
        "decode_s": secs,
        "frames_per_chunk": chunk * dec.temporal,
        "steady_decode_s_per_chunk": steady,
        "decode_fps": chunk * dec.temporal / steady,
        "pixel_shape": list(frames.shape[2:]),
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    from cf.diffusion import build_sampler
    from cf.memory import KVCache, build_policy
    from cf.model import Cond, attention_kernels
    from cf.rollout import ChunkTimer, rollout
    from cf.utils import atomic_write_json, pick_device

    args = parse(sys.argv[1:] if argv is None else argv)
    device = pick_device("cpu" if args.tiny and args.device == "auto" else args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    if args.tiny and device.type == "cpu":
        dtype = torch.float32
    cfg, model, text, wc = build(args, device, dtype)
    if args.compile:
        model.forward = torch.compile(model.forward)
    chunk = cfg.model.frames_per_chunk
    n_latents = max(chunk, int(round(args.seconds * cfg.data.fps)))
    n_chunks = -(-n_latents // chunk)
    cond = Cond(text=text)
    sampler = build_sampler(cfg.diffusion, "student")

    def run(n, timer=None):
        cache = KVCache(build_policy(cfg.memory, chunk))
        with torch.no_grad(), attention_kernels(cfg.model):
            res = rollout(
                model,
                cache,
                sampler,
                cond,
                n,
                generator=torch.Generator().manual_seed(0),
                callbacks=[timer] if timer else [],
            )
        return res, cache

    t0 = time.perf_counter()
    if args.warmup:
        run(min(args.warmup, n_chunks))
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = ChunkTimer(device)
    t0 = time.perf_counter()
    res, cache = run(n_chunks, timer)
    sync(device)
    total = time.perf_counter() - t0
    vpl = cfg.model.video_frames_per_latent
    video_frames = 1 + vpl * (n_chunks * chunk - 1)
    lat = timer.latencies
    steady = statistics.median(lat[len(lat) // 2 :])  # second half: the bounded cache is full
    fps = video_frames / total
    steady_fps = chunk * vpl / steady
    out = {
        "benchmark": "wan_rollout",
        "tiny": args.tiny,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": args.dtype if not (args.tiny and device.type == "cpu") else "fp32",
        "attention": args.attention,
        "compile": args.compile,
        "weights": args.weights or "random",
        "ckpt": args.ckpt,
        "wan_config": wc.as_dict(),
        "latent_shape": [wc.in_channels, cfg.data.height, cfg.data.width],
        "tokens_per_frame": model.tokens_per_frame(),
        "policy": args.policy,
        "memory": {k: cfg.memory[k] for k in cfg.memory},
        "sampler_steps": sampler.n_steps,
        "seconds": args.seconds,
        "chunks": n_chunks,
        "latent_frames": n_chunks * chunk,
        "video_frames": video_frames,
        "warmup_s": warmup_s,
        "total_s": total,
        "chunk_latency_s": lat,
        "video_fps": fps,
        "steady_video_fps": steady_fps,
        "kv_frames_held": cache.used,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "goal_video_fps": GOAL_FPS,
        "meets_goal": fps >= GOAL_FPS,
        "reported_fps": REPORTED,
        "finite": bool(torch.isfinite(res.video.float()).all()),
    }
    if not args.no_vae:
        out["vae"] = time_vae(
            args,
            device,
            dtype if device.type == "cuda" else torch.float32,
            res.video.shape,
            min(args.vae_chunks, n_chunks),
            chunk,
        )
        if "steady_decode_s_per_chunk" in out["vae"]:
            per_chunk = steady + out["vae"]["steady_decode_s_per_chunk"]
            out["steady_video_fps_with_decode"] = chunk * vpl / per_chunk
    tag = args.tag or (
        "tiny"
        if args.tiny
        else (torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu")
    )
    path = Path(args.out) if args.out else RESULTS / f"wan_rollout_{tag}.json"
    atomic_write_json(path, out)
    print(
        f"wan_rollout: {video_frames} video frames ({args.seconds:g} s) in {total:.2f} s = {fps:.1f} FPS "
        f"(steady {steady_fps:.1f}; goal {GOAL_FPS:g}) on {out['device_name']}"
        + (f"; VAE {out['vae'].get('decode_fps', float('nan')):.1f} FPS" if "vae" in out else "")
        + f" -> {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
