"""Faults as tests: one clean line (exit code 2, no traceback) for every bad path and file the CLI takes:
output folders that cannot be created or written, config values out of their domain, checkpoints and
weights that are not what they claim, videos that are not videos, a disk that fills up."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from cf.cli import main
from cf.faults import one_line


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("bad")
    save_file({"w": torch.zeros(64)}, str(d / "ok.safetensors"))
    good = (d / "ok.safetensors").read_bytes()
    (d / "header.safetensors").write_bytes(b"\xff" * 8 + good[8:])
    (d / "cut.safetensors").write_bytes(good[: len(good) - 100])
    (d / "text.ckpt").write_text("not a checkpoint\n")
    torch.save({"state_dict": {"w": torch.zeros(64)}}, d / "ok.ckpt")
    (d / "cut.ckpt").write_bytes((d / "ok.ckpt").read_bytes()[:300])
    torch.save({"state_dict": {"w": torch.zeros(1)}, "cfg": Path("x")}, d / "pickle.ckpt")

    class Twice(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    torch.jit.save(torch.jit.script(Twice()), str(d / "script.pt"))
    (d / "afile").write_text("")
    return d


@pytest.mark.parametrize(
    "name, expected",
    [
        ("header.safetensors", "its header length field says"),
        ("cut.safetensors", "it is truncated"),
        ("text.ckpt", "it is a text file"),
        ("cut.ckpt", "it is truncated or damaged"),
        ("pickle.ckpt", "refuses to unpickle (an object of type pathlib.PosixPath)"),
        ("script.pt", "it is a TorchScript archive"),
        ("missing.ckpt", "does not exist; pass the path of a .safetensors"),
    ],
)
def test_generate_refuses_a_bad_checkpoint_in_one_line(bad_files, tmp_path, capsys, name, expected):
    path = bad_files / name
    rc = main(["generate", "--preset", "smoke", "--ckpt", str(path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"cf: error: --ckpt '{path}' ") and expected in err
    assert "a .safetensors file or a torch/Lightning checkpoint (.ckpt)" in err


@pytest.mark.parametrize("command", ["world", "ablate"])
def test_an_output_folder_that_cannot_be_created_fails_before_any_work(bad_files, capsys, command):
    target = bad_files / "afile" / "sub"
    rc = main([command, "--preset", "smoke", "--out", str(target), "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"cannot create the output folder '{target}' (--out): '{bad_files / 'afile'}' is a file" in err


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch, capsys):
    import cf.filecheck

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cf.filecheck.tempfile, "mkstemp", read_only)
    rc = main(["world", "--preset", "smoke", "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 2 and "Read-only file system; pass --out a folder you can write to" in err


@pytest.mark.parametrize("override, expected", [
    ("trainer.lr=nan", "trainer.lr=nan is not a finite number"),
    ("trainer.lr=-1", "trainer.lr=-1.0 must be positive"),
    ("cdmd.generator_lr=inf", "cdmd.generator_lr=inf is not a finite number"),
    ("data.batch_size=-2", "data.batch_size=-2 must be positive"),
    ("memory.slow_frames=-1", "memory.slow_frames=-1 must be >= 0"),
    ("trainer.betas=[0.9,1.5]", "trainer.betas[1]=1.5 must be in [0, 1)"),
])
def test_values_out_of_their_domain_are_refused_at_validation(capsys, override, expected):
    assert main(["ablate", "--plan", "--preset", "smoke", override]) == 2
    assert expected in capsys.readouterr().err


def test_a_full_disk_is_one_line_that_says_to_rerun(tmp_path, monkeypatch, capsys):
    import av

    import cf.video

    def full(*a, **k):
        raise av.error.OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cf.video, "_write_av", full)
    assert main(["world", "--preset", "smoke", "--n", "1", "--seconds", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err  # after the progress bar's line
    assert err.count("cf: error:") == 1 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(f"cf: error: no space left on device while writing '{tmp_path / 'world_000.mp4'}'")
    assert "run the same command again" in last


def test_a_video_that_is_not_a_video_names_the_file_and_the_fix(tmp_path):
    from cf.errors import CfError
    from cf.video import read_video

    for name in ("notes.mp4", "notes.gif"):
        (tmp_path / name).write_text("meeting notes\n")
        expected = rf"cannot read video '.*{name}': it is a text file; expected a video"
        with pytest.raises(CfError, match=expected):
            read_video(tmp_path / name)


def test_messages_are_one_line_without_colour_codes_and_debug_shows_the_traceback(bad_files, capsys):
    coloured = "\x1b[1mRun with id=abc not found\x1b[0m\n  second line"
    assert one_line(coloured) == "Run with id=abc not found second line"
    path = bad_files / "text.ckpt"
    assert main(["--debug", "generate", "--preset", "smoke", "--ckpt", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("cf: error: --ckpt")
