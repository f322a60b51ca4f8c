"""Video files and pictures: write mp4/webm/gif, read any of them, contact sheets.

Conventions: on disk and in numpy a video is uint8 ``[T, H, W, 3]``; inside models it is float
``[T, C, H, W]`` (or ``[B, F, C, H, W]``) in ``[-1, 1]``. `to_uint8` converts the second to the
first. Every write is atomic (a crash never leaves a half-written file), and every read failure
raises `VideoReadError` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cf.errors import CfError, VideoReadError
from cf.utils import atomic_path

VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".mkv", ".mov", ".avi")


def to_uint8(video) -> np.ndarray:
    """float ``[T, C, H, W]`` in [-1, 1] (torch or numpy) -> uint8 ``[T, H, W, 3]``.

    One channel is repeated to grey; more than three (latents) shows the first three.
    A uint8 ``[T, H, W, 3]`` array passes through unchanged.
    """
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8 and video.ndim == 4 and video.shape[-1] == 3:
        return video
    if video.ndim != 4:
        raise CfError(f"expected a video [T, C, H, W], got shape {tuple(video.shape)}")
    c = video.shape[1]
    if c == 1:
        video = np.repeat(video, 3, axis=1)
    elif c > 3:
        video = video[:, :3]
    elif c != 3:
        raise CfError(f"cannot show a video with {c} channels; expected 1, 3 or more")
    out = np.clip((video.transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5, 0, 255)
    return out.astype(np.uint8)


def to_float(frames: np.ndarray):
    """uint8 ``[T, H, W, 3]`` -> torch float ``[T, 3, H, W]`` in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def write_video(path: str | Path, video, fps: float, *, crf: int = 10, scale: int = 1) -> Path:
    """Write mp4/webm (PyAV) or gif (Pillow), atomically. `scale` enlarges with nearest neighbour
    (a 32x32 world frame is unreadable at its own size). mp4 uses H.264 yuv420p, so it plays
    everywhere but is slightly lossy: score exact pixel questions on the gif or the arrays.
    """
    path = Path(path)
    frames = to_uint8(video)
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".gif":
            _write_gif(tmp, frames, fps)
        elif suffix in (".mp4", ".webm", ".mkv", ".mov"):
            _write_av(tmp, frames, fps, crf, "libvpx-vp9" if suffix == ".webm" else "libx264", suffix)
        else:
            raise CfError(f"cannot write {str(path)!r}: unknown video suffix {suffix!r}; "
                          "use .mp4, .webm or .gif")
    return path


def _write_av(path: Path, frames: np.ndarray, fps: float, crf: int, codec: str, suffix: str) -> None:
    import av

    t, h, w, _ = frames.shape
    if h % 2 or w % 2:  # yuv420p needs even sides
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    fmt = {".mp4": "mp4", ".webm": "webm", ".mkv": "matroska", ".mov": "mov"}[suffix]
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # one thread: the same frames always give the same bytes
        extra = {"threads": "1"} if codec == "libx264" else {"b": "0"}
        stream.options = {"crf": str(crf), **extra}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    from PIL import Image

    t, h, w, _ = frames.shape
    packed = (frames[..., 0].astype(np.int32) << 16) | (frames[..., 1].astype(np.int32) << 8) | frames[..., 2]
    colours, index = np.unique(packed, return_inverse=True)
    if len(colours) <= 256:
        # Exact: one palette entry per colour (Pillow's quantize(palette=...) looks colours up in a
        # reduced-precision cache, so distinct nearby colours would merge).
        palette = np.stack([colours >> 16, (colours >> 8) & 255, colours & 255], 1).astype(np.uint8)
        index = index.reshape(t, h, w).astype(np.uint8)
        images = []
        for f in index:
            im = Image.fromarray(f, mode="P")
            im.putpalette(palette.tobytes())
            images.append(im)
    else:
        # One global palette and no dithering: equal input pixels always map to equal palette entries,
        # so a revisit that is exact in the arrays stays exact in the gif.
        stack = Image.fromarray(frames.reshape(-1, w, 3))
        pal = stack.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        images = [Image.fromarray(f).quantize(palette=pal, dither=Image.Dither.NONE) for f in frames]
    # GIF delays are whole centiseconds: give each frame the delay that keeps the running time exact,
    # and record the frame rate, so a reader can restore frames Pillow merges (it writes a run of
    # identical frames as one frame with the summed delay).
    ends = np.round(np.arange(1, t + 1) * 100.0 / fps) * 10
    durations = np.diff(np.concatenate([[0.0], ends])).astype(int).tolist()
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=durations,
                   loop=0, optimize=False, disposal=1, comment=f"cf fps={fps:g}")


