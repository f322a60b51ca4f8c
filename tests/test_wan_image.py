"""`cf generate --model wan --image`: the picture encoded by the Wan VAE as one chunk of clean context latents
(tiny random parts in the diffusers layout). What is exact: the video's first frame is the VAE's round trip of
the resized picture, the same as encoding the picture alone (Wan's I2V first-latent encoding) and decoding it;
the mp4 adds H.264's error on top. A random tiny VAE reconstructs nothing, so the round trip itself is
measured here, not its quality (that is the real VAE's, docs/wan.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the wan extra is not installed (pip install -e .[wan])")
pytest.importorskip("transformers", reason="the wan extra is not installed (pip install -e .[wan])")

from cf.cli import main  # noqa: E402
from cf.image import load_image, to_frame  # noqa: E402
from cf.wan.tiny import save_tiny_pipeline  # noqa: E402

SKIMAGE_DATA = Path(pytest.importorskip("skimage").__file__).parent / "data"


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("wan_pipeline"))


def _round_trip_alone(vae, picture: torch.Tensor) -> torch.Tensor:
    """The picture as a 1-frame video through AutoencoderKLWan.encode (mode) and decode -> [3, H, W]."""
    with torch.no_grad():
        z = vae.encode(picture[None, :, None]).latent_dist.mode()
        return vae.decode(z).sample[0, :, 0].clamp(-1, 1)


def test_the_first_latent_is_the_picture_alone_and_decodes_to_its_round_trip(pipe_dir):
    from cf.wan.vae import StreamDecoder, encode_still, load_vae

    vae = load_vae(pipe_dir)
    frame, _ = load_image(SKIMAGE_DATA / "chelsea.png", 16, 24)
    picture = to_frame(frame)
    ctx = encode_still(vae, picture, 3)
    assert ctx.shape == (1, 3, 4, 4, 6)
    with torch.no_grad():
        alone = vae.encode(picture[None, :, None]).latent_dist.mode()  # [1, C, 1, h, w]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert (ctx[:, :1] - ((alone - mean) / std).permute(0, 2, 1, 3, 4)).abs().max() <= 1e-5
    decoded = StreamDecoder(vae).decode(ctx)  # [1, 9, 3, H, W]: the still clip as the VAE gives it back
    assert decoded.shape == (1, 9, 3, 16, 24)
    assert (decoded[0, 0] - _round_trip_alone(vae, picture)).abs().max() <= 1e-5


def test_cf_generate_wan_image_opens_with_the_picture(pipe_dir, tmp_path, capsys):
    from cf.video import read_video
    from cf.wan.vae import load_vae

    picture = SKIMAGE_DATA / "astronaut.png"
    rc = main(["generate", "--model", "wan", "--preset", "wan", "--weights", str(pipe_dir), "--prompt",
               "a red house by the sea", "--image", str(picture), "--memory", "sink", "--seconds", "3",
               "--out", str(tmp_path), "data.height=4", "data.width=6", "device=cpu"])
    assert rc == 0
    meta = json.loads((tmp_path / "wan_sink_seed0.json").read_text())
    assert meta["image_mode"] == "context" and meta["context_latents"] == 3
    assert meta["image"]["frame_size"] == [24, 16] and meta["image"]["box"] == [0, 4, 24, 20]
    assert meta["latent_frames"] == 3 + 12 and meta["frames"] == 1 + 4 * (15 - 1)
    mp4, fps = read_video(tmp_path / "wan_sink_seed0.mp4")
    assert mp4.shape == (meta["frames"], 16, 24, 3) and fps == 16
    frame, _ = load_image(picture, 16, 24)
    want = _round_trip_alone(load_vae(pipe_dir), to_frame(frame))
    err = meta["first_frame_round_trip"]
    assert err["max_abs_255"] == pytest.approx(float((want - to_frame(frame)).abs().max() * 127.5), rel=1e-4)
    # the mp4's frame 0 is that round trip, to H.264's error (yuv420p halves the colour resolution)
    got = torch.from_numpy(mp4[0].astype(np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert float((got - want).abs().mean()) * 127.5 < 12


def test_a_bad_picture_stops_wan_before_any_weights_load(tmp_path, capsys):
    (tmp_path / "x.png").write_text("not a picture")
    rc = main(["generate", "--model", "wan", "--preset", "wan", "--weights", str(tmp_path / "none"),
               "--prompt", "p", "--image", str(tmp_path / "x.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "x.png is not a picture" in err and not (tmp_path / "out").exists()
