"""Training step times of this tree and an earlier commit, side by side in one run (`make bench-compare`).

    python -m benchmarks.compare REV [--presets tiny] [--stages teacher ...] [--steps 30] [--rounds 2]

REV (a commit, tag or branch) is checked out into a temporary git worktree; `benchmarks.bench_train`
then runs in both trees in turn, `--rounds` times (baseline, current, baseline, current, ...), so a
machine that slows down or speeds up during the run biases neither side. Each tree imports its own `cf`
(the editable install of this one is kept out of the baseline's process). Per stage the table gives each
round's median step time and the speed-up of the means. Writes
benchmarks/results/compare_train_<preset>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from cf.utils import atomic_write_json, atomic_write_text, git_sha

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Runs `python -m MODULE ARGS` with the `cf` of the working directory's tree: drops the editable
# install's finder and any `cf` module a .pth file imported at start-up (cf's torchvision hook).
_BOOT = """
import os, runpy, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
for name in [m for m in sys.modules if m == "cf" or m.startswith("cf.")]:
    del sys.modules[name]
sys.path.insert(0, os.getcwd())
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def bench_in(tree: Path, out: Path, args: list[str]) -> dict[str, dict]:
    """Run bench_train in `tree`, results to `out`; returns {preset: its JSON}."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-c", _BOOT, "benchmarks.bench_train", *args, "--out", str(out)]
    subprocess.run(cmd, cwd=tree, check=True)
    results = [json.loads(p.read_text()) for p in out.glob("train_*.json")]
    return {r["preset"]: r for r in results}


def table(preset: str, base_rev: str, base_sha: str, runs: dict[str, list[dict]]) -> str:
    """Markdown: per stage, each round's median step (ms) for both trees and the speed-up of the means."""
    cur = runs["current"][0]["stages"]
    head = (f"# Training step time, side by side: preset `{preset}`\n\n"
            f"{cur[0]['device']}, {cur[0]['dtype']}, batch {cur[0]['batch_size']}, random weights. Baseline "
            f"`{base_rev}` (git {base_sha[:10]}) against the current tree (git {git_sha()[:10]}), "
            f"{len(runs['current'])} rounds run alternately by `python -m benchmarks.compare`; "
            f"each figure is a round's median step over {cur[0]['steps_timed']} steps "
            f"(`benchmarks.bench_train`). Speed-up = mean baseline / mean current.\n\n"
            "| stage | baseline ms | current ms | speed-up |\n|---|---|---|---|\n")
    lines = []
    for i, row in enumerate(cur):
        b = [r["stages"][i]["step_s"] * 1e3 for r in runs["baseline"]]
        c = [r["stages"][i]["step_s"] * 1e3 for r in runs["current"]]
        lines.append(f"| {row['stage']} | {' / '.join(f'{x:.1f}' for x in b)} | "
                     f"{' / '.join(f'{x:.1f}' for x in c)} | {sum(b) / len(b) / (sum(c) / len(c)):.2f}x |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the baseline commit, tag or branch")
    ap.add_argument("--presets", nargs="+", default=["tiny"])
    ap.add_argument("--stages", nargs="+", default=None, help="default: every stage bench_train knows")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    sha = subprocess.run(["git", "rev-parse", args.rev], cwd=ROOT, capture_output=True, text=True)
    if sha.returncode:
        print(f"error: {args.rev!r} is not a commit of this repository ({sha.stderr.strip()}); "
              f"pass a commit, tag or branch, e.g. HEAD~1", file=sys.stderr)
        return 2
    base_sha = sha.stdout.strip()
    bench_args = ["--presets", *args.presets, "--steps", str(args.steps)]
    if args.stages:
        bench_args += ["--stages", *args.stages]
    with tempfile.TemporaryDirectory(prefix="cf-compare-") as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), base_sha], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            runs: dict[str, list[dict]] = {"baseline": [], "current": []}
            for r in range(args.rounds):
                for side, where in (("baseline", tree), ("current", ROOT)):
                    print(f"==> round {r + 1}/{args.rounds}: {side}", flush=True)
                    runs[side].append(bench_in(where, Path(tmp) / f"{side}-{r}", bench_args))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    for preset in args.presets:
        per = {side: [r[preset] for r in rs] for side, rs in runs.items()}
        atomic_write_json(args.out / f"compare_train_{preset}.json",
                          {"preset": preset, "baseline": args.rev, "baseline_sha": base_sha,
                           "current_sha": git_sha(), **per})
        md = table(preset, args.rev, base_sha, per)
        atomic_write_text(args.out / f"compare_train_{preset}.md", md)
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
