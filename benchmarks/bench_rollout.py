"""Rollout latency and cache size per memory policy over a long rollout (DESIGN.md section 7).

    python -m benchmarks.bench_rollout [--presets smoke tiny] [--chunks 200]

Writes benchmarks/results/rollout_<preset>.json (every policy's per-chunk series) and
rollout_<preset>.md (the table). Latency "at chunk k" is the median of the 20 chunks ending at k,
wall and CPU time: one chunk on a shared CPU is too noisy to compare alone. Bounded policies
are flat when the latency at the last chunk is within 15% of chunk 20's and the cache bytes stop
changing once the policy's budget is full; `full` grows linearly.
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
    cpu0, cpu1 = at(r["chunk_cpu_s"], k0), at(r["chunk_cpu_s"], n)
    kv = r["kv_bytes"]
    bounded = r["policy"] != "full"
    # constant once full: from the first chunk that reaches the final size, it never changes
    first_full = next(i for i, b in enumerate(kv) if b == kv[-1])
    return {
        "policy": r["policy"],
        "ms_at_20": wall0 * 1e3, "ms_at_last": wall1 * 1e3, "ratio": wall1 / wall0,
        "cpu_ms_at_20": cpu0 * 1e3, "cpu_ms_at_last": cpu1 * 1e3, "cpu_ratio": cpu1 / cpu0,
        "kv_mib_at_20": kv[k0 - 1] / 2**20, "kv_mib_at_last": kv[-1] / 2**20,
        "frames_held": r["kv_frames"][-1],
        "kv_constant_from_chunk": first_full + 1 if bounded else None,
        "kv_linear": (not bounded) and all(b2 - b1 == kv[1] - kv[0] for b1, b2 in zip(kv, kv[1:])),
        "flat": bounded and abs(cpu1 / cpu0 - 1) <= TOLERANCE and len(set(kv[first_full:])) == 1,
        "latent_fps": r["latent_fps"], "video_fps": r["video_fps"],
    }


def table(preset: str, rows: list[dict], meta: dict) -> str:
    head = (f"# Rollout benchmark: preset `{preset}`, {meta['chunks']} chunks of {meta['frames_per_chunk']} "
            f"latent frames\n\n{meta['device']}, {meta['dtype']}, {meta['params']:,} parameters, "
            f"{meta['tokens_per_frame']} tokens per frame, {meta['forwards_per_chunk']} forwards per chunk "
            f"({meta['sampler_steps']} sampler steps + 1 cache write), batch 1, git {meta['git_sha'][:10]}.\n"
            f"Latency at chunk k = median of the {WINDOW} chunks ending at k (wall clock, and this process's "
            f"CPU time, which other jobs on a shared machine disturb less). `flat`: CPU time at the last "
            f"chunk within {TOLERANCE:.0%} of chunk 20's and cache bytes constant once full.\n\n")
    cols = ("| policy | ms @20 | ms @last | ratio | CPU ms @20 | CPU ms @last | CPU ratio | KV MiB @20 | "
            "KV MiB @last | frames held | KV constant from chunk | flat | latent frames/s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        const = r["kv_constant_from_chunk"] if r["kv_constant_from_chunk"] else (
            "grows linearly" if r["kv_linear"] else "grows")
        flat = "yes" if r["flat"] else ("n/a" if r["policy"] == "full" else "NO")
        lines.append(f"| {r['policy']} | {r['ms_at_20']:.1f} | {r['ms_at_last']:.1f} | {r['ratio']:.2f} | "
                     f"{r['cpu_ms_at_20']:.1f} | {r['cpu_ms_at_last']:.1f} | {r['cpu_ratio']:.2f} | "
                     f"{r['kv_mib_at_20']:.3f} | {r['kv_mib_at_last']:.3f} | {r['frames_held']} | {const} | "
                     f"{flat} | {r['latent_fps']:.1f} |")
    return head + cols + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["smoke", "tiny"])
    ap.add_argument("--chunks", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: idle threads of a busy shared CPU spin and inflate CPU time)")
    args = ap.parse_args(argv)
    for preset in args.presets:
        raw, rows = {}, []
        for policy in POLICIES.names():
            overrides = [f"memory.policy={policy}", f"trainer.threads={args.threads}"]
            cfg = load_config(preset, overrides=overrides)
            raw[policy] = measure(cfg, args.chunks, progress=True)
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
