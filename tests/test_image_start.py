"""`cf generate --image`: a user's picture as the first clean context frames of a native rollout.

The picture is read, checked, scaled to cover the frame and centre-cropped (cf.image); the video's first
frame is exactly that crop; bad files stop the command before anything is written; and a memory policy that
keeps the first frames keeps the picture: shown on a rollout through a network whose weights are set by hand
so that it shows, at each place, what its cache holds for that place (so what it shows at a revisit is what
the policy kept, nothing else). It is not a trained model; the property tested is the policy's, measured with
cf.metrics' revisit error against chance.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cf.cli import main
from cf.image import load_image, to_frame

SKIMAGE_DATA = Path(pytest.importorskip("skimage").__file__).parent / "data"


def _bad_files(tmp: Path) -> dict[str, Path]:
    photo = (SKIMAGE_DATA / "coffee.png").read_bytes()
    jpeg = (SKIMAGE_DATA / "rocket.jpg").read_bytes()
    files = {
        "missing": tmp / "nowhere.png",
        "truncated png": tmp / "cut.png",
        "truncated jpeg": tmp / "cut.jpg",
        "not an image": tmp / "notes.png",
        "16-bit grey": tmp / "grey16.png",
        "16-bit rgb": tmp / "rgb16.png",
        "cmyk": tmp / "print.jpg",
        "alpha": tmp / "rgba.png",
        "grey alpha": tmp / "la.png",
        "palette transparency": tmp / "pal.png",
        "a folder": tmp / "folder.png",
        "another format": tmp / "pic.bmp",
    }
    files["truncated png"].write_bytes(photo[: len(photo) // 2])
    files["truncated jpeg"].write_bytes(jpeg[: len(jpeg) // 3])
    files["not an image"].write_text("these are notes, not pixels\n")
    Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)).save(files["16-bit grey"])
    _write_png16_rgb(files["16-bit rgb"])
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).convert("CMYK").save(files["cmyk"])
    Image.fromarray(np.full((8, 8, 4), 200, np.uint8), "RGBA").save(files["alpha"])
    Image.fromarray(np.full((8, 8, 2), 200, np.uint8), "LA").save(files["grey alpha"])
    pal = Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).convert("P")
    pal.save(files["palette transparency"], transparency=0)
    files["a folder"].mkdir()
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(files["another format"])
    return files


def _write_png16_rgb(path: Path) -> None:
    """A valid 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h = w = 4
    rows = b"".join(b"\x00" + np.full((w, 3), 40000, ">u2").tobytes() for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


BAD = ["missing", "truncated png", "truncated jpeg", "not an image", "16-bit grey", "16-bit rgb", "cmyk",
       "alpha", "grey alpha", "palette transparency", "a folder", "another format"]


@pytest.mark.parametrize("kind", BAD)
def test_a_bad_picture_is_one_line_naming_the_file_and_the_fix_and_nothing_is_written(kind, tmp_path, capsys):
    path = _bad_files(tmp_path)[kind]
    out = tmp_path / "out"
    rc = main(["generate", "--preset", "smoke", "--image", str(path), "--seconds", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 0 and err.startswith("cf: error: --image ") and str(path) in err
    fixes = ("pass", "save", "convert", "flatten", "export")
    assert any(f in err.split(";")[-1] for f in fixes), err


def test_the_picture_is_scaled_to_cover_the_frame_and_centre_cropped(tmp_path):
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (30, 80, 3), dtype=np.uint8)  # wide: the sides are cropped
    Image.fromarray(src).save(tmp_path / "wide.png")
    frame, crop = load_image(tmp_path / "wide.png", height=12, width=16)
    assert frame.shape == (12, 16, 3) and frame.dtype == np.uint8
    # cover: scale 12 / 30 = 0.4 -> 32 x 12, the middle 16 columns kept
    assert crop["resized_to"] == [32, 12] and crop["box"] == [8, 0, 24, 12]
    assert crop["original_size"] == [80, 30]
    assert crop["box_in_original"] == [20.0, 0.0, 60.0, 30.0] and crop["resample"] == "bicubic"
    want = np.asarray(Image.fromarray(src).resize((32, 12), Image.Resampling.BICUBIC))[:, 8:24]
    assert np.array_equal(frame, want)
    # a tall picture loses its top and bottom; greyscale becomes RGB
    Image.fromarray(src[:, :20, 0].copy()).save(tmp_path / "tall.png")
    frame, crop = load_image(tmp_path / "tall.png", height=8, width=8)
    assert frame.shape == (8, 8, 3) and crop["resized_to"] == [8, 12] and crop["box"] == [0, 2, 8, 10]
    assert np.array_equal(frame[..., 0], frame[..., 2])


def test_generated_video_starts_with_the_picture_exactly(tmp_path):
    """generate(): frame 0 (and every context frame) is the resized crop, bit for bit after uint8."""
    from cf.config import load_config
    from cf.generation import generate
    from cf.model import build_model
    from cf.video import to_uint8

    cfg = load_config("smoke")
    frame, _ = load_image(SKIMAGE_DATA / "astronaut.png", cfg.data.height, cfg.data.width)
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu")).eval()
    video, meta = generate(cfg, model, 3, context=4, image=to_frame(frame))
    assert video.shape[0] == 4 + 3 * 2 and meta["start"] == "image" and meta["context_frames"] == 4
    assert np.array_equal(to_uint8(video[:4]), np.repeat(frame[None], 4, 0))
    xs = [c[0] for c in meta["camera"]]
    assert xs[:5] == [xs[0]] * 5  # the camera holds over the picture, then follows the world from there


def test_cf_generate_image_writes_the_crop_into_its_json(tmp_path):
    import json

    from cf.video import read_video

    out = tmp_path / "gen"
    rc = main(["generate", "--preset", "smoke", "--memory", "sink", "--image",
               str(SKIMAGE_DATA / "rocket.jpg"), "--seconds", "1", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "smoke_sink_seed0.json").read_text())
    assert meta["image"]["path"].endswith("rocket.jpg") and meta["image"]["original_size"] == [640, 427]
    assert meta["image"]["box"] == [4, 0, 20, 16] and meta["context_frames"] == 4  # smoke: student.context 4
    assert meta["frames"] == 4 + 8
    gif, _ = read_video(out / "smoke_sink_seed0.gif")
    frame, _ = load_image(SKIMAGE_DATA / "rocket.jpg", 16, 16)
    # the gif's palette quantises colours; the picture is still what frame 0 shows
    assert np.abs(gif[0].astype(int) - frame.astype(int)).mean() < 6


def test_image_and_context_must_fill_whole_chunks_and_rgb_frames(tmp_path, capsys):
    img = str(SKIMAGE_DATA / "coffee.png")
    argv = ["generate", "--preset", "smoke", "--image", img]
    assert main([*argv, "--context", "3", "--out", str(tmp_path)]) == 2
    assert "--context 3 with --image" in capsys.readouterr().err
    assert main(["generate", "--preset", "smoke", "--image", img, "--out", str(tmp_path / "x"),
                 "model.channels=4"]) == 2
    assert "model.channels=4" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------ the picture kept in memory


def copy_by_place(cfg, a: float = 1e4, big: float = 1e7, sharp: float = 4.0, flag_gain: float = 1e4):
    """A one-block CausalVideoDiT (patch p, width >= 2 * 3p^2 + 4, one head, world positions in pixels) whose
    hand-set weights make each output token the mean of the clean cached tokens at the same world position.

    - patch_embed writes the patch's pixels, times `a`, into channels [0, P) and a constant `big` into one
      channel, so every LayerNorm is an affine map of the pixels (its scale set by `big`);
    - the timestep sinusoid's slowest sine is 0 at sigma 0 and positive for any noisy input: through the time
      MLP it becomes a flag in the attention's input, and a key carries minus that flag, so noisy tokens
      (this chunk's own) are never read; queries and keys are otherwise constant vectors on the spatial
      rotary pairs, whose rotated dot product peaks where the world positions coincide;
    - values are the pixel channels, which the output projection writes into channels [P, 2P) and the head
      reads back. Cross-attention and the MLP add nothing.
    """
    from cf.model import build_model
    from cf.model.rope import axis_dims

    torch.manual_seed(0)
    m = build_model(cfg, torch.device("cpu")).eval()
    d, pd = m.dim, m.channels * m.patch**2
    content, answer = slice(0, pd), slice(pd, 2 * pd)
    const, ref, flag, eflag = 2 * pd, 2 * pd + 1, 2 * pd + 2, d - 1
    assert eflag > flag and m.heads == 1 and len(m.blocks) == 1 and m.positions == "world"
    sigma = big * math.sqrt(d - 1) / d  # LayerNorm's std, set by the constant channel
    dt, dh, dw = axis_dims(d)
    with torch.no_grad():
        for prm in m.parameters():
            prm.zero_()
        m.patch_embed.weight[content] = a * torch.eye(pd)
        m.patch_embed.bias[const] = big
        m.time_embed[0].weight[eflag, m.freq_dim - 1] = flag_gain
        m.time_embed[2].weight[eflag, eflag] = 1.0
        m.time_proj[1].weight[flag, eflag] = 1.0  # the shift of the attention's input (row block 0)
        blk = m.blocks[0]
        blk.modulation[2] = 1.0  # the attention's gate
        wk, wv = blk.attn.qkv.weight[d:2 * d], blk.attn.qkv.weight[2 * d:]
        bq, bk = blk.attn.qkv.bias[:d], blk.attn.qkv.bias[d:2 * d]
        spatial = torch.arange(dt, d, 2)
        bq[spatial], bk[spatial] = sharp, sharp
        bq[dt - 2], wk[dt - 2, flag] = 1.0, -1.0  # the slowest time pair: no rotation over any lag
        idx = torch.arange(pd)
        wv[idx, content.start + idx], wv[idx, ref] = 1.0, -1.0
        blk.attn.proj.weight[answer.start + idx, idx] = sigma
        m.head.weight[idx, answer.start + idx] = sigma / a
        m.head.weight[idx, ref] = -sigma / a
    return m


COPY_OVERRIDES = ["model.patch_size=4", "model.dim=128", "model.depth=1", "model.heads=1",
                  "model.qk_norm=false", "model.text_encoder=none", "model.camera=false",
                  "model.positions=world", "model.position_scale=4"]


def first_return(camera_x: list[int], n_ctx: int, width: int) -> int:
    """The first frame after the context at the picture's camera position, once it was out of view."""
    x0 = camera_x[0]
    away = next(t for t in range(n_ctx, len(camera_x)) if abs(camera_x[t] - x0) >= width)
    return next(t for t in range(away, len(camera_x)) if camera_x[t] == x0)


@pytest.mark.parametrize("policy, keeps", [("sink", True), ("slowfast", True), ("full", True),
                                           ("sliding", False)])
def test_a_policy_that_keeps_the_first_frames_keeps_the_picture(policy, keeps):
    """A smoke world's pan leaves the photograph and returns to it ~5 s later. Retention at that first
    revisit, 1 - error(revisit, picture) / error(revisit, other places shown about as long ago): the sink
    (smoke: 1 frame), slow-fast (whose sink is the picture) and full memory keep it (measured 0.9995, 0.9998,
    0.9995); a 4-frame sliding window has lost it (negative)."""
    from cf.config import load_config
    from cf.generation import generate
    from cf.metrics.revisit import chance_errors, chance_frames, retention, revisit_errors

    cfg = load_config("smoke", None, [*COPY_OVERRIDES, f"memory.policy={policy}"])
    frame, _ = load_image(SKIMAGE_DATA / "astronaut.png", cfg.data.height, cfg.data.width)
    n_ctx = 4
    video, meta = generate(cfg, copy_by_place(cfg), 30, context=n_ctx, image=to_frame(frame))
    xs = [c[0] for c in meta["camera"]]
    back = first_return(xs, n_ctx, cfg.data.width)
    assert back - n_ctx >= 4 * cfg.data.fps  # a real absence: seconds, not a window's few frames
    pairs = torch.tensor([[0, back, back]])
    refs = chance_frames(pairs, torch.tensor(meta["camera"]), (cfg.data.height, cfg.data.width))
    mse = revisit_errors(video, pairs)["mse"]
    chance = chance_errors(video, pairs, None, refs)["mse"]
    r = float(retention(mse, chance))
    assert (r > 0.5) == keeps, r
    if keeps:
        assert r > 0.99
