import pytest
from omegaconf import OmegaConf

from cf.cli import main
from cf.config import ConfigError, available, config_hash, load_config
from cf.registry import Registry, UnknownNameError


@pytest.mark.parametrize("preset", ["smoke", "tiny", "small", "wan"])
@pytest.mark.parametrize("method", ["context_forcing", "self_forcing", "longlive"])
def test_every_preset_and_method_loads(preset, method):
    cfg = load_config(preset, method)
    assert cfg.preset == preset and cfg.method == method


def test_layers_apply_in_order():
    cfg = load_config("smoke", "self_forcing", ["memory.window_frames=7"])
    assert cfg.model.dim == 32  # from the preset
    assert cfg.memory.policy == "sliding"  # from the method
    assert cfg.memory.window_frames == 7  # from the command line
    assert load_config("smoke").memory.window_frames == 4


def test_wan_preset_has_wan_shapes():
    cfg = load_config("wan")
    tokens = (cfg.data.height // cfg.model.patch_size) * (cfg.data.width // cfg.model.patch_size)
    assert tokens == 1560
    m = cfg.model
    assert (m.depth, m.dim, m.heads, m.dim // m.heads) == (30, 1536, 12, 128)
    assert cfg.memory.sink_frames + cfg.memory.slow_frames + cfg.memory.window_frames == 21


def test_unknown_key_names_the_close_valid_key():
    with pytest.raises(ConfigError, match=r"model\.dpth.*did you mean 'model\.depth'"):
        load_config("smoke", overrides=["model.dpth=3"])


def test_wrong_type_names_the_key_and_type():
    with pytest.raises(ConfigError, match=r"model\.depth.*expected int"):
        load_config("smoke", overrides=["model.depth=deep"])


def test_bad_choice_and_bad_shape_say_how_to_fix():
    with pytest.raises(ConfigError, match="data.texture='marble' is not one of procedural, photo, mixed"):
        load_config("smoke", overrides=["data.texture=marble"])
    with pytest.raises(ConfigError, match="not divisible by model.patch_size=5"):
        load_config("smoke", overrides=["model.patch_size=5"])
    with pytest.raises(ConfigError, match="erft.p_noise=1.5 must be a probability"):
        load_config("smoke", overrides=["erft.p_noise=1.5"])


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as e:
        load_config("smok")
    assert "did you mean 'smoke'" in str(e.value)
    for name in available("presets"):
        assert name in str(e.value)


def test_registry_lists_valid_names():
    reg: Registry[int] = Registry("memory policy")
    reg.add("slowfast", 1)
    reg.add("sliding", 2)
    assert reg.get("sliding") == 2
    with pytest.raises(UnknownNameError, match="valid memory policy names: sliding, slowfast.*'slowfast'"):
        reg.get("slowfsat")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("sliding", 3)


def test_config_hash_tracks_only_the_named_keys():
    a = load_config("smoke")
    b = load_config("smoke", overrides=["memory.policy=full", "model.depth=3"])
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, ["data", "diffusion"]) == config_hash(b, ["data", "diffusion"])
    assert config_hash(a, ["model"]) != config_hash(b, ["model"])
    assert config_hash(a) == config_hash(OmegaConf.create(OmegaConf.to_container(a)))


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["config", "--preset", "smoke", "model.dpth=3"]) == 2
    assert "cf: error: unknown config key 'model.dpth'" in capsys.readouterr().err
    assert main(["config", "--preset", "smoke", "--memory", "sliding", "model.depth=3"]) == 0
    out = capsys.readouterr().out
    assert "policy: sliding" in out and "depth: 3" in out


def test_window_smaller_than_a_chunk_is_refused_at_load():
    with pytest.raises(ConfigError, match="memory.window_frames=1 is smaller than model.frames_per_chunk=2"):
        load_config("smoke", overrides=["memory.window_frames=1"])
