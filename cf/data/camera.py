"""Camera paths: endless integer x positions of the frame's left edge over the panorama.

A path is a generator that yields lists of consecutive positions (chunks, so that drawing a
thousand frames is not a thousand generator steps). Positions are whole pixels, so a camera that
comes back to a place comes back to exactly the same pixels, and a revisit's ground truth is
exact. A path draws its randomness from the generator it is given and only moves forward, so
the first N positions never depend on how many are asked for later.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cf.registry import Registry

CHUNK = 256  # positions per chunk of the closed-form and random-walk paths
TOURS = ("tour", "tour_anchored")  # the paths built on the tour's loop (a 3-frame-wide panorama, one lag)


@dataclass(frozen=True)
class PathSpec:
    span: int  # largest x: panorama width - frame width
    speed: float  # pixels per frame
    lags: tuple[int, ...]  # revisit lags the `revisit` path must produce (`tour`: the longest one)
    view: int = 0  # frame width: what the camera sees from x is [x, x + view)


@dataclass(frozen=True)
class CameraPath:
    generate: Callable[[PathSpec, np.random.Generator], Iterator[list[int]]]
    text: str  # how the prompt describes the motion; formatted with `speed`


CAMERA_PATHS: Registry[CameraPath] = Registry("camera path")


def reflect(u, hi: int):
    """Fold positions into ``[0, hi]`` by bouncing off both ends (a triangle wave).

    Works on ints (plain Python, fast in the path generators) and on integer numpy arrays.
    """
    if hi == 0:
        return u * 0
    m = u % (2 * hi)
    if isinstance(m, np.ndarray):
        return np.where(m <= hi, m, 2 * hi - m)
    return m if m <= hi else 2 * hi - m


def _step(spec: PathSpec) -> int:
    return max(1, int(round(spec.speed)))


def pingpong(spec: PathSpec, rng: np.random.Generator) -> Iterator[list[int]]:
    """Constant speed, reversing at the ends of the panorama."""
    x0, d = int(rng.integers(0, spec.span + 1)), int(rng.choice((-1, 1)))
    for first in itertools.count(0, CHUNK):
        t = np.arange(first, first + CHUNK)
        yield reflect(x0 + d * np.rint(spec.speed * t).astype(np.int64), spec.span).tolist()


def random_walk(spec: PathSpec, rng: np.random.Generator) -> Iterator[list[int]]:
    """Steps of 0.5-1.5x the speed, with pauses of 1-4 frames and random reversals."""
    x, d, pause = int(rng.integers(0, spec.span + 1)), int(rng.choice((-1, 1))), 0
    chunk: list[int] = []
    while True:
        chunk.append(x)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
        if pause:
            pause -= 1
            continue
        r = rng.random()
        if r < 0.1:
            pause = int(rng.integers(0, 4))  # this frame holds still too
            continue
        if r < 0.2:
            d = -d
        x += d * max(1, int(round(spec.speed * rng.uniform(0.5, 1.5))))
        if x < 0 or x > spec.span:  # bounce off the end
            x, d = reflect(x, spec.span), -d


def revisit(spec: PathSpec, rng: np.random.Generator) -> Iterator[list[int]]:
    """Out-and-back excursions, one per configured lag (in a shuffled order, repeated forever).

    An excursion of lag L leaves an anchor, moves away for k frames, holds L - 2k frames and comes
    back, arriving at the anchor exactly L frames after leaving it; it never passes the anchor on
    the way, so the anchor's previous visit is exactly L frames earlier. k is L // 2 when the
    panorama has room, fewer frames otherwise. Between excursions the camera travels at its
    speed to a new anchor with room for the next lag.
    """
    step = _step(spec)
    x = int(rng.integers(0, spec.span + 1))
    yield [x]
    while True:
        for lag in rng.permutation(np.array(spec.lags)):
            lag = int(lag)
            need = step * (lag // 2)
            anchors = [a for a in range(spec.span + 1) if a >= need or spec.span - a >= need]
            target = int(rng.choice(anchors)) if anchors else (0 if x > spec.span // 2 else spec.span)
            travel = []
            while x != target:  # travel to the anchor, landing on it exactly
                x += int(np.sign(target - x)) * min(step, abs(target - x))
                travel.append(x)
            yield travel
            room = {1: spec.span - x, -1: x}
            ok = [d for d in (1, -1) if room[d] >= need]
            d = int(rng.choice(ok)) if ok else max(room, key=room.get)
            k = min(lag // 2, room[d] // step)
            path = [x + d * step * j for j in range(1, k + 1)]
            path += [path[-1] if path else x] * (lag - 2 * k)
            path += [x + d * step * (k - j) for j in range(1, k + 1)]
            yield path


def _travel(x: int, target: int, step: int) -> list[int]:
    """Positions from x (exclusive) to target (inclusive) at `step` px per frame, landing exactly."""
    out = []
    while x != target:
        x += int(np.sign(target - x)) * min(step, abs(target - x))
        out.append(x)
    return out


def _wander(x: int, n: int, lo: int, hi: int, step: int, rng: np.random.Generator) -> list[int]:
    """n positions in [lo, hi] that start next to x and end back on x: a pan with random turns (10 % per
    frame, and at the ends), holding still only when it must to land on time."""
    out, home, d = [], x, int(rng.choice((-1, 1)))
    for i in range(n):
        left, dist = n - i, -(-abs(home - x) // step)  # frames left, frames needed to get home
        if dist >= left:  # head home
            x += int(np.sign(home - x)) * min(step, abs(home - x))
        elif dist == left - 1:
            pass  # one frame to spare: hold, so the last frame lands on home
        else:
            if rng.random() < 0.1 or not lo <= x + d * step <= hi:
                d = -d
            if lo <= x + d * step <= hi:
                x += d * step
        out.append(x)
    return out


def tour(spec: PathSpec, rng: np.random.Generator) -> Iterator[list[int]]:
    """Long revisit lags with the camera always moving: the camera alternates between the two ends of the
    panorama, A (x = 0) and B (x = span). Arriving at one end, it makes 1-3 excursions from it into the
    middle zone that shows neither end (each returns to the end at a drawn lag), then crosses to the other
    end, which it reaches exactly L = max(spec.lags) frames after it last left it. So each end's view is
    out of sight for L frames (the longest lag), the excursions add middle lags and the pans inside the
    zone short ones. Needs a panorama at least 3 frame widths wide (a zone that sees neither end)."""
    yield [0]
    yield from _tour_from(0, spec, rng, dwell=(0, spec.span))


def tour_anchored(spec: PathSpec, rng: np.random.Generator) -> Iterator[list[int]]:
    """`tour` anchored away from its first frames: the camera starts at end B (x = span) and pans to end A,
    so the first frames (the clean context a rollout starts from, which an attention sink keeps) show B's
    side. It never dwells at A: it turns there at once, and spends the time between crossings at B (1-3
    excursions into the middle zone, as `tour` does at both ends). So A is out of sight for exactly
    L = max(spec.lags) frames between visits and the longest lags all return to A's side, whose views
    ([0, 2 * view) at most) miss the first frames' while those stay right of x = 2 * view (at tiny's
    bench world, 4 context frames show [84, 128) and A's side [0, 64)); B's places come back at the
    excursions' middle lags."""
    yield [spec.span]
    yield from _tour_from(spec.span, spec, rng, dwell=(spec.span,))


