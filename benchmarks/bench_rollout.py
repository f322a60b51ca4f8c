"""Rollout latency and cache size per memory policy over a long rollout (DESIGN.md section 7).

    python -m benchmarks.bench_rollout [--presets smoke tiny] [--chunks 200]

Writes benchmarks/results/rollout_<preset>.json (every policy's per-chunk series) and
rollout_<preset>.md (the table). A shared CPU's load drifts during a long run, so the flatness
check uses the interleaved probe of `cf bench rollout` (chunk 20 and the last chunk re-timed
alternately from copies of the cache state each started from, median of the repeats); the
plain series' medians over the 20 chunks ending at 20 and at the last chunk are shown beside it.
Bounded policies are flat when the probed latency at the last chunk is within 15% of chunk 20's
and the cache bytes stop changing once the policy's budget is full; `full` grows linearly.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from cf.commands.bench_rollout import measure
from cf.config import load_config
from cf.memory import POLICIES
from cf.utils import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 20  # chunks per latency median
TOLERANCE = 0.15  # "flat": last-chunk latency within this fraction of chunk 20's


def at(series: list[float], k: int) -> float:
    """Median of the WINDOW values ending at chunk k (1-based)."""
    return statistics.median(series[max(0, k - WINDOW):k])


def summarise(r: dict) -> dict:
    n = r["chunks"]
    k0 = min(20, n)
    wall0, wall1 = at(r["chunk_latency_s"], k0), at(r["chunk_latency_s"], n)
    probe0, probe1 = r["probe_latency_s"][str(k0)], r["probe_latency_s"][str(n)]
    kv = r["kv_bytes"]
    bounded = r["policy"] != "full"
    # constant once full: from the first chunk that reaches the final size, it never changes
    first_full = next(i for i, b in enumerate(kv) if b == kv[-1])
    return {
        "policy": r["policy"],
        "ms_at_20": wall0 * 1e3, "ms_at_last": wall1 * 1e3, "ratio": wall1 / wall0,
        "probe_ms_at_20": probe0 * 1e3, "probe_ms_at_last": probe1 * 1e3, "probe_ratio": probe1 / probe0,
        "kv_mib_at_20": kv[k0 - 1] / 2**20, "kv_mib_at_last": kv[-1] / 2**20,
        "frames_held": r["kv_frames"][-1],
        "kv_constant_from_chunk": first_full + 1 if bounded else None,
        "kv_linear": (not bounded) and all(b2 - b1 == kv[1] - kv[0] for b1, b2 in zip(kv, kv[1:])),
        "flat": bounded and abs(probe1 / probe0 - 1) <= TOLERANCE and len(set(kv[first_full:])) == 1,
        "latent_fps": r["latent_fps"], "video_fps": r["video_fps"],
        "gflop_per_chunk_at_last": r["flops_per_chunk"][str(n)] / 1e9,
        "mfu_at_last": r["mfu"][str(n)], "peak_gflops": r["peak_matmul_flops"] / 1e9,
    }


def table(preset: str, rows: list[dict], meta: dict) -> str:
    head = (f"# Rollout benchmark: preset `{preset}`, {meta['chunks']} chunks of {meta['frames_per_chunk']} "
            f"latent frames\n\n{meta['device']}, {meta['dtype']}, {meta['params']:,} parameters, "
            f"{meta['tokens_per_frame']} tokens per frame, {meta['forwards_per_chunk']} forwards per chunk "
            f"({meta['sampler_steps']} sampler steps + 1 cache write), batch 1, git {meta['git_sha'][:10]}.\n"
            f"Series: median wall ms of the {WINDOW} chunks ending at chunk 20 / the last chunk. Probe: "
            f"chunk 20 and the last chunk re-timed {meta['repeats']} times each, alternating, from copies "
            f"of the cache state each started from (median): the fair comparison when the load drifts. "
            f"`flat`: probed last-chunk latency within {TOLERANCE:.0%} of chunk 20's and cache bytes "
            f"constant once full. MFU: FLOPs of one chunk (counted by torch) over its probed time, as a "
            f"fraction of the peak matmul FLOP/s measured in the same process "
            f"({rows[0]['peak_gflops']:.1f} GFLOP/s).\n\n")
    cols = ("| policy | series ms @20 | series ms @last | probe ms @20 | probe ms @last | probe ratio | "
            "KV MiB @20 | KV MiB @last | frames held | KV constant from chunk | flat | latent frames/s | "
            "GFLOP/chunk @last | MFU @last |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        const = r["kv_constant_from_chunk"] if r["kv_constant_from_chunk"] else (
            "grows linearly" if r["kv_linear"] else "grows")
        flat = "yes" if r["flat"] else ("n/a" if r["policy"] == "full" else "NO")
        lines.append(f"| {r['policy']} | {r['ms_at_20']:.1f} | {r['ms_at_last']:.1f} | "
                     f"{r['probe_ms_at_20']:.1f} | {r['probe_ms_at_last']:.1f} | {r['probe_ratio']:.2f} | "
                     f"{r['kv_mib_at_20']:.3f} | {r['kv_mib_at_last']:.3f} | {r['frames_held']} | {const} | "
                     f"{flat} | {r['latent_fps']:.1f} | {r['gflop_per_chunk_at_last']:.3f} | "
                     f"{r['mfu_at_last']:.1%} |")
    return head + cols + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["smoke", "tiny"])
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: idle threads of a busy shared CPU spin and inflate CPU time)")
    args = ap.parse_args(argv)
    for preset in args.presets:
        raw, rows = {}, []
        for policy in POLICIES.names():
            overrides = [f"memory.policy={policy}", f"trainer.threads={args.threads}"]
            cfg = load_config(preset, overrides=overrides)
            raw[policy] = measure(cfg, args.chunks, repeats=args.repeats, progress=True)
            raw[policy]["repeats"] = args.repeats
            rows.append(summarise(raw[policy]))
        meta = raw[rows[0]["policy"]]
        blob = {"preset": preset, "summary": rows, "runs": raw}
        atomic_write_json(args.out / f"rollout_{preset}.json", blob)
        md = table(preset, rows, meta)
        atomic_write_text(args.out / f"rollout_{preset}.md", md)
        print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
