"""What the world is painted with: named colours, shapes, procedural textures and photo crops.

Everything here is numpy on uint8 ``[H, W, 3]`` pictures and draws its randomness from the
generator it is given, so a world is a pure function of its seed.
"""

from __future__ import annotations

import functools

import numpy as np

from cf.errors import CfError

# Saturated colours with names, so a prompt can say what is where. Landmarks and subjects use
# them pure; background textures use them muted (`mute`), so landmarks stand out.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 35),
    "orange": (245, 130, 20),
    "yellow": (255, 225, 25),
    "lime": (160, 230, 40),
    "green": (30, 150, 60),
    "teal": (0, 128, 128),
    "cyan": (70, 220, 240),
    "blue": (30, 80, 220),
    "purple": (130, 40, 180),
    "magenta": (240, 50, 230),
    "pink": (250, 170, 200),
    "brown": (140, 80, 30),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon")
TINTS = tuple(c for c in COLOURS if c not in ("white", "black"))  # for grey photos
PATTERNS = ("solid", "striped", "checkered", "dotted")  # how a subject's body is filled
PROCEDURAL = ("noise", "stripes", "checkerboard", "gradient", "dots")
# RGB photographs and grey ones (tinted when used) that ship inside scikit-image's wheel.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel")

OUTLINE = np.array(PALETTE["black"], np.uint8)
# Colours the textures of one panorama may use. Landmarks and subjects add at most 2 per palette
# colour (pure and the dark pattern shade, the outline being "black"), so a whole video stays
# within a GIF's 256-colour palette and the gifs `cf world` writes are pixel-exact.
TEXTURE_COLOURS = 256 - 2 * len(PALETTE)


@functools.lru_cache(maxsize=1024)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """bool ``[size, size]`` (read-only, cached): the pixels of `shape` filling a square of `size` pixels."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0  # pixel centres in [-1, 1]
    y, x = np.meshgrid(c, c, indexing="ij")
    r, a = np.hypot(x, y), np.arctan2(y, x)
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        m = r <= 0.95
    elif shape == "square":
        m = np.maximum(ax, ay) <= 0.8
    elif shape == "triangle":  # apex up
        m = (y <= 0.8) & (ax <= (y + 0.95) * 0.55)
    elif shape == "diamond":
        m = ax + ay <= 0.95
    elif shape == "star":  # five points
        m = r <= 0.4 + 0.58 * ((1.0 + np.cos(5.0 * (a + np.pi / 2))) / 2.0) ** 2
    elif shape == "cross":
        m = ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))
    elif shape == "ring":
        m = (r <= 0.95) & (r >= 0.5)
    elif shape == "hexagon":
        m = (ay <= 0.82) & (ax * 0.866 + ay * 0.5 <= 0.82)
    else:
        raise CfError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    m.setflags(write=False)
    return m


def dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a bool mask by one pixel (4-neighbourhood): the mask plus its outline."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


@functools.lru_cache(maxsize=1024)
def _outline_masks(shape: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    inner = np.zeros((size, size), bool)
    inner[1:-1, 1:-1] = shape_mask(shape, size - 2)
    mask = dilate(inner)
    inner.setflags(write=False)
    mask.setflags(write=False)
    return inner, mask


def outlined(shape: str, size: int, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A shape with a dark one-pixel outline -> (rgb uint8 ``[size, size, 3]``, mask bool ``[size, size]``).

    fill: a colour ``[3]`` or a picture ``[size, size, 3]``. The shape is drawn one pixel smaller than
    `size` on each side so the outline fits. The mask is shared (read-only).
    """
    inner, mask = _outline_masks(shape, size)
    return np.where(inner[..., None], fill, OUTLINE).astype(np.uint8), mask