def _tour_from(x: int, spec: PathSpec, rng: np.random.Generator,
               dwell: tuple[int, ...]) -> Iterator[list[int]]:
    """The tour's loop from end `x` (0 or span), the camera already there: it crosses to the other end, and
    at the ends in `dwell` spends the frames until the next crossing on excursions into the middle zone,
    so the end it left is reached again exactly L = max(spec.lags) frames after (see `tour`); at an end
    not in `dwell` it turns back at once."""
    step, span, view = _step(spec), spec.span, spec.view
    lo, hi = view, span - view  # the zone whose views overlap neither end's
    long = max(spec.lags)
    while True:
        cross = _travel(x, span - x, step)
        yield cross
        x = cross[-1]
        if x not in dwell:
            continue
        fill = long - 2 * len(cross)  # frames at this end before crossing back
        into = _travel(x, hi if x == span else lo, step)  # the legs between the end and the zone
        parts = []
        least = 2 * len(into) + 2 * step  # an excursion's legs, and a little panning in the zone
        for n in range(3, 0, -1):  # as many excursions as fit
            if fill >= n * least:
                w = rng.dirichlet(np.full(n, 2.0))
                parts = least + np.floor(w * (fill - n * least)).astype(int)
                parts[-1] += fill - parts.sum()
                break
        if not len(parts):
            yield [x] * fill if fill > 0 else []
            continue
        for lag in parts:
            lag = int(lag)
            out = _travel(x, hi if x == span else lo, step)
            zone = _wander(out[-1], lag - 2 * len(out), lo, hi, step, rng)
            yield out + zone + _travel(zone[-1] if zone else out[-1], x, step)


CAMERA_PATHS.add("pingpong", CameraPath(pingpong, "pans back and forth at {speed:g} pixels per frame"))
CAMERA_PATHS.add("random", CameraPath(random_walk, "wanders at about {speed:g} pixels per frame, pausing "
                                                   "and turning back at random"))
CAMERA_PATHS.add("tour", CameraPath(tour, "pans back and forth at {speed:g} pixels per frame"))
CAMERA_PATHS.add("tour_anchored", CameraPath(tour_anchored,
                                             "pans back and forth at {speed:g} pixels per frame"))
CAMERA_PATHS.add("revisit", CameraPath(revisit, "leaves places and comes back to them, moving at "
                                                "{speed:g} pixels per frame"))