def read_video(path: str | Path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a video file -> (uint8 ``[T, H, W, 3]``, fps). Raises `VideoReadError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(path, "no such file")
    if path.suffix.lower() == ".gif":
        return _read_gif(path, max_frames)
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(path, "the file has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 8.0
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except VideoReadError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many types; all mean "unreadable"
        raise VideoReadError(path, _not_a_video(path, e)) from None
    if not frames:
        raise VideoReadError(path, "it decodes to zero frames")
    return np.stack(frames), fps


def _not_a_video(path: Path, e: Exception) -> str:
    """Why a file did not decode, what was expected and the fix (VideoReadError adds the file name)."""
    from cf.faults import one_line

    if _is_text(path):
        what = "a text file"
    else:
        what = f"not a video this decoder can read ({type(e).__name__}: {one_line(str(e))[:160]})"
    return (f"it is {what}; expected a video ({', '.join(VIDEO_SUFFIXES)}): re-encode it "
            "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or remove it")


def _is_text(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return bool(head) and all(32 <= c < 127 or c in (9, 10, 13) for c in head)


def _read_gif(path: Path, max_frames: int | None) -> tuple[np.ndarray, float]:
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            comment = im.info.get("comment", b"")
            comment = comment.decode(errors="replace") if isinstance(comment, bytes) else str(comment)
            fps = float(comment.split("fps=")[1].split()[0]) if comment.startswith("cf fps=") else None
            frames, clock = [], 0
            for frame in ImageSequence.Iterator(im):
                rgb = np.asarray(frame.convert("RGB"))
                duration = frame.info.get("duration", 0) or 0
                if fps is None:
                    fps = 1000.0 / (duration or 125)
                    repeat = 1
                else:  # frames from the running time: restores runs of identical frames
                    repeat = round((clock + duration) * fps / 1000) - round(clock * fps / 1000)
                clock += duration
                frames.extend([rgb] * max(1, repeat))
                if max_frames is not None and len(frames) >= max_frames:
                    frames = frames[:max_frames]
                    break
    except Exception as e:  # noqa: BLE001 - Pillow raises many types; all mean "unreadable"
        raise VideoReadError(path, _not_a_video(path, e)) from None
    if not frames:
        raise VideoReadError(path, "it decodes to zero frames")
    return np.stack(frames), fps


def contact_sheet(
    path: str | Path,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int = 4,
    title: str | None = None,
) -> Path:
    """A PNG grid: one row per uint8 ``[T, H, W, 3]`` (or float ``[T, C, H, W]``) array.

    Frames are enlarged by `scale` with nearest neighbour so pixels stay crisp.
    """
    from matplotlib.figure import Figure  # no pyplot: no backend chosen, nothing global to close

    rows = [to_uint8(r) for r in rows]
    n_rows, n_cols = len(rows), max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    fig_w = max(4.0, n_cols * w * scale / 100 + 1.5)
    fig_h = max(1.5, n_rows * h * scale / 100 + (0.6 if title else 0.3))
    fig = Figure(figsize=(fig_w, fig_h))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < row.shape[0]:
                ax.imshow(row[j], interpolation="nearest")
            if j == 0 and row_labels:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return Path(path)