def pattern_fill(pattern: str, size: int, colour: tuple[int, int, int]) -> np.ndarray:
    """uint8 ``[size, size, 3]``: a subject's body, `colour` with a pattern in a darker shade."""
    base = np.array(colour, np.float32)
    dark = base * 0.45
    y, x = np.mgrid[0:size, 0:size]
    if pattern == "solid":
        alt = np.zeros((size, size), bool)
    elif pattern == "striped":
        alt = (y // 2) % 2 == 1
    elif pattern == "checkered":
        alt = ((y // 2) + (x // 2)) % 2 == 1
    elif pattern == "dotted":
        alt = (y % 3 == 1) & (x % 3 == 1)
    else:
        raise CfError(f"unknown pattern {pattern!r}; valid patterns: {', '.join(PATTERNS)}")
    return np.where(alt[..., None], dark, base).astype(np.uint8)


def mute(colour: tuple[int, int, int], amount: float = 0.4) -> np.ndarray:
    """A palette colour mixed towards grey: float ``[3]``."""
    return np.array(colour, np.float32) * (1.0 - amount) + 128.0 * amount


def _smooth_noise(h: int, w: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """float ``[h, w]`` in [0, 1]: random values on a grid of `cell` pixels, bilinearly interpolated."""
    grid = rng.random((h // cell + 2, w // cell + 2))
    fy, fx = np.arange(h) / cell, np.arange(w) / cell
    iy, ix = fy.astype(int), fx.astype(int)
    ty, tx = (fy - iy)[:, None], (fx - ix)[None, :]
    g00, g01 = grid[iy][:, ix], grid[iy][:, ix + 1]
    g10, g11 = grid[iy + 1][:, ix], grid[iy + 1][:, ix + 1]
    return (g00 * (1 - tx) + g01 * tx) * (1 - ty) + (g10 * (1 - tx) + g11 * tx) * ty


def procedural(kind: str, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A procedural texture -> (uint8 ``[h, w, 3]``, a few words for the prompt)."""
    c1, c2 = rng.choice(len(COLOURS), size=2, replace=False)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "noise":
        v = 0.65 * _smooth_noise(h, w, 8, rng) + 0.35 * _smooth_noise(h, w, 3, rng)
        v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
    elif kind == "stripes":
        theta, period = rng.uniform(0, np.pi), rng.uniform(4.0, 10.0)
        v = (((x * np.cos(theta) + y * np.sin(theta)) / period) % 1.0 < 0.5).astype(np.float32)
    elif kind == "checkerboard":
        cell = int(rng.integers(3, 8))
        v = ((x // cell + y // cell) % 2).astype(np.float32)
    elif kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        v = x * np.cos(theta) + y * np.sin(theta)
        v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
    elif kind == "dots":
        period = int(rng.integers(4, 9))
        v = (np.hypot(x % period - period / 2, y % period - period / 2) < period / 3).astype(np.float32)
    else:
        raise CfError(f"unknown texture {kind!r}; valid textures: {', '.join(PROCEDURAL)}")
    a, b = mute(PALETTE[COLOURS[c1]]), mute(PALETTE[COLOURS[c2]])
    rgb = a * (1.0 - v[..., None]) + b * v[..., None]
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), f"{COLOURS[c1]}-and-{COLOURS[c2]} {kind}"


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """uint8 ``[H, W, 3]`` or ``[H, W]`` (grey): one of scikit-image's bundled photographs (cached)."""
    import skimage.data

    if name not in PHOTOS:
        raise CfError(f"unknown photo {name!r}; valid photos: {', '.join(PHOTOS)}")
    return np.ascontiguousarray(getattr(skimage.data, name)())


@functools.cache
def photo_for_height(name: str, h: int):
    """`load_photo` as a PIL image shrunk so its shorter side is about 4 * h (never enlarged): crops of
    it still have more pixels than the frame, and resizing them is much cheaper than from the original."""
    from PIL import Image

    img = Image.fromarray(load_photo(name))
    f = min(1.0, 4 * h / min(img.size))
    if f == 1.0:
        return img
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BOX)


def photo(name: str, h: int, w: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A random crop of a photograph resized to ``[h, w, 3]`` -> (uint8 picture, words for the prompt)."""
    from PIL import Image

    img = photo_for_height(name, h)
    crop_h = min(img.height, img.width * h / w) * rng.uniform(0.3, 1.0)
    crop_w = crop_h * w / h
    top, left = rng.uniform(0, img.height - crop_h), rng.uniform(0, img.width - crop_w)
    box = (left, top, left + crop_w, top + crop_h)
    out = np.asarray(img.resize((w, h), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0), np.uint8)
    if out.ndim == 3:
        return out, f"{name} photo"
    tint = TINTS[rng.integers(len(TINTS))]  # grey photos get a colour tint so they differ from one another
    out = (out[..., None] * (0.45 + 0.55 * np.array(PALETTE[tint]) / 255.0)).astype(np.uint8)
    return out, f"{tint}-tinted {name} photo"


def panorama(h: int, w: int, frame_w: int, mode: str,
             rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """uint8 ``[h, w, 3]``: side-by-side regions half to one and a half frames wide, each its own
    texture (`mode`: procedural | photo | mixed), so every place looks different. Also returns the
    regions' descriptions, left to right.
    """
    if mode not in ("procedural", "photo", "mixed"):
        raise CfError(f"unknown texture mode {mode!r}; valid modes: procedural, photo, mixed")
    out = np.empty((h, w, 3), np.uint8)
    words: list[str] = []
    x, previous = 0, None
    while x < w:
        seg = min(int(rng.integers(max(1, frame_w // 2), frame_w * 3 // 2 + 1)), w - x)
        use_photo = mode == "photo" or (mode == "mixed" and rng.random() < 0.5)
        kinds = [k for k in (PHOTOS if use_photo else PROCEDURAL) if k != previous]  # neighbours differ
        previous = kinds[rng.integers(len(kinds))]
        pic, desc = (photo if use_photo else procedural)(previous, h, seg, rng)
        out[:, x : x + seg] = pic
        words.append(desc)
        x += seg
    return _limit_colours(out, TEXTURE_COLOURS), words


def _limit_colours(img: np.ndarray, n: int) -> np.ndarray:
    """uint8 ``[h, w, 3]`` reduced to at most `n` colours (octree: ~25x faster than median cut for
    ~1 grey level more error; no dithering)."""
    from PIL import Image

    packed = np.sort(((img[..., 0].astype(np.int32) << 16) | (img[..., 1].astype(np.int32) << 8)
                      | img[..., 2]).ravel())
    if 1 + np.count_nonzero(packed[1:] != packed[:-1]) <= n:  # distinct colours (np.unique is slower)
        return img
    q = Image.fromarray(img).quantize(colors=n, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    return np.array(q.convert("RGB"))
