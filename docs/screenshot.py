"""The MLflow compare view of an ablation's latest pipeline runs, as a PNG (docs/mlflow_compare.png).

    .venv/bin/python docs/screenshot.py [--ablation memory] [--preset tiny] [--out docs/mlflow_compare.png]

Needs a headless Chromium (Debian: `apt-get install chromium`) and the runs in the project's store
(`make ablate ABLATION=ablations/memory.yaml`). Starts `cf ui` on a spare port, drives Chromium over
the DevTools protocol (with aiohttp, which MLflow already depends on) to close the assistant panel,
fold the plots and show only the parameters, metrics and tags that differ between the runs, then
captures the page and stops both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# what to click once the page has rendered: close the assistant, fold the plots, diff-only tables
TIDY = """(() => {
  const click = (el) => { if (el) el.click(); return !!el; };
  const byLabel = (label) => document.querySelector(`button[aria-label="${label}"]`);
  const done = [click(byLabel('Close'))];
  for (const what of ['Parameters', 'Metrics', 'Tags']) done.push(click(byLabel(`${what} - Show diff only`)));
  const header = (text) => [...document.querySelectorAll('[role=button][aria-expanded]')]
    .find(e => e.innerText.trim() === text);
  done.push(click(header('Visualizations')));
  return done;
})()"""
# the page's height down to the (empty) artifact viewer (the metric table scrolls on its own)
HEIGHT = """(() => {
  const main = document.querySelector('main') || document.body;
  const art = [...document.querySelectorAll('[role=button][aria-expanded]')]
    .find(e => e.innerText.trim() === 'Artifacts');
  const bottom = art ? art.getBoundingClientRect().top + main.scrollTop + 10 : main.scrollHeight;
  return Math.min(5000, Math.round(bottom));
})()"""


def compare_url(ablation: str, preset: str, port: int) -> str:
    from cf import results, tracking
    from cf.config import load_config

    cfg = load_config(preset)
    df = results.latest(results.pipeline_runs(cfg))
    df = df[(df["ablation"] == ablation) & (df["preset"] == preset)]
    if df.empty:
        sys.exit(
            f"no finished pipeline runs of ablation {ablation!r} at preset {preset!r} in "
            f"the store; run: make ablate PRESET={preset} ABLATION=ablations/{ablation}.yaml"
        )
    exp = tracking.client(cfg).get_experiment_by_name(cfg.tracking.experiment).experiment_id
    q = urllib.parse.quote
    runs = q(json.dumps(list(df.sort_values("start_time")["run_id"])))
    return f"http://127.0.0.1:{port}/#/compare-runs?runs={runs}&experiments={q(json.dumps([exp]))}"


def wait_http(url: str, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    sys.exit(f"{url} did not answer within {seconds:.0f} s")


async def capture(ws_url: str, url: str, out: Path, width: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        counter = iter(range(1, 10**9))

        async def call(method: str, **params):
            my = next(counter)
            await ws.send_json({"id": my, "method": method, "params": params})
            async for msg in ws:
                reply = json.loads(msg.data)
                if reply.get("id") == my:
                    return reply.get("result", {})
            raise RuntimeError("the browser closed the connection")

        async def js(expr: str):
            return (await call("Runtime.evaluate", expression=expr, returnByValue=True))["result"].get(
                "value"
            )

        await call("Page.enable")
        await call("Page.navigate", url=url)
        for _ in range(240):
            if await js("!!document.body && document.body.innerText.includes('Run details')"):
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        print("tidied:", await js(TIDY))
        await asyncio.sleep(2)
        height = await js(HEIGHT)
        await call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=int(height),
            deviceScaleFactor=1,
            mobile=False,
        )
        await asyncio.sleep(2)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ablation", default="memory")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow_compare.png")
    ap.add_argument("--port", type=int, default=5123, help="port of the MLflow UI")
    ap.add_argument("--width", type=int, default=1500)
    args = ap.parse_args()
    browser = next(
        (b for b in BROWSERS if subprocess.run(["which", b], capture_output=True).returncode == 0), None
    )
    if browser is None:
        sys.exit("no chromium found: apt-get install chromium")
    url = compare_url(args.ablation, args.preset, args.port)
    print("compare view:", url)
    ui = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "cf"), "ui", "--port", str(args.port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    profile = tempfile.TemporaryDirectory(prefix="cf-chromium-")
    devtools = args.port + 1
    chrome = None
    try:
        wait_http(f"http://127.0.0.1:{args.port}/", 180)
        chrome = subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--hide-scrollbars",
                f"--user-data-dir={profile.name}",
                f"--remote-debugging-port={devtools}",
                f"--window-size={args.width},1200",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_http(f"http://127.0.0.1:{devtools}/json/version", 60)
        page = next(
            t
            for t in requests.get(f"http://127.0.0.1:{devtools}/json/list", timeout=5).json()
            if t["type"] == "page"
        )
        asyncio.run(capture(page["webSocketDebuggerUrl"], url, args.out, args.width))
        print("wrote", args.out)
    finally:
        for proc in (chrome, ui):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
        profile.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
