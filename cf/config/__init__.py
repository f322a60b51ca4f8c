"""Structured configs: `load_config(preset, method, overrides)` returns a validated OmegaConf tree."""

from cf.config.load import ConfigError, available, config_hash, load_config, to_yaml, validate
from cf.config.schema import Config

__all__ = ["Config", "ConfigError", "available", "config_hash", "load_config", "to_yaml", "validate"]
