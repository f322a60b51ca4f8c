"""`cf bench rollout`: per-chunk latency and cache bytes of one memory policy over a long rollout.

Random weights (speed does not depend on them), batch 1, the student's few-step sampler (each
chunk = its steps + one cache-writing pass at sigma 0), a panning camera. Prints one JSON object
with --json; `measure` is the library entry (benchmarks/bench_rollout.py runs it per policy).

`chunk_latency_s` is the plain series. On a shared machine the load drifts over a long run, so
`probe_latency_s` also times chunk 20 and the last chunk again, `repeats` times each, alternating,
each from a copy of the cache state that chunk started from: the fair comparison of the two.
"""

COMMAND = ("bench", "rollout")
HELP = "time a long rollout per chunk for one memory policy; --json prints one JSON object"


def add_arguments(p) -> None:
    p.add_argument("--policy", default=None, help="memory policy (default: memory.policy)")
    p.add_argument("--chunks", type=int, default=200, help="chunks to generate (default 200)")
    p.add_argument("--sampler", choices=("student", "teacher"), default="student")
    p.add_argument("--repeats", type=int, default=15,
                   help="interleaved re-timings of chunk 20 and the last chunk (0: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object to stdout")


def run(args, cfg) -> int:
    import json

    from cf.errors import CfError

    if args.chunks < 1:
        raise CfError(f"--chunks {args.chunks} must be >= 1")
    if args.policy is not None:
        cfg.memory.policy = args.policy
    result = measure(cfg, args.chunks, sampler=args.sampler, repeats=args.repeats,
                     progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        lat, k = result["chunk_latency_s"], min(20, args.chunks)
        print(f"{result['policy']} @ {result['preset']} on {result['device']} ({result['dtype']}): "
              f"{lat[k - 1] * 1e3:.1f} ms at chunk {k}, {lat[-1] * 1e3:.1f} ms at chunk {len(lat)}; "
              f"{result['kv_bytes'][-1] / 2**20:.2f} MiB cached; {result['video_fps']:.1f} video frames/s")
    return 0


def measure(cfg, n_chunks: int, *, sampler: str = "student", repeats: int = 15,
            progress: bool = False) -> dict:
    """Roll out `n_chunks` chunks with random weights; return the per-chunk figures as a dict."""
    import copy
    import functools
    import statistics
    import time

    import torch

    from cf.diffusion import build_sampler
    from cf.memory import KVCache, build_policy
    from cf.model import attention_kernels, build_model, precision
    from cf.perf import count_flops, mfu, peak_matmul_flops
    from cf.rollout import CacheBytes, ChunkTimer, Progress, RolloutCallback, chunk_step, rollout
    from cf.utils import compute_dtype, git_sha, pick_device, set_threads

    set_threads(cfg.trainer.threads)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device).eval()
    chunk = cfg.model.frames_per_chunk
    frames = n_chunks * chunk
    # a pan at the world's speed: positions move like in the world, at no data cost
    xs = torch.arange(frames, dtype=torch.float64) * cfg.data.camera_speed
    camera = torch.stack([xs, torch.zeros_like(xs)], 1)[None].to(device)
    policy = build_policy(cfg.memory, chunk)
    timer, nbytes = ChunkTimer(device), CacheBytes()
    probes = sorted({min(20, n_chunks), n_chunks}) if repeats > 0 else []

    class Snapshot(RolloutCallback):
        """Copies of the cache as chunk k (1-based) found it, for each probed k."""

        def __init__(self):
            self.states: dict[int, KVCache] = {}

        def on_chunk_start(self, chunk, cache):
            if chunk + 1 in probes:
                self.states[chunk + 1] = copy.deepcopy(cache)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    snap = Snapshot()
    callbacks = [timer, nbytes, snap]
    if progress:
        callbacks.append(Progress(n_chunks, desc=f"bench {cfg.memory.policy}"))
    smp = build_sampler(cfg.diffusion, sampler)
    with torch.no_grad(), precision(cfg.model, device), attention_kernels(cfg.model):
        cond = model.make_cond(["a benchmark of the rollout"], camera=camera)
        gen = torch.Generator().manual_seed(cfg.seed)
        rollout(model, KVCache(policy), smp, cond, n_chunks, generator=gen, callbacks=callbacks)
        samples: dict[int, list[float]] = {k: [] for k in probes}
        for _ in range(repeats):
            for k in probes:
                cache = copy.deepcopy(snap.states[k])
                x = torch.randn(1, chunk, cfg.model.channels, cfg.data.height, cfg.data.width, generator=gen)
                f0 = (k - 1) * chunk
                t0 = now()
                chunk_step(model, cache, smp, cond.frames(f0, f0 + chunk), x.to(device),
                           exit_step=smp.n_steps - 1, generator=gen)
                samples[k].append(now() - t0)
        # FLOPs of one chunk (sampler steps + cache write) at each probed length, counted by torch
        flops: dict[int, int] = {}
        for k in probes:
            x = torch.randn(1, chunk, cfg.model.channels, cfg.data.height, cfg.data.width, generator=gen)
            f0 = (k - 1) * chunk
            step = functools.partial(chunk_step, model, copy.deepcopy(snap.states[k]), smp,
                                     cond.frames(f0, f0 + chunk), x.to(device), exit_step=smp.n_steps - 1,
                                     generator=gen)
            flops[k], _ = count_flops(step)
    dtype = compute_dtype(cfg.model.dtype, device)
    peak = peak_matmul_flops(device, dtype)
    probe_s = {k: statistics.median(v) for k, v in samples.items()}
    tail = timer.latencies[-min(20, n_chunks):]
    latent_fps = chunk / statistics.median(tail)
    return {
        "policy": cfg.memory.policy,
        "preset": cfg.preset,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "dtype": str(dtype).replace("torch.", ""),
        "chunks": n_chunks,
        "frames_per_chunk": chunk,
        "sampler_steps": smp.n_steps,
        "forwards_per_chunk": smp.n_steps + 1,
        "tokens_per_frame": model.tokens_per_frame(),
        "params": sum(p.numel() for p in model.parameters()),
        "memory": {k: cfg.memory[k] for k in ("sink_frames", "slow_frames", "window_frames",
                                              "bounded_positions")},
        "position_bound": policy.position_bound,
        "chunk_latency_s": timer.latencies,
        "chunk_cpu_s": timer.cpu_times,
        "probe_latency_s": {str(k): v for k, v in probe_s.items()},
        "probe_samples_s": {str(k): v for k, v in samples.items()},
        "flops_per_chunk": {str(k): v for k, v in flops.items()},
        "peak_matmul_flops": peak,
        "mfu": {str(k): mfu(flops[k], probe_s[k], peak) for k in probes},
        "kv_bytes": nbytes.nbytes,
        "kv_frames": nbytes.frames,
        "latent_fps": latent_fps,
        "video_fps": latent_fps * cfg.model.video_frames_per_latent,
        "torch": torch.__version__,
        "git_sha": git_sha(),
    }
