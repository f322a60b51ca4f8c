"""A user's picture as a video's first frame: read, checked, resized and centre-cropped to a frame size.

    frame, crop = load_image("cat.jpg", height=32, width=32)   # uint8 [32, 32, 3], and what was done

Accepted: PNG and JPEG, 8 bits per channel, RGB, greyscale or palette without transparency, any size.
The picture is scaled (aspect ratio kept, Pillow's antialiased bicubic filter) until it covers the frame,
then its centre is cropped to the frame; `crop` says how (the JSON of `cf generate` carries it). What
cannot be read faithfully is refused with a `CfError` naming the file and the fix, before anything is
generated: a missing, truncated or non-image file, 16-bit, CMYK, or an alpha channel (a transparent
pixel has no colour to continue from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cf.errors import CfError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("PNG", "JPEG")
RESAMPLE = "bicubic"  # Pillow's bicubic, antialiased when it shrinks (its filter widens with the scale)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def load_image(path: str | Path, height: int, width: int, *, flag: str = "--image"
               ) -> tuple[np.ndarray, dict]:
    """Read `path` and fit it to `height` x `width` -> (uint8 [height, width, 3], crop record).

    The crop record: the file, its original size, the size it was scaled to, the box cut out of the
    scaled picture and the same box in the original's pixels (all [left, top, right, bottom]).
    `flag` names the option the path came from in error messages."""
    from PIL import Image

    img, name = _open_checked(Path(path), flag)
    w0, h0 = img.size
    scale = max(height / h0, width / w0)
    # round, but never below the frame (a 1-pixel shortfall would leave the crop without a column)
    w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    left, top = (w1 - width) // 2, (h1 - height) // 2
    resized = img.resize((w1, h1), Image.Resampling.BICUBIC)
    frame = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)
    sx, sy = w0 / w1, h0 / h1
    crop = {
        "path": name,
        "original_size": [w0, h0],
        "resized_to": [w1, h1],
        "resample": RESAMPLE,
        "box": [left, top, left + width, top + height],
        "box_in_original": [round(left * sx, 2), round(top * sy, 2), round((left + width) * sx, 2),
                            round((top + height) * sy, 2)],
        "frame_size": [width, height],
    }
    return frame.copy(), crop


def image_files(folder: str | Path, *, flag: str = "--image-dir") -> list[Path]:
    """The PNG and JPEG files directly in `folder`, sorted by name; an error when there are none."""
    d = Path(folder)
    if not d.is_dir():
        raise CfError(f"{flag} {d}: no such folder; pass a folder of PNG or JPEG pictures")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CfError(f"{flag} {d} holds no .png, .jpg or .jpeg file; put the pictures to start from there")
    return files


def to_frame(frame: np.ndarray):
    """uint8 [H, W, 3] -> torch float [3, H, W] in [-1, 1] (exactly what `cf.video.to_uint8` maps back)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 127.5 - 1.0


def _open_checked(path: Path, flag: str):
    """Open and fully decode `path`, refusing what cannot be used -> (RGB PIL image, the path as given)."""
    from PIL import Image, UnidentifiedImageError

    name = str(path)
    if not path.exists():
        raise CfError(f"{flag} {name}: no such file; pass the path of a PNG or JPEG picture")
    if not path.is_file():
        raise CfError(f"{flag} {name} is not a file; pass the path of a PNG or JPEG picture")
    with path.open("rb") as f:
        head = f.read(26)
    # Pillow reads 16-bit RGB(A) PNGs as 8-bit without a word: the header says what the file holds
    if head.startswith(_PNG_SIGNATURE) and len(head) >= 25 and head[24] == 16:
        raise CfError(f"{flag} {name} is a 16-bit PNG; save it with 8 bits per channel "
                      f"(e.g. `convert in.png -depth 8 out.png`) and pass that")
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not halfway through a run
    except UnidentifiedImageError:
        raise CfError(f"{flag} {name} is not a picture Pillow can read; pass a PNG or JPEG file") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken chunks, bad checksums
        raise CfError(f"{flag} {name} cannot be decoded ({e}): the file is damaged or cut short; "
                      f"export it again as PNG or JPEG") from None
    if img.format not in FORMATS:
        raise CfError(f"{flag} {name} is {img.format or 'an unknown format'}, not PNG or JPEG; "
                      f"convert it to PNG and pass that")
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        raise CfError(f"{flag} {name} has {'16-bit' if mode.startswith('I;16') else mode + '-mode'} pixels; "
                      f"save it with 8 bits per channel and pass that")
    if mode == "CMYK":
        raise CfError(f"{flag} {name} is CMYK; convert it to RGB (e.g. `convert in.jpg -colorspace sRGB "
                      f"out.jpg`) and pass that")
    if "A" in mode or mode in ("PA", "RGBa", "La") or "transparency" in img.info:
        raise CfError(f"{flag} {name} has an alpha channel (transparency); flatten it onto a background "
                      f"(e.g. `convert in.png -background white -flatten out.png`) and pass that")
    if mode not in ("RGB", "L", "P", "1"):
        raise CfError(f"{flag} {name} has {mode} pixels; convert it to 8-bit RGB and pass that")
    return img.convert("RGB"), name
